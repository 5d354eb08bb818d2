"""GRPO (Group Relative Policy Optimization; DeepSeekMath, https://arxiv.org/abs/2402.03300, and DeepSeek-R1), with
TRL 1.16's loss variants: DAPO (https://arxiv.org/abs/2503.14476, the default), Dr. GRPO
(https://arxiv.org/abs/2503.20783), BNPO, GSPO's sequence-level importance sampling (https://arxiv.org/abs/2507.18071),
CISPO (MiniMax-M1, https://arxiv.org/abs/2506.13585) and SAPO (https://arxiv.org/abs/2511.20347). Each prompt gets
num_generations completions; a completion's advantage is its reward relative to the other completions of its prompt,
so no value model is needed. The policy is trained with a clipped, importance-sampled surrogate on those advantages,
optionally with a KL penalty to a frozen reference. Rewards come from reward models and/or Python functions with
TRL's signature. With tools or an environment, a completion is a multi-turn rollout: the policy's turns, its tool
calls and their results, trained on its own tokens only. The behaviour matched is TRL 1.16's GRPOTrainer (see
docs/grpo.md): "TRL's", in this file, means TRL 1.16's; "the seed", a word of the shared plumbing after the banner, is
TRL v0.8.6's documented behaviour, the reference of the v0.8-era scripts (dpo.py, ppo.py, ...).

    # offline quickstart: the tiny world (assets/), CPU: the tiny policy learns to write positive reviews
    python grpo.py
    # a Python reward function (TRL's signature) instead of, or next to, reward models
    python grpo.py --reward_funcs assets/tiny_rewards.py:sentiment
    # tools: the tiny tool world, where the policy learns to call a lookup tool whose answer it cannot know otherwise
    python grpo.py --model_name_or_path assets/tiny-tools --dataset_name assets/data/tool_prompts \
        --environment_factory assets/tiny_tools.py:MovieRatings --reward_funcs assets/tiny_tools.py:correct \
        --max_completion_length 48 --learning_rate 2e-4
    # a real model, a reward model and TRL's defaults
    python grpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/tldr \
        --reward_model path/to/reward_model --learning_rate 1e-6 --max_completion_length 512 --bf16
    # several GPUs (the generation batch is per_device_train_batch_size x processes x steps_per_generation)
    accelerate launch --multi_gpu --num_processes 8 grpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --bf16
"""

import asyncio
import copy
import gc
import importlib.util
import inspect
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from datasets import DatasetDict, load_dataset, load_from_disk
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import ModelOutput

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (used in the wandb run name)"""
    seed: int = 42
    """seed of the experiment: data order, initialisation of new weights, sampling noise"""
    output_dir: str = "runs/grpo"
    """where the final model, metrics.jsonl, samples.jsonl, args.json and checkpoints are written"""
    overwrite_output_dir: bool = False
    """replace a previous run in output_dir (by default it is kept: a named output_dir is refused)"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project_name: str = "post-training"
    """the wandb project"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    push_to_hub: bool = False
    """push the final model and tokenizer to the Hub under the name of output_dir"""
    logging_steps: int = 1
    """print and record metrics (and samples) every this many optimizer steps (and after the last)"""

    # --- model ---
    model_name_or_path: str = str(ASSETS / "tiny-gpt2")
    """a Hub id or a local directory (default: the tiny world's pretrained GPT-2)"""
    revision: str | None = None
    """the Hub revision (branch, tag or commit) of the model"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """dtype the weights are loaded in (keep float32 and use --bf16 for mixed precision)"""
    attn_implementation: str | None = None
    """attention kernel, e.g. sdpa, eager, flash_attention_2 (default: transformers' choice)"""
    bf16: bool = False
    """bf16 mixed precision (autocast) through accelerate"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, about a third more compute"""
    chunk_size: int = 1024
    """log-probs computed this many completion positions at a time from the last hidden states, never the whole
    (tokens x vocabulary) logits (chunked_log_probs); 0: the plain path, all completion positions' logits at once"""
    disable_dropout: bool = False
    """switch dropout off in the policy and the reference (TRL's default keeps it)"""
    use_peft: bool = False
    """train LoRA adapters instead of all weights"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)"""
    lora_dropout: float = 0.05
    """dropout on the LoRA branch"""
    lora_target_modules: list[str] | None = None
    """module names that get adapters (default: all linear layers)"""

    # --- data ---
    dataset_name: str = str(ASSETS / "data" / "prompts")
    """prompts: a Hub id, a .json/.jsonl/.csv/.parquet file, a save_to_disk directory, or a directory of split files"""
    dataset_config: str | None = None
    """the dataset configuration (subset) name"""
    dataset_train_split: str = "train"
    """the split whose prompts are used (its other columns go to Python reward functions by name)"""
    query_column: str | None = None
    """the column holding the prompts (default: 'prompt', else 'query'); strings or message lists"""

    # --- optimisation ---
    learning_rate: float = 5e-4
    """peak learning rate of AdamW (the default suits the tiny world; TRL's default is 1e-6)"""
    per_device_train_batch_size: int = 32
    """completions per process per micro-batch (TRL's default is 8)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    steps_per_generation: int | None = None
    """micro-batches one generation batch serves (default: gradient_accumulation_steps)"""
    num_iterations: int = 1
    """passes over each generation batch (mu of the GRPO paper)"""
    max_steps: int = 40
    """optimizer steps to take"""
    warmup_ratio: float = 0.0
    """fraction of the steps during which the learning rate ramps up linearly from 0 (not under constant)"""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """the learning-rate schedule after warm-up"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    optim: Literal["adamw_torch_fused", "adamw_torch"] = "adamw_torch_fused"
    """AdamW kernels: fused, one pass over all parameters (transformers' default), or torch's per-tensor loop"""
    save_steps: int = 0
    """checkpoint every this many optimizer steps, where a generation batch is used up (0: only on SIGTERM / SIGINT)"""
    save_total_limit: int | None = None
    """keep only the newest this many checkpoints (None: all)"""
    resume_from_checkpoint: str | None = None
    """a checkpoint-N directory to continue from, or latest: the newest complete one in output_dir (none: start)"""

    # --- rewards ---
    reward_model: tuple[str, ...] = ()
    """reward models (paths, Hub ids, 'task:model' pipelines; default without --reward_funcs: the tiny world's)"""
    reward_funcs: tuple[str, ...] = ()
    """Python reward functions, FILE.py:NAME, with TRL's signature (None: does not apply to that completion)"""
    reward_weights: tuple[float, ...] | None = None
    """one weight per reward, models first, then functions, in the order given (default: all 1)"""

    # --- generation ---
    num_generations: int = 8
    """completions per prompt (a group); at least 2"""
    max_completion_length: int = 24
    """new tokens per completion (TRL's default is 512; the tiny world's reviews are short)"""
    temperature: float = 1.0
    """sampling temperature, also applied to the logits when log-probs are computed for training"""
    top_p: float = 1.0
    """nucleus sampling: the smallest set of tokens whose probabilities add up to top_p"""
    top_k: int = 0
    """sample among the top_k most likely tokens only (0: all)"""
    min_p: float | None = None
    """drop tokens less likely than min_p times the most likely one"""
    repetition_penalty: float = 1.0
    """penalty on tokens already in the prompt or the completion (1: none)"""
    mask_truncated_completions: bool = False
    """completions that reach max_completion_length without an EOS take no part in the loss (DAPO)"""

    # --- tools: multi-turn rollouts (conversational prompts; the tokenizer needs a response_template) ---
    tools: tuple[str, ...] = ()
    """functions the policy may call, FILE.py:NAME[,NAME...], each with type hints and a Google-style docstring"""
    environment_factory: str | None = None
    """FILE.py:CLASS: an instance per rollout, reset(**row) before it; its public methods are tools (TRL's interface)"""
    max_tool_calling_iterations: int | None = None
    """rounds of tool calls per rollout (None: until a turn calls nothing or max_completion_length is used up)"""
    tool_timeout: float | None = None
    """seconds a tool call may take before it becomes an error result (None: no limit; TRL has none)"""

    # --- GRPO ---
    beta: float = 0.0
    """KL coefficient (k3 estimator, per token, added to the loss); 0 loads no reference model"""
    epsilon: float = 0.2
    """lower clipping range of the ratio: 1 - epsilon"""
    epsilon_high: float | None = None
    """upper clipping range: 1 + epsilon_high (default: epsilon); DAPO suggests 0.28; for cispo, the cap of the ratio"""
    delta: float | None = None
    """two-sided clipping: the ratio is also capped at delta (e.g. 1 + 2 epsilon)"""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """token: one ratio per token; sequence: one per completion, of its mean log-ratio (GSPO)"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """divide the centred rewards by the std of their group, the batch, or nothing (Dr. GRPO; sum_then_normalize)"""
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    """with several rewards: sum, then normalise in the group; or normalise each in the group, then sum"""
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo"] = "dapo"
    """how the clipped surrogate is formed and aggregated (see grpo_loss)"""
    sapo_temperature_pos: float = 1.0
    """sapo: the gate's temperature for positive advantages"""
    sapo_temperature_neg: float = 1.05
    """sapo: the gate's temperature for other advantages"""
    top_entropy_quantile: float = 1.0
    """train only on the tokens whose entropy is in this top fraction of the micro-batch's (1: all)"""
    sync_ref_model: bool = False
    """every ref_model_sync_steps steps, move the reference towards the policy (TR-DPO); needs beta > 0, no LoRA"""
    ref_model_mixup_alpha: float = 0.6
    """reference <- alpha * policy + (1 - alpha) * reference at each sync"""
    ref_model_sync_steps: int = 512
    """optimizer steps between reference syncs"""


# ----------------------------------------------------------------------------------------------------------------------
# The algorithm: prompts -> rollouts (sampled turns, tool calls and their results) -> rewards -> group-relative
# advantages -> clipped surrogate loss on the sampled tokens only
# ----------------------------------------------------------------------------------------------------------------------
def format_query(prompt, tokenizer, tools: list[dict] | None = None) -> tuple[str, bool]:
    """THE place to change how a prompt becomes text: a message list is rendered with the chat template, the tool
    schemas (when the policy has tools) and the generation prompt (then the text holds its own special tokens:
    templated=True); a string is used as it is."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tools=tools or None, tokenize=False,
                                             add_generation_prompt=True), True
    return prompt, False


def import_from_file(flag: str, spec: str, kind: str = "function") -> list[tuple[str, object]]:
    """'FILE.py:NAME[,NAME...]' -> [(NAME, what FILE.py defines as NAME), ...]. Raises ValueError, one line naming the
    flag, when the spec, the file or a name is missing."""
    path, sep, names = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not names:
        raise ValueError(f"{flag} {spec!r}: expected FILE.py:NAME")
    if not Path(path).is_file():
        raise ValueError(f"{flag} {spec}: there is no file {path}")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    found = []
    for name in names.split(","):
        value = getattr(module, name, None)
        if not callable(value):
            raise ValueError(f"{flag} {spec}: {path} defines no {kind} {name}")
        found.append((name, value))
    return found


def load_python_reward(spec: str) -> tuple[str, Callable]:
    """'FILE.py:NAME' -> (NAME, the function NAME defined in FILE.py), which must take TRL's keywords prompts,
    completions, completion_ids (check_reward_signature). Raises ValueError naming what is missing."""
    if "," in spec.rpartition(":")[2]:
        raise ValueError(f"--reward_funcs {spec!r}: expected FILE.py:NAME (one function; repeat the flag's values "
                         "for more)")
    name, function = import_from_file("--reward_funcs", spec)[0]
    check_reward_signature(spec, function)
    return name, function


def check_reward_signature(spec: str, function: Callable, columns: list[str] | None = None,
                           environments: bool = False) -> None:
    """Raise ValueError (one line: what the function must accept, and what it has) unless `function` takes the call
    score_completions makes, TRL's keyword convention f(prompts=, completions=, completion_ids=, **columns), with
    `columns` the dataset's other columns (and environments= under --environment_factory): each keyword by name, or
    **kwargs. columns None (not known yet): only prompts, completions and completion_ids are checked, and a parameter
    they leave out may be a column."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # no signature to read (some builtins): its first call tells
        return
    extra = ["environments"] if environments else []
    keywords = dict.fromkeys(["prompts", "completions", "completion_ids", *extra, *(columns or [])])
    try:
        signature.bind_partial(**keywords) if columns is None else signature.bind(**keywords)
    except TypeError as error:
        name = spec.rpartition(":")[2]
        others = f" and the dataset's other columns ({', '.join(columns)})" if columns else ""
        raise ValueError(f"--reward_funcs {spec}: reward function {name} must accept the keyword arguments prompts, "
                         f"completions, completion_ids{', environments' if environments else ''}{others}, as TRL "
                         f"calls it (or take **kwargs); it has {name}{signature}: {error}") from None


def tool_schema(flag: str, spec: str, name: str, tool: Callable) -> dict:
    """The JSON schema the chat template shows the model for a tool (transformers' get_json_schema, as TRL): its name,
    docstring and typed arguments. Raises ValueError naming the tool and what it lacks (a type hint, a docstring, an
    argument's line under Args:)."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(tool)
    except Exception as error:  # TypeHintParsingException, DocstringParsingException: say which tool, and what
        raise ValueError(f"{flag} {spec}: tool {name} cannot be described to the model: {error} (a tool needs a type "
                         "hint on every argument and a Google-style docstring with an Args: line for each)") from None


def environment_tools(environment) -> dict[str, Callable]:
    """An environment's tools, as TRL finds them: the public methods of its class, except reset and get_reward."""
    return {name: getattr(environment, name) for name, _ in inspect.getmembers(type(environment), inspect.isfunction)
            if not name.startswith("_") and name not in ("reset", "get_reward")}


def load_environment_factory(spec: str) -> tuple[str, Callable, object]:
    """'FILE.py:CLASS' -> (CLASS, the factory, a probe instance). The factory is called without arguments (TRL's
    contract); the instance must have reset(**row) and its tools must be describable (tool_schema). Raises ValueError,
    one line, naming what is missing."""
    name, factory = import_from_file("--environment_factory", spec, kind="class")[0]
    try:
        probe = factory()
    except Exception as error:  # the user's constructor: one line, not a traceback
        raise ValueError(f"--environment_factory {spec}: {name}() raised {type(error).__name__}: {error} (the factory "
                         "is called without arguments)") from None
    if not callable(getattr(probe, "reset", None)):
        raise ValueError(f"--environment_factory {spec}: {name} has no reset method; an environment defines "
                         "reset(**row), called with the dataset row's columns before every rollout")
    for tool_name, tool in environment_tools(probe).items():
        tool_schema("--environment_factory", spec, tool_name, tool)
    return name, factory, probe


def load_tools(tool_specs: tuple[str, ...], environment_spec: str | None
               ) -> tuple[dict[str, Callable], list[dict], tuple[str, Callable, object] | None]:
    """--tools and --environment_factory, loaded and checked (ValueError, one line). Returns the standalone tools by
    name; the schemas the chat template shows, the standalone tools' then the environment's methods' (TRL's order;
    a method named like a standalone tool replaces it); and the environment's (CLASS, factory, probe), or None."""
    loaded = [(spec, name, tool) for spec in tool_specs for name, tool in import_from_file("--tools", spec)]
    standalone = {name: tool for _, name, tool in loaded}
    schemas = {name: tool_schema("--tools", spec, name, tool) for spec, name, tool in loaded}
    environment = load_environment_factory(environment_spec) if environment_spec else None
    if environment is not None:
        schemas.update({name: tool_schema("--environment_factory", environment_spec, name, tool)
                        for name, tool in environment_tools(environment[2]).items()})
    return standalone, list(schemas.values()), environment


def reset_environments(environments: list, rows: list[dict], prompts: list[list[dict]]) -> list[list[dict]]:
    """Reset environment i with row i's columns, reset(**row) (TRL's), before rollout i. A string it returns is an
    observation, appended to the prompt's last message (a new list: the dataset's prompt is left as it is). Returns
    the prompts the rollouts start from (a prompt without an observation is the same object). An exception in reset
    raises ValueError, one line naming where it came from."""
    started = []
    for environment, row, prompt in zip(environments, rows, prompts):
        try:
            observation = environment.reset(**row)
        except Exception as error:  # the user's environment: one line instead of its traceback
            frame = traceback.extract_tb(error.__traceback__)[-1]
            raise ValueError(f"{type(environment).__name__}.reset raised {type(error).__name__}: "
                             f"{' '.join(str(error).split())[:500]} ({Path(frame.filename).name}, line "
                             f"{frame.lineno})") from error
        if isinstance(observation, str):
            prompt = prompt[:-1] + [{**prompt[-1], "content": prompt[-1]["content"] + observation}]
        started.append(prompt)
    return started


def check_tool_template(tokenizer) -> None:
    """TRL 1.16's checks of a tokenizer before multi-turn training, as ValueError: its chat template renders a whole
    tool-calling exchange (a call's name, argument key and value, and the tool's result all appear: some templates
    drop one silently); it is prefix-preserving (rendering a tool turn only appends tokens to the conversation before
    it, which tool_suffix_ids relies on); and it has a response_template, which parse_response reads calls with."""
    if tokenizer.chat_template is None:
        raise ValueError("tools need a chat template that renders tool calls, and the tokenizer has none")
    call = {"type": "function", "function": {"name": "tool_name_a8f3", "arguments": {"arg_key_b9d4": "arg_value_d6e7"}}}
    exchange = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "tool_name_a8f3", "content": "tool_result_c4f9"}]
    try:
        rendered = tokenizer.apply_chat_template(exchange, tokenize=False)
    except Exception as error:  # jinja2's TemplateError and friends: a template that rejects the tool roles
        rendered = f"{type(error).__name__}: {error}"
    missing = [part for part in ("tool_name_a8f3", "arg_key_b9d4", "arg_value_d6e7", "tool_result_c4f9")
               if part not in rendered]
    if missing:
        raise ValueError(f"the chat template cannot render tool calls (a call and a tool result rendered without "
                         f"{', '.join(missing)}); use a tokenizer whose template supports tools")
    empty_call = [{"type": "function", "function": {"name": "dummy", "arguments": {}}}]
    before = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": empty_call}]
    after = before + [{"role": "tool", "name": "dummy", "content": "dummy"}]
    ids_before = tokenizer.apply_chat_template(before, tokenize=True, return_dict=False)
    ids_after = tokenizer.apply_chat_template(after, tokenize=True, return_dict=False, add_generation_prompt=True)
    if ids_after[: len(ids_before)] != ids_before:
        raise ValueError("the chat template is not prefix-preserving (a conversation rendered with a tool result does "
                         "not start with its rendering without it), so a tool turn cannot be appended token by token")
    if getattr(tokenizer, "response_template", None) is None:
        raise ValueError("tools need a tokenizer with a response_template (transformers' parse_response reads the "
                         "tool calls of a sampled turn with it); set tokenizer.response_template (TRL's "
                         "add_response_schema does for the templates it knows) and save the tokenizer")


MAX_UNSCORED_GENERATIONS = 3  # generation batches in a row in which no reward scores anything: the run stops


def score_completions(reward_funcs: list[tuple[str, Callable]], prompts: list, completions: list,
                      completion_ids: list[list[int]], columns: dict[str, list]) -> torch.Tensor:
    """(n, F) rewards of n completions (strings, or message lists for conversational prompts: the parsed turns and the
    tool results) under F reward functions, each called with TRL's signature f(prompts=, completions=,
    completion_ids=, **columns) (columns include environments= under --environment_factory); None becomes NaN ("does
    not apply"). A function that raises, returns the wrong number of values, or returns something that is not a number
    raises ValueError, one line naming it (and where an exception came from)."""
    scores = torch.full((len(completions), len(reward_funcs)), float("nan"))
    for f, (name, function) in enumerate(reward_funcs):
        try:
            values = function(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as error:  # the function's own error, in one line instead of its traceback
            frame = traceback.extract_tb(error.__traceback__)[-1]
            text = " ".join(str(error).split())[:500]
            raise ValueError(f"reward function {name} raised {type(error).__name__}: {text} "
                             f"({Path(frame.filename).name}, line {frame.lineno})") from error
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            found = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise ValueError(f"reward function {name} must return one value per completion ({len(completions)}), "
                             f"got {found}")
        for i, value in enumerate(values):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
                    isinstance(value, torch.Tensor) and value.numel() == 1):
                raise ValueError(f"reward function {name} returned {value!r} ({type(value).__name__}) for completion "
                                 f"{i}; expected a number or None")
            scores[i, f] = float(value)
    return scores


@torch.no_grad()
def sample_completions(model, queries: list[list[int]], max_new_tokens: int, pad_token_id: int, eos_token_id: int,
                       seed: int, **generation_kwargs) -> tuple[list[list[int]], list[bool]]:
    """One completion per query, all in ONE left-padded `generate` call with the KV cache, the sampling noise seeded by
    `seed`. Each completion is cut after its first EOS (kept). Returns the completions' token ids and whether each
    ended with EOS (False: truncated at max_new_tokens)."""
    device = next(model.parameters()).device
    rows = [torch.tensor(query) for query in queries]
    input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_token_id, padding_side="left")
    attention_mask = pad_sequence([torch.ones_like(row) for row in rows], batch_first=True, padding_side="left")
    torch.manual_seed(seed)
    generations = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                                 **generation_kwargs).cpu()[:, input_ids.shape[1] :]
    completions, ended = [], []
    for row in generations.tolist():
        end = row.index(eos_token_id) + 1 if eos_token_id in row else len(row)
        completions.append(row[:end])
        ended.append(eos_token_id in row)
    return completions, ended


def parse_turn(tokenizer, turn: list[int], context: list[int], tools: list[dict] | None) -> dict:
    """A sampled turn as a message, {"role": "assistant", "content": ..., "tool_calls": [...]}: transformers'
    tokenizer.parse_response with the tokenizer's response_template, `context` (the tokens before the turn) as its
    prefix and the tool schemas to type the arguments (TRL's parse_response). A turn it cannot parse (a malformed
    call) falls back to its plain text, so a broken call ends the rollout instead of the run."""
    try:
        message = tokenizer.parse_response(turn, prefix=context, tools=tools)
        if message is None:  # a turn cut so short that nothing is left
            raise ValueError("nothing parsed")
        for call in message.get("tool_calls") or []:  # what the template and call_tools need of every call
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ValueError(f"malformed tool call {call!r}")
            if function.get("arguments") is None:
                function["arguments"] = {}
        if isinstance(message.get("content"), str):
            message["content"] = message["content"].removesuffix(tokenizer.eos_token)
        message["content"] = message.get("content") or ""
    except (ValueError, TypeError, AttributeError):
        message = {"role": "assistant", "content": tokenizer.decode(turn, skip_special_tokens=True)}
    return message


def run_tool(tool: Callable, arguments: dict, timeout: float | None = None):
    """tool(**arguments); an async tool is run to completion. With a timeout in seconds (beyond TRL), the call runs in
    a daemon thread and raises TimeoutError when it has not returned by then: the rollout gets an error result and
    goes on. A thread cannot be stopped, so the abandoned call may still finish in the background; a tool with side
    effects should bound its own work too."""
    def call():
        result = tool(**arguments)
        return asyncio.run(result) if inspect.isawaitable(result) else result

    if timeout is None:
        return call()
    outcome = {}

    def target():
        try:
            outcome["result"] = call()
        except Exception as error:  # raised again below, in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no result after {timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def call_tools(tool_calls: list[dict], tools: dict[str, Callable], timeout: float | None = None
               ) -> tuple[list[dict], int]:
    """Run one turn's tool calls (run_tool). Returns the tool messages, {"role": "tool", "name": ..., "content":
    str(result)}, in the order of the calls, and how many failed: an unknown tool, arguments it does not take, an
    exception, a call past the timeout or a result that cannot be printed each become the result {"error": "..."}
    (TRL's), never a crash."""
    messages, failures = [], 0
    for call in tool_calls:
        name, arguments = call["function"]["name"], call["function"].get("arguments") or {}
        try:
            if call.get("type", "function") != "function":
                raise ValueError(f"Unsupported tool call type: {call.get('type')}")
            if name not in tools:
                raise ValueError(f"Tool {name} not found.")
            if not isinstance(arguments, dict):
                raise ValueError(f"Tool {name} got arguments {arguments!r}, expected a mapping")
            content = str(run_tool(tools[name], arguments, timeout))
        except Exception as error:  # the tool's own failure is the model's to see, as TRL's {"error": ...}
            failures += 1
            try:
                content = str({"error": str(error)})
            except Exception:  # an exception whose message cannot be printed
                content = str({"error": type(error).__name__})
        messages.append({"role": "tool", "name": name, "content": content})
    return messages, failures


def tool_suffix_ids(tokenizer, tool_messages: list[dict]) -> list[int]:
    """The tokens the chat template writes after an assistant turn that called tools: the tool results and the header
    of the next assistant turn (TRL's _get_tool_suffix_ids). Rendered once with a dummy conversation ending in a call
    and once with the tool messages and the generation prompt added; the difference is the suffix. The dummy's
    rendering is cut after its last EOS first: some templates write a newline after the end of a turn, which the
    sampled turn (cut at its EOS) does not hold."""
    call = [{"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}]
    dummy = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": call}]
    before = tokenizer.apply_chat_template(dummy, tokenize=True, return_dict=False)
    after = tokenizer.apply_chat_template(dummy + tool_messages, tokenize=True, return_dict=False,
                                          add_generation_prompt=True)
    if tokenizer.eos_token_id in before:
        before = before[: len(before) - before[::-1].index(tokenizer.eos_token_id)]
    if after[: len(before)] != before:
        raise ValueError("the chat template is not prefix-preserving: a conversation rendered with its tool results "
                         "does not start with its rendering without them")
    return after[len(before) :]


@dataclass
class Rollout:
    """One multi-turn completion, token-in/token-out: `completion` holds every sampled token and every token the
    template wrote for the tools, in order, exactly as the model saw them (past turns are never decoded and encoded
    again); `tool_mask` is 1 on sampled tokens (each turn's EOS included) and 0 on tool results and headers."""
    completion: list[int]
    tool_mask: list[int]
    messages: list[dict]  # the parsed turns and the tool messages (what conversational reward functions receive)
    ended: bool = False  # the last token is an EOS (False: cut by max_completion_length)
    calls: int = 0
    failures: int = 0


def roll_out(model, tokenizer, queries: list[list[int]], max_completion_length: int, seed: int,
             tools: list[dict[str, Callable]] | None = None, tool_schemas: list[dict] | None = None,
             max_tool_calling_iterations: int | None = None, max_length: int | None = None, parse: bool = False,
             tool_timeout: float | None = None, **generation_kwargs) -> list[Rollout]:
    """One rollout per query (token ids of the rendered prompt). Without tools: one sampled turn each, in one
    `generate` call. With tools (tools[i]: rollout i's functions by name), a loop over turns:
      1. sample the next turn of every open rollout, all in one left-padded `generate` call (the turn ends at EOS);
      2. parse it (parse_turn); a rollout whose turn calls no tool, or that has used max_tool_calling_iterations
         rounds, is done;
      3. run the calls (call_tools; tool_timeout seconds each) and append the tool turn's tokens (tool_suffix_ids;
         tool_mask 0);
      4. a tool turn that would overflow the budget (max_completion_length for the whole completion, tool tokens
         included) or the model's max_length is dropped: the rollout ends as it is, with its last turn's calls;
      5. go on with what is left of each budget (a turn that reaches it is cut, and ends its rollout).
    parse: turns become messages with parse_turn (conversational prompts and a response_template, as TRL), else with
    their plain text. Turn t's sampling noise is seeded by seed + 100_003 t."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    rollouts = [Rollout([], [], []) for _ in queries]
    contexts = [list(query) for query in queries]  # prompt + completion so far: what the next turn is sampled from
    waiting = list(range(len(queries)))  # the rollouts that sample a turn in this round
    for turn_index in range(sys.maxsize):
        # 1. the next turn of every waiting rollout, one generate call for all, each with what is left of its budget
        budgets = [max_completion_length - len(rollouts[i].completion) for i in waiting]
        turns, _ = sample_completions(model, [contexts[i] for i in waiting], max(budgets), pad, eos,
                                      seed=seed + 100_003 * turn_index, **generation_kwargs)
        # 2. each turn appended as sampled (mask 1) and parsed; those that call a tool, with rounds left, go on
        calling = []
        for i, turn, budget in zip(waiting, turns, budgets):
            turn = turn[:budget]  # one generate call for all: each rollout keeps only its own budget
            rollout = rollouts[i]
            if parse:
                message = parse_turn(tokenizer, turn, contexts[i], tool_schemas)
            else:
                message = {"role": "assistant", "content": tokenizer.decode(turn, skip_special_tokens=True)}
            rollout.completion += turn
            rollout.tool_mask += [1] * len(turn)
            rollout.messages.append(message)
            rollout.ended = bool(turn) and turn[-1] == eos
            contexts[i] += turn
            rounds_left = max_tool_calling_iterations is None or turn_index < max_tool_calling_iterations
            if tools is not None and message.get("tool_calls") and rounds_left:
                calling.append(i)
        # 3. the calls run; 4. their results appended as the template writes them (mask 0), unless they overflow
        waiting = []
        for i in calling:
            rollout = rollouts[i]
            results, failures = call_tools(rollout.messages[-1]["tool_calls"], tools[i], tool_timeout)
            rollout.calls += len(results)
            rollout.failures += failures
            suffix = tool_suffix_ids(tokenizer, results)
            too_long = max_length is not None and len(contexts[i]) + len(suffix) >= max_length
            if len(rollout.completion) + len(suffix) > max_completion_length or too_long:
                continue  # the results are dropped: the rollout ends with its call
            rollout.messages += results
            rollout.completion += suffix
            rollout.tool_mask += [0] * len(suffix)
            rollout.ended = False
            contexts[i] += suffix
            if len(rollout.completion) < max_completion_length:  # no budget left: it ends on the tool turn
                waiting.append(i)  # 5. another turn
        if not waiting:
            return rollouts


def collate_rollouts(queries: list[list[int]], rollouts: list[Rollout], pad_token_id: int,
                     train_mask: list[bool]) -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion sequences for the training forward: input_ids and attention_mask (B, T), and
    completion_mask (B, T-1), at each shifted position t the tool_mask of token t+1 when it is a completion token
    (1: sampled, trained on; 0: written by a tool, context only), 0 elsewhere. The mask is built from lengths and the
    tool mask, never from EOS or pad ids: a multi-turn completion holds an EOS per turn. A row whose train_mask is
    False (truncated, under mask_truncated_completions) is all 0."""
    sequences = [torch.tensor(query + rollout.completion) for query, rollout in zip(queries, rollouts)]
    input_ids = pad_sequence(sequences, batch_first=True, padding_value=pad_token_id)
    attention_mask = pad_sequence([torch.ones_like(sequence) for sequence in sequences], batch_first=True)
    completion_mask = torch.zeros(len(sequences), input_ids.shape[1] - 1)
    for i, (query, rollout) in enumerate(zip(queries, rollouts)):
        if train_mask[i]:
            start = len(query) - 1
            completion_mask[i, start : start + len(rollout.completion)] = torch.tensor(rollout.tool_mask,
                                                                                       dtype=torch.float)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


# Token log-probs without ever holding the (tokens x vocabulary) logits: the same block in sft, iterative_sft, dpo, kto,
# orpo, cpo, ppo, grpo and rloo (tests/test_chunked_log_probs.py compares them and checks it against the plain path)
@dataclass
class TokenLogProbs(ModelOutput):
    """What a forward returns inside chunked_log_probs, in place of logits: per-token float32 values (B, T-1), position
    t for label t+1, 0 where that label is not scored (-100). log_probs carries the gradient; entropy and mean_logits
    (the mean logit over the vocabulary), present when asked for, have none. hidden_states: the model's, if asked."""

    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def output_logits(project, config, hidden: torch.Tensor) -> torch.Tensor:
    """The logits a model computes from its last hidden states, (n, H) -> (n, V): project (its output layer's forward:
    bias, LoRA and all), then the scaling and soft-capping some architectures apply after it (Cohere's logit_scale,
    Granite's logits_scaling, Gemma's final_logit_softcapping; config: the model's)."""
    logits = project(hidden)
    config = config.get_text_config()
    if getattr(config, "logit_scale", None) is not None:
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None) is not None:
        logits = config.final_logit_softcapping * torch.tanh(logits / config.final_logit_softcapping)
    return logits


def label_log_probs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                    extras: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """(n, V) logits and (n,) labels -> {"log_probs": (n,) float32, and any of "entropy", "mean_logits" in extras}.
    log p(label) = logit[label] - logsumexp(logits): no log-softmax over the vocabulary is ever materialised."""
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    label_logits = logits.gather(1, labels.unsqueeze(1)).squeeze(1)  # before logsumexp: in this order the backward
    log_normalizer = torch.logsumexp(logits, dim=-1)  # sums the two (n, V) gradients in place, one buffer fewer
    values = {"log_probs": label_logits - log_normalizer}
    with torch.no_grad():  # last: a chunk's recompute in the backward stops before them (checkpoint's early stop)
        if "entropy" in extras:
            values["entropy"] = log_normalizer - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        if "mean_logits" in extras:
            values["mean_logits"] = logits.mean(-1)
    return values


def chunked_label_log_probs(project, config, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int,
                            temperature: float = 1.0, extras: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """label_log_probs of n positions from their (n, H) last hidden states (output_logits(project, config, ...)),
    chunk_size positions at a time, so that at most one chunk's (chunk_size, V) logits exist at once. With gradients
    each chunk runs under torch.utils.checkpoint: its logits are freed after the forward and recomputed, one chunk at
    a time, in the backward (the output layer's matmul once more). n <= chunk_size (or chunk_size 0): one chunk,
    nothing recomputed, the plain computation."""
    def one_chunk(hidden: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return label_log_probs(output_logits(project, config, hidden), labels, temperature, extras)

    if chunk_size == 0 or len(labels) <= chunk_size:
        return one_chunk(hidden, labels)
    parts = []
    for start in range(0, len(labels), chunk_size):
        part = (hidden[start : start + chunk_size], labels[start : start + chunk_size])
        parts.append(checkpoint(one_chunk, *part, use_reentrant=False) if torch.is_grad_enabled()
                     else one_chunk(*part))
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


@contextmanager
def chunked_log_probs(model: torch.nn.Module, labels: torch.Tensor, chunk_size: int, temperature: float = 1.0,
                      extras: tuple[str, ...] = ()):
    """Inside the block, one forward of `model` (the unwrapped model; call it through its DDP / FSDP / DeepSpeed
    wrapper as usual) returns TokenLogProbs of `labels` ((B, T), -100 where not scored) instead of (B, T, V) logits.

    The model calls its output layer once, as always, but the layer's forward is replaced: it takes the last hidden
    states at the N scored positions and returns their values, (N, 1 + len(extras)), computed chunk_size positions at
    a time (chunked_label_log_probs). So whatever wraps the layer treats them as it treats logits: FSDP and ZeRO-3
    gather its weights around that call, and again in the backward once the values' gradient arrives, when each chunk
    is recomputed. A hook at the end of the model's forward returns them as TokenLogProbs."""
    targets = labels[:, 1:] != -100  # (B, T-1): position t is scored when label t+1 is
    positions = F.pad(targets, (0, 1), value=False)  # (B, T)
    head = model.get_output_embeddings()
    patched = vars(head).get("forward")  # a forward set on the layer itself before the block: put back after it
    project = head.forward  # the layer's own forward, kept: the chunks project with it
    names, outputs = ("log_probs", *extras), []

    def values_at_scored_positions(hidden: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (N, 1 + len(extras))
        values = chunked_label_log_probs(project, model.config, hidden[positions], labels[:, 1:][targets],
                                         chunk_size, temperature, extras)
        return torch.stack([values[name] for name in names], dim=-1)

    def keep_output(module, inputs, output):  # after the wrappers' own hooks on the layer: what they returned
        outputs.append(output)

    def as_token_log_probs(module, args, output):
        zeros = torch.zeros(targets.shape, dtype=torch.float32, device=labels.device)
        values = dict(zip(names, outputs.pop().unbind(-1)))  # the extras without gradient, as label_log_probs made them
        return TokenLogProbs(**{name: zeros.masked_scatter(targets, value if name == "log_probs" else value.detach())
                                for name, value in values.items()},
                             hidden_states=getattr(output, "hidden_states", None))

    head.forward = values_at_scored_positions
    handles = [head.register_forward_hook(keep_output), model.register_forward_hook(as_token_log_probs, prepend=True)]
    try:
        yield
    finally:
        del head.forward  # the class's forward again, or the one set before the block
        if patched is not None:
            head.forward = patched
        for handle in handles:
            handle.remove()


def completion_log_probs(model, batch: dict, temperature: float, accelerator,
                         chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies (both (B, T-1), 0 off the completion mask) of the completion tokens under
    `model`, the logits divided by the sampling temperature (as TRL does); entropies have no gradient. chunk_size > 0:
    chunked_log_probs, its labels the tokens on the mask (-100 on the prompt, tool results and padding), so that no
    (tokens x vocabulary) logits are ever held whole. 0: the plain path, the model's logits at the masked positions
    only (lm_head_only_at), then label_log_probs: logit - logsumexp, no log-softmax."""
    mask = batch["completion_mask"].bool()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if chunk_size:
        labels = batch["input_ids"].masked_fill(~F.pad(mask, (1, 0), value=False), -100)  # token t+1, scored at t
        with accelerator.autocast(), chunked_log_probs(accelerator.unwrap_model(model), labels, chunk_size,
                                                       temperature, extras=("entropy",)):
            out = model(**inputs)
        return out.log_probs, out.entropy
    positions = F.pad(mask, (0, 1), value=False)  # position t scores token t + 1
    with accelerator.autocast(), lm_head_only_at(accelerator.unwrap_model(model), positions):
        logits = model(**inputs).logits  # (N, V)
    values = label_log_probs(logits, batch["input_ids"][:, 1:][mask], temperature, extras=("entropy",))
    zeros = torch.zeros(mask.shape, device=logits.device)
    return zeros.masked_scatter(mask, values["log_probs"]), zeros.masked_scatter(mask, values["entropy"])


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Standard deviation over the non-NaN entries, with Bessel's correction (n - 1), as TRL's nanstd: NaN where
    fewer than two entries are left."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    variance = variance * torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = variance.sqrt()
    if keepdim:
        return std
    return std.squeeze() if dim is None else std.squeeze(dim)


LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo")


def grpo_advantages(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, num_generations: int,
                    scale_rewards: str = "group", multi_objective_aggregation: str = "sum_then_normalize"
                    ) -> torch.Tensor:
    """Group-relative advantages, (N,), as TRL 1.16's GRPOTrainer computes them.

    rewards_per_func: (N, F) rewards of F reward functions for N completions, the num_generations completions of each
    prompt contiguous (all processes' completions: a group may span processes); NaN where a function returned None.
    reward_weights: (F,).
    sum_then_normalize (default): r = sum_f w_f r_f (NaN skipped), then A = (r - mean of the group) / (std + 1e-4),
    std taken over the group ("group"), over the whole batch ("batch"), or not dividing ("none"; Dr. GRPO).
    normalize_then_sum: each function normalised within the group, (r_f - mean_f) / (std_f + 1e-4), weighted and
    summed, then the sum normalised over the batch (scale_rewards is not used). Standard deviations use Bessel's
    correction. A completion that no function scored gets advantage 0, and is left out of its group's statistics."""
    if rewards_per_func.dim() != 2 or rewards_per_func.shape[0] % num_generations:
        raise ValueError(f"rewards_per_func must be (N, F) with N a multiple of num_generations {num_generations}, "
                         f"got shape {tuple(rewards_per_func.shape)}")
    weights = reward_weights.to(rewards_per_func).unsqueeze(0)  # (1, F)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)  # (N,)
    if multi_objective_aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[unscorable] = float("nan")
        grouped = rewards.view(-1, num_generations)  # (prompts, G)
        mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
        if scale_rewards in ("group", "none"):
            std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
        elif scale_rewards == "batch":
            std = nanstd(rewards).expand_as(rewards)
        else:
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
        advantages = rewards - mean
        if scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
    elif multi_objective_aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])  # (prompts, G, F)
        normalized = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (
            nanstd(grouped, dim=1, keepdim=True) + 1e-4)
        rewards = (normalized.view(-1, rewards_per_func.shape[1]) * weights).nansum(dim=1)
        rewards[unscorable] = float("nan")
        advantages = (rewards - torch.nanmean(rewards)) / (nanstd(rewards) + 1e-4)
    else:
        raise ValueError(f"multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum', got "
                         f"{multi_objective_aggregation!r}")
    return torch.nan_to_num(advantages, nan=0.0)


def rollout_metrics(all_rewards: torch.Tensor, reward_weights: torch.Tensor, reward_names: list[str],
                    num_generations: int, rollouts: list[tuple[int, bool, int, int]], tools: bool = False) -> dict:
    """A generation batch's metrics with TRL's names. all_rewards: (N, F) of every process's completions; rollouts:
    (sampled tokens, ended with EOS, tool calls, failed calls) of each. Lengths count sampled tokens only (tool
    results are not the policy's); with tools, tools/call_frequency is calls per rollout and tools/failure_frequency
    failed calls per call."""
    weighted = (all_rewards * reward_weights.unsqueeze(0)).nansum(dim=1)
    weighted[torch.isnan(all_rewards).all(dim=1)] = float("nan")
    grouped_std = nanstd(weighted.view(-1, num_generations), dim=1)
    lengths, ended, calls, failures = (torch.tensor(column, dtype=torch.float) for column in zip(*rollouts))
    metrics = {"reward": torch.nanmean(weighted).item(), "reward_std": nanstd(weighted).item(),
               "frac_reward_zero_std": torch.isclose(grouped_std, torch.zeros_like(grouped_std)).float().mean().item(),
               "completions/mean_length": lengths.mean().item(),
               "completions/clipped_ratio": (1 - ended).mean().item()}
    for f, name in enumerate(reward_names):
        metrics[f"rewards/{name}/mean"] = torch.nanmean(all_rewards[:, f]).item()
        metrics[f"rewards/{name}/std"] = nanstd(all_rewards[:, f]).item()
    if tools:
        metrics["tools/call_frequency"] = calls.mean().item()
        metrics["tools/failure_frequency"] = (failures.sum() / calls.sum()).item() if calls.sum() > 0 else 0.0
    return metrics


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the mask's tokens; x of shape (B, 1) (one value per sequence) is averaged over sequences."""
    if x.shape[1] == 1:
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_loss(per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor | None,
              ref_per_token_logps: torch.Tensor | None, advantages: torch.Tensor, completion_mask: torch.Tensor,
              args: Args, num_items_in_batch: torch.Tensor | float | None = None,
              entropies: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO-family loss of one micro-batch, as TRL 1.16's GRPOTrainer._compute_loss, and its metrics.

    per_token_logps, old_per_token_logps, ref_per_token_logps, completion_mask, entropies: (B, T) over the completion
    tokens (mask 1 on tokens that count); advantages: (B,). old_per_token_logps None: the samples come from the
    current policy, so the ratio is 1 with the policy gradient (per_token_logps.detach()). num_items_in_batch: what
    dapo and cispo divide the token sum by (default: this batch's completion tokens). args: the settings as the flags
    give them (Args): loss_type, epsilon, epsilon_high, delta, beta, importance_sampling_level, max_completion_length
    (dr_grpo's normaliser), top_entropy_quantile, sapo_temperature_pos, sapo_temperature_neg; a new setting is an
    Args field read here. Each variant's per-token loss and normaliser are the steps below (docs/grpo.md has them as a
    table); gradient accumulation scaling is the caller's. Returns (loss, metrics): kl (with beta), entropy (with
    entropies), clip_ratio/low_mean|high_mean|region_mean (cispo: cispo_clip_ratio; sapo: none), means over this
    batch."""
    loss_type = args.loss_type
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if args.importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got "
                         f"{args.importance_sampling_level!r}")
    mask = completion_mask.to(per_token_logps.dtype)
    epsilon_low, epsilon_high = args.epsilon, args.epsilon if args.epsilon_high is None else args.epsilon_high
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B, 1)

    # 1. Importance weights: per token (B, T), or one per sequence (B, 1), the mean log-ratio over its tokens.
    log_ratio = per_token_logps - old_per_token_logps
    if args.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)

    # 2. The per-token policy loss: the clipped surrogate (with delta, r is capped first: two-sided clipping); cispo:
    #    the capped ratio, detached, weighs the log-prob; sapo: a soft gate, tau set by the sign of the advantage.
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(ratio, max=epsilon_high).detach() * advantages * per_token_logps
    elif loss_type == "sapo":
        temperature = torch.where(advantages > 0, args.sapo_temperature_pos, args.sapo_temperature_neg)
        per_token_loss = -torch.sigmoid(temperature * (ratio - 1)) * 4 / temperature * advantages
    else:
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        capped = ratio if args.delta is None else torch.clamp(ratio, max=args.delta)
        per_token_loss = -torch.min(capped * advantages, clipped * advantages)

    # 3. Only the high-entropy tokens (the "80/20" rule of https://arxiv.org/abs/2506.01939) learn, when asked.
    if args.top_entropy_quantile < 1.0:
        if entropies is None:
            raise ValueError("top_entropy_quantile < 1 needs the per-token entropies")
        scored = entropies[completion_mask.bool()].float()
        if scored.numel() == 0:
            entropy_mask = torch.zeros_like(mask)
        else:
            threshold = torch.quantile(scored, 1 - args.top_entropy_quantile)
            entropy_mask = ((entropies * mask >= threshold) & completion_mask.bool()).to(mask.dtype)
        per_token_loss = per_token_loss * entropy_mask

    # 4. The KL penalty to the reference, k3 estimator per token (always >= 0).
    metrics = {}
    if args.beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("beta != 0 needs the reference model's per-token log-probs")
        per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        per_token_loss = per_token_loss + args.beta * per_token_kl
        metrics["kl"] = masked_mean(per_token_kl.detach(), mask)

    # 5. Aggregate: grpo, sapo: each sequence's token mean, then the mean; bnpo: the batch's token mean; dr_grpo: the
    #    token sum / (B x max_completion_length); dapo, cispo: the token sum / num_items_in_batch.
    if loss_type in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.shape[0] * args.max_completion_length)
    else:  # dapo, cispo
        normalizer = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch).to(mask)
        loss = (per_token_loss * mask).sum() / normalizer.clamp(min=1.0)

    # 6. Metrics: entropy, and how often the ratio left the trust region (where that moved the loss).
    if entropies is not None:
        metrics["entropy"] = masked_mean(entropies.detach(), mask)
    ratio = ratio.detach()
    if loss_type == "cispo":
        metrics["cispo_clip_ratio"] = masked_mean(((ratio > epsilon_high) & (advantages > 0)).float(), mask)
    elif loss_type != "sapo":
        low = (ratio < 1 - epsilon_low) & (advantages < 0)
        high = (ratio > 1 + epsilon_high) & (advantages > 0)
        metrics["clip_ratio/low_mean"] = masked_mean(low.float(), mask)
        metrics["clip_ratio/high_mean"] = masked_mean(high.float(), mask)
        metrics["clip_ratio/region_mean"] = masked_mean((low | high).float(), mask)
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------------
# One generation batch, stage by stage (generate_and_score calls them in order): this process's prompts -> sample the
# rollouts -> score them -> old and reference log-probs -> advantages -> metrics. The stages are the same text in
# grpo.py and rloo.py; generate_and_score, which calls them, is each script's own.
# ----------------------------------------------------------------------------------------------------------------------
class GenerationFailed(Exception):
    """A generation batch that cannot be used: a reward function or an environment's reset failed (on any process),
    or no reward scored anything for too long. Every process raises it together (stop_if_any); main then saves the
    last completed step and stops."""


def stop_if_any(problem: str | None) -> None:
    """Every process learns here whether any of them met a problem, before a collective would wait for it: each
    raises GenerationFailed with the first process's problem."""
    problems = [message for message in gather_object([problem]) if message is not None]
    if problems:
        raise GenerationFailed(problems[0])


@dataclass
class GenerationSetup:
    """What every generation batch is drawn from and scored with, fixed for the run (main, stage 7)."""
    tokenizer: object
    prompts: list  # the dataset's prompts by row: strings or message lists
    columns: dict[str, list]  # the dataset's other columns by row: reward functions and reset(**row) get them
    query_column: str
    queries: list[list[int]]  # the token ids of each non-empty prompt (format_query)
    rows: list[int]  # the dataset row of each query
    reward_funcs: list[tuple[str, Callable]]  # (name, function with TRL's signature): models, functions, environment
    reward_weights: torch.Tensor  # (F,)
    prompts_per_generation: int  # prompts in a generation batch, on all processes together
    per_process: int  # completions per process in a generation batch
    micro_steps_per_generation: int  # micro-batches a generation batch serves: steps_per_generation x num_iterations
    unscored_limit: int  # generation batches in a row no reward scores before the run stops
    generation_kwargs: dict  # what generate samples with
    tool_schemas: list[dict]  # what the chat template shows of the tools (empty: no tools)
    environments: list | None  # one per completion of this process, made once, reset before each rollout (TRL's pool)
    rollout_tools: list[dict[str, Callable]] | None  # rollout i's tools by name: the standalone ones, its environment's
    parse: bool  # turns become messages with the tokenizer's response_template (conversational prompts), else text
    max_length: int | None  # the policy's max_position_embeddings


def prompts_of_process(generation: int, setup: GenerationSetup, accelerator,
                       args) -> tuple[list, list[list[int]], dict[str, list]]:
    """a. This process's prompts of generation batch `generation`: a seeded permutation per epoch (the order depends on
    the generation index alone, so resuming is exact), each prompt repeated num_generations times; process p takes the
    p-th contiguous slice, so a group may span processes, as in TRL. Environments are reset with their rows, and may
    add to a prompt. Returns the prompts, their token ids and the columns the reward functions get (environments=
    included)."""
    indices = step_indices(generation, len(setup.queries), setup.prompts_per_generation, args.seed)
    everyone = [i for i in indices for _ in range(args.num_generations)]
    mine = everyone[accelerator.process_index * setup.per_process : (accelerator.process_index + 1) * setup.per_process]
    prompts, queries = [setup.prompts[setup.rows[i]] for i in mine], [setup.queries[i] for i in mine]
    columns = {name: [values[setup.rows[i]] for i in mine] for name, values in setup.columns.items()}
    if setup.environments:  # each reset with its row's columns, the prompt included
        rows = [{setup.query_column: prompt, **{name: values[j] for name, values in columns.items()}}
                for j, prompt in enumerate(prompts)]
        try:
            started, problem = reset_environments(setup.environments, rows, prompts), None
        except ValueError as error:
            started, problem = prompts, str(error)
        stop_if_any(problem)
        queries = [query if started_prompt is prompt else setup.tokenizer(format_query(  # an observation was added
            started_prompt, setup.tokenizer, setup.tool_schemas)[0], add_special_tokens=False)["input_ids"]
            for prompt, started_prompt, query in zip(prompts, started, queries)]
        prompts, columns["environments"] = started, setup.environments
    return prompts, queries, columns


def sample_rollouts(model, queries: list[list[int]], generation: int, setup: GenerationSetup, accelerator,
                    args) -> list[Rollout]:
    """b. One rollout per query (roll_out), one micro-batch of rows at a time (a generate call per turn), each seeded
    by its place in the whole batch: the samples do not depend on how many processes share the batch, and a resumed
    run draws the same ones."""
    rollouts = []
    with gathered_for_generation(accelerator, model) as policy:  # whole weights for these calls only
        policy.eval()  # for generate only: under gradient checkpointing, train mode would switch the KV cache off
        for start in range(0, setup.per_process, args.per_device_train_batch_size):
            part = slice(start, start + args.per_device_train_batch_size)
            place = accelerator.process_index * setup.per_process + start
            rollouts += roll_out(policy, setup.tokenizer, queries[part], args.max_completion_length,
                                 seed=args.seed * 1_000_003 + generation * 10_007 + place,
                                 tools=setup.rollout_tools[part] if setup.rollout_tools else None,
                                 tool_schemas=setup.tool_schemas,
                                 max_tool_calling_iterations=args.max_tool_calling_iterations,
                                 max_length=setup.max_length, parse=setup.parse, tool_timeout=args.tool_timeout,
                                 **setup.generation_kwargs)
        policy.train()
    return rollouts


def score_rollouts(rollouts: list[Rollout], prompts: list, columns: dict[str, list],
                   reward_funcs: list[tuple[str, Callable]]) -> torch.Tensor:
    """c. (n, F) rewards of this process's rollouts under every reward function (score_completions: TRL's signature,
    with the dataset's other columns; conversational prompts get message lists: the parsed turns and the tool results).
    A function that fails on any process stops them all (GenerationFailed)."""
    shown = [rollout.messages if isinstance(prompt, list) else rollout.messages[0]["content"]
             for prompt, rollout in zip(prompts, rollouts)]
    try:
        rewards_per_func = score_completions(reward_funcs, prompts, shown, [r.completion for r in rollouts], columns)
        problem = None
    except ValueError as error:
        rewards_per_func, problem = None, str(error)
    stop_if_any(problem)
    return rewards_per_func


def old_and_reference_log_probs(model, reference_model, queries: list[list[int]], rollouts: list[Rollout],
                                need_old: bool, pad_token_id: int, accelerator, args) -> list[dict[str, torch.Tensor]]:
    """d. The training tensors, one dict per micro-batch (collate_rollouts, on the device), with the (B, T-1) per-token
    log-probs of the sampling policy (old_per_token_logps, when need_old) and, when beta > 0, of the reference
    (ref_per_token_logps; with LoRA, the policy with its adapters off), both without gradient. The completion mask is
    0 on tool tokens (context, never trained on: in the loss, the KL and every aggregate) and, under
    mask_truncated_completions, on every completion without an EOS."""
    train_mask = [rollout.ended or not args.mask_truncated_completions for rollout in rollouts]
    micro_batches = []
    for start in range(0, len(rollouts), args.per_device_train_batch_size):
        part = slice(start, start + args.per_device_train_batch_size)
        batch = collate_rollouts(queries[part], rollouts[part], pad_token_id, train_mask[part])
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        with torch.no_grad():
            if need_old:
                batch["old_per_token_logps"] = completion_log_probs(model, batch, args.temperature, accelerator,
                                                                    args.chunk_size)[0]
            if args.beta != 0.0:
                if reference_model is not None:
                    batch["ref_per_token_logps"] = completion_log_probs(reference_model, batch, args.temperature,
                                                                        accelerator, args.chunk_size)[0]
                else:
                    with accelerator.unwrap_model(model).disable_adapter():
                        batch["ref_per_token_logps"] = completion_log_probs(model, batch, args.temperature,
                                                                            accelerator, args.chunk_size)[0]
        micro_batches.append(batch)
    return micro_batches


def share_advantages(advantages: torch.Tensor, micro_batches: list[dict], accelerator, args) -> torch.Tensor:
    """e. This process's slice of the generation batch's advantages (N,), each micro-batch's part put in it as
    "advantages" (B,); returns the slice."""
    per_process = len(micro_batches) * args.per_device_train_batch_size
    mine = advantages[accelerator.process_index * per_process : (accelerator.process_index + 1) * per_process]
    for start, batch in zip(range(0, len(mine), args.per_device_train_batch_size), micro_batches):
        batch["advantages"] = mine[start : start + args.per_device_train_batch_size].to(accelerator.device)
    return mine


def metrics_and_samples(all_rewards: torch.Tensor, rewards_per_func: torch.Tensor, advantages: torch.Tensor,
                        rollouts: list[Rollout], prompts: list, setup: GenerationSetup, args
                        ) -> tuple[dict, list[dict]]:
    """f. The batch's metrics with TRL's names, over every process's completions (rollout_metrics), and its samples
    for samples.jsonl: prompt, completion, each reward (None where it did not apply) and the advantage."""
    reward_names, use_tools = [name for name, _ in setup.reward_funcs], bool(setup.tool_schemas)
    metrics = rollout_metrics(all_rewards, setup.reward_weights, reward_names, args.num_generations,
                              gather_object([(sum(r.tool_mask), r.ended, r.calls, r.failures) for r in rollouts]),
                              tools=use_tools)
    texts = [setup.tokenizer.decode(r.completion, skip_special_tokens=not use_tools) for r in rollouts]
    samples = gather_object([{"prompt": prompts[i], "completion": texts[i],
                              **{f"reward/{name}": (None if math.isnan(v) else v)
                                 for name, v in zip(reward_names, rewards_per_func[i].tolist())},
                              "advantage": advantages[i].item()} for i in range(len(rollouts))])
    return metrics, samples


def count_unscored(all_rewards: torch.Tensor, unscored_generations: int, generation: int, setup: GenerationSetup,
                   accelerator) -> int:
    """The generation batches in a row that no reward scored, this one included: a warning for such a batch (its
    advantages are all 0: only a KL term in the loss moves it), GenerationFailed at the setup's unscored_limit
    (MAX_UNSCORED_GENERATIONS in a row, or the whole run when it is shorter)."""
    if not torch.isnan(all_rewards).all():
        return 0
    limit = setup.unscored_limit
    if unscored_generations + 1 >= limit:
        batches = (f"{limit} generation batches in a row" if limit == MAX_UNSCORED_GENERATIONS
                   else f"any of the run's {limit} generation batches")
        raise GenerationFailed(f"no reward function scored any completion (every value None or NaN) in {batches}")
    accelerator.print(f"warning: generation {generation}: no reward function scored any completion; the batch brings "
                      f"no policy update ({unscored_generations + 1} in a row; the run stops at {limit})")
    return unscored_generations + 1


def generate_and_score(generation: int, setup: GenerationSetup, model, reference_model, accelerator, args,
                       unscored_generations: int) -> tuple[list[dict], dict, list[dict], int]:
    """One generation batch, stages a-f: this process's micro-batches (steps_per_generation of them: input_ids,
    attention_mask, completion_mask, advantages, num_items_in_batch, and the old and reference log-probs where they
    are used), the batch's metrics with TRL's names, its samples for samples.jsonl, and the generation batches in a
    row no reward scored (count_unscored). A batch that cannot be used raises GenerationFailed on every process."""
    # a. The prompts of this process (environments reset with their rows); b. their rollouts; c. their rewards.
    prompts, queries, columns = prompts_of_process(generation, setup, accelerator, args)
    rollouts = sample_rollouts(model, queries, generation, setup, accelerator, args)
    rewards_per_func = score_rollouts(rollouts, prompts, columns, setup.reward_funcs)

    # d. Training tensors; the reference's log-probs when beta > 0; and the old ones when the policy moves before the
    #    batch is used up: when gradient_accumulation_steps is not a multiple of steps_per_generation x num_iterations
    #    (TRL's rule). Otherwise the samples come from the current policy. dapo and cispo divide by the generation
    #    batch's completion tokens (num_items_in_batch, all processes').
    need_old = args.gradient_accumulation_steps % setup.micro_steps_per_generation != 0
    micro_batches = old_and_reference_log_probs(model, reference_model, queries, rollouts, need_old,
                                                setup.tokenizer.pad_token_id, accelerator, args)
    completion_tokens = sum(float(batch["completion_mask"].sum()) for batch in micro_batches)
    num_items = accelerator.reduce(torch.tensor(completion_tokens, device=accelerator.device), "sum")
    for batch in micro_batches:
        batch["num_items_in_batch"] = num_items

    # e. Advantages over every process's completions: a group may span processes, and its statistics need all of its
    #    completions.
    all_rewards = accelerator.gather(rewards_per_func.to(accelerator.device)).cpu()  # (generation batch, F)
    advantages = grpo_advantages(all_rewards, setup.reward_weights, args.num_generations, args.scale_rewards,
                                 args.multi_objective_aggregation)
    my_advantages = share_advantages(advantages, micro_batches, accelerator, args)

    # f. Metrics and samples of the batch, over every process's completions; a batch no reward scored is counted.
    metrics, samples = metrics_and_samples(all_rewards, rewards_per_func, my_advantages, rollouts, prompts, setup, args)
    return micro_batches, metrics, samples, count_unscored(all_rewards, unscored_generations, generation, setup,
                                                           accelerator)


# ----------------------------------------------------------------------------------------------------------------------
# The run's setup, main's stages 0-7: the flags, tools and rewards checked before anything loads, TRL's schedule, the
# prompts, the reward functions. The same text in grpo.py and rloo.py (check_args aside).
# ----------------------------------------------------------------------------------------------------------------------
def load_reward_specs(args, environment: tuple[str, Callable, object] | None
                      ) -> tuple[list[str], list[tuple[str, Callable]], bool, torch.Tensor]:
    """The rewards, checked before anything loads (ValueError, one line): the reward model specs (default, when there
    is no other reward: the tiny world's reward model), the Python reward functions by name, whether the environment
    has a get_reward (one more reward, weight 1, named after its class: TRL's), and one weight per reward, (F,)."""
    reward_models = list(args.reward_model)
    environment_reward = environment is not None and callable(getattr(environment[2], "get_reward", None))
    if not (reward_models or args.reward_funcs or environment_reward):
        reward_models = [str(ASSETS / "tiny-reward")]  # the tiny world's reward model, the default reward
    for spec in reward_models:
        parse_reward_spec(spec)
    python_rewards = [load_python_reward(spec) for spec in args.reward_funcs]
    num_rewards = len(reward_models) + len(python_rewards)
    if args.reward_weights is not None and len(args.reward_weights) != num_rewards:
        raise ValueError(f"--reward_weights has {len(args.reward_weights)} values but there are {num_rewards} rewards "
                         f"({len(reward_models)} models, {len(python_rewards)} functions)")
    weights = torch.tensor((args.reward_weights or [1.0] * num_rewards) + [1.0] * environment_reward)
    return reward_models, python_rewards, environment_reward, weights


def generation_schedule(args, world_size: int) -> tuple[int, int, int, int]:
    """TRL's schedule, derived in this one place: a generation batch of generation_batch_size completions
    (per_device_train_batch_size x processes x steps_per_generation; prompts_per_generation prompts x num_generations)
    serves steps_per_generation micro-batches, num_iterations times over (micro_steps_per_generation); checkpoints
    fall only where one is used up. Returns (steps_per_generation, generation_batch_size, prompts_per_generation,
    micro_steps_per_generation); sizes that do not divide fail with one line."""
    steps_per_generation = args.steps_per_generation or args.gradient_accumulation_steps
    generation_batch_size = args.per_device_train_batch_size * world_size * steps_per_generation
    if generation_batch_size % args.num_generations:
        fail(f"the generation batch (per_device_train_batch_size {args.per_device_train_batch_size} x "
             f"{world_size} processes x steps_per_generation {steps_per_generation} = {generation_batch_size} "
             f"completions) must be a multiple of --num_generations {args.num_generations}")
    micro_steps_per_generation = steps_per_generation * args.num_iterations
    if args.save_steps < 0 or args.save_steps * args.gradient_accumulation_steps % micro_steps_per_generation:
        fail(f"--save_steps {args.save_steps} must be a multiple of the optimizer steps one generation batch serves "
             f"(steps_per_generation x num_iterations / gradient_accumulation_steps = {micro_steps_per_generation} / "
             f"{args.gradient_accumulation_steps}), so that a checkpoint never falls inside one")
    return (steps_per_generation, generation_batch_size, generation_batch_size // args.num_generations,
            micro_steps_per_generation)


def load_prompt_data(args, python_rewards: list[tuple[str, Callable]], environment, use_tools: bool
                     ) -> tuple[list, dict[str, list], str]:
    """The prompts, loaded and checked before any model is (load_prompts): the prompts by row, the dataset's other
    columns by row (Python lists, once: reading a datasets Column item by item is slow), which go to the reward
    functions, and the prompt column's name. The Python reward functions are checked against the call they will get,
    which passes these columns too (as TRL's); tools need conversational prompts. Fails with one line."""
    prompt_split, query_column = load_prompts(args.dataset_name, args.dataset_config, args.dataset_train_split,
                                              args.query_column)
    columns = prompt_split.to_dict()
    prompts = columns.pop(query_column)
    try:
        for spec, (_, function) in zip(args.reward_funcs, python_rewards):
            check_reward_signature(spec, function, list(columns), environments=environment is not None)
    except ValueError as error:
        fail(str(error))
    if use_tools and not isinstance(prompts[0], list):
        fail(f"tools need conversational prompts (message lists, rendered with the chat template and the tool "
             f"schemas); column '{query_column}' holds {type(prompts[0]).__name__}s")
    return prompts, columns, query_column


def tokenize_prompts(prompts: list, tokenizer, tool_schemas: list[dict], query_column: str, args
                     ) -> tuple[list[list[int]], list[int]]:
    """The prompts' token ids (format_query: rendered with the chat template and the tool schemas when there are
    tools), empty ones skipped, and the dataset row each comes from. Conversational prompts need a chat template;
    tools need one that renders calls, prefix-preserving, and a tokenizer that parses them (TRL's checks). Fails with
    one line."""
    if isinstance(prompts[0], list) and tokenizer.chat_template is None:
        fail(f"the prompts are conversations but the tokenizer of {args.model_name_or_path} has no chat template")
    if tool_schemas:
        try:
            check_tool_template(tokenizer)
        except ValueError as error:
            fail(f"--tools / --environment_factory with the tokenizer of {args.model_name_or_path}: {error}")
    queries, rows = [], []
    for row, prompt in enumerate(prompts):
        if not isinstance(prompt, (str, list)):
            fail(f"prompts must be strings or message lists; column '{query_column}' holds {type(prompt).__name__}")
        text, templated = format_query(prompt, tokenizer, tool_schemas)
        ids = list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
        if ids:
            queries.append(ids)
            rows.append(row)
    return queries, rows


def load_reward_funcs(reward_models: list[str], python_rewards: list[tuple[str, Callable]],
                      environment: tuple[str, Callable, object] | None, environment_reward: bool, device
                      ) -> list[tuple[str, Callable]]:
    """The rewards, all as (name, function with TRL's signature): models (and pipelines) first, scoring the last
    assistant turn's text, then the Python functions, then the environment's get_reward (named after its class). A
    model that cannot be loaded fails with one line."""
    reward_funcs = []
    try:
        for spec in reward_models:
            score = load_reward_function(spec, device)
            reward_funcs.append((Path(spec).name or spec, lambda prompts, completions, score=score, **_: score(
                prompts, [c if isinstance(c, str) else [m for m in c if m["role"] == "assistant"][-1]["content"]
                          for c in completions])))
    except (OSError, ValueError) as error:
        fail(f"could not load reward model {spec}: {' '.join(str(error).split())[:500]}")
    reward_funcs += python_rewards
    if environment_reward:
        reward_funcs.append((environment[0], lambda environments, **_: [e.get_reward() for e in environments]))
    return reward_funcs


def rollout_environments(environment: tuple[str, Callable, object] | None, standalone_tools: dict[str, Callable],
                         use_tools: bool, per_process: int) -> tuple[list | None, list[dict[str, Callable]] | None]:
    """The environments, one per completion of this process, made once and reset before every rollout (TRL's pool;
    the probe instance is the first), and each rollout's tools by name: the standalone ones and its environment's
    methods (None without tools)."""
    environments = [environment[2]] + [environment[1]() for _ in range(per_process - 1)] if environment else None
    if not use_tools:
        return environments, None
    return environments, ([{**standalone_tools, **environment_tools(env)} for env in environments] if environments
                          else [standalone_tools] * per_process)


def write_samples(output_dir: Path, step: int, samples: list[dict], track: bool) -> None:
    """A generation batch's samples: appended to samples.jsonl, and a wandb table under --track (main process)."""
    with open(output_dir / "samples.jsonl", "a") as f:
        f.writelines(json.dumps({"step": step, **sample}) + "\n" for sample in samples)
    if track:
        import wandb

        wandb.log({"completions": wandb.Table(columns=list(samples[0]), rows=[list(s.values()) for s in samples])},
                  step=step)


def check_args(args: Args) -> None:
    """What the flags alone can tell, before anything is loaded: one line (fail) for the first that is wrong."""
    check_positive(args, ["num_generations", "max_completion_length", "per_device_train_batch_size",
                          "gradient_accumulation_steps", "num_iterations", "max_steps", "logging_steps",
                          "ref_model_sync_steps"])
    if args.num_generations < 2:
        fail(f"--num_generations must be at least 2 (an advantage compares a completion with the others of its "
             f"prompt), got {args.num_generations}")
    if args.temperature <= 0:
        fail(f"--temperature must be positive, got {args.temperature}")
    if args.chunk_size < 0:
        fail(f"--chunk_size must be >= 0 (0: the plain path), got {args.chunk_size}")
    if not 0 < args.top_entropy_quantile <= 1:
        fail(f"--top_entropy_quantile must be in (0, 1], got {args.top_entropy_quantile}")
    if args.sync_ref_model and args.beta == 0.0:
        fail("--sync_ref_model needs a reference model, and --beta 0 loads none; set --beta > 0")
    if args.sync_ref_model and args.use_peft:
        fail("--sync_ref_model moves a separate reference model, and --use_peft has none (the policy with its "
             "adapters off is the reference); drop one of the two")
    if args.max_tool_calling_iterations is not None and args.max_tool_calling_iterations < 0:
        fail(f"--max_tool_calling_iterations must be None or >= 0, got {args.max_tool_calling_iterations}")
    if args.tool_timeout is not None and not args.tool_timeout > 0:
        fail(f"--tool_timeout must be None or a positive number of seconds, got {args.tool_timeout}")
    check_run(args, ["model_name_or_path"])  # learning rate, model path, output_dir, --resume_from_checkpoint latest


def main(args: Args) -> None:
    # 0. Check what can be checked before anything is loaded: the flags, the rewards (files, functions, signatures),
    #    the tools and the environment (files, classes, reset, schemas).
    check_args(args)
    try:
        standalone_tools, tool_schemas, environment = load_tools(args.tools, args.environment_factory)
        reward_models, python_rewards, environment_reward, reward_weights = load_reward_specs(args, environment)
    except ValueError as error:
        fail(str(error))
    use_tools = bool(tool_schemas)

    # 1. Accelerator (checks how the run was launched; seeds every RNG), and TRL's schedule: a generation batch serves
    #    steps_per_generation micro-batches, num_iterations times over; checkpoints fall only where one is used up.
    accelerator = make_accelerator(args, zero3_refusal="its reward model would be loaded partitioned and used "
                                                       "outside an engine")
    world_size = accelerator.num_processes
    accelerator.print(f"run: {world_size} process(es) x {args.per_device_train_batch_size} per device x "
                      f"{args.gradient_accumulation_steps} accumulation = "
                      f"{world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps} "
                      "completions per optimizer step")
    steps_per_generation, generation_batch_size, prompts_per_generation, micro_steps_per_generation = \
        generation_schedule(args, world_size)
    output_dir = Path(args.output_dir)

    # 2. Data: the prompts, loaded and checked before any model is; every other column goes to the reward functions.
    prompts, other_columns, query_column = load_prompt_data(args, python_rewards, environment, use_tools)

    # 3. Tokenizer and tokenised prompts (empty ones skipped; rendered with the tool schemas when there are tools).
    #    Without a pad token, EOS pads (padding is masked).
    tokenizer = load_tokenizer(args, "to end completions")
    queries, rows = tokenize_prompts(prompts, tokenizer, tool_schemas, query_column, args)
    if len(queries) < prompts_per_generation:
        fail(f"the dataset has {len(queries)} non-empty prompts but one generation batch needs "
             f"{prompts_per_generation} ({generation_batch_size} completions / num_generations {args.num_generations})")

    # 4. Policy (LoRA, gradient checkpointing), and the reference when beta > 0: a frozen copy of the initial policy
    #    (also when resuming), or with LoRA the policy with its adapters off (no second copy).
    model = load_trainable_model(args, AutoModelForCausalLM, "CAUSAL_LM")
    reference_model = None
    if args.beta != 0.0 and not args.use_peft:
        reference_model = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path, revision=args.revision, attn_implementation=args.attn_implementation,
            dtype=args.dtype if args.dtype == "auto" else getattr(torch, args.dtype))
    for module in (model, reference_model) if args.disable_dropout else ():
        if module is not None:
            disable_dropout_in_model(module)

    # 5. Optimizer, schedule and resumed state (the schedule is stepped once per optimizer step), then the reference,
    #    sharded like the policy under FSDP (ZeRO-3 is refused at launch; under ZeRO-2 it is replicated).
    model, optimizer, scheduler, state = prepare_training(args, accelerator, model.to(accelerator.device),
                                                          args.max_steps)
    start_step = state["step"]
    if reference_model is not None:
        reference_model = prepare_frozen(accelerator, reference_model)
    num_params = sum(p.numel() for p in model.parameters())
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"model: {num_params / 1e6:.2f}M parameters, {num_trainable / 1e6:.2f}M trainable; "
                      f"{len(queries)} prompts; {args.max_steps} steps; a generation batch of {prompts_per_generation} "
                      f"prompts x {args.num_generations} completions serves {micro_steps_per_generation} micro-batches")

    # 6. The rewards, all as functions with TRL's signature: models (and pipelines) first, scoring the last assistant
    #    turn's text, then Python functions, then the environment's get_reward (named after its class).
    reward_funcs = load_reward_funcs(reward_models, python_rewards, environment, environment_reward, accelerator.device)

    # 7. Logs: metrics.jsonl and samples.jsonl always, wandb with --track; then what every generation batch is drawn
    #    from: the environments, one per completion of this process, made once and reset before every rollout (TRL's
    #    pool), each rollout's tools (the standalone ones and its environment's methods). A batch that cannot be used
    #    (a reward function or an environment's reset failed, on any process; or no reward scored anything in
    #    MAX_UNSCORED_GENERATIONS batches in a row, or in the whole run when it is shorter) stops every process.
    log = open_logs(args, accelerator, start_step, files=("metrics.jsonl", "samples.jsonl"))
    unscored_generations = state.get("unscored_generations", 0)  # the latest batches no reward scored, in a row
    per_process = args.per_device_train_batch_size * steps_per_generation  # completions per process per generation
    environments, rollout_tools = rollout_environments(environment, standalone_tools, use_tools, per_process)
    setup = GenerationSetup(
        tokenizer, prompts, other_columns, query_column, queries, rows, reward_funcs, reward_weights,
        prompts_per_generation, per_process, micro_steps_per_generation,
        unscored_limit=min(MAX_UNSCORED_GENERATIONS,
                           math.ceil(args.max_steps * args.gradient_accumulation_steps / micro_steps_per_generation)),
        generation_kwargs={"do_sample": True, "temperature": args.temperature, "top_p": args.top_p,
                           "top_k": args.top_k, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty},
        tool_schemas=tool_schemas, environments=environments, rollout_tools=rollout_tools,
        parse=isinstance(prompts[0], list) and getattr(tokenizer, "response_template", None) is not None,
        max_length=getattr(accelerator.unwrap_model(model).config, "max_position_embeddings", None))

    def stop_at_generation(generation: int, problem: str) -> NoReturn:
        """Every process together: a checkpoint of the last completed step, which is the state this generation batch
        started from (when the batch starts a step: where every checkpoint falls), then one line, exit status 1."""
        micro_step = generation * micro_steps_per_generation
        completed = micro_step // args.gradient_accumulation_steps
        if completed > 0 and micro_step % args.gradient_accumulation_steps == 0:
            checkpoint = output_dir / f"checkpoint-{completed}"
            save_checkpoint(checkpoint, accelerator, model, tokenizer, optimizer, scheduler,
                            {"step": completed, "unscored_generations": unscored_generations}, args.save_total_limit)
            kept = f"saved {checkpoint}, the last completed step (once fixed, --resume_from_checkpoint latest)"
        elif completed > 0:
            checkpoints = complete_checkpoints(output_dir)
            kept = f"the last checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
        else:
            kept = "nothing was saved (no step was completed)"
        fail(f"at step {completed + 1}: {problem}; {kept}", once=True)

    # 8. Training loop. One optimizer step = gradient_accumulation_steps micro-batches; a generation batch serves
    #    steps_per_generation micro-batches, num_iterations times over (TRL's schedule).
    model.train()
    micro_batches, generation_metrics, samples, generation_seconds = [], {}, [], 0.0
    running, running_steps, train_seconds, running_completions = {}, 0, 0.0, 0
    progress = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps, desc="grpo",
                    disable=not accelerator.is_local_main_process)
    preemption = Preemption()  # from here on, SIGTERM / SIGINT end the run with a checkpoint
    for step in progress:
        step_start = time.time()
        step_metrics, step_loss = [], torch.zeros((), device=accelerator.device)
        for j in range(args.gradient_accumulation_steps):
            micro_step = step * args.gradient_accumulation_steps + j
            # 8a. A new generation batch when the last one is used up (also on resume: the samples are seeded).
            if micro_step % micro_steps_per_generation == 0 or not micro_batches:
                generation, generation_start = micro_step // micro_steps_per_generation, time.time()
                try:
                    micro_batches, generation_metrics, samples, unscored_generations = generate_and_score(
                        generation, setup, model, reference_model, accelerator, args, unscored_generations)
                except GenerationFailed as error:
                    stop_at_generation(generation, str(error))
                generation_seconds = time.time() - generation_start
                running_completions += generation_batch_size
            batch = micro_batches[micro_step % steps_per_generation]

            # 8b. Loss and backward. dapo / cispo divide by the generation batch's completion tokens, rescaled to one
            #     process's share of one optimizer step (TRL's normalizer); the others are means over this
            #     micro-batch, divided by the accumulation steps. DDP averages the gradients over processes.
            with accumulating(accelerator, model, last=j == args.gradient_accumulation_steps - 1):
                per_token_logps, entropies = completion_log_probs(model, batch, args.temperature, accelerator,
                                                                  args.chunk_size)
                normalizer = (batch["num_items_in_batch"] / accelerator.num_processes
                              * args.gradient_accumulation_steps / steps_per_generation)
                loss, metrics = grpo_loss(per_token_logps, batch.get("old_per_token_logps"),
                                          batch.get("ref_per_token_logps"), batch["advantages"],
                                          batch["completion_mask"], args, normalizer, entropies)
                if args.loss_type not in ("dapo", "cispo"):
                    loss = loss / args.gradient_accumulation_steps
                accelerator.backward(loss)
            step_loss += loss.detach()
            step_metrics.append(metrics)

        # 8c. Clip (max_grad_norm 0: only measure the norm); stop before a non-finite update; step; and
        #     (sync_ref_model) move the reference towards the policy.
        step_loss = accelerator.reduce(step_loss, "mean")
        grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf")))
        stop_if_not_finite(step_loss, grad_norm, step, output_dir)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if args.sync_ref_model and reference_model is not None and done % args.ref_model_sync_steps == 0:
            with torch.no_grad():
                for reference_param, param in zip(reference_model.parameters(),
                                                  accelerator.unwrap_model(model).parameters()):
                    reference_param.mul_(1.0 - args.ref_model_mixup_alpha).add_(param, alpha=args.ref_model_mixup_alpha)

        # 8d. Log (the loss metrics averaged over the window's micro-batches and the processes), checkpoint.
        train_seconds += time.time() - step_start
        running_steps += 1
        for metrics in step_metrics:
            for key, value in metrics.items():
                running[key] = running.get(key, 0.0) + float(value) / len(step_metrics)
        running["loss"] = running.get("loss", 0.0) + step_loss.item()
        if done % args.logging_steps == 0 or done == args.max_steps:
            averaged = accelerator.reduce(torch.tensor([running[key] / running_steps for key in sorted(running)],
                                                       device=accelerator.device), "mean").tolist()
            log({"step": done, **dict(zip(sorted(running), averaged)), **generation_metrics,
                 "grad_norm": float(grad_norm), "learning_rate": scheduler.get_last_lr()[0],
                 "samples_per_second": running_completions / train_seconds, "time/generate": generation_seconds,
                 "peak_memory_mb": peak_memory_mb()})
            progress.set_postfix(reward=f"{generation_metrics['reward']:.3f}")
            if accelerator.is_main_process:
                write_samples(output_dir, done, samples, args.track)
            running, running_steps, train_seconds, running_completions = {}, 0, 0.0, 0
        signum = preemption.requested(accelerator)  # the same answer on every process
        # checkpoints only where a generation batch is used up (a resume generates anew): at every step when
        # steps_per_generation = gradient_accumulation_steps and num_iterations = 1 (the defaults)
        used_up = done * args.gradient_accumulation_steps % micro_steps_per_generation == 0
        if done < args.max_steps and used_up and (signum or args.save_steps > 0 and done % args.save_steps == 0):
            save_checkpoint(output_dir / f"checkpoint-{done}", accelerator, model, tokenizer, optimizer, scheduler,
                            {"step": done, "unscored_generations": unscored_generations}, args.save_total_limit)
            if signum:
                preemption.stop(accelerator, signum, output_dir / f"checkpoint-{done}")

    # 9. Save: plain save_pretrained weights that AutoModelForCausalLM loads (LoRA: merged, and the adapter alone).
    save_final_model(args, accelerator, model, tokenizer, AutoModelForCausalLM)
    del model  # the DDP-wrapped policy goes before its process group does
    gc.collect()
    accelerator.end_training()  # an orderly end of the process group: a peer torn down mid-exit can abort the other


# ======================================================================================================================
# The plumbing: launch checks, runs and checkpoints, data and model loading, sharded saving, logging. Nothing below is
# specific to one algorithm; each function is byte-identical in every script that has it (tests/test_layout.py).
# ======================================================================================================================
def fail(message: str, once: bool = False) -> NoReturn:
    """Stop with one line, `<script>: error: <message>`, exit status 1. once: every process meets the same error, so
    only the first one prints it; the others wait for it to exit (the launcher then stops them), because a launcher
    that sees any process fail kills the rest, and the first one could be killed before it printed."""
    if once and int(os.environ.get("RANK", "0")) > 0:
        time.sleep(60)
        sys.exit(1)
    sys.exit(f"{Path(__file__).name}: error: {message}")


def make_accelerator(args, zero3_refusal: str | None = None) -> Accelerator:
    """The Accelerator, every RNG seeded. FSDP / DeepSpeed asked for without a GPU (or not installed) is one line, not a
    silent fall-back to data parallelism; several processes without a GPU become one gloo group on CPU."""
    requested = [name for variable, name in [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")]
                 if os.environ.get(variable, "false").lower() == "true"]
    if requested and not torch.cuda.is_available():
        fail(f"{requested[0]} was requested (accelerate config or --use_fsdp / --use_deepspeed) but this machine has "
             "no GPU, and FSDP and DeepSpeed shard over GPUs; for several CPU processes (gloo data parallelism) use "
             "`accelerate launch --multi_gpu --num_processes N`", once=True)
    if requested == ["DeepSpeed"] and importlib.util.find_spec("deepspeed") is None:
        fail("DeepSpeed was requested (accelerate config or --use_deepspeed) but it is not installed: "
             "`pip install deepspeed` (an optional dependency of these scripts)", once=True)
    if zero3_refusal and requested == ["DeepSpeed"] and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        fail(f"{Path(__file__).name} does not run under DeepSpeed ZeRO-3 ({zero3_refusal}); use "
             "accelerate_configs/fsdp.yaml, or deepspeed_zero2.yaml", once=True)
    multi_process_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(cpu=multi_process_cpu, mixed_precision="bf16" if args.bf16 else None)
    set_seed(args.seed)
    return accelerator


def check_run(args, model_fields: list[str]) -> None:
    """Before anything loads: the learning rate, local model paths and --output_dir are checked (one line each).
    `--resume_from_checkpoint latest` becomes the newest complete checkpoint in output_dir (none: a fresh start; a
    finished run: nothing to do, exit 0). A fresh run never writes over a previous one: a named output_dir holding
    one is refused (unless --resume_from_checkpoint latest found nothing to resume there: then it is kept beside it,
    as the default output_dir's always is, by open_logs); --overwrite_output_dir replaces it."""
    def say(line: str) -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(line)
    for name in ["learning_rate", "train_learning_rate"]:
        if hasattr(args, name) and not getattr(args, name) > 0:
            fail(f"--{name} must be positive, got {getattr(args, name)}", once=True)
    for name in model_fields:
        path = getattr(args, name)
        if path and not Path(path).expanduser().exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
            fail(f"--{name} {path} does not exist: expected a model directory or a Hub id", once=True)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        fail(f"--output_dir {output_dir} is a file; expected a directory (or a path that does not exist yet)",
             once=True)
    latest = args.resume_from_checkpoint == "latest"
    if latest:
        if (output_dir / "config.json").exists():  # written by the final save only
            say(f"{output_dir} holds a finished run: nothing to resume")
            sys.exit(0)
        checkpoints = complete_checkpoints(output_dir)
        args.resume_from_checkpoint = str(checkpoints[-1]) if checkpoints else None
        say(f"resuming from the latest checkpoint, {checkpoints[-1]}" if checkpoints else
            f"no complete checkpoint in {output_dir}: starting fresh")
    elif args.resume_from_checkpoint and not (Path(args.resume_from_checkpoint) / "training_state.pt").exists():
        fail(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a checkpoint directory of this script "
             "(no training_state.pt in it)", once=True)
    held = sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []
    named = args.output_dir != type(args).__dataclass_fields__["output_dir"].default
    if held and named and not (latest or args.resume_from_checkpoint or args.overwrite_output_dir):
        fail(f"--output_dir {output_dir} holds a previous run ({', '.join(held[:4])}{', ...' * (len(held) > 4)}); "
             "pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, or another "
             "--output_dir", once=True)


def check_positive(args, names: list[str]) -> None:
    """The flags that count something (sizes, steps, lengths) must be positive integers: one line for the first that
    is not, before anything loads."""
    for name in names:
        if getattr(args, name) <= 0:
            fail(f"--{name} must be a positive integer, got {getattr(args, name)}")


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoint-N directories of output_dir, oldest first: whole, since save_checkpoint renames a checkpoint
    into place only once every file is written."""
    found = [path for path in Path(output_dir).glob("checkpoint-*")
             if path.name.split("-")[-1].isdigit() and (path / "training_state.pt").exists()]
    return sorted(found, key=lambda path: int(path.name.split("-")[-1]))


class Preemption:
    """SIGTERM (what Slurm and Kubernetes send before a kill) and SIGINT set a flag instead of killing: the loop ends
    the step in progress, asks requested() (all-reduced: every process stops at the same step), saves and calls
    stop(). Signals during the save are only noted; a checkpoint appears under its name only once whole."""

    def __init__(self):
        self.signum = 0
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.note)

    def note(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def requested(self, accelerator) -> int:
        if accelerator.num_processes == 1:
            return self.signum
        return int(accelerator.reduce(torch.tensor(self.signum, device=accelerator.device), "max"))

    def stop(self, accelerator, signum: int, checkpoint: Path) -> NoReturn:
        flag = "--resume_from_checkpoint"
        argv = [arg for i, arg in enumerate(sys.argv) if not arg.startswith(flag) and sys.argv[i - 1] != flag]
        launcher = "the same `accelerate launch ...` and" if accelerator.num_processes > 1 else "python"
        accelerator.print(f"stopped by {signal.Signals(signum).name}: saved {checkpoint}; resume with: {launcher} "
                          f"{' '.join(argv)} --resume_from_checkpoint latest")
        sys.exit(128 + signum)


def load_any_dataset(name: str, config: str | None = None) -> DatasetDict:
    """Load a Hub dataset, a local data file, a `save_to_disk` directory or a directory of split files."""
    path = Path(name)
    if path.is_file():
        builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
        if path.suffix not in builders:
            raise ValueError(f"unknown dataset file type '{path.suffix}' of {name}: expected one of {sorted(builders)}")
        return load_dataset(builders[path.suffix], data_files=str(path))
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        loaded = load_from_disk(str(path))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)
    return load_dataset(name, config)  # a Hub id, or a directory of train/test files (splits inferred from names)


def load_dataset_or_fail(name: str, config: str | None = None) -> DatasetDict:
    """load_any_dataset, with any failure (not found, unreadable, unknown type, empty, network) as one line that names
    the dataset and the reason, not a traceback."""
    try:
        return load_any_dataset(name, config)
    except Exception as error:
        message = str(error) or type(error).__name__  # an empty JSON file raises a bare StopIteration
        cause = error.__cause__  # datasets wraps the real reason, e.g. split files whose columns differ
        if cause is not None and str(cause):
            message += f" ({type(cause).__name__}: {' '.join(str(cause).split())})"
        elif isinstance(error, StopIteration) or "corresponds to no data" in message or "generating the dataset" in \
                message:  # how datasets says "empty"
            message += " (is a data file empty? every split needs at least one row)"
        fail(f"could not load dataset {name}: {message}")


def step_indices(step: int, num_rows: int, global_batch_size: int, seed: int) -> list[int]:
    """The rows (or prompts) of training step `step` on all processes: each epoch is a permutation seeded by
    seed + epoch, global_batch_size rows a step, the tail dropped. The order depends on the step alone, so resuming is
    exact and N processes see the batches of one."""
    epoch, position = divmod(step, num_rows // global_batch_size)
    permutation = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return permutation[position * global_batch_size : (position + 1) * global_batch_size]


def load_tokenizer(args, eos_purpose: str):
    """The tokenizer of --model_name_or_path; it needs an EOS token. Without a pad token EOS pads: padding is masked by
    position (attention mask, labels -100), never by token id, so a real EOS is still learned."""
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, revision=args.revision)
    if tokenizer.eos_token_id is None:
        fail(f"the tokenizer of {args.model_name_or_path} has no EOS token; expected one {eos_purpose}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_trainable_model(args, model_class, task_type: str, **kwargs):
    """The model to train at --dtype (resuming without LoRA: the checkpoint's weights), gradient checkpointing if
    asked, LoRA adapters with --use_peft (new, or the checkpoint's)."""
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    path = args.resume_from_checkpoint if args.resume_from_checkpoint and not args.use_peft else args.model_name_or_path
    model = model_class.from_pretrained(path, revision=args.revision if path == args.model_name_or_path else None,
                                        dtype=dtype, attn_implementation=args.attn_implementation, **kwargs)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.use_peft:
        from peft import LoraConfig, PeftModel, get_peft_model

        if args.resume_from_checkpoint:
            return PeftModel.from_pretrained(model, args.resume_from_checkpoint, is_trainable=True)
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, task_type=task_type,
                                                 lora_dropout=args.lora_dropout,
                                                 target_modules=args.lora_target_modules or "all-linear"))
    return model


def prepare_training(args, accelerator, model, total_steps: int):
    """AdamW and the schedule, prepared by accelerate, and the state of --resume_from_checkpoint (loaded with
    weights_only=True): (model, optimizer, scheduler, state), state {"step": 0} when fresh. The loop steps the
    scheduler once per optimizer step (accelerate would step it once per process)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay, fused=args.optim == "adamw_torch_fused")
    warmup = math.ceil(args.warmup_ratio * total_steps)

    def multiplier(step: int) -> float:  # transformers' schedules, without importing its optimization module (slow)
        kind = args.lr_scheduler_type
        if kind == "constant" or (step >= warmup and kind == "constant_with_warmup"):
            return 1.0
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 1.0 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # what accelerate cannot infer without a dataloader
        accelerator.state.deepspeed_plugin.deepspeed_config.update({
            "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
            "gradient_clipping": args.max_grad_norm})
    model, optimizer = accelerator.prepare(model, optimizer)
    state = {"step": 0}
    if args.resume_from_checkpoint:
        checkpoint = Path(args.resume_from_checkpoint)
        state = torch.load(checkpoint / "training_state.pt", weights_only=True)
        load_optimizer_state(checkpoint, accelerator, model, optimizer, state.pop("optimizer"))
        scheduler.load_state_dict(state.pop("scheduler"))
        rng = torch.load(checkpoint / f"rng_state_{accelerator.process_index}.pt", weights_only=True)
        random.setstate(rng["python"])
        name, keys, position, has_gauss, gauss = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    return model, optimizer, scheduler, state


@contextmanager
def accumulating(accelerator, model, last: bool):
    """One micro-batch's forward and backward: gradients meet over processes in the last micro-batch of a step only,
    where DeepSpeed's engine steps (it reads accelerate's sync flag; a private API). accelerate's `accumulate` would
    divide each loss by the accumulation steps, where these scripts normalise by the whole step's tokens or samples."""
    accelerator.gradient_state._set_sync_gradients(last)
    with nullcontext() if last else accelerator.no_sync(model):
        yield


def stop_if_not_finite(loss, grad_norm, step: int, output_dir: Path) -> None:
    """Stop on a non-finite loss or gradient norm before the update poisons the weights (every process sees the same
    reduced values and stops together), naming the last checkpoint."""
    if not (math.isfinite(float(loss)) and math.isfinite(float(grad_norm))):
        checkpoints = complete_checkpoints(output_dir)
        kept = f"the last checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
        fail(f"loss is {float(loss)} (gradient norm {float(grad_norm)}) at step {step + 1}; stopping without "
             f"updating the weights ({kept})")


def open_logs(args, accelerator, start_step: int, files: tuple[str, ...] = ("metrics.jsonl",)):
    """output_dir with args.json, fresh log files (resuming: the rows up to start_step kept), wandb under --track. A
    previous run in output_dir (the run checks let it through) is moved to <output_dir>-<its time>, or deleted under
    --overwrite_output_dir. Returns log(metrics): a console line, a strict-JSON metrics.jsonl row, a wandb point."""
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        if not args.resume_from_checkpoint and output_dir.is_dir() and any(output_dir.iterdir()):
            if args.overwrite_output_dir:
                shutil.rmtree(output_dir)
                print(f"--overwrite_output_dir: removed the previous run in {output_dir}")
            else:
                stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(output_dir.stat().st_mtime))
                kept = next(path for n in range(1000) if not (path := output_dir.with_name(
                    f"{output_dir.name}-{stamp}" + (f"-{n}" if n else ""))).exists())
                output_dir.rename(kept)
                print(f"{output_dir} held a previous run: kept as {kept} (--overwrite_output_dir replaces it)")
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
        for file in (output_dir / name for name in files):
            if not args.resume_from_checkpoint:  # a fresh run starts a fresh log
                file.unlink(missing_ok=True)
            elif file.exists():  # a resumed one keeps what was logged up to its checkpoint, and appends
                logged = [line for line in file.read_text().splitlines() if json.loads(line)["step"] <= start_step]
                file.write_text("".join(line + "\n" for line in logged))
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args),
                       name=f"{args.exp_name}__{args.seed}__{int(time.time())}")

    def log(metrics: dict) -> None:
        if accelerator.is_main_process:
            tqdm.write(" ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                                for key, value in metrics.items()))
            with open(output_dir / "metrics.jsonl", "a") as f:  # NaN and infinity are not JSON: null
                f.write(json.dumps({key: None if isinstance(value, float) and not math.isfinite(value) else value
                                    for key, value in metrics.items()}) + "\n")
            if args.track:
                import wandb

                wandb.log(metrics, step=metrics["step"])
    accelerator.wait_for_everyone()  # no process writes into output_dir before it is ready
    return log


@contextmanager
def lm_head_only_at(model: torch.nn.Module, positions: torch.Tensor | None):
    """Inside the block the output layer of `model` (unwrapped) runs only at `positions` ((B, T) bool), so its forward
    returns (N, V) logits, one row per True position: on a large vocabulary the output layer is most of a forward's
    FLOPs and its logits most of the memory, yet few positions are scored. positions None: (B, T, V) logits."""
    if positions is None:
        yield
        return
    handle = model.get_output_embeddings().register_forward_pre_hook(
        lambda module, inputs: (inputs[0][positions], *inputs[1:]))
    try:
        yield
    finally:
        handle.remove()


def gathered_state_dict(accelerator, model) -> dict:
    """The model's full weights for save_pretrained, complete on the main process; every process must call it (FSDP
    and ZeRO-3 hold shards, gathered here to CPU)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.tensor import DTensor

        weights = {}
        for name, tensor in model.state_dict().items():  # the same order everywhere: one all-gather per sharded tensor
            tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            if accelerator.is_main_process:
                weights[name] = tensor.cpu()
        return weights
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.get_state_dict(model)  # ZeRO-3 needs zero3_save_16bit_model: true (our configs set it)
    return accelerator.unwrap_model(model).state_dict()


def save_checkpoint(path: Path, accelerator, model, tokenizer, optimizer, scheduler, progress: dict,
                    limit: int | None = None) -> None:
    """A resumable checkpoint, written by every process: weights (or adapter) as save_pretrained writes them,
    optimizer, scheduler, the `progress` counters, each process's RNG states, all loadable with weights_only=True.
    Written under <path>.incomplete and renamed once whole; then only the newest `limit` are kept. FSDP's optimizer
    state is gathered by parameter name (sharded again on resume); DeepSpeed writes its own to path/deepspeed.
    accelerate's save_state is not used: its weights are not a model that transformers loads."""
    if path in complete_checkpoints(path.parent):
        return  # this step is saved already (a signal right after a periodic checkpoint)
    partial = path.with_name(path.name + ".incomplete")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    weights = gathered_state_dict(accelerator, model)
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer_state = get_optimizer_state_dict(model, optimizer.optimizer,
                                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        model.save_checkpoint(str(partial / "deepspeed"), exclude_frozen_parameters=True)
        optimizer_state = None
    else:
        optimizer_state = optimizer.state_dict()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(partial, state_dict=weights)
        tokenizer.save_pretrained(partial)
        torch.save({**progress, "optimizer": optimizer_state, "scheduler": scheduler.state_dict()},
                   partial / "training_state.pt")
    accelerator.wait_for_everyone()
    name, keys, position, has_gauss, gauss = np.random.get_state()  # numpy's array as a tensor: weights_only loads it
    torch.save({"python": random.getstate(), "torch": torch.get_rng_state(),
                "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               partial / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        partial.rename(path)
        for old in complete_checkpoints(path.parent)[: -limit if limit else 0]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_optimizer_state(path: Path, accelerator, model, optimizer, optimizer_state: dict | None) -> None:
    """The optimizer state of a checkpoint written by save_checkpoint, under the same distributed setup."""
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer.optimizer, optimizer_state,
                                 options=StateDictOptions(full_state_dict=True))
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        model.load_checkpoint(str(path / "deepspeed"), load_module_strict=False, load_optimizer_states=True,
                              load_lr_scheduler_states=False)
    else:
        optimizer.load_state_dict(optimizer_state)


def save_final_model(args, accelerator, model, tokenizer, model_class, **kwargs) -> None:
    """output_dir: save_pretrained weights and the tokenizer (LoRA: merged, and the adapter alone in
    output_dir/adapter), pushed with --push_to_hub. Every process gathers the weights; a sharded LoRA model cannot
    merge in place, so a CPU copy of the base (model_class.from_pretrained(..., **kwargs)) merges the saved adapter."""
    output_dir = Path(args.output_dir)
    accelerator.wait_for_everyone()
    weights = gathered_state_dict(accelerator, model)
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        if args.use_peft:
            from peft import PeftModel

            final.save_pretrained(output_dir / "adapter", state_dict=weights)
            if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
                dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
                base = model_class.from_pretrained(args.model_name_or_path, revision=args.revision, dtype=dtype,
                                                   **kwargs)
                final = PeftModel.from_pretrained(base, output_dir / "adapter")
            final, weights = final.merge_and_unload(), None
        final.save_pretrained(output_dir, state_dict=weights)
        tokenizer.save_pretrained(output_dir)
        if args.push_to_hub:
            final.push_to_hub(output_dir.name)
            tokenizer.push_to_hub(output_dir.name)
        if args.track:
            import wandb

            wandb.finish()
    accelerator.wait_for_everyone()  # every process leaves together, once the main one has saved
    accelerator.print(f"saved to {output_dir}")


def disable_dropout_in_model(model: torch.nn.Module) -> None:
    """Dropout off (p = 0) in every module, as the seed does for the policy (and the reference, where there is one)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def prepare_frozen(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """A model that is only evaluated (a reference, a teacher): eval mode, no gradients. Under FSDP it is sharded as
    the policy is (each transformer block, then the root); under ZeRO-3 by a DeepSpeed engine without an optimizer (as
    TRL's prepare_deepspeed); otherwise replicated on each process's device."""
    model.eval().requires_grad_(False)
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import fully_shard

        block_classes = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in block_classes:
                fully_shard(module)
        fully_shard(model)
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        config.pop("optimizer", None), config.pop("scheduler", None)
        config["zero_optimization"].pop("offload_optimizer", None)
        if config["zero_optimization"]["stage"] != 3:
            config["zero_optimization"]["stage"] = 0
        model = deepspeed.initialize(model=model, config=config)[0]
        model.eval()
    else:
        model.to(accelerator.device)
    return model


@contextmanager
def gathered_for_generation(accelerator, model):
    """Yields the model to call generate on, with its full parameters until the block ends. FSDP: each sharded module
    is gathered once and kept whole across the decoding steps (not per token and layer); ZeRO-3: GatheredParameters.
    Every process must enter it and generate inside it (transformers keeps them in step: synced_gpus)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FSDPModule

        sharded = [module for module in model.modules() if isinstance(module, FSDPModule)]
        for module in sharded:
            module.unshard()
            module.set_reshard_after_forward(False, recurse=False)
        try:
            yield model
        finally:
            for module in sharded:
                module.reshard()
                module.set_reshard_after_forward(True, recurse=False)
    elif accelerator.distributed_type == DistributedType.DEEPSPEED and \
            accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield accelerator.unwrap_model(model)
    else:
        yield accelerator.unwrap_model(model)


def find_query_column(column_names: list[str], query_column: str | None = None) -> str:
    """The column holding the prompts: --query_column, else 'prompt', else 'query'."""
    candidates = [query_column] if query_column else ["prompt", "query"]
    for column in candidates:
        if column in column_names:
            return column
    expected = f"a '{query_column}' column" if query_column else "a 'prompt' or 'query' column"
    raise ValueError(f"expected {expected} (strings or message lists); found columns {column_names}")


def load_prompts(name: str, config: str | None, split: str, query_column: str | None) -> tuple:
    """The prompts of one split, loaded and checked before any model is (one line per failure): the split must exist
    and hold rows; the prompt column is --query_column, else 'prompt' or 'query'. Returns (the split, the column)."""
    raw = load_dataset_or_fail(name, config)
    try:
        if split not in raw:
            raise ValueError(f"dataset {name} has no split '{split}'; found splits {list(raw)}")
        if len(raw[split]) == 0:
            raise ValueError(f"split '{split}' of dataset {name} is empty; expected at least one prompt")
        return raw[split], find_query_column(raw[split].column_names, query_column)
    except ValueError as error:
        fail(str(error))


def parse_reward_spec(spec: str) -> tuple[str | None, str]:
    """'task:model' for a transformers pipeline (task one of the pipeline tasks, e.g. sentiment-analysis), else
    (None, spec): a sequence-classification model path or Hub id. Raises ValueError for a spec that cannot work."""
    from transformers.pipelines import SUPPORTED_TASKS, TASK_ALIASES

    task, sep, model = spec.partition(":")
    if sep and not Path(spec).exists() and (task in SUPPORTED_TASKS or task in TASK_ALIASES):
        if not model:
            raise ValueError(f"reward pipeline spec '{spec}' names no model; expected 'task:model'")
        return task, model
    if sep and not Path(spec).exists():
        raise ValueError(f"unknown reward spec '{spec}': '{task}' is not a transformers pipeline task (expected "
                         f"'task:model' with a task such as sentiment-analysis, or a sequence-classification model)")
    if Path(spec).exists() and not (Path(spec) / "config.json").exists():
        raise ValueError(f"reward model '{spec}' is not a model directory (no config.json in it)")
    if not Path(spec).exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise ValueError(f"reward model '{spec}' does not exist: expected a model directory, a Hub id or 'task:model'")
    return None, spec


def load_reward_function(spec: str, device, max_length: int = 1024) -> Callable[[list, list], list[float]]:
    """A callable (prompts, responses) -> list of float scores, from a reward spec (see parse_reward_spec).

    A sequence-classification model scores prompt + response the way reward.py trained it: message-list prompts
    rendered with the chat template and the response as the assistant turn, string prompts concatenated; EOS
    appended, the start kept when too long, right padding; the score read where plain transformers reads it. A
    pipeline (such as sentiment-analysis:lvwerra/distilbert-imdb, TRL's PPO example) scores prompt + response,
    and the reward is the raw score (logit) of the pipeline's last label, e.g. POSITIVE for a sentiment classifier.
    """
    task, name = parse_reward_spec(spec)
    if task is not None:
        from transformers import pipeline

        pipe = pipeline(task, model=name, device=device)

        def score_with_pipeline(prompts: list, responses: list[str]) -> list[float]:
            texts = [(format_query(p, pipe.tokenizer)[0] if isinstance(p, list) else p) + r
                     for p, r in zip(prompts, responses)]
            outputs = pipe(texts, top_k=None, function_to_apply="none", batch_size=16, truncation=True)
            last = pipe.model.config.num_labels - 1
            label = pipe.model.config.id2label[last]
            return [next(o["score"] for o in output if o["label"] == label) for output in outputs]

        return score_with_pipeline
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForSequenceClassification.from_pretrained(name).eval().requires_grad_(False).to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # transformers finds the last real token through config.pad_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
    max_length = min(max_length, tokenizer.model_max_length)

    @torch.no_grad()
    def score_with_model(prompts: list, responses: list[str]) -> list[float]:
        sequences = []
        for prompt, response in zip(prompts, responses):
            if isinstance(prompt, list):
                text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}],
                                                     tokenize=False)
                ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            else:
                ids = list(tokenizer(prompt + response)["input_ids"])
            if not ids or ids[-1] != tokenizer.eos_token_id:
                ids.append(tokenizer.eos_token_id)
            sequences.append(ids[:max_length])
        scores = []
        for start in range(0, len(sequences), 64):
            chunk = sequences[start : start + 64]
            longest = max(len(ids) for ids in chunk)
            input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (longest - len(ids)) for ids in chunk])
            attention_mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in chunk])
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            scores += logits[:, 0].float().tolist()
        return scores

    return score_with_model


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
