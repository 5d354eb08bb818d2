"""Supervised fine-tuning (SFT): maximise the likelihood of demonstration texts, by default only of their completions.

SFT is the first stage of every RLHF pipeline (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155): the policy is
trained with next-token cross-entropy on demonstrations. This file reproduces TRL v0.8.6's `SFTTrainer` as documented
("the seed" wherever this file says it) in one readable loop, and adds what its users asked for: completion-only loss,
packing that never lets one document attend to another, NEFTune (https://arxiv.org/abs/2310.05914), exact loss
normalisation across gradient accumulation and processes, checkpoints that resume bit-exactly, and a NaN stop. See
docs/sft.md for the details and the deviations.

    # offline quickstart: the tiny world (assets/), CPU, under a minute
    python sft.py
    # a real model and dataset from the Hub
    python sft.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara \
        --learning_rate 2e-5 --per_device_train_batch_size 4 --gradient_accumulation_steps 8 --packing \
        --gradient_checkpointing --bf16 --eval_steps 200 --save_steps 500
    # several GPUs (the global batch is per_device_train_batch_size x gradient_accumulation_steps x processes)
    accelerate launch --multi_gpu --num_processes 8 sft.py --model_name_or_path Qwen/Qwen2.5-0.5B --bf16
    # models larger than one GPU holds: FSDP2 or DeepSpeed ZeRO (docs/scaling.md: which config for which size)
    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 8 sft.py \
        --model_name_or_path Qwen/Qwen2.5-7B --gradient_checkpointing
"""

import bisect
import importlib.util
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from datasets import DatasetDict, load_dataset, load_from_disk
from tqdm.auto import tqdm
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import ModelOutput

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (used in the wandb run name)"""
    seed: int = 42
    """seed of the experiment: data order, initialisation of new weights, sampling noise"""
    output_dir: str = "runs/sft"
    """where the model, metrics.jsonl, args.json and checkpoints go"""
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
    logging_steps: int = 10
    """print and record training metrics every this many optimizer steps"""

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
    """log-probs computed this many scored positions at a time from the last hidden states, never the whole (tokens x
    vocabulary) logits (chunked_log_probs); 0: the plain path, the model's logits at once"""
    lm_head_only_at_labels: bool = True
    """with --chunk_size 0: apply the output layer only where a token is scored (off: at every position, as the seed)"""
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
    dataset_name: str = str(ASSETS / "data" / "sft_messages")
    """a Hub id, a .json/.jsonl/.csv/.parquet file, a save_to_disk directory, or a directory of split files"""
    dataset_config: str | None = None
    """the dataset configuration (subset) name"""
    dataset_train_split: str = "train"
    """the split to train on"""
    dataset_test_split: str | None = "auto"
    """the split to evaluate on (auto: 'test' if the data has one; None: no evaluation)"""
    max_length: int = 1024
    """tokens per example (longer ones are truncated at the end) and per packed block"""
    packing: bool = False
    """pack whole examples into blocks of max_length tokens; attention stays inside each example"""
    completion_only_loss: bool = True
    """for prompt-completion and messages rows, learn only the completion / assistant turns"""

    # --- optimisation ---
    learning_rate: float = 5e-4
    """peak learning rate of AdamW (the default suits the tiny world; real models want about 2e-5)"""
    per_device_train_batch_size: int = 8
    """examples (or packed blocks) per process per micro-batch"""
    per_device_eval_batch_size: int = 16
    """examples (or packed blocks) per process per evaluation batch"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    num_train_epochs: float = 1.0
    """passes over the training set (ignored when max_steps > 0)"""
    max_steps: int = -1
    """optimizer steps to take (-1: as many as num_train_epochs needs)"""
    warmup_ratio: float = 0.0
    """fraction of the steps during which the learning rate ramps up linearly from 0 (not under constant)"""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """the learning-rate schedule after warm-up"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    optim: Literal["adamw_torch_fused", "adamw_torch"] = "adamw_torch_fused"
    """AdamW kernels: fused, one pass over all parameters (transformers' default), or torch's loop (the seed)"""
    eval_steps: int = 100
    """evaluate every this many optimizer steps (also before the first and after the last)"""
    save_steps: int = 500
    """write a resumable checkpoint every this many optimizer steps (0: only when stopped by SIGTERM / SIGINT)"""
    save_total_limit: int | None = None
    """keep only the newest this many checkpoints (None: all)"""
    resume_from_checkpoint: str | None = None
    """a checkpoint-N directory to continue from, or latest: the newest complete one in output_dir (none: start)"""

    # --- SFT ---
    neftune_noise_alpha: float | None = None
    """NEFTune: uniform noise of magnitude alpha / sqrt(length * hidden) on the input embeddings while training"""


# ----------------------------------------------------------------------------------------------------------------------
# The algorithm: rows -> training text -> tokens with labels (-100 where no loss is taken) -> packed batches -> loss
# ----------------------------------------------------------------------------------------------------------------------
def detect_format(column_names: list[str]) -> Literal["messages", "prompt-completion", "text"]:
    """Which of the three SFT row formats a dataset holds, from its columns (a clear error if none)."""
    if "messages" in column_names:
        return "messages"
    if "prompt" in column_names and "completion" in column_names:
        return "prompt-completion"
    if "text" in column_names:
        return "text"
    raise ValueError("expected a 'text' column, a 'messages' column, or 'prompt' and 'completion' columns; "
                     f"found columns {column_names}")


def row_tools(example: dict) -> list[dict] | None:
    """The tool schemas of a row's optional 'tools' column (TRL's format: a list of JSON schemas, or that list as a
    JSON string), for the chat template; None when the row has none. Raises ValueError when it is neither."""
    tools = example.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise ValueError(f"the 'tools' column holds a string that is not JSON ({error}); expected a list of tool "
                             "schemas or that list as a JSON string") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(tool, dict) for tool in tools)):
        raise ValueError(f"the 'tools' column must hold a list of tool schemas (dicts), found {type(tools).__name__}")
    return tools or None  # [] as None: some templates render tool boilerplate for an empty list


def render_chat(messages: list[dict], tokenizer, trainable_from: int = 0, tools: list[dict] | None = None
                ) -> tuple[str, list[tuple[int, int]], bool]:
    """Render a conversation with the chat template (and the row's tool schemas) and find the character span of every
    assistant turn.

    An assistant turn i spans from the end of render(messages[:i], generation prompt) to the end of
    render(messages[:i+1]): exactly what the model produces when it answers, end-of-turn token included; a turn that
    calls tools holds the calls as the template writes them. Tool results ('tool' messages) and every header are
    outside the spans, so they are context, never targets. Only turns at index >= trainable_from are returned (a
    conversational prompt-completion row learns only its completion).
    """
    def render(part: list[dict], add_generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(part, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    text = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < trainable_from:
            continue
        before, through = render(messages[:i], add_generation_prompt=True), render(messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise ValueError("the chat template does not render conversations incrementally (a rendered prefix of the "
                             "conversation is not a prefix of its text), so assistant turns cannot be located; "
                             "convert the rows to 'text' or 'prompt'/'completion' strings")
        spans.append((len(before), len(through)))
    return text, spans, True


def format_example(example: dict, tokenizer) -> tuple[str, list[tuple[int, int]], bool]:
    """THE place to change how a row becomes training text (what the seed's `formatting_func` does).

    Returns (text, completion_spans, templated): the full training text; the [start, end) character spans that carry
    the loss when completion-only loss is on; and whether the chat template rendered the text (then it already holds
    its special tokens, else the tokenizer adds BOS if it has one and EOS is appended). Conversations are rendered
    with the row's tool schemas (an optional 'tools' column, as TRL's SFTTrainer).
    """
    if "messages" in example:
        return render_chat(example["messages"], tokenizer, tools=row_tools(example))
    if "prompt" in example and "completion" in example:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, list):  # conversational prompt-completion: the completion's turns carry the loss
            return render_chat(prompt + completion, tokenizer, trainable_from=len(prompt), tools=row_tools(example))
        return prompt + completion, [(len(prompt), len(prompt) + len(completion))], False
    return example["text"], [(0, len(example["text"]))], False


def renders_tool_calls(tokenizer) -> bool:
    """Whether the chat template writes a tool-calling exchange out in full: a call's name, argument key and value, and
    the tool's result (TRL's check; some templates drop calls or results silently, and their rows would train the
    model on empty turns)."""
    call = {"type": "function", "function": {"name": "tool_name_a8f3", "arguments": {"arg_key_b9d4": "arg_value_d6e7"}}}
    exchange = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "tool_name_a8f3", "content": "tool_result_c4f9"}]
    try:
        rendered = tokenizer.apply_chat_template(exchange, tokenize=False)
    except Exception:  # jinja2's TemplateError and friends: a template that rejects the tool roles
        return False
    return all(part in rendered for part in ("tool_name_a8f3", "arg_key_b9d4", "arg_value_d6e7", "tool_result_c4f9"))


def tokenize_example(example: dict, tokenizer, max_length: int, completion_only_loss: bool) -> dict:
    """One row -> {"input_ids", "labels"} (lists of length <= max_length); labels are -100 where no loss is taken.

    Tokenising the whole text once (rather than prompt and completion apart) gives the tokens the model will really
    see; the character offsets of each token then say whether it belongs to a completion span. EOS is appended to
    non-templated text and is always a target, so the model learns to stop even when the pad token is the EOS token
    (padding is masked by position, never by token id).
    """
    text, spans, templated = format_example(example, tokenizer)
    encoding = tokenizer(text, add_special_tokens=not templated, return_offsets_mapping=True)
    input_ids, offsets = list(encoding["input_ids"]), encoding["offset_mapping"]
    if completion_only_loss:  # a token is a target if its characters overlap a completion span
        is_target = [any(start < span_end and end > span_start for span_start, span_end in spans)
                     for start, end in offsets]
    else:
        is_target = [True] * len(input_ids)
    if not templated and (not input_ids or input_ids[-1] != tokenizer.eos_token_id):
        input_ids.append(tokenizer.eos_token_id)
        is_target.append(True)
    input_ids, is_target = input_ids[:max_length], is_target[:max_length]  # truncation keeps the start
    labels = [token if target else -100 for token, target in zip(input_ids, is_target)]
    return {"input_ids": input_ids, "labels": labels}


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Pack whole tokenised examples into blocks of at most max_length tokens (best-fit decreasing).

    No example is split across blocks. position_ids restart at 0 for every example: transformers reads those resets
    as document boundaries and confines attention to each document (the seed's ConstantLengthDataset concatenates
    documents and lets each attend to all earlier ones in its block). The first token of each document is not a
    target, since it would be predicted from the previous document's last token.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    blocks: list[list[int]] = []  # example indices of each block
    free: list[tuple[int, int]] = []  # sorted (free space, block index)
    for i in order:
        length = len(examples[i]["input_ids"])
        slot = bisect.bisect_left(free, (length, -1))  # the fullest block that still has room
        if slot == len(free):
            blocks.append([i])
            bisect.insort(free, (max_length - length, len(blocks) - 1))
        else:
            space, block = free.pop(slot)
            blocks[block].append(i)
            bisect.insort(free, (space - length, block))
    packed = []
    for block in blocks:
        input_ids, labels, position_ids = [], [], []
        for i in block:
            input_ids += examples[i]["input_ids"]
            labels += [-100] + examples[i]["labels"][1:]
            position_ids += list(range(len(examples[i]["input_ids"])))
        packed.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids})
    return packed


def tokenize_splits(args, accelerator, raw: DatasetDict, tokenizer, max_length: int, data_format: str
                    ) -> dict[str, list[dict]]:
    """The train split and the eval split (if any) as lists of training rows: each row tokenised (tokenize_example:
    labels -100 outside the completions), rows left with no target token after truncation to max_length dropped with
    a warning, then with --packing packed into blocks (pack_examples). A row that cannot be formatted, or a split with
    no target token left, stops the run with one line."""
    try:
        with accelerator.main_process_first():  # the main process fills the datasets cache first
            tokenized = {split: raw[split].map(tokenize_example, remove_columns=raw[split].column_names,
                                               fn_kwargs={"tokenizer": tokenizer, "max_length": max_length,
                                                          "completion_only_loss": args.completion_only_loss},
                                               desc=f"tokenizing {split}")
                         for split in [args.dataset_train_split, args.dataset_test_split] if split}
    except (ValueError, KeyError, TypeError, NotImplementedError) as error:
        fail(f"could not format the {data_format} rows of {args.dataset_name}: {error!r}")
    splits = {}
    for split, dataset in tokenized.items():
        rows = [{"input_ids": ids, "labels": labels} for ids, labels in zip(dataset["input_ids"], dataset["labels"])]
        kept = [row for row in rows if any(label != -100 for label in row["labels"][1:])]
        if len(kept) < len(rows):
            accelerator.print(f"warning: {len(rows) - len(kept)} of {len(rows)} {split} rows have no target token "
                              f"left after truncation to {max_length} tokens; they are dropped")
        if not kept:
            fail(f"no {split} row has a target token within the first {max_length} tokens")
        splits[split] = pack_examples(kept, max_length) if args.packing else kept
    return splits


def collate(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest row -> input_ids, labels, attention_mask, position_ids, each (B, T).

    Padding has label -100, attention 0 and position ids that start a fresh run at 0, so in packed mode it is a
    document of its own that no real token attends to.
    """
    longest = max(len(row["input_ids"]) for row in rows)
    batch = {"input_ids": [], "labels": [], "attention_mask": [], "position_ids": []}
    for row in rows:
        n, pad = len(row["input_ids"]), longest - len(row["input_ids"])
        batch["input_ids"].append(row["input_ids"] + [pad_token_id] * pad)
        batch["labels"].append(row["labels"] + [-100] * pad)
        batch["attention_mask"].append([1] * n + [0] * pad)
        batch["position_ids"].append(row.get("position_ids", list(range(n))) + list(range(pad)))
    return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


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


def selective_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next-token label: (B, T, V) logits, or the (N, V) logits of the N scored positions only
    (lm_head_only_at), and (B, T) labels -> ((B, T-1) log-probs, (B, T-1) mask).

    Position t predicts label t+1. Computed as logit[label] - logsumexp(logits) in float32, which never materialises
    a log-softmax over the vocabulary. Masked positions (label -100) get log-prob 0 and mask False.
    """
    mask = labels[:, 1:] != -100
    if logits.dim() == 3:
        logits = logits[:, :-1][mask]  # (N, V): the scored positions
    label_logits = logits.gather(1, labels[:, 1:][mask].unsqueeze(1)).squeeze(1).float()
    log_probs = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device).masked_scatter(
        mask, label_logits - torch.logsumexp(logits.float(), dim=-1))
    return log_probs, mask


def token_log_probs(model, unwrapped, batch: dict, chunk_size: int, lm_head_only_at_labels: bool = True,
                    packing: bool = False) -> torch.Tensor:
    """Per-token log-probs (B, T-1) of a collated batch's labels under `model` (as the loop calls it: wrapped for DDP,
    FSDP or DeepSpeed; `unwrapped` is the model underneath), 0 where not scored. chunk_size > 0: chunked_log_probs.
    0: the plain path, the model's own logits at the scored positions (at every position with lm_head_only_at_labels
    off), then selective_log_probs. packing: no attention mask, attention follows the documents marked by position-id
    resets. use_cache=False: a KV cache would also switch off transformers' packed-sequence detection."""
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if packing:
        inputs["position_ids"] = batch["position_ids"]
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    if chunk_size:
        with chunked_log_probs(unwrapped, batch["labels"], chunk_size):
            return model(**inputs).log_probs
    with lm_head_only_at(unwrapped, scored_positions(batch["labels"]) if lm_head_only_at_labels else None):
        logits = model(**inputs).logits  # (N, V), or (B, T, V) at every position
    return selective_log_probs(logits, batch["labels"])[0]


def sft_loss(log_probs: torch.Tensor, num_items_in_batch: int | torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of a micro-batch, divided by num_items_in_batch: the number of target
    tokens in the whole optimizer step (all micro-batches, all processes). Summing these over micro-batches gives
    the exact per-token mean of the step, however it is split. (B, T-1) per-token log-probs (0 where not scored) ->
    scalar."""
    return -log_probs.sum() / num_items_in_batch


def add_neftune_noise(embeddings: torch.Tensor, alpha: float) -> torch.Tensor:
    """NEFTune: embeddings (B, T, D) + Uniform(-m, m) noise with m = alpha / sqrt(T * D), as the seed computes it."""
    magnitude = alpha / math.sqrt(embeddings.size(1) * embeddings.size(2))
    return embeddings + torch.zeros_like(embeddings).uniform_(-magnitude, magnitude)


def check_packing_isolation(model, device: torch.device) -> None:
    """Run two documents packed in one row and the second alone; raise if its logits differ (attention leaked).

    Packing relies on the model turning position-id resets into a block-diagonal mask; an architecture that ignores
    them would silently train on cross-document attention, so this is checked once before training.
    """
    first, second = torch.arange(3, 10, device=device), torch.arange(20, 25, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=torch.cat([first, second])[None], use_cache=False,
                       position_ids=torch.cat([torch.arange(7), torch.arange(5)]).to(device)[None]).logits[0, 7:]
        alone = model(input_ids=second[None], use_cache=False).logits[0]
    model.train(was_training)
    tolerance = 1e-3 if packed.dtype == torch.float32 else 5e-2
    if not torch.allclose(packed.float(), alone.float(), atol=tolerance):
        raise ValueError(f"--packing needs a model whose attention honours position-id resets; {type(model).__name__} "
                         f"lets packed documents attend to each other (max logit difference "
                         f"{(packed - alone).abs().max():.3g}); use --no-packing")


def main(args: Args) -> None:
    # 0. Check what can be checked before anything is loaded.
    check_positive(args, ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                          "max_length", "logging_steps", "eval_steps"])
    if args.chunk_size < 0:
        fail(f"--chunk_size must be 0 (the plain path) or a positive number of positions, got {args.chunk_size}")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        fail(f"need --max_steps > 0 or --num_train_epochs > 0, got {args.max_steps} and {args.num_train_epochs}")
    check_run(args, ["model_name_or_path"])  # learning rate, model path, output_dir, --resume_from_checkpoint latest

    # 1. Accelerator (checks how the run was launched; seeds every RNG). The global batch is computed here, once.
    accelerator = make_accelerator(args)
    world_size = accelerator.num_processes
    global_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    accelerator.print(f"run: {world_size} process(es) x {args.per_device_train_batch_size} per device x "
                      f"{args.gradient_accumulation_steps} accumulation = {global_batch_size} rows per optimizer step")
    output_dir = Path(args.output_dir)

    # 2. Data, loaded and checked before the model is: which of the three formats the rows have.
    raw = load_splits(args, accelerator, detect_format)
    data_format = detect_format(raw[args.dataset_train_split].column_names)

    # 3. Tokenizer. GPT-2-style tokenizers have no pad token: EOS doubles as pad, which is safe because padding is
    #    masked by position (attention mask / labels -100), never by token id.
    tokenizer = load_tokenizer(args, "to end every example")
    max_length = min(args.max_length, tokenizer.model_max_length)  # as the seed: never beyond what the model reads
    first_row = raw[args.dataset_train_split][0]
    if (data_format == "messages" or isinstance(first_row.get("prompt"), list)) and tokenizer.chat_template is None:
        fail(f"the rows are conversations but the tokenizer of {args.model_name_or_path} has no chat template")
    conversation = first_row["messages"] if data_format == "messages" else first_row["prompt"] + \
        first_row["completion"] if isinstance(first_row.get("prompt"), list) else []
    calls_tools = "tools" in first_row or any(m.get("tool_calls") or m.get("role") == "tool" for m in conversation)
    if calls_tools and not renders_tool_calls(tokenizer):
        fail(f"the rows call tools but the chat template of {args.model_name_or_path} does not render tool calls and "
             "results (they would train on empty turns); use a tokenizer whose template supports tools")

    # 4. Tokenise (labels -100 outside completions), drop rows left with no target, then optionally pack.
    splits = tokenize_splits(args, accelerator, raw, tokenizer, max_length, data_format)
    train_rows = splits[args.dataset_train_split]
    eval_rows = equal_eval_share(accelerator, splits.get(args.dataset_test_split, []))
    unit = "packed blocks" if args.packing else "rows"
    steps_per_epoch = len(train_rows) // global_batch_size
    if steps_per_epoch == 0:
        fail(f"the training set has {len(train_rows)} {unit} but one optimizer step needs {global_batch_size} "
             f"(per_device_train_batch_size {args.per_device_train_batch_size} x gradient_accumulation_steps "
             f"{args.gradient_accumulation_steps} x {world_size} processes)")
    total_steps = args.max_steps if args.max_steps > 0 else max(1, int(args.num_train_epochs * steps_per_epoch))
    accelerator.print(f"{data_format} data: {len(train_rows)} train / {len(eval_rows)} eval {unit}; {total_steps} "
                      f"steps of {global_batch_size}")

    # 5. Model (LoRA, gradient checkpointing), with NEFTune's noise on the input embeddings in training mode only.
    model = load_trainable_model(args, AutoModelForCausalLM, "CAUSAL_LM")
    if args.neftune_noise_alpha is not None:
        alpha = args.neftune_noise_alpha
        model.get_input_embeddings().register_forward_hook(
            lambda module, inputs, output: add_neftune_noise(output, alpha) if module.training else output)
    model.to(accelerator.device)
    if args.packing:
        try:
            check_packing_isolation(model, accelerator.device)
        except ValueError as error:
            fail(str(error))
    num_params = sum(p.numel() for p in model.parameters())
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"model: {num_params / 1e6:.2f}M parameters, {num_trainable / 1e6:.2f}M trainable")

    # 6. Optimizer, schedule, resumed state; the logs.
    model, optimizer, scheduler, state = prepare_training(args, accelerator, model, total_steps)
    start_step, num_tokens_seen = state["step"], state.get("num_tokens", 0)
    log = open_logs(args, accelerator, start_step)

    def forward(batch: dict) -> torch.Tensor:
        """(B, T-1) log-probs of a batch's targets (token_log_probs): no (tokens x vocabulary) logits are held whole
        (--chunk_size; 0: the model's logits at the targets). Under autocast with --bf16: the chunked output layer runs
        in a hook, outside the autocast accelerate wraps the model's forward in."""
        with accelerator.autocast():
            return token_log_probs(model, accelerator.unwrap_model(model), batch, args.chunk_size,
                                   args.lm_head_only_at_labels, args.packing)

    def evaluate() -> float:
        """Mean next-token loss over every target token of the eval split (each process takes every N-th row)."""
        model.eval()
        loss_sum, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
        my_rows = eval_rows[accelerator.process_index :: world_size]
        with torch.no_grad():
            for start in range(0, len(my_rows), args.per_device_eval_batch_size):
                batch = collate(my_rows[start : start + args.per_device_eval_batch_size], tokenizer.pad_token_id)
                batch = {key: value.to(accelerator.device) for key, value in batch.items()}
                loss_sum += -forward(batch).sum()
                count += (batch["labels"][:, 1:] != -100).sum()
        model.train()
        return (accelerator.reduce(loss_sum, "sum") / accelerator.reduce(count, "sum")).item()

    # 7. Training loop. One optimizer step = gradient_accumulation_steps micro-batches on each process.
    model.train()
    if eval_rows and start_step == 0:
        log({"step": 0, "epoch": 0.0, "eval_loss": evaluate()})
    # running sums over the current logging window; train_seconds excludes evaluation and checkpointing
    running_loss, running_steps, running_tokens, running_samples, train_seconds = 0.0, 0, 0, 0, 0.0
    progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="sft",
                    disable=not accelerator.is_local_main_process)
    preemption = Preemption()  # from here on, SIGTERM / SIGINT end the run with a checkpoint
    for step in progress:
        step_start = time.time()
        # 7a. This process's micro-batches of this step, and the number of target tokens in the whole step.
        indices = step_indices(step, len(train_rows), global_batch_size, args.seed)
        mine = indices[accelerator.process_index :: world_size]
        micro_batches = [collate([train_rows[i] for i in mine[j : j + args.per_device_train_batch_size]],
                                 tokenizer.pad_token_id) for j in range(0, len(mine), args.per_device_train_batch_size)]
        local_targets = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)
        num_items_in_batch = accelerator.reduce(torch.tensor(local_targets, device=accelerator.device), "sum")

        # 7b. Forward and backward each micro-batch. DDP averages gradients over processes, so each loss is scaled by
        #     world_size to make the update the gradient of (sum of token losses in the step) / (target tokens in it).
        step_loss = torch.zeros((), device=accelerator.device)
        for j, batch in enumerate(micro_batches):
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            with accumulating(accelerator, model, last=j == len(micro_batches) - 1):
                loss = sft_loss(forward(batch), num_items_in_batch)
                accelerator.backward(loss * world_size)
            step_loss += loss.detach()
        step_loss = accelerator.reduce(step_loss, "sum")

        # 7c. Clip (max_grad_norm 0: only measure the norm); stop before a non-finite update; step.
        grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf")))
        stop_if_not_finite(step_loss, grad_norm, step, output_dir)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 7d. Log, evaluate, checkpoint.
        tokens = int(accelerator.reduce(torch.tensor(sum(int(mb["attention_mask"].sum()) for mb in micro_batches),
                                                     device=accelerator.device), "sum"))
        num_tokens_seen += tokens
        running_loss, running_steps = running_loss + step_loss.item(), running_steps + 1
        running_tokens, running_samples = running_tokens + tokens, running_samples + global_batch_size
        train_seconds += time.time() - step_start
        done = step + 1
        if done % args.logging_steps == 0 or done == total_steps:
            metrics = {"step": done, "epoch": done / steps_per_epoch, "loss": running_loss / running_steps,
                       "grad_norm": float(grad_norm), "learning_rate": scheduler.get_last_lr()[0],
                       "num_tokens": num_tokens_seen, "samples_per_second": running_samples / train_seconds,
                       "tokens_per_second": running_tokens / train_seconds, "peak_memory_mb": peak_memory_mb()}
            progress.set_postfix(loss=f"{metrics['loss']:.4f}")
            log(metrics)
            running_loss, running_steps, running_tokens, running_samples, train_seconds = 0.0, 0, 0, 0, 0.0
        if eval_rows and (done % args.eval_steps == 0 or done == total_steps):
            log({"step": done, "epoch": done / steps_per_epoch, "eval_loss": evaluate()})
        signum = preemption.requested(accelerator)  # the same answer on every process
        if done < total_steps and (signum or args.save_steps > 0 and done % args.save_steps == 0):
            save_checkpoint(output_dir / f"checkpoint-{done}", accelerator, model, tokenizer, optimizer, scheduler,
                            {"step": done, "num_tokens": num_tokens_seen}, args.save_total_limit)
            if signum:
                preemption.stop(accelerator, signum, output_dir / f"checkpoint-{done}")

    # 8. Save: plain save_pretrained weights that AutoModelForCausalLM loads (LoRA: merged, and the adapter alone).
    save_final_model(args, accelerator, model, tokenizer, AutoModelForCausalLM)
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


def load_splits(args, accelerator, check_columns) -> DatasetDict:
    """--dataset_name, loaded and checked before any model loads (one line per failure). --dataset_test_split auto
    becomes 'test' if the data has one, else None; each split used must exist, hold rows and pass check_columns."""
    raw = load_dataset_or_fail(args.dataset_name, args.dataset_config)
    if args.dataset_test_split == "auto":  # resolved here, so everything after sees a split name or None
        args.dataset_test_split = "test" if "test" in raw else None
        if args.dataset_test_split is None:
            accelerator.print(f"dataset {args.dataset_name} has no split 'test': training without evaluation "
                              "(pass --dataset_test_split to name one)")
    try:
        for split in [args.dataset_train_split] + ([args.dataset_test_split] if args.dataset_test_split else []):
            if split not in raw:
                raise ValueError(f"dataset {args.dataset_name} has no split '{split}'; found splits {list(raw)} "
                                 "(--dataset_test_split None trains without evaluation)")
            if len(raw[split]) == 0:
                raise ValueError(f"split '{split}' of dataset {args.dataset_name} is empty; expected at least one row")
            check_columns(raw[split].column_names)
    except ValueError as error:
        fail(str(error))
    return raw


def equal_eval_share(accelerator, eval_rows: list) -> list:
    """Under FSDP / DeepSpeed every forward involves all processes, so each must run as many eval batches: the rows
    are cut to a multiple of the process count, saying so."""
    world_size = accelerator.num_processes
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded and len(eval_rows) % world_size:
        kept = len(eval_rows) - len(eval_rows) % world_size
        accelerator.print(f"evaluating on {kept} of {len(eval_rows)} eval rows: a multiple of the {world_size} "
                          "processes, since every forward of a sharded model involves all of them")
        eval_rows = eval_rows[:kept]
    return eval_rows


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


def scored_positions(labels: torch.Tensor, label_pad_token_id: int = -100) -> torch.Tensor:
    """(B, T) labels -> (B, T) bool: the positions t whose logits are scored, i.e. whose next label t+1 is a target."""
    return F.pad(labels[:, 1:] != label_pad_token_id, (0, 1), value=False)


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


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
