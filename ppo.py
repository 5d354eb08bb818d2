"""Proximal Policy Optimization (PPO) for language models: RLHF with a value head, a KL-shaped reward and GAE.

RLHF-PPO (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593; Ouyang et al. 2022, https://arxiv.org/abs/2203.02155)
treats each response token as an action: the policy samples a response to a query, a reward model scores it, and the
per-token reward is -beta * KL(policy || reference) with the score added on the last token. Generalised advantage
estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438) turns rewards and the value head's estimates into
advantages, and the clipped PPO objective (Schulman et al. 2017, https://arxiv.org/abs/1707.06347) updates policy and
value head together for a few epochs over the batch; an adaptive controller steers beta towards a target KL. This file
reproduces TRL's v0.8 API in one piece: `AutoModelForCausalLMWithValueHead` (and its seq2seq twin),
`create_reference_model`, `PPOConfig` and `PPOTrainer.generate / step / log_stats`, with the seed's numbers ("the seed"
throughout: TRL v0.8.6 and its documented behaviour, the reference this file matches; docs/ppo.md gives every stage,
every stat and the deviations).

Reading order: `Args`; the algorithm as functions (`compute_rewards`, `compute_gae` / `compute_advantages`,
`ppo_losses`, `ppo_update`); `PPOTrainer.step`, which calls them in order; `main`, the training loop; then the
value-head model and the seed's other API.

    # offline quickstart: the tiny world (assets/), CPU, about 15 s: the tiny policy learns to write positive reviews
    python ppo.py
    # the seed's sentiment example: GPT-2 on IMDB prompts, rewarded by a sentiment classifier
    python ppo.py --model_name lvwerra/gpt2-imdb --query_dataset stanfordnlp/imdb --query_column text \
        --input_min_text_length 2 --input_max_text_length 8 --reward_model sentiment-analysis:lvwerra/distilbert-imdb \
        --learning_rate 1.41e-5 --batch_size 128 --mini_batch_size 128 --output_min_length 4 --output_max_length 16 \
        --steps 194
    # several GPUs: each process rolls out and scores its own batch_size queries
    accelerate launch --multi_gpu --num_processes 8 ppo.py --model_name lvwerra/gpt2-imdb \
        --query_dataset stanfordnlp/imdb --query_column text --input_min_text_length 2 --input_max_text_length 8 \
        --reward_model sentiment-analysis:lvwerra/distilbert-imdb --learning_rate 1.41e-5 --batch_size 16 \
        --mini_batch_size 16 --output_min_length 4 --output_max_length 16 --steps 194 --bf16
    # models larger than one GPU holds: FSDP2 or DeepSpeed ZeRO-2 (docs/scaling.md: which config for which size)
    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 8 ppo.py \
        --model_name Qwen/Qwen2.5-7B-Instruct --gradient_checkpointing

From Python, as in the seed's quickstart: `from ppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer`.
"""

import copy
import gc
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
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, ClassVar, Literal, NoReturn

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from datasets import DatasetDict, load_dataset, load_from_disk
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm
from torch.utils.checkpoint import checkpoint
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                          AutoTokenizer, LogitsProcessor, LogitsProcessorList, MinPLogitsWarper, PreTrainedModel,
                          PreTrainedTokenizerBase, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
from transformers.utils import ModelOutput

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass
class Args:
    """ppo.py's command line, which is also the seed's `PPOConfig` (its field names and meanings; `PPOConfig` below
    is this class checked when made). The knobs of what `step` computes keep the seed's defaults;
    lm_head_only_at_responses and optim default to faster paths to the same update, and the fields that set a run's
    scale to the tiny world (docs/ppo.md gives the seed's values). A new flag goes here."""

    # --- experiment ---
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (used in the wandb run name)"""
    seed: int = 0
    """seed of the experiment: value-head initialisation, sampling noise, mini-batch order"""
    output_dir: str = "runs/ppo"
    """where the final model, metrics.jsonl, samples.jsonl, args.json and checkpoints are written"""
    overwrite_output_dir: bool = False
    """replace a previous run in output_dir (by default it is kept: a named output_dir is refused)"""
    track: bool = False
    """log to Weights & Biases"""
    log_with: Literal["wandb"] | None = None
    """the seed's switch for tracking: "wandb" is the same as --track"""
    wandb_project_name: str = "post-training"
    """the wandb project"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    push_to_hub: bool = False
    """push the final model (with its value head) and tokenizer to the Hub under the name of output_dir"""
    logging_steps: int = 1
    """print and record training metrics every this many PPO steps"""

    # --- model ---
    model_name: str = str(ASSETS / "tiny-gpt2")
    """the policy (also the reference): a Hub id or local directory of a causal LM, or of a seq2seq LM such as T5"""
    revision: str | None = None
    """the Hub revision (branch, tag or commit) of the policy"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """dtype the weights are loaded in (keep float32 and use --bf16 for mixed precision)"""
    bf16: bool = False
    """bf16 mixed precision (autocast) through accelerate"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, about a third more compute"""
    chunk_size: int = 1024
    """log-probs computed this many response positions at a time from the last hidden states, never the whole (tokens
    x vocabulary) logits (chunked_log_probs); 0: the plain path, the model's logits at once (kl_penalty full and
    encoder-decoder models always take the plain path: they need whole distributions)"""
    lm_head_only_at_responses: bool = True
    """plain path: apply the output layer only at the response tokens (off, and with kl_penalty full: everywhere, as
    the seed)"""
    use_peft: bool = False
    """train LoRA adapters (and the value head in full); the reference is the policy with adapters off"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)"""
    lora_dropout: float = 0.05
    """dropout on the LoRA branch"""
    lora_target_modules: list[str] | None = None
    """module names that get adapters (default: all linear layers)"""

    # --- data ---
    query_dataset: str = str(ASSETS / "data" / "prompts")
    """prompts: a Hub id, a .json/.jsonl/.csv/.parquet file, a save_to_disk directory or a directory of split files"""
    dataset_config: str | None = None
    """the dataset configuration (subset) name"""
    dataset_train_split: str = "train"
    """the split whose prompts are used"""
    query_column: str | None = None
    """the column holding the prompts (default: 'prompt', else 'query'); strings or message lists"""
    input_min_text_length: int | None = None
    """with input_max_text_length: cut each tokenised prompt to a random length in [min, max) (None: whole prompts)"""
    input_max_text_length: int | None = None
    """see input_min_text_length (the seed's IMDB example uses 2 and 8)"""
    reward_model: str = str(ASSETS / "tiny-reward")
    """a sequence-classification model (path or Hub id), or a 'task:model' transformers pipeline"""
    output_min_length: int = 8
    """responses get max_new_tokens drawn from [output_min_length, output_max_length) each step (seed example: 4)"""
    output_max_length: int = 24
    """see output_min_length (seed example: 16)"""
    temperature: float = 1.0
    """sampling temperature; the same temperature divides the logits when log-probs are recomputed for training"""

    # --- optimisation ---
    steps: int = 20
    """PPO steps (each: one batch of rollouts, their scores and ppo_epochs of updates) that `python ppo.py` runs"""
    learning_rate: float = 1e-4
    """Adam learning rate (seed: 1.41e-5; the default suits the tiny world)"""
    batch_size: int = 32
    """rollouts per PPO step per process (seed: 128)"""
    mini_batch_size: int = 8
    """rollouts per forward/backward pass (seed: 128)"""
    gradient_accumulation_steps: int = 1
    """mini-batches whose gradients are summed per optimizer step"""
    ppo_epochs: int = 4
    """passes over each batch of rollouts"""
    max_grad_norm: float | None = None
    """clip the global gradient norm to this (None: no clipping)"""
    optim: Literal["adam_torch_fused", "adam_torch"] = "adam_torch_fused"
    """Adam kernels: fused, one pass over all parameters (transformers' default), or torch's loop (the seed)"""
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "constant"
    """the learning-rate schedule over the `steps` PPO steps of `python ppo.py` (the seed keeps it constant)"""
    save_steps: int = 0
    """write a resumable checkpoint every this many PPO steps (0: only when stopped by SIGTERM / SIGINT)"""
    save_total_limit: int | None = None
    """keep only the newest this many checkpoints (None: all)"""
    resume_from_checkpoint: str | None = None
    """a checkpoint-N directory to continue from, or latest: the newest complete one in output_dir (none: start)"""

    # --- PPO ---
    adap_kl_ctrl: bool = True
    """adaptive KL control (Ziegler et al.); otherwise the KL coefficient stays at init_kl_coef"""
    init_kl_coef: float = 0.2
    """initial KL penalty coefficient beta"""
    kl_penalty: Literal["kl", "abs", "mse", "full"] = "kl"
    """which per-token KL estimate (kl_estimate) the reward is penalised by: kl: logp - ref_logp; abs: |kl|;
    mse: kl^2 / 2; full: the exact KL over the vocabulary"""
    target: float = 6.0
    """the adaptive controller's target: the KL per sequence (summed over its response tokens) it steers beta towards"""
    horizon: float = 10000.0
    """horizon of the adaptive controller (in rollouts)"""
    gamma: float = 1.0
    """discount of GAE"""
    lam: float = 0.95
    """lambda of GAE"""
    cliprange: float = 0.2
    """clip range of the policy ratio"""
    cliprange_value: float = 0.2
    """clip range of the value prediction around the rollout's value"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    early_stopping: bool = False
    """stop the PPO epochs of a step once the policy's KL to the rollout policy exceeds 1.5 x target_kl"""
    target_kl: float = 1.0
    """early stopping's limit: the mean per-token KL of the updated policy to the rollout policy (not the reference,
    and not the controller's `target`)"""
    ratio_threshold: float = 10.0
    """zero the loss of a mini-batch whose mean ratio exceeds this (it would spike the loss)"""
    use_score_scaling: bool = False
    """divide scores by their running standard deviation"""
    use_score_norm: bool = False
    """with use_score_scaling: also subtract the running mean"""
    score_clip: float | None = None
    """clip scores to [-score_clip, score_clip] (after scaling)"""
    whiten_rewards: bool = False
    """whiten the per-token rewards before GAE"""

    # --- beyond the seed (defaults keep the seed's behaviour) ---
    gumbel_max_sampling: bool = True
    """draw generate's sampled tokens with the Gumbel-max trick: the same distribution as its torch.multinomial, other
    random numbers, and on CPU several times cheaper (multinomial costs more than a 20M model's forward per token);
    off: generate's own sampling"""
    stop_token: str | None = None
    """cut each response after this token (and stop generating there): 'eos', or any string that is one token"""
    missing_eos_penalty: float | None = None
    """subtract this from the score of a response that never produced the stop token (EOS by default)"""
    fix_seed_bugs: bool = False
    """fix the seed's bugs that change numbers: clipping on the first optimizer step only, padding's whitened rewards"""

    check_on_init: ClassVar[bool] = False  # the command line: main checks the sizes, a bad one is one line

    def __post_init__(self):
        if self.log_with == "wandb":
            self.track = True
        if self.check_on_init:
            self.check_sizes()

    def check_sizes(self) -> None:
        """Sizes are checked for exact division, in the seed's terms (ValueError)."""
        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0: the plain path), got {self.chunk_size}")
        if self.batch_size % self.backward_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size "
                             f"({self.mini_batch_size}) x gradient_accumulation_steps "
                             f"({self.gradient_accumulation_steps}) = {self.backward_batch_size}")

    @property
    def backward_batch_size(self) -> int:
        """rollouts per optimizer step (per process)"""
        return self.mini_batch_size * self.gradient_accumulation_steps

    @property
    def model_name_or_path(self) -> str:
        """model_name, under the name the shared blocks below the banner read"""
        return self.model_name


@dataclass
class PPOConfig(Args):
    """The seed's `PPOConfig` (what `PPOTrainer` takes): the fields of Args, with the sizes checked when it is made
    (ValueError), as the seed's."""

    check_on_init: ClassVar[bool] = True


# ----------------------------------------------------------------------------------------------------------------------
# The algorithm: prompts -> tokens, log-probs, masked statistics, the KL-penalised rewards, GAE, the clipped
# losses, the update over epochs and mini-batches, KL control
# ----------------------------------------------------------------------------------------------------------------------
def format_query(prompt, tokenizer) -> tuple[str, bool]:
    """THE place to change how a prompt becomes text: a message list is rendered with the chat template and the
    generation prompt (then the text holds its own special tokens: templated=True); a string is used as it is."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), True
    return prompt, False


def tokenize_queries(prompts: list, tokenizer, cut_length: Callable[[], int] | None = None,
                     column: str = "prompt") -> tuple[list, list]:
    """Prompts (strings or message lists) -> (queries, reward_prompts): the token ids the policy continues, and what
    the reward model reads as the prompt. With cut_length each query is cut to cut_length() tokens, as the seed's
    IMDB example does (the reward model then reads the cut query); empty queries are dropped."""
    queries, reward_prompts = [], []
    for prompt in prompts:
        if not isinstance(prompt, (str, list)):
            raise ValueError(f"prompts must be strings or message lists; column '{column}' holds "
                             f"{type(prompt).__name__}")
        text, templated = format_query(prompt, tokenizer)
        ids = list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
        if cut_length is not None:
            ids = ids[: cut_length()]
        if ids:
            queries.append(ids)
            reward_prompts.append(tokenizer.decode(ids, skip_special_tokens=True) if cut_length else prompt)
    return queries, reward_prompts


class GumbelMaxSampling(LogitsProcessor):
    """generate's last logits processor: Gumbel noise on the (warped) scores, so that its greedy argmax draws from
    softmax(scores), exactly as softmax + torch.multinomial do (the Gumbel-max trick). torch.multinomial costs 48 ms
    per token on CPU at batch 32 and a 32k vocabulary, more than the whole forward of a 20M-parameter model; the noise
    costs about 2 ms. A uniform draw of exactly 0 gives the noise -inf: that token is skipped, never chosen."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores - torch.log(-torch.log(torch.rand_like(scores)))


def gumbel_max_generation_kwargs(generation_config, generation_kwargs: dict) -> dict:
    """generate's keyword arguments for the same sampling drawn by GumbelMaxSampling: greedy decoding over the scores
    warped as generate warps them (temperature, top-k, top-p, min-p, in its order) plus Gumbel noise. The model's
    generation_config, updated with generation_kwargs, says what is sampled; anything else that changes the draw
    (beams, several sequences, other warpers, processors of one's own) keeps generate's own sampling: the kwargs are
    returned unchanged, as they are for greedy decoding."""
    config = copy.deepcopy(generation_config)
    unused = config.update(**generation_kwargs)
    if (not config.do_sample or unused or "logits_processor" in generation_kwargs or (config.num_beams or 1) > 1
            or (config.num_return_sequences or 1) > 1 or config.top_h is not None
            or (config.typical_p or 1.0) < 1.0 or 0.0 < (config.epsilon_cutoff or 0.0) < 1.0
            or 0.0 < (config.eta_cutoff or 0.0) < 1.0):
        return generation_kwargs
    warpers = [TemperatureLogitsWarper(config.temperature)] if config.temperature not in (None, 1.0) else []
    warpers += [TopKLogitsWarper(config.top_k)] if config.top_k else []
    warpers += [TopPLogitsWarper(config.top_p)] if config.top_p is not None and config.top_p < 1.0 else []
    warpers += [MinPLogitsWarper(config.min_p)] if config.min_p is not None else []
    return {**generation_kwargs, "do_sample": False, "temperature": None, "top_k": None, "top_p": None,
            "min_p": None, "logits_processor": LogitsProcessorList([*warpers, GumbelMaxSampling()])}


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


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(..., V) logits, (...) labels -> (...) float32 log-probs of the labels, as logit[label] - logsumexp(logits)
    (the seed gathers from a full log_softmax: the same numbers, V times the memory)."""
    logits = logits.float()
    return torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (...) entropy of the softmax distribution: logsumexp(l) - sum(softmax(l) * l)."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values where mask is 1."""
    return (values * mask).sum() / mask.sum()


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance (Bessel's n / (n - 1), as the seed) of values where mask is 1."""
    count = mask.sum()
    if count == 0:
        raise ValueError("the mask is empty: there are no response tokens to take a variance over")
    return masked_mean((values - masked_mean(values, mask)) ** 2, mask) * count / (count - 1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, accelerator=None) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8), with the mean and unbiased variance over the mask's positions (of every
    process, given an accelerator of several); shift_mean=False adds the mean back. Applied everywhere, as the seed."""
    if accelerator is None or accelerator.num_processes == 1:
        mean, var = masked_mean(values, mask), masked_var(values, mask)
    else:
        total = accelerator.reduce(torch.stack([(values * mask).sum(), mask.sum()]), "sum")
        mean = total[0] / total[1]
        var = accelerator.reduce((((values - mean) ** 2) * mask).sum(), "sum") / (total[1] - 1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_estimate(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Per-token KL estimate between policy and reference at the sampled tokens, (B, T) -> (B, T); `kind` is the
    seed's `kl_penalty` option (the seed's function of the same name).

    kl: logp - ref_logp (unbiased, can be negative); abs: |logp - ref_logp|; mse: (logp - ref_logp)^2 / 2;
    full: the exact KL(policy || reference) of the next-token distributions, from (B, T, V) log-prob inputs:
    sum_v p(v) (log p(v) - log ref(v)).
    """
    if kind == "kl":
        return logprob - ref_logprob
    if kind == "abs":
        return (logprob - ref_logprob).abs()
    if kind == "mse":
        return 0.5 * (logprob - ref_logprob).square()
    if kind == "full":
        return (logprob.exp() * (logprob - ref_logprob)).sum(-1)
    raise ValueError(f"unknown kl_penalty '{kind}': expected one of kl, abs, mse, full")


def scale_scores(scores: torch.Tensor, config: "Args", running: "RunningMoments") -> torch.Tensor:
    """(B,) scores -> (B,) as the seed: divided by the running standard deviation of all scores so far (every
    process's) with use_score_scaling, the running mean subtracted first with use_score_norm; then clipped to
    [-score_clip, score_clip]."""
    if config.use_score_scaling:
        running.update(scores)
        scaling = torch.as_tensor(running.std, dtype=scores.dtype, device=scores.device) + torch.finfo(scores.dtype).eps
        mean = torch.as_tensor(running.mean, dtype=scores.dtype, device=scores.device)
        scores = (scores - mean) / scaling if config.use_score_norm else scores / scaling
    if config.score_clip is not None:
        scores = torch.clip(scores, -config.score_clip, config.score_clip)
    return scores


def compute_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, masks: torch.Tensor,
                    kl_coef: float, kl_penalty: str = "kl") -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token rewards (B, T) of RLHF: -kl_coef * KL at every response token, plus the score (B,) on the last
    response token (the last position where masks (B, T) is 1). logprobs / ref_logprobs: the policy's and the
    reference's log-probs of the sampled tokens (B, T), or whole log-softmax distributions (B, T, V) for
    kl_penalty="full". Returns (rewards, kls): kls (B, T) is the KL estimate the penalty used, which the KL
    controller is fed (change it here and the controller sees the change)."""
    kls = kl_estimate(logprobs, ref_logprobs, kl_penalty)
    rewards = -kl_coef * kls
    last = masks.shape[1] - 1 - masks.flip(1).argmax(1)
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores
    return rewards, kls


def compute_gae(values: torch.Tensor, rewards: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimation over (B, T) rewards and values (already zero outside the response):
    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, V_T = 0."""
    lastgaelam = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    length = rewards.shape[-1]
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    return torch.stack(advantages_reversed[::-1], dim=1)


def compute_advantages(values: torch.Tensor, rewards: torch.Tensor, masks: torch.Tensor, config: "Args",
                       accelerator=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T) values, rewards and masks -> (advantages, returns, values), each (B, T): GAE over the masked rewards
    and values (the rewards whitened first with whiten_rewards), then the advantages whitened over the response
    tokens of every process; the returns (the value targets) are advantages + values, taken before the whitening."""
    values, rewards = values * masks, rewards * masks
    if config.whiten_rewards:
        rewards = masked_whiten(rewards, masks, shift_mean=False, accelerator=accelerator)
        if config.fix_seed_bugs:  # whitening moved the zeros of the padding: keep padding reward-free
            rewards = rewards * masks
    advantages = compute_gae(values, rewards, config.gamma, config.lam)
    returns = advantages + values
    advantages = masked_whiten(advantages, masks, accelerator=accelerator).detach()
    return advantages, returns, values


def ppo_losses(old_logprobs, values, logprobs, vpreds, mask, advantages, returns, cliprange: float,
               cliprange_value: float) -> dict[str, torch.Tensor]:
    """The clipped surrogate policy loss and the clipped value loss of a mini-batch, all inputs (B, T):

    ratio = exp(logp - old_logp);  pg_loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))
    vpred_clipped = clip(vpred, V_old - eps_v, V_old + eps_v);
    vf_loss = 0.5 * masked_mean(max((vpred - R)^2, (vpred_clipped - R)^2))
    """
    vpredclipped = torch.max(torch.min(vpreds, values + cliprange_value), values - cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return {"pg_loss": masked_mean(torch.max(pg_losses, pg_losses2), mask),
            "vf_loss": 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask),
            "pg_clipfrac": masked_mean(torch.gt(pg_losses2, pg_losses).float(), mask),
            "vf_clipfrac": masked_mean(torch.gt(vf_losses2, vf_losses1).float(), mask), "ratio": ratio}


def ppo_update(config: "Args", rollouts: dict[str, torch.Tensor], forward: Callable, backward: Callable,
               accelerator) -> list[dict[str, torch.Tensor]]:
    """ppo_epochs passes over a batch of rollouts in shuffled mini-batches of mini_batch_size (the seed's numpy
    permutation), with early stopping between epochs. rollouts: "logprobs", "values", "masks", "advantages",
    "returns", each (B, T), as the rollout left them. forward(rows) -> (logprobs (b, T), values (b, T), entropy) of
    the policy now on those rows (entropy: the mean over their response tokens, no gradient); backward(loss,
    pg_loss, vf_loss) backpropagates and steps the optimizer every gradient_accumulation_steps calls. Returns the
    seed's stats of every mini-batch."""
    all_stats = []
    for _ in range(config.ppo_epochs):
        order = np.random.permutation(len(rollouts["masks"]))
        for start in range(0, len(order), config.mini_batch_size):
            rows = order[start : start + config.mini_batch_size]
            logprobs, vpreds, entropy = forward(rows)
            old, old_values, mask, adv, ret = (rollouts[key][rows] for key in ("logprobs", "values", "masks",
                                                                               "advantages", "returns"))
            # The clipped policy and value losses. A mini-batch whose mean ratio exceeds ratio_threshold has its
            # losses zeroed (the seed still steps the optimizer on it).
            out = ppo_losses(old, old_values, logprobs, vpreds, mask, adv, ret, config.cliprange,
                             config.cliprange_value)
            pg_loss, vf_loss = out["pg_loss"], out["vf_loss"]
            loss = pg_loss + config.vf_coef * vf_loss
            if (avg_ratio := masked_mean(out["ratio"], mask).item()) > config.ratio_threshold:
                warnings.warn(f"The average ratio of batch ({avg_ratio:.2f}) exceeds threshold "
                              f"{config.ratio_threshold:.2f}. Skipping batch.")
                pg_loss, vf_loss, loss = pg_loss * 0.0, vf_loss * 0.0, loss * 0.0
            with torch.no_grad():  # the seed's stats of the mini-batch
                all_stats.append({key: value.detach().float() for key, value in {
                    "loss/policy": pg_loss, "loss/value": vf_loss, "loss/total": loss, "policy/entropy": entropy,
                    "policy/approxkl": 0.5 * masked_mean((logprobs - old) ** 2, mask),
                    "policy/policykl": masked_mean(old - logprobs, mask), "policy/clipfrac": out["pg_clipfrac"],
                    "policy/advantages_mean": masked_mean(adv, mask), "returns/mean": masked_mean(ret, mask),
                    "returns/var": masked_var(ret, mask), "val/vpred": masked_mean(vpreds, mask),
                    "val/error": masked_mean((vpreds - ret) ** 2, mask), "val/clipfrac": out["vf_clipfrac"],
                    "val/mean": masked_mean(old_values, mask), "val/var": masked_var(old_values, mask)}.items()})
            backward(loss, pg_loss, vf_loss)
        # early stopping: once the last mini-batch's policy KL (averaged over processes) exceeds 1.5 x target_kl
        if config.early_stopping and accelerator.reduce(all_stats[-1]["policy/policykl"], "mean") > \
                1.5 * config.target_kl:
            break
    return all_stats


class AdaptiveKLController:
    """Ziegler et al. 2019: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current: float, n_steps: int) -> None:
        proportional_error = np.clip(current / self.target - 1, -0.2, 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


class FixedKLController:
    """A constant beta."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current: float, n_steps: int) -> None:
        pass


class RunningMoments:
    """Running mean and standard deviation of the scores over all processes (the seed's score scaling), merged with
    Chan et al.'s parallel update."""

    def __init__(self, accelerator):
        self.mean, self.std, self.var, self.count = 0.0, 1.0, 1.0, 1e-24
        self.accelerator = accelerator

    @torch.no_grad()
    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(torch.stack([xs.sum(), torch.tensor(float(xs.numel()), device=xs.device)]),
                                            "sum")
            xs_mean, xs_count = total[0] / total[1], total[1]
            xs_var = self.accelerator.reduce(((xs - xs_mean) ** 2).sum(), "sum") / xs_count
        else:
            xs_count = xs.numel()
            xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        xs_mean, xs_var = xs_mean.float(), xs_var.float()
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count
        self.mean += delta * xs_count / tot_count
        self.var = (old_sum + xs_var * xs_count) / tot_count
        self.std = (self.var * tot_count / (tot_count - 1)).float().sqrt()
        self.count = tot_count
        return xs_mean.item(), (xs_var * xs_count / (xs_count - 1)).float().sqrt().item()

    def state_dict(self) -> dict:
        """mean, std, var and count as they are (floats before the first update, tensors after: a resume continues
        exactly), tensors on the CPU, so that torch.load(weights_only=True) reads them."""
        return {key: value.cpu() if torch.is_tensor(value := getattr(self, key)) else float(value)
                for key in ("mean", "std", "var", "count")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value.to(self.accelerator.device) if torch.is_tensor(value) else value)


# ----------------------------------------------------------------------------------------------------------------------
# The trainer: generate (rollouts), step (one PPO update, stage by stage), log_stats
# ----------------------------------------------------------------------------------------------------------------------
class PPOTrainer:
    """The seed's PPOTrainer: `generate` rolls out, `step(queries, responses, scores)` runs one PPO update on a batch
    of rollouts and returns the seed's stats, `log_stats` writes them. Without `ref_model` the reference is a frozen
    copy made by create_reference_model (sharing `num_shared_layers` layers), or, for a LoRA policy, the policy with
    its adapters off. The default optimizer is Adam over the trainable parameters with config.learning_rate."""

    def __init__(self, config: PPOConfig | None = None, model: nn.Module | None = None, ref_model=None,
                 tokenizer: PreTrainedTokenizerBase | None = None, dataset=None, optimizer=None, data_collator=None,
                 num_shared_layers: int | None = None, lr_scheduler=None):
        # 0. Check the arguments (the seed's checks, with what was found).
        if not isinstance(config, Args):  # a PPOConfig, or ppo.py's Args (the same fields)
            raise ValueError(f"config must be a PPOConfig, got {type(config)}")
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise ValueError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer)}")
        if not isinstance(model, PreTrainedModelWrapper):
            raise ValueError(f"model must be an AutoModelForCausalLMWithValueHead or AutoModelForSeq2SeqLMWithValueHead"
                             f", got {type(model)}")
        self.config, self.tokenizer = config, tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

        # 1. Accelerator; every RNG seeded from config.seed, as the seed's set_seed (the mini-batch order follows it).
        self.accelerator = make_accelerator(config)
        self.current_device = self.accelerator.device
        self.is_encoder_decoder = getattr(model, "is_encoder_decoder", False)
        self.is_peft_model = model.is_peft_model
        # token log-probs chunk_size positions at a time (batched_forward_pass) unless whole distributions are needed
        self.chunked = config.chunk_size > 0 and not self.is_encoder_decoder and config.kl_penalty != "full"
        # Dropout off, as in the seed, whose every forward pass runs in eval mode (value head, LoRA and model
        # dropout included). Here the probabilities are zeroed and the policy stays in train mode, which computes
        # the same numbers and lets gradient checkpointing (active only in train mode) work.
        disable_dropout_in_model(model)
        model.train()

        # 2. Reference model: the one given, a frozen copy (layers optionally shared), or LoRA's adapters-off policy.
        if ref_model is not None:
            if num_shared_layers is not None:
                warnings.warn("num_shared_layers is ignored when ref_model is given", UserWarning)
            self.ref_model = ref_model
        elif self.is_peft_model:
            self.ref_model = None
        else:
            if num_shared_layers is not None and self.accelerator.distributed_type in (DistributedType.FSDP,
                                                                                       DistributedType.DEEPSPEED):
                raise ValueError("num_shared_layers shares tensors between the policy and the reference, which FSDP "
                                 "and DeepSpeed shard separately; leave it unset under them")
            self.ref_model = create_reference_model(model, num_shared_layers=num_shared_layers)
        self.optional_peft_ctx = (lambda: self.accelerator.unwrap_model(self.model).pretrained_model.disable_adapter()
                                  ) if self.is_peft_model else nullcontext

        # 3. Data (optional, as in the seed: the training loop may feed step() itself).
        self.dataset, self.dataloader = dataset, None
        if dataset is not None:
            self.dataloader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                                                          drop_last=True, collate_fn=data_collator)

        # 4. Optimizer (Adam over the trainable parameters, as the seed), KL controller, score statistics; prepared by
        #    accelerate (DDP / FSDP / DeepSpeed); the reference frozen and sharded like the policy.
        self.optimizer = optimizer or torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                                       lr=config.learning_rate,
                                                       fused=config.optim == "adam_torch_fused")
        self.lr_scheduler = lr_scheduler
        self.kl_ctl = (AdaptiveKLController(config.init_kl_coef, config.target, config.horizon) if config.adap_kl_ctrl
                       else FixedKLController(config.init_kl_coef))
        self.running = RunningMoments(self.accelerator)
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:  # what accelerate cannot infer
            self.accelerator.state.deepspeed_plugin.deepspeed_config.update(
                {"train_micro_batch_size_per_gpu": config.mini_batch_size,
                 "gradient_clipping": config.max_grad_norm or 0.0})
        self.model, self.optimizer = self.accelerator.prepare(model.to(self.accelerator.device), self.optimizer)
        if self.dataloader is not None:
            self.dataloader = self.accelerator.prepare(self.dataloader)
        if self.ref_model is not None:
            self.ref_model = prepare_frozen(self.accelerator, self.ref_model)
        self.current_step = 0  # step() calls so far
        self._micro_steps, self._clipped = 0, False
        if config.max_grad_norm is not None and not config.fix_seed_bugs:
            warnings.warn("the seed clips the gradient norm on the first optimizer step only (its parameter list is a "
                          "one-shot iterator); pass fix_seed_bugs=True (--fix_seed_bugs) to clip every step")

    def generate(self, query_tensor, length_sampler: Callable | None = None, batch_size: int = 4,
                 return_prompt: bool = True, generate_ref_response: bool = False, **generation_kwargs):
        """Responses of the policy (and, with generate_ref_response, of the reference) to a list of query tensors
        (T,), batch_size queries per left-padded generate call with the KV cache, each response cut after its first
        EOS (padding removed); return_prompt=False returns the responses alone. length_sampler() draws max_new_tokens
        for each call. One query tensor (T,) gives generate's own (1, T') output, uncut, as the seed."""
        one = not isinstance(query_tensor, list)
        if one and query_tensor.dim() != 1:
            raise ValueError(f"query_tensor must be a tensor of shape (seq_len,) or a list of such tensors, got "
                             f"shape {tuple(query_tensor.shape)}")
        if one and length_sampler is not None:  # one draw for the policy and the reference, as the seed
            generation_kwargs["max_new_tokens"], length_sampler = length_sampler(), None
        generation_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        if self.config.gumbel_max_sampling:  # the same draws' distribution, without torch.multinomial's cost
            generation_config = self.accelerator.unwrap_model(self.model).pretrained_model.generation_config
            generation_kwargs = gumbel_max_generation_kwargs(generation_config, generation_kwargs)

        def run(model) -> list[torch.Tensor]:
            return self._generate_batched(model, [query_tensor] if one else query_tensor, length_sampler, batch_size,
                                          return_prompt, remove_padding=not one, **generation_kwargs)

        with gathered_for_generation(self.accelerator, self.model) as policy:  # whole weights for this call only
            policy.eval()  # for generate only: under gradient checkpointing, train mode would switch the KV cache off
            try:
                responses = run(policy)
                if generate_ref_response:  # the reference: LoRA's policy with adapters off, or the frozen copy
                    with (self.optional_peft_ctx() if self.is_peft_model else
                          gathered_for_generation(self.accelerator, self.ref_model)) as reference:
                        ref_responses = run(policy if reference is None else reference)
            finally:
                policy.train()
        if one:
            responses = responses[0].unsqueeze(0)
            ref_responses = ref_responses[0].unsqueeze(0) if generate_ref_response else None
        return (responses, ref_responses) if generate_ref_response else responses

    @torch.no_grad()
    def _generate_batched(self, model, query_tensors: list[torch.Tensor], length_sampler=None, batch_size: int = 4,
                          return_prompt: bool = True, remove_padding: bool = True, **generation_kwargs):
        outputs = []
        eos = self.tokenizer.eos_token_id
        side = "right" if self.is_encoder_decoder else "left"  # left: every query ends where its response starts
        batch_size = min(len(query_tensors), batch_size)
        for start in range(0, len(query_tensors), batch_size):
            if length_sampler is not None:
                generation_kwargs["max_new_tokens"] = length_sampler()
            batch = [query.to(self.current_device) for query in query_tensors[start : start + batch_size]]
            input_ids = pad_sequence(batch, batch_first=True, padding_value=self.tokenizer.pad_token_id,
                                     padding_side=side)
            attention_mask = pad_sequence([torch.ones_like(query) for query in batch], batch_first=True,
                                          padding_side=side)
            generations = model.generate(input_ids=input_ids, attention_mask=attention_mask, **generation_kwargs)
            for query, generation in zip(batch, generations):
                # the decoder's sequence starts with its start token (which may be the EOS id); skip it
                response = generation if self.is_encoder_decoder else generation[input_ids.shape[1]:]
                first = 1 if self.is_encoder_decoder else 0
                if remove_padding and (response[first:] == eos).any():  # cut after the first EOS (kept)
                    response = response[: first + int((response[first:] == eos).nonzero()[0, 0]) + 1]
                outputs.append(torch.cat([query, response]) if return_prompt and not self.is_encoder_decoder
                               else response)
        return outputs

    def _step_safety_checker(self, batch_size: int, queries, responses, scores, masks=None):
        """Every input a list of batch_size tensors, responses non-empty, scores finite scalars -> on the device."""
        for name, items in (("queries", queries), ("responses", responses), ("scores", scores)):
            if not isinstance(items, list):
                raise ValueError(f"{name} must be a list of tensors, got {type(items).__name__}")
            if len(items) != batch_size:
                raise ValueError(f"step expects config.batch_size = {batch_size} {name}, got {len(items)} (queries "
                                 f"{len(queries)}, responses {len(responses)}, scores {len(scores)})")
        if not isinstance(queries[0], torch.Tensor) or not isinstance(responses[0], torch.Tensor):
            raise ValueError(f"queries and responses must be lists of 1-D token-id tensors, got lists of "
                             f"{type(queries[0]).__name__} and {type(responses[0]).__name__}")
        if empty := [i for i, response in enumerate(responses) if response.numel() == 0]:
            raise ValueError(f"responses must not be empty; responses {empty[:10]} have no tokens")
        if empty := [i for i, query in enumerate(queries) if query.numel() == 0 and not self.is_encoder_decoder]:
            raise ValueError(f"queries must not be empty; queries {empty[:10]} have no tokens")
        scores = [torch.as_tensor(score, dtype=torch.float32) for score in scores]
        if bad := [i for i, score in enumerate(scores) if score.numel() != 1]:
            raise ValueError(f"each score must be one number; scores {bad[:10]} have shapes "
                             f"{[tuple(scores[i].shape) for i in bad[:10]]}")
        scores = torch.stack([score.reshape(()) for score in scores]).to(self.current_device)
        if not torch.isfinite(scores).all():
            raise ValueError(f"scores must be finite; got {scores[~torch.isfinite(scores)].tolist()} at positions "
                             f"{(~torch.isfinite(scores)).nonzero().flatten().tolist()}")
        queries = [query.to(self.current_device) for query in queries]
        responses = [response.to(self.current_device) for response in responses]
        masks = [mask.to(self.current_device) for mask in masks] if masks is not None else None
        return queries, responses, scores, masks

    def step(self, queries: list[torch.Tensor], responses: list[torch.Tensor], scores: list[torch.Tensor],
             response_masks: list[torch.Tensor] | None = None) -> dict:
        """One PPO update on batch_size rollouts: queries and responses are lists of 1-D token-id tensors, scores a
        list of scalar tensors (one per response); response_masks optionally marks the response tokens to train on.
        Returns the seed's stats. The stages are those of docs/ppo.md; each is a function of the algorithm section."""
        config, bs = self.config, self.config.batch_size
        queries, responses, scores, response_masks = self._step_safety_checker(bs, queries, responses, scores,
                                                                                response_masks)
        timing, t0 = {}, time.time()

        # 1. Score scaling (running statistics over all processes) and clipping, as the seed.
        scores = scale_scores(scores, config, self.running)

        # 2. Forward passes without gradient: the policy's log-probs and values (the "old" ones of PPO) and the
        #    reference's log-probs, (B, T-1) each (position t scores token t+1), and the mask of the response tokens.
        #    kl_penalty "full" needs the whole next-token distributions (B, T-1, V) of both instead.
        t = time.time()
        model_inputs = self.prepare_model_inputs(queries, responses)
        full_kl = config.kl_penalty == "full"
        with torch.no_grad():
            old_logprobs, logits, values, masks = self.batched_forward_pass(
                self.model, queries, responses, model_inputs, return_logits=full_kl, response_masks=response_masks)
            with self.optional_peft_ctx():
                ref_logprobs, ref_logits, _, _ = self.batched_forward_pass(
                    self.model if self.is_peft_model else self.ref_model, queries, responses, model_inputs,
                    return_logits=full_kl)
        timing["time/ppo/forward_pass"] = time.time() - t

        with torch.no_grad():
            # 3. Per-token rewards: -beta * KL at every response token, plus the score on the last one.
            t = time.time()
            policy, reference = ((torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)) if full_kl
                                 else (old_logprobs, ref_logprobs))
            rewards, kls = compute_rewards(scores, policy, reference, masks, self.kl_ctl.value, config.kl_penalty)
            del logits, ref_logits, policy, reference
            timing["time/ppo/compute_rewards"] = time.time() - t

            # 4. Advantages (GAE, whitened) and returns.
            t = time.time()
            advantages, returns, values = compute_advantages(values, rewards, masks, config, self.accelerator)
            timing["time/ppo/compute_advantages"] = time.time() - t

        # 5. ppo_epochs passes over the batch in shuffled mini-batches, an optimizer step every
        #    gradient_accumulation_steps mini-batches.
        t = time.time()
        rollouts = {"logprobs": old_logprobs, "values": values, "masks": masks, "advantages": advantages,
                    "returns": returns}
        forward = partial(self._train_forward, queries, responses, model_inputs, masks)  # forward(rows)
        all_stats = ppo_update(config, rollouts, forward, self._backward_and_step, self.accelerator)
        timing["time/ppo/optimize_step"] = time.time() - t

        # 6. Statistics, averaged over the mini-batches and over processes.
        t = time.time()
        train_stats = {key: torch.stack([stats[key] for stats in all_stats]).mean() for key in all_stats[0]}
        stats = self.record_step_stats(scores=scores, logprobs=old_logprobs, ref_logprobs=ref_logprobs, kls=kls,
                                       train_stats=train_stats, kl_coef=self.kl_ctl.value, masks=masks,
                                       queries=queries, responses=responses)
        timing["time/ppo/calc_stats"] = time.time() - t
        stats["ppo/learning_rate"] = self.optimizer.param_groups[0]["lr"]

        # 7. The KL controller's update with the KL the rewards were penalised by (per sequence, the mean over every
        #    process's rollouts) and the global batch size; the schedule's step, if one was given.
        kl = self.accelerator.reduce((kls * masks).sum(-1).mean(), "mean").item()
        self.kl_ctl.update(kl, bs * self.accelerator.num_processes)
        timing["time/ppo/total"] = time.time() - t0
        stats.update(timing)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.current_step += 1
        return stats

    def _train_forward(self, queries, responses, model_inputs: dict, masks: torch.Tensor, rows) -> tuple:
        """The policy on the rollouts `rows`, with gradient: log-probs (b, T-1), values (b, T-1), and the mean entropy
        of its next-token distributions at the response tokens (no gradient), for ppo_update."""
        logprobs, logits_or_entropy, vpreds, _ = self.batched_forward_pass(
            self.model, [queries[j] for j in rows], [responses[j] for j in rows],
            {key: value[rows] for key, value in model_inputs.items()}, return_logits=not self.chunked,
            return_entropy=self.chunked)
        with torch.no_grad():
            mask = masks[rows].bool()
            if self.chunked:  # per-token entropies, computed chunk by chunk with the log-probs
                entropy = logits_or_entropy[mask].mean()
            else:  # logits (N, V) at the response tokens only, or (b, T-1, V)
                logits = logits_or_entropy
                entropy = entropy_from_logits(logits if logits.dim() == 2 else logits[mask]).mean()
        return logprobs, vpreds, entropy

    def _backward_and_step(self, loss: torch.Tensor, pg_loss: torch.Tensor, vf_loss: torch.Tensor) -> None:
        """Backward of one mini-batch's loss, scaled by 1 / gradient_accumulation_steps, and the optimizer step every
        gradient_accumulation_steps calls (the gradient clipped first: the seed does it on the first optimizer step
        only). A loss that is not finite on some process stops every process before the optimizer sees it."""
        config = self.config
        if self.accelerator.reduce((~torch.isfinite(loss.detach())).float(), "sum").item() > 0:
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"the PPO loss is {loss.item()} (policy {pg_loss.item()}, value "
                                     f"{(config.vf_coef * vf_loss).item()}); the optimizer was not stepped")
        self._micro_steps += 1
        sync = self._micro_steps % config.gradient_accumulation_steps == 0
        with accumulating(self.accelerator, self.model, last=sync):
            self.accelerator.backward(loss / config.gradient_accumulation_steps)
        if sync:
            if config.max_grad_norm is not None and (config.fix_seed_bugs or not self._clipped):
                self.accelerator.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                 config.max_grad_norm)
                self._clipped = True
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def prepare_model_inputs(self, queries: list[torch.Tensor], responses: list[torch.Tensor]) -> dict:
        """Right-padded model inputs: query + response (decoder-only), or query -> encoder and response -> decoder."""
        def pad_right(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            return (pad_sequence([s.long() for s in sequences], batch_first=True,
                                 padding_value=self.tokenizer.pad_token_id),
                    pad_sequence([torch.ones_like(s, dtype=torch.long) for s in sequences], batch_first=True))

        if self.is_encoder_decoder:
            input_ids, attention_mask = pad_right(queries)
            decoder_input_ids, decoder_attention_mask = pad_right(responses)
            return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids,
                    "decoder_attention_mask": decoder_attention_mask}
        input_ids, attention_mask = pad_right([torch.cat([q, r]) for q, r in zip(queries, responses)])
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def batched_forward_pass(self, model, queries, responses, model_inputs: dict, return_logits: bool = False,
                             response_masks=None, return_entropy: bool = False):
        """Log-probs (B, T-1) of every next token, logits (B, T-1, V) if asked, values (B, T-1) and the mask (B, T-1)
        of the response tokens, computed mini_batch_size rows at a time. With lm_head_only_at_responses the output
        layer runs at the mask's N positions only: the log-probs are 0 elsewhere and the logits are (N, V). Without
        logits asked for, on the chunked path (chunk_size > 0, decoder-only, kl_penalty not full) no (N, V) logits
        exist at once (chunked_log_probs); return_entropy there: the second value is the per-token entropy (B, T-1)
        of the response tokens (0 elsewhere) instead of the logits.

        Position t holds log p(token t+1) and the value of the state before it; the mask is 1 on the response's
        tokens: t in [len(query) - 1, len(query) - 1 + len(response)) (encoder-decoder: the decoder positions from 1
        up to its last token, as the seed). Each chunk is run at its own longest length and zero-padded back to T-1,
        which is exact because padding is on the right; the log-probs and logits are divided by the temperature.
        """
        fbs = self.config.mini_batch_size
        key = "decoder_attention_mask" if self.is_encoder_decoder else "attention_mask"
        full_length = model_inputs[key].shape[1]
        all_logprobs, all_logits, all_values, all_masks = [], [], [], []
        for start in range(0, len(queries), fbs):
            chunk = {name: value[start : start + fbs] for name, value in model_inputs.items()}
            for ids_key, mask_key in (("input_ids", "attention_mask"), ("decoder_input_ids", "decoder_attention_mask")):
                if ids_key in chunk:  # drop the columns that are padding in every row of the chunk
                    used = int(chunk[mask_key].sum(1).max())
                    chunk[ids_key], chunk[mask_key] = chunk[ids_key][:, :used], chunk[mask_key][:, :used]
            input_ids = chunk["decoder_input_ids" if self.is_encoder_decoder else "input_ids"]
            masks = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, device=input_ids.device)
            for j in range(len(input_ids)):
                if self.is_encoder_decoder:
                    begin, end = 1, int(chunk["decoder_attention_mask"][j].sum()) - 1
                else:
                    begin = len(queries[start + j]) - 1
                    end = begin + len(responses[start + j])
                masks[j, begin:end] = 1
                if response_masks is not None and not self.is_encoder_decoder:
                    masks[j, begin:end] *= response_masks[start + j].to(masks.dtype)
            # the output layer only where a log-prob is used (the masked response positions): logits are (N, V) then
            scored = masks.bool()
            language_model = self.accelerator.unwrap_model(model).pretrained_model
            if self.chunked and not return_logits:  # the response tokens' log-probs (and entropies), chunk by chunk
                labels = input_ids.masked_fill(~F.pad(scored, (1, 0), value=False), -100)  # label t+1 at position t
                with self.accelerator.autocast(), chunked_log_probs(language_model, labels, self.config.chunk_size,
                                                                    self.config.temperature,
                                                                    ("entropy",) if return_entropy else ()):
                    out, _, values = model(**chunk, use_cache=False)
                pad = full_length - 1 - out.log_probs.shape[1]
                all_logprobs.append(F.pad(out.log_probs, (0, pad)))
                all_values.append(F.pad(values[:, :-1].float(), (0, pad)))
                all_masks.append(F.pad(masks, (0, pad)))
                if return_entropy:
                    all_logits.append(F.pad(out.entropy, (0, pad)))
                continue
            only_scored = (self.config.lm_head_only_at_responses and not self.is_encoder_decoder
                           and self.config.kl_penalty != "full")
            positions = F.pad(scored, (0, 1), value=False) if only_scored else None
            with self.accelerator.autocast(), lm_head_only_at(language_model, positions):
                logits, _, values = model(**chunk, use_cache=False)
            logits = logits / self.config.temperature if self.config.temperature != 1.0 else logits
            if only_scored:  # 0 at the positions that are never used (queries, padding), as the masks say
                logprobs = torch.zeros_like(masks).masked_scatter(
                    scored, logprobs_from_logits(logits, input_ids[:, 1:][scored]))
            else:
                logprobs = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])
            pad = full_length - 1 - logprobs.shape[1]
            all_logprobs.append(F.pad(logprobs, (0, pad)))
            all_values.append(F.pad(values[:, :-1].float(), (0, pad)))
            all_masks.append(F.pad(masks, (0, pad)))
            if return_logits:
                all_logits.append(logits if only_scored else F.pad(logits[:, :-1], (0, 0, 0, pad)))
        return (torch.cat(all_logprobs), torch.cat(all_logits) if return_logits or return_entropy else None,
                torch.cat(all_values), torch.cat(all_masks))

    def record_step_stats(self, kl_coef: float, **data) -> dict:
        """The seed's stats of a step: objective/*, ppo/* (means over the mini-batches) and tokens/*; scalars are
        averaged over processes, distributions (numpy arrays) are this process's."""
        mask, kls = data["masks"], data["kls"]
        kl_list = (kls * mask).sum(-1)
        query_lens = torch.tensor([len(q) for q in data["queries"]], dtype=torch.float)
        response_lens = torch.tensor([len(r) for r in data["responses"]], dtype=torch.float)
        scalars = {
            "objective/kl": kl_list.mean(),
            "objective/kl_coef": torch.tensor(float(kl_coef)),
            "objective/entropy": (-data["logprobs"] * mask).sum(-1).mean(),
            "ppo/mean_non_score_reward": masked_mean(-kl_coef * kls, mask),  # the KL part of the rewards
            "ppo/mean_scores": data["scores"].mean(), "ppo/std_scores": data["scores"].std(),
            "tokens/queries_len_mean": query_lens.mean(), "tokens/queries_len_std": query_lens.std(),
            "tokens/responses_len_mean": response_lens.mean(), "tokens/responses_len_std": response_lens.std(),
            **{f"ppo/{key}": value for key, value in data["train_stats"].items()},
        }
        scalars["ppo/val/var_explained"] = 1 - scalars["ppo/val/error"] / scalars["ppo/returns/var"]
        values = torch.stack([value.float().to(self.current_device) for value in scalars.values()])
        stats = dict(zip(scalars, self.accelerator.reduce(values, "mean").tolist()))
        if stats["objective/kl"] < -1.0:
            warnings.warn(f"KL divergence is starting to become negative: {stats['objective/kl']:.2f} - this might be "
                          "a precursor for failed training (often: generation kwargs that differ from the sampling "
                          "the log-probs assume, e.g. a temperature, top_k or min_length)")
        stats.update({"objective/kl_dist": kl_list.cpu().numpy(), "objective/logprobs": data["logprobs"].cpu().numpy(),
                      "objective/ref_logprobs": data["ref_logprobs"].cpu().numpy(),
                      "tokens/queries_dist": query_lens.numpy(), "tokens/responses_dist": response_lens.numpy()})
        return stats

    def log_stats(self, stats: dict, batch: dict, rewards, columns_to_log=("query", "response")) -> None:
        """A console line, a metrics.jsonl row (the scalar stats plus env/reward_mean|std over all processes) and
        samples.jsonl rows (columns_to_log of batch, with the reward) in config.output_dir; with --track, wandb too
        (a game_log table and histograms)."""
        if isinstance(rewards, list):  # a list of scalar tensors or numbers, as passed to step
            rewards = [float(reward) for reward in rewards]
        rewards = torch.as_tensor(rewards, dtype=torch.float32, device=self.current_device).flatten()
        rewards = self.accelerator.gather(rewards).cpu()
        missing = [column for column in columns_to_log if column not in batch]
        if missing:
            raise ValueError(f"columns_to_log {list(columns_to_log)} are not all in the batch: missing {missing}, "
                             f"found {list(batch)}")
        columns = [gather_object(list(batch[column])) for column in columns_to_log]
        if not self.accelerator.is_main_process:
            return
        row = {"step": self.current_step, "env/reward_mean": rewards.mean().item(),
               "env/reward_std": rewards.std().item() if len(rewards) > 1 else 0.0}
        row.update({key: value for key, value in stats.items() if isinstance(value, (int, float))})
        output_dir = Path(self.config.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(output_dir / "metrics.jsonl", "a") as f:  # NaN and infinity are not JSON: null
            f.write(json.dumps({key: None if isinstance(value, float) and not math.isfinite(value) else value
                                for key, value in row.items()}) + "\n")
        samples = [{"step": self.current_step, **dict(zip(columns_to_log, values)), "reward": reward}
                   for *values, reward in zip(*columns, rewards.tolist())]
        with open(output_dir / "samples.jsonl", "a") as f:
            f.writelines(json.dumps(sample) + "\n" for sample in samples)
        shown = ["env/reward_mean", "objective/kl", "objective/kl_coef", "ppo/loss/total", "ppo/policy/clipfrac",
                 "tokens/responses_len_mean", "episodes_per_second"]
        tqdm.write(f"step {self.current_step} " + " ".join(f"{key.split('/')[-1]} {row[key]:.4g}" for key in shown
                                                            if key in row))
        if self.config.track:
            import wandb

            logs = {key: wandb.Histogram(value) if isinstance(value, np.ndarray) else value
                    for key, value in {**row, **stats}.items() if key != "step"}
            logs["env/reward_dist"] = wandb.Histogram(rewards.numpy())
            logs["game_log"] = wandb.Table(columns=[*columns_to_log, "reward"],
                                           rows=[list(sample.values())[1:] for sample in samples])
            wandb.log(logs, step=self.current_step)

    def _save_pretrained(self, save_directory) -> None:
        """The policy with its value head (seed layout) and the tokenizer, written by the main process. Every process
        calls it: under FSDP / ZeRO-3 the weights are gathered from their shards first."""
        weights = gathered_state_dict(self.accelerator, self.model)
        if self.accelerator.is_main_process:
            self.accelerator.unwrap_model(self.model).save_pretrained(save_directory, state_dict=weights)
            self.tokenizer.save_pretrained(save_directory)


def main(args: Args) -> None:
    # 0. Check what can be checked before anything is loaded.
    try:
        args.check_sizes()
        parse_reward_spec(args.reward_model)
    except ValueError as error:
        fail(str(error))
    check_positive(args, ["steps", "logging_steps", "output_min_length"])
    if args.output_max_length <= args.output_min_length:
        fail(f"--output_max_length must be above --output_min_length {args.output_min_length} (the range is "
             f"[min, max)), got {args.output_max_length}")
    if (args.input_min_text_length is None) != (args.input_max_text_length is None) or (
            args.input_min_text_length is not None and not 0 < args.input_min_text_length < args.input_max_text_length):
        fail(f"--input_min_text_length and --input_max_text_length go together, with 0 < min < max; got "
             f"{args.input_min_text_length} and {args.input_max_text_length}")
    if args.temperature <= 0:
        fail(f"--temperature must be positive, got {args.temperature}")
    if args.use_peft and any(os.environ.get(variable, "false").lower() == "true"
                             for variable in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")):
        fail("--use_peft is not supported under FSDP or DeepSpeed by ppo.py (its value-head model saves the adapter "
             "from an unsharded policy); train LoRA with data parallelism: accelerate_configs/multi_gpu.yaml")
    check_run(args, ["model_name"])  # learning rate, model path, output_dir, --resume_from_checkpoint latest

    # 1. Accelerator (checks how the run was launched; seeds every RNG). The trainer below makes its own, which
    #    shares this one's state.
    accelerator = make_accelerator(args, zero3_refusal="its reward model would be loaded partitioned and used outside "
                                                       "an engine")
    world_size = accelerator.num_processes
    global_batch_size = args.batch_size * world_size
    accelerator.print(f"run: {world_size} process(es) x {args.mini_batch_size} per device x "
                      f"{args.gradient_accumulation_steps} accumulation = {world_size * args.backward_batch_size} "
                      f"rollouts per optimizer step; {world_size} x {args.batch_size} = {global_batch_size} rollouts "
                      "per PPO step")
    output_dir = Path(args.output_dir)

    # 2. Data: the prompts, loaded and checked before any model is (ppo.py has no test split: not the other scripts'
    #    load_splits).
    prompt_split, query_column = load_prompts(args.query_dataset, args.dataset_config, args.dataset_train_split,
                                              args.query_column)
    prompts = prompt_split[query_column]

    # 3. Tokenizer and tokenised queries. With --input_min/max_text_length each query is cut to a random length, as
    #    the seed's IMDB example does; the reward model then sees the cut query as the prompt.
    tokenizer = load_tokenizer(args, "to end responses")
    if isinstance(prompts[0], list) and tokenizer.chat_template is None:
        fail(f"the prompts are conversations but the tokenizer of {args.model_name} has no chat template")
    cut_length = (LengthSampler(args.input_min_text_length, args.input_max_text_length)
                  if args.input_min_text_length is not None else None)
    try:
        queries, reward_prompts = tokenize_queries(prompts, tokenizer, cut_length, query_column)
    except ValueError as error:
        fail(str(error))
    if len(queries) < global_batch_size:
        fail(f"the query dataset has {len(queries)} non-empty prompts but one PPO step needs {global_batch_size} "
             f"(batch_size {args.batch_size} x {world_size} processes)")
    stop_token_id = None
    if args.stop_token is not None:
        stop_ids = ([tokenizer.eos_token_id] if args.stop_token == "eos" else
                    tokenizer(args.stop_token, add_special_tokens=False)["input_ids"])
        if len(stop_ids) != 1:
            fail(f"--stop_token must be 'eos' or one token; '{args.stop_token}' is {len(stop_ids)} tokens {stop_ids}")
        stop_token_id = stop_ids[0]

    # 4. Policy with a value head (seq2seq models get the seq2seq wrapper); LoRA; gradient checkpointing. When
    #    resuming, the policy (and its value head) come from the checkpoint and the reference from model_name.
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    is_encoder_decoder = AutoConfig.from_pretrained(args.model_name, revision=args.revision).is_encoder_decoder
    wrapper = AutoModelForSeq2SeqLMWithValueHead if is_encoder_decoder else AutoModelForCausalLMWithValueHead
    peft_config = None
    if args.use_peft and not args.resume_from_checkpoint:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                 target_modules=args.lora_target_modules or "all-linear",
                                 task_type="SEQ_2_SEQ_LM" if is_encoder_decoder else "CAUSAL_LM")
    load_path = args.resume_from_checkpoint or args.model_name
    model = wrapper.from_pretrained(load_path, dtype=dtype, peft_config=peft_config, is_trainable=True,
                                    **({"revision": args.revision} if load_path == args.model_name else {}))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_model = None
    if args.resume_from_checkpoint and not args.use_peft:
        ref_model = wrapper.from_pretrained(args.model_name, revision=args.revision, dtype=dtype)

    # 5. The trainer (reference, the seed's Adam, accelerate's preparation) and the learning-rate schedule, stepped
    #    once per PPO step over --steps: get_scheduler's multipliers written out (importing it costs 0.8 s of start-up).
    trainer = PPOTrainer(args, model, ref_model, tokenizer)

    def lr_multiplier(step: int) -> float:
        if args.lr_scheduler_type == "linear":
            return (args.steps - step) / args.steps
        return 0.5 * (1.0 + math.cos(math.pi * (step / args.steps))) if args.lr_scheduler_type == "cosine" else 1.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lr_multiplier)
    torch.manual_seed(args.seed + accelerator.process_index)  # each process samples its own responses
    params_in_memory = sum(p.numel() for m in (model, trainer.ref_model) if m is not None for p in m.parameters())
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"model: {params_in_memory / 1e6:.2f}M parameters in memory (policy"
                      f"{' + reference' if trainer.ref_model is not None else ''}), {num_trainable / 1e6:.2f}M "
                      f"trainable; {len(queries)} prompts, {args.steps} steps of {global_batch_size} rollouts")

    # 6. The reward: a sequence-classification model or a pipeline, on the same device.
    try:
        reward_fn = load_reward_function(args.reward_model, accelerator.device)
    except (OSError, ValueError) as error:
        fail(f"could not load reward model {args.reward_model}: {' '.join(str(error).split())[:500]}")

    # 7. Resume: optimizer, schedule, KL coefficient, seed-mode clip, score statistics and every RNG, all loaded with
    #    weights_only=True (tensors and plain Python types, as save_checkpoint writes them); then the logs
    #    (metrics.jsonl and samples.jsonl, written by log_stats; wandb with --track).
    start_step = 0
    if args.resume_from_checkpoint:
        checkpoint = Path(args.resume_from_checkpoint)
        state = torch.load(checkpoint / "training_state.pt", weights_only=True)
        load_optimizer_state(checkpoint, accelerator, trainer.model, trainer.optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        trainer.kl_ctl.value, trainer._clipped = state["kl_coef"], state["clipped"]
        trainer.running.load_state_dict(state["running"])
        rng = torch.load(checkpoint / f"rng_state_{accelerator.process_index}.pt", weights_only=True)
        random.setstate(rng["python"])
        name, keys, position, has_gauss, gauss = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        start_step = trainer.current_step = state["step"]
        accelerator.print(f"resumed from {checkpoint} at step {start_step}")
    open_logs(args, accelerator, start_step, files=("metrics.jsonl", "samples.jsonl"))

    # 8. Training loop: rollout -> score -> PPO step -> log, batch_size queries per process per step.
    generation_kwargs = {"min_length": -1, "top_k": 0, "top_p": 1.0, "do_sample": True,
                         "temperature": args.temperature, "pad_token_id": tokenizer.pad_token_id}
    if stop_token_id is not None and stop_token_id != tokenizer.eos_token_id:
        generation_kwargs["eos_token_id"] = [tokenizer.eos_token_id, stop_token_id]
    output_length_sampler = LengthSampler(args.output_min_length, args.output_max_length)
    ended_by = tokenizer.eos_token_id if stop_token_id is None else stop_token_id
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="ppo",
                    disable=not accelerator.is_local_main_process)
    preemption = Preemption()  # from here on, SIGTERM / SIGINT end the run with a checkpoint of the last PPO step
    for step in progress:
        step_start = time.time()
        mine = step_indices(step, len(queries), global_batch_size, args.seed)[accelerator.process_index :: world_size]
        query_tensors = [torch.tensor(queries[i]) for i in mine]

        # 8a. Rollout: all of this process's queries in one left-padded generate call with the KV cache; each
        #     response cut after its first EOS, or after the stop token.
        response_tensors = trainer.generate(query_tensors, length_sampler=output_length_sampler,
                                            batch_size=args.batch_size, return_prompt=False, **generation_kwargs)
        if stop_token_id is not None:  # truncate after the first stop token (it is kept)
            response_tensors = [r[: int((r == stop_token_id).nonzero()[0, 0]) + 1] if (r == stop_token_id).any()
                                else r for r in response_tensors]
        for i in [i for i, r in enumerate(response_tensors) if len(r) == 0]:  # an immediate stop: the EOS itself
            response_tensors[i] = torch.tensor([tokenizer.eos_token_id], device=accelerator.device)
        rollout_seconds = time.time() - step_start

        # 8b. Score prompt + response with the reward model; the optional penalty for responses that never ended.
        score_start = time.time()
        response_texts = tokenizer.batch_decode(response_tensors, skip_special_tokens=True)
        scores = reward_fn([reward_prompts[i] for i in mine], response_texts)
        if args.missing_eos_penalty is not None:
            scores = [s - args.missing_eos_penalty * float(not (r == ended_by).any())
                      for s, r in zip(scores, response_tensors)]
        score_tensors = [torch.tensor(float(s)) for s in scores]
        score_seconds = time.time() - score_start

        # 8c. The PPO step. A non-finite loss stops the run before the optimizer sees it.
        try:
            stats = trainer.step(query_tensors, response_tensors, score_tensors)
        except FloatingPointError as error:
            checkpoints = complete_checkpoints(output_dir)
            kept = f"the last checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
            fail(f"{error} at step {step + 1}; stopping ({kept})")
        scheduler.step()

        # 8d. Log (every logging_steps) and checkpoint: every save_steps, and when a signal asks to stop.
        done = step + 1
        stats.update({"time/rollout": rollout_seconds, "time/score": score_seconds,
                      "episodes_per_second": global_batch_size / (time.time() - step_start),
                      "peak_memory_mb": peak_memory_mb()})
        if done % args.logging_steps == 0 or done == args.steps:
            query_texts = tokenizer.batch_decode(query_tensors, skip_special_tokens=True)
            trainer.log_stats(stats, {"query": query_texts, "response": response_texts}, score_tensors)
            progress.set_postfix(reward=f"{stats['ppo/mean_scores']:.3f}", kl=f"{stats['objective/kl']:.3f}")
        signum = preemption.requested(accelerator)  # the same answer on every process
        if done < args.steps and (signum or args.save_steps > 0 and done % args.save_steps == 0):
            counters = {"step": done, "kl_coef": float(trainer.kl_ctl.value),  # a numpy float after adaptive updates
                        "clipped": trainer._clipped, "running": trainer.running.state_dict()}
            save_checkpoint(output_dir / f"checkpoint-{done}", accelerator, trainer.model, tokenizer,
                            trainer.optimizer, scheduler, counters, args.save_total_limit)
            if signum:
                preemption.stop(accelerator, signum, output_dir / f"checkpoint-{done}")

    # 9. Save: the policy with its value head in the seed's layout (plain AutoModelForCausalLM loads it, ignoring
    #    v_head.*) and the tokenizer; with LoRA, the merged model in output_dir and the adapter in output_dir/adapter
    #    (each with the value head).
    save_final_model(args, accelerator, trainer.model, tokenizer, wrapper)
    del trainer, model  # the DDP-wrapped policy goes before its process group does
    gc.collect()
    accelerator.end_training()  # an orderly end of the process group: a peer torn down mid-exit can abort the other


# ----------------------------------------------------------------------------------------------------------------------
# The model: a language model with a value head, in the seed's weight layout; the reference model (after main: the
# algorithm above reads them only through forward(...) -> (log-probs or logits, _, values))
# ----------------------------------------------------------------------------------------------------------------------
class ValueHead(nn.Module):
    """One scalar per token: dropout, then a linear map of the last hidden state (the seed's layout: `summary`)."""

    def __init__(self, config, summary_dropout_prob: float | None = None):
        super().__init__()
        if summary_dropout_prob is None:  # the seed: the config's value, else 0.1
            summary_dropout_prob = getattr(config, "summary_dropout_prob", 0.1)
        self.dropout = nn.Dropout(summary_dropout_prob) if summary_dropout_prob else nn.Identity()
        hidden_size = getattr(config, "word_embed_proj_dim", None) or getattr(config, "hidden_size", None)
        if getattr(config, "is_encoder_decoder", False) and hasattr(config, "decoder"):
            hidden_size = getattr(config.decoder, "hidden_size", hidden_size)
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = self.dropout(hidden_states)
        return self.summary(output.to(self.summary.weight.dtype))


def read_value_head_weights(name_or_path: str, revision: str | None = None, token=None) -> dict | None:
    """The `v_head.*` tensors (keys without the prefix) a checkpoint keeps in its own weight files, as the seed saves
    them: model.safetensors, pytorch_model.bin or their sharded indexes (LoRA: pytorch_model.bin); None if none."""
    from huggingface_hub import hf_hub_download
    from safetensors import safe_open

    def locate(filename: str) -> Path | None:
        if Path(name_or_path).is_dir():
            path = Path(name_or_path) / filename
            return path if path.exists() else None
        try:  # a Hub id: the files from_pretrained has just downloaded are in the cache
            return Path(hf_hub_download(name_or_path, filename, revision=revision, token=token))
        except Exception:  # not in the repository (or offline): try the next layout
            return None

    for filename in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json"):
        if (path := locate(filename)) is None:
            continue
        files = [path] if not filename.endswith(".index.json") else [locate(shard) for shard in sorted(
            {file for key, file in json.loads(path.read_text())["weight_map"].items() if key.startswith("v_head.")})]
        state = {}
        for file in files:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as f:
                    state.update({key: f.get_tensor(key) for key in f.keys() if key.startswith("v_head.")})
            else:
                state.update(torch.load(file, map_location="cpu", weights_only=True))
        return {key[len("v_head."):]: value for key, value in state.items() if key.startswith("v_head.")} or None
    return None


class PreTrainedModelWrapper(nn.Module):
    """A transformers model (`.pretrained_model`) plus a value head (`.v_head`), saved in the seed's layout: the
    wrapped model's own state-dict keys, unchanged, plus `v_head.summary.weight` and `v_head.summary.bias`, all in
    the model's weight file. Plain transformers loads such a checkpoint (ignoring the two extra keys), and
    `from_pretrained` here loads the value head back instead of initialising a new one."""

    transformers_parent_class = None
    supported_args = ("summary_dropout_prob", "v_head_initializer_range", "v_head_init_strategy")

    def __init__(self, pretrained_model, score_module=None, supports_rm_adapter=False, rm_adapter_name=None,
                 summary_dropout_prob=None, v_head_initializer_range=0.2, v_head_init_strategy=None):
        super().__init__()
        self.pretrained_model = pretrained_model
        self.config = pretrained_model.config
        self._no_split_modules = getattr(pretrained_model, "_no_split_modules", None)  # FSDP shards these blocks
        self.is_peft_model = not isinstance(pretrained_model, PreTrainedModel) and hasattr(
            pretrained_model, "disable_adapter")
        self.supports_rm_adapter, self.rm_adapter_name, self.policy_adapter_name = (
            supports_rm_adapter, rm_adapter_name, "default")
        if score_module is not None:
            self.score = score_module
        self.v_head = ValueHead(self.config, summary_dropout_prob)
        if v_head_init_strategy == "normal":
            self.v_head.summary.weight.data.normal_(mean=0.0, std=v_head_initializer_range)
            self.v_head.summary.bias.data.zero_()
        elif v_head_init_strategy is not None:
            raise ValueError(f"unknown v_head_init_strategy '{v_head_init_strategy}': expected None or 'normal'")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load (or wrap) a transformers model and add a value head: the checkpoint's own value head if it has one
        (seed layout), else a new one. Value-head kwargs: summary_dropout_prob, v_head_initializer_range (0.2),
        v_head_init_strategy (None: the default init of nn.Linear; "normal"). `peft_config` adds new LoRA adapters;
        a directory holding an adapter_config.json loads that adapter on its base model; `reward_adapter` adds a
        LoRA reward adapter (with its score head) on the same base weights. Everything else goes to transformers."""
        head_kwargs = {key: kwargs.pop(key) for key in cls.supported_args if key in kwargs}
        peft_config = kwargs.pop("peft_config", None)
        reward_adapter = kwargs.pop("reward_adapter", None)
        reward_adapter_name = kwargs.pop("reward_adapter_name", "reward_adapter")
        is_trainable = kwargs.pop("is_trainable", False)
        value_head = None
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            name = str(pretrained_model_name_or_path)
            if (Path(name) / "adapter_config.json").exists():  # a LoRA checkpoint: base model + adapter
                from peft import PeftConfig, PeftModel

                base_name = PeftConfig.from_pretrained(name).base_model_name_or_path
                base = cls.transformers_parent_class.from_pretrained(base_name, *model_args, **kwargs)
                pretrained_model = PeftModel.from_pretrained(base, name, is_trainable=is_trainable)
            else:
                pretrained_model = cls.transformers_parent_class.from_pretrained(name, *model_args, **kwargs)
            value_head = read_value_head_weights(name, kwargs.get("revision"), kwargs.get("token"))
        elif isinstance(pretrained_model_name_or_path, nn.Module):
            pretrained_model = pretrained_model_name_or_path
        else:
            raise ValueError("pretrained_model_name_or_path should be a string or a PreTrainedModel, "
                             f"but is {type(pretrained_model_name_or_path)}")
        if peft_config is not None and isinstance(pretrained_model, PreTrainedModel):
            from peft import get_peft_model

            pretrained_model = get_peft_model(pretrained_model, peft_config)
        multi_adapter = {}
        if reward_adapter is not None:  # the seed's API only (see add_and_load_reward_modeling_adapter)
            if isinstance(pretrained_model, PreTrainedModel):
                raise ValueError("reward_adapter can only be used with a LoRA (PEFT) policy: pass peft_config too")
            multi_adapter = {"score_module": add_and_load_reward_modeling_adapter(
                pretrained_model, reward_adapter, reward_adapter_name), "supports_rm_adapter": True,
                "rm_adapter_name": reward_adapter_name}
        model = cls(pretrained_model, **multi_adapter, **head_kwargs)
        if value_head is not None:  # resuming: the checkpoint's value head, not a new one
            model.v_head.load_state_dict(value_head)
        model.v_head.to(next(pretrained_model.parameters()).device)
        return model

    def generate(self, *args, **kwargs):
        """The wrapped model's `generate`."""
        return self.pretrained_model.generate(*args, **kwargs)

    def gradient_checkpointing_enable(self, **kwargs):
        self.pretrained_model.gradient_checkpointing_enable(**kwargs)

    def merge_and_unload(self) -> "PreTrainedModelWrapper":
        """A LoRA policy with its adapters merged into the base weights, and the same value head."""
        merged = type(self)(self.pretrained_model.merge_and_unload())
        merged.v_head = self.v_head
        return merged

    def state_dict(self, *args, **kwargs) -> dict:
        """The wrapped model's keys unchanged, plus v_head.*. A LoRA policy: the value head alone (the seed's
        layout; its adapter is saved by peft)."""
        state = {} if self.is_peft_model else self.pretrained_model.state_dict(*args, **kwargs)
        for key, value in self.v_head.state_dict().items():
            state[f"v_head.{key}"] = value
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        heads = {key[len("v_head."):]: value for key, value in state_dict.items() if key.startswith("v_head.")}
        self.v_head.load_state_dict(heads, strict=strict)
        rest = {key: value for key, value in state_dict.items() if not key.startswith("v_head.")}
        if rest or not self.is_peft_model:
            return self.pretrained_model.load_state_dict(rest, strict=strict, assign=assign)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """save_pretrained of the wrapped model with the value head inside its weight file (state_dict None: this
        model's). A LoRA policy: the adapter (peft's save_pretrained) and the value head in pytorch_model.bin, as the
        seed does."""
        if self.is_peft_model:
            kwargs.pop("state_dict", None)  # the value head alone (see state_dict): peft takes the adapter itself
            self.pretrained_model.save_pretrained(save_directory, *args, **kwargs)
            torch.save(self.state_dict(), Path(save_directory) / "pytorch_model.bin")
            return
        if kwargs.get("state_dict") is None:
            kwargs["state_dict"] = self.state_dict()
        return self.pretrained_model.save_pretrained(save_directory, *args, **kwargs)

    def push_to_hub(self, *args, **kwargs):
        """push_to_hub of the wrapped model, with the value head in the pushed weights (seed layout)."""
        self.pretrained_model.v_head = self.v_head  # a temporary submodule, so its keys are v_head.*
        try:
            return self.pretrained_model.push_to_hub(*args, **kwargs)
        finally:
            del self.pretrained_model.v_head

    # the seed's API only: the LoRA reward adapter loaded by from_pretrained(..., reward_adapter=...)
    def compute_reward_score(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        """(B, T, num_labels) scores of the reward adapter at every position: the reward adapter is switched on for
        one no-grad forward, then the policy's adapter is active again."""
        if not self.supports_rm_adapter:
            raise ValueError("this model has no reward adapter: load it with from_pretrained(..., reward_adapter=...)")
        self.pretrained_model.set_adapter(self.rm_adapter_name)
        try:
            with torch.no_grad():
                output = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask,
                                               output_hidden_states=True, return_dict=True, **kwargs)
                scores = self.score(output.hidden_states[-1].to(self.score.weight.dtype))
        finally:
            self.pretrained_model.set_adapter(self.policy_adapter_name)
        return scores


class AutoModelForCausalLMWithValueHead(PreTrainedModelWrapper):
    """A causal LM with a value head: forward returns (lm_logits in float32, loss, value (B, T))."""

    transformers_parent_class = AutoModelForCausalLM

    def __init__(self, pretrained_model, **kwargs):
        super().__init__(pretrained_model, **kwargs)
        if pretrained_model.get_output_embeddings() is None:
            raise ValueError("The model does not have a language model head, please use a model that has one.")

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, **kwargs):
        kwargs["output_hidden_states"] = True  # the value head reads the last hidden state
        output = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask,
                                       past_key_values=past_key_values, **kwargs)
        value = self.v_head(output.hidden_states[-1]).squeeze(-1)
        if isinstance(output, TokenLogProbs):  # inside chunked_log_probs: per-token log-probs in place of the logits
            return output, None, value
        return output.logits.float(), output.loss, value


def create_reference_model(model: nn.Module, num_shared_layers: int | None = None, pattern: str | None = None):
    """A frozen copy of `model` in eval mode, the reference of the KL penalty. With num_shared_layers=k (the seed's
    API, see shared_parameter_names) the parameters before layer k are frozen in the policy and SHARED with the
    reference: the same tensors, no copy (the seed froze them but deep-copied them anyway, saving no memory)."""
    memo = {}
    for name in shared_parameter_names(model, num_shared_layers, pattern) if num_shared_layers is not None else []:
        parameter = model.get_parameter(name)
        parameter.requires_grad_(False)  # frozen in the policy too: the two models hold the one tensor
        memo[id(parameter)] = parameter  # deepcopy returns what the memo holds instead of copying it
    reference = copy.deepcopy(model, memo)
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    return reference.eval()


# ----------------------------------------------------------------------------------------------------------------------
# The seed's API only (python ppo.py uses none of it but seq2seq models): the seq2seq value-head model, the LoRA reward
# adapter of from_pretrained(..., reward_adapter=...), and the layers create_reference_model(num_shared_layers=k) shares
# ----------------------------------------------------------------------------------------------------------------------
class AutoModelForSeq2SeqLMWithValueHead(PreTrainedModelWrapper):
    """An encoder-decoder LM (T5 family) with a value head on the decoder's last hidden state: forward(input_ids,
    attention_mask, decoder_input_ids=..., decoder_attention_mask=...) returns (lm_logits, loss, value (B, T_dec))."""

    transformers_parent_class = AutoModelForSeq2SeqLM
    is_encoder_decoder = True

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, **kwargs):
        output = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask,
                                       past_key_values=past_key_values, output_hidden_states=True, **kwargs)
        value = self.v_head(output.decoder_hidden_states[-1]).squeeze(-1)
        return output.logits.float(), output.loss, value


def add_and_load_reward_modeling_adapter(pretrained_model, adapter_path: str, adapter_name: str = "reward_adapter"):
    """Load a LoRA reward adapter (trained on the same base, e.g. by reward.py --use_peft) next to the policy's
    adapter, and return its score head as a frozen nn.Linear: policy, reference and reward model then share one
    copy of the base weights (PreTrainedModelWrapper.compute_reward_score uses it)."""
    pretrained_model.load_adapter(adapter_path, adapter_name, is_trainable=False)
    files = [Path(adapter_path) / name for name in ("adapter_model.safetensors", "adapter_model.bin")]
    file = next((f for f in files if f.exists()), None)
    if file is None:
        raise ValueError(f"no adapter_model.safetensors or adapter_model.bin in reward adapter {adapter_path}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(file)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    score = {key.rsplit(".", 1)[-1]: value for key, value in state.items() if ".score." in f".{key}"}
    if "weight" not in score:
        raise ValueError(f"reward adapter {adapter_path} holds no score head (expected a '*score.weight' tensor)")
    num_labels, hidden = score["weight"].shape
    head = nn.Linear(hidden, num_labels, bias="bias" in score).to(next(pretrained_model.parameters()).device)
    head.load_state_dict(score)
    return head.requires_grad_(False)


LAYER_PATTERNS = ["transformer.h.{layer}", "model.decoder.layers.{layer}", "gpt_neox.layers.{layer}",
                  "model.layers.{layer}"]


def shared_parameter_names(model: nn.Module, num_shared_layers: int, pattern: str | None = None) -> list[str]:
    """The parameters before layer `num_shared_layers` (embeddings and layers 0..k-1): those before the first whose
    name contains `pattern` (e.g. "transformer.h.{layer}") for that layer, or else one of the usual layer names."""
    names = [name for name, _ in model.named_parameters()]
    candidates = [pattern] if pattern is not None else LAYER_PATTERNS
    found = next((c.format(layer=num_shared_layers) for c in candidates
                  if any(c.format(layer=num_shared_layers) in name for name in names)), None)
    if found is None:
        raise ValueError(f"no parameter name contains the layer pattern for layer {num_shared_layers} "
                         f"(tried {candidates}); pass pattern= with the model's layer names")
    return names[: next(i for i, name in enumerate(names) if found in name)]


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


@contextmanager
def accumulating(accelerator, model, last: bool):
    """One micro-batch's forward and backward: gradients meet over processes in the last micro-batch of a step only,
    where DeepSpeed's engine steps (it reads accelerate's sync flag; a private API). accelerate's `accumulate` would
    divide each loss by the accumulation steps, where these scripts normalise by the whole step's tokens or samples."""
    accelerator.gradient_state._set_sync_gradients(last)
    with nullcontext() if last else accelerator.no_sync(model):
        yield


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


class LengthSampler:
    """TRL's LengthSampler (trl.core): a uniformly random integer in [min_value, max_value), from numpy's global RNG."""

    def __init__(self, min_value: int, max_value: int):
        self.values = list(range(min_value, max_value))

    def __call__(self) -> int:
        return int(np.random.choice(self.values))


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
