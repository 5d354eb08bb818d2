"""Iterative SFT (expert iteration): sample from the policy, keep the best-scored samples, fine-tune on them, repeat.

Expert iteration / rejection-sampling fine-tuning (Anthony et al. 2017, https://arxiv.org/abs/1705.08439; RAFT, Dong et
al. 2023, https://arxiv.org/abs/2304.06767; Touvron et al. 2023's rejection sampling, https://arxiv.org/abs/2307.09288)
improves a policy without a policy gradient: each iteration draws several responses per prompt, scores them with a
reward model, keeps the top fraction of each prompt's samples, and takes supervised (next-token cross-entropy) steps on
the kept responses only. This file reproduces TRL v0.8.6's `IterativeSFTTrainer` as documented ("the seed" wherever this
file says it: its `step(input_ids, attention_mask, labels, texts, texts_labels)` API, outside transformers.Trainer) and
runs the expert-iteration loop with it. It fixes four bugs of the seed's trainer (docs/iterative_sft.md): (1) a
decoder-only model's labels given by the caller are honoured, -100 masks included; (2) `texts_labels` are the decoder
targets (encoder-decoder) or the suffix of each text that carries the loss (decoder-only), not a re-tokenisation of
`texts`; (3) `max_length` cuts each sequence, not the batch dimension; (4) padding is masked by position, so with pad ==
EOS (GPT-2) the model still learns to stop.

    # offline quickstart: the tiny world (assets/), CPU, about 16 s: the tiny policy learns to write positive reviews
    python iterative_sft.py
    # a real model, IMDB prompts, rewarded by a sentiment classifier
    python iterative_sft.py --model_name_or_path lvwerra/gpt2-imdb --dataset_name stanfordnlp/imdb --query_column text \
        --reward_model sentiment-analysis:lvwerra/distilbert-imdb --learning_rate 1.41e-5 --num_iterations 10 \
        --prompts_per_iteration 256 --samples_per_prompt 8 --keep_fraction 0.25 --max_length 512
    # several GPUs: each process samples, scores and trains on its share of each iteration's prompts
    accelerate launch --multi_gpu --num_processes 8 iterative_sft.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/ultrafeedback-prompt --reward_model <a reward.py output> --bf16
    # models larger than one GPU holds: FSDP2 or DeepSpeed ZeRO (docs/scaling.md: which config for which size)
    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 8 iterative_sft.py \
        --model_name_or_path Qwen/Qwen2.5-7B-Instruct --gradient_checkpointing

From Python: `from iterative_sft import IterativeSFTTrainer`; `trainer.step(input_ids=..., labels=...)` or
`trainer.step(texts=..., texts_labels=...)` (docs/iterative_sft.md has the expert-iteration loop).
"""

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
from tqdm.auto import tqdm
from torch.utils.checkpoint import checkpoint
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                          AutoTokenizer, PreTrainedTokenizerBase)
from transformers.utils import ModelOutput

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (used in the wandb run name)"""
    seed: int = 42
    """seed of the experiment: data order, initialisation of new weights, sampling noise"""
    output_dir: str = "runs/iterative_sft"
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
    """print and record metrics (and samples) every this many iterations (and after the last)"""

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
    vocabulary) logits (chunked_log_probs); 0: the plain path, the model's logits at once (encoder-decoder: always)"""
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
    """prompts: a Hub id, a .json/.jsonl/.csv/.parquet file, a save_to_disk directory or a directory of split files"""
    dataset_config: str | None = None
    """the dataset configuration (subset) name"""
    dataset_train_split: str = "train"
    """the split whose prompts are used"""
    query_column: str | None = None
    """the column holding the prompts (default: 'prompt', else 'query'); strings or message lists"""
    reward_model: str = str(ASSETS / "tiny-reward")
    """a sequence-classification model (path, Hub id, reward.py output) or a 'task:model' transformers pipeline"""
    output_min_length: int = 8
    """the fewest tokens a response has (EOS is blocked before), and the least max_new_tokens drawn per prompt"""
    output_max_length: int = 24
    """each prompt's max_new_tokens is drawn from [output_min_length, output_max_length)"""
    temperature: float = 1.0
    """sampling temperature"""
    max_length: int = 1024
    """tokens per training sequence (prompt + response); longer ones are truncated as truncation_mode says"""
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    """keep_end: a too long sequence keeps its last max_length tokens (the response); keep_start: its first"""

    # --- optimisation ---
    learning_rate: float = 5e-4
    """AdamW learning rate, constant (the default suits the tiny world; real models want about 1e-5)"""
    per_device_train_batch_size: int = 16
    """kept samples per process per micro-batch"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    save_steps: int = 0
    """write a resumable checkpoint every this many iterations (0: only when stopped by SIGTERM / SIGINT)"""
    save_total_limit: int | None = None
    """keep only the newest this many checkpoints (None: all)"""
    resume_from_checkpoint: str | None = None
    """a checkpoint-N directory to continue from, or latest: the newest complete one in output_dir (none: start)"""

    # --- expert iteration ---
    num_iterations: int = 8
    """rounds of sample -> score -> keep the best -> fine-tune"""
    prompts_per_iteration: int = 32
    """prompts drawn each iteration, over all processes (each process takes an equal share)"""
    samples_per_prompt: int = 8
    """responses sampled per prompt"""
    keep_fraction: float = 0.25
    """fraction of each prompt's samples trained on: the top ceil(keep_fraction * samples_per_prompt) by reward"""
    sft_epochs: int = 2
    """passes of trainer.step over the kept samples per iteration"""


# ----------------------------------------------------------------------------------------------------------------------
# The algorithm: prompts -> samples (one generate call) -> the best of each prompt's -> SFT steps on them
# ----------------------------------------------------------------------------------------------------------------------
def format_query(prompt, tokenizer) -> tuple[str, bool]:
    """THE place to change how a prompt becomes text: a message list is rendered with the chat template and the
    generation prompt (then the text holds its own special tokens: templated=True); a string is used as it is."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), True
    return prompt, False


@torch.no_grad()
def sample_responses(model, queries: list[torch.Tensor], num_samples: int, max_new_tokens: list[int],
                     pad_token_id: int, eos_token_ids: list[int], **generation_kwargs) -> list[list[torch.Tensor]]:
    """num_samples responses to each of the (1-D token-id) queries, all in ONE `generate` call with the KV cache.

    Queries are left-padded (decoder-only) and each row repeated num_samples times, contiguously, as TRL's
    BestOfNSampler's `query.repeat` (`num_return_sequences` would refuse greedy decoding). Query i's
    responses are cut to max_new_tokens[i] tokens and after their first EOS (kept). Returns per query a list of
    num_samples 1-D response tensors (on the CPU, padding stripped, at least one token each)."""
    device = next(model.parameters()).device
    is_encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    side = "right" if is_encoder_decoder else "left"  # the encoder reads the attention mask either way
    queries = [query.cpu() for query in queries]
    input_ids = torch.nn.utils.rnn.pad_sequence(queries, batch_first=True, padding_value=pad_token_id,
                                                padding_side=side).repeat_interleave(num_samples, dim=0)
    attention_mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(query) for query in queries], batch_first=True,
                                                     padding_side=side).repeat_interleave(num_samples, dim=0)
    generations = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 max_new_tokens=max(max_new_tokens), pad_token_id=pad_token_id,
                                 **generation_kwargs).cpu()
    # (queries * num_samples, tokens): decoder-only outputs repeat the padded queries; an encoder-decoder's output is
    # the decoder's sequence, which starts with its start token
    responses = generations[:, 1:] if is_encoder_decoder else generations[:, input_ids.shape[1]:]
    eos = torch.tensor(eos_token_ids)
    samples = []
    for i in range(len(queries)):
        mine = []
        for response in responses[i * num_samples : (i + 1) * num_samples]:
            response = response[: max_new_tokens[i]]
            ended = torch.isin(response, eos).nonzero()
            mine.append(response[: int(ended[0, 0]) + 1] if len(ended) else response)
        samples.append(mine)
    return samples


def tokenize_queries(prompts: list, tokenizer, query_column: str) -> tuple[list[list[int]], list]:
    """The prompts as token ids (format_query, then the tokenizer), and the prompts themselves as the reward function
    sees them; a prompt that tokenises to nothing is left out of both. A prompt that is neither a string nor a
    message list stops the run with one line."""
    queries, reward_prompts = [], []
    for prompt in prompts:
        if not isinstance(prompt, (str, list)):
            fail(f"prompts must be strings or message lists; column '{query_column}' holds {type(prompt).__name__}")
        text, templated = format_query(prompt, tokenizer)
        ids = list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
        if ids:
            queries.append(ids)
            reward_prompts.append(prompt)
    return queries, reward_prompts


def keep_best(rewards: list[float], num_samples: int, keep: int) -> list[int]:
    """Indices (into the flat list of rewards, num_samples consecutive ones per prompt) of each prompt's `keep`
    highest-rewarded samples, in their original order; ties keep the earlier sample (RAFT's per-prompt ranking)."""
    kept = []
    for start in range(0, len(rewards), num_samples):
        mine = range(start, start + num_samples)
        kept += sorted(sorted(mine, key=lambda i: -rewards[i])[:keep])
    return kept


def kept_examples(queries: list[torch.Tensor], responses: list[torch.Tensor], kept: list[int], num_samples: int,
                  is_encoder_decoder: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The kept samples (indices into responses, num_samples consecutive ones per query) as IterativeSFTTrainer.step's
    input_ids and labels, 1-D each. Decoder-only: prompt + response, the loss on the response alone (labels -100 over
    the prompt; the response's EOS included when it ended). Encoder-decoder: the prompt feeds the encoder, the
    response is the decoder's target."""
    if is_encoder_decoder:
        return [queries[i // num_samples] for i in kept], [responses[i] for i in kept]
    input_ids = [torch.cat([queries[i // num_samples], responses[i]]) for i in kept]
    labels = [torch.cat([torch.full((len(queries[i // num_samples]),), -100), responses[i]]) for i in kept]
    return input_ids, labels


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
    """Log-probability of each next-token label: (B, T, V) logits, (B, T) labels -> ((B, T-1) log-probs, (B, T-1) mask).

    Position t predicts label t+1. Computed as logit[label] - logsumexp(logits) in float32, which never materialises
    a (B, T, V) log-softmax. Masked positions (label -100) get log-prob 0 and mask False.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    safe_labels = labels.masked_fill(~mask, 0)
    label_logits = torch.gather(logits, 2, safe_labels.unsqueeze(-1)).squeeze(-1).float()
    log_probs = label_logits - torch.logsumexp(logits.float(), dim=-1)
    return log_probs * mask, mask


def token_log_probs(model, unwrapped, batch: dict, chunk_size: int) -> torch.Tensor:
    """Per-token log-probs (B, T-1) of a collated batch's labels under a causal LM `model` (as the trainer calls it:
    wrapped for DDP, FSDP or DeepSpeed; `unwrapped` is the model underneath), 0 where not scored. chunk_size > 0:
    chunked_log_probs. 0: the plain path, the model's (B, T, V) logits, then selective_log_probs."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if chunk_size:
        with chunked_log_probs(unwrapped, batch["labels"], chunk_size):
            return model(**inputs).log_probs
    return selective_log_probs(model(**inputs).logits, batch["labels"])[0]


def sft_loss(log_probs: torch.Tensor, num_items_in_batch: int | torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of a micro-batch, divided by num_items_in_batch: the number of target
    tokens in the whole optimizer step (all micro-batches, all processes). Summing these over micro-batches gives
    the exact per-token mean of the step, however it is split. (B, T-1) per-token log-probs (0 where not scored) ->
    scalar."""
    return -log_probs.sum() / num_items_in_batch


class IterativeSFTTrainer:
    """The seed's IterativeSFTTrainer: `step(...)` takes supervised steps on whatever examples the caller brings (the
    samples an outer loop chose), as lists of 1-D token-id tensors or of strings, and returns training stats.

    AdamW over the trainable parameters unless `optimizers` holds an optimizer, and a constant schedule unless it holds
    a scheduler (the seed demanded max_steps then); model and optimizer are prepared with the given accelerator or a
    new one. Causal LMs and encoder-decoder models (AutoModelForSeq2SeqLM: labels are the decoder's targets, not
    shifted) are supported. A causal LM's log-probs are computed chunk_size scored positions at a time from its last
    hidden states (chunked_log_probs; 0: from its whole logits); an encoder-decoder's always from its logits.
    """

    def __init__(self, model=None, tokenizer=None, optimizers=(None, None), learning_rate: float = 1e-5,
                 per_device_train_batch_size: int = 8, gradient_accumulation_steps: int = 1,
                 max_grad_norm: float | None = 1.0, weight_decay: float = 0.0, max_length: int | None = None,
                 truncation_mode: str = "keep_end", seed: int = 0, accelerator: Accelerator | None = None,
                 bf16: bool = False, chunk_size: int = 1024):
        # 0. Check the arguments, with what was found.
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise ValueError(f"tokenizer must be a transformers tokenizer (PreTrainedTokenizerBase), got "
                             f"{type(tokenizer).__name__}")
        if not isinstance(model, torch.nn.Module) or not any(True for _ in model.parameters()):
            raise ValueError(f"model must be a torch module with parameters (an AutoModelForCausalLM or "
                             f"AutoModelForSeq2SeqLM), got {type(model).__name__}")
        if truncation_mode not in ("keep_end", "keep_start"):
            raise ValueError(f"truncation_mode must be 'keep_end' or 'keep_start', got {truncation_mode!r}")
        for name, value in (("per_device_train_batch_size", per_device_train_batch_size),
                            ("gradient_accumulation_steps", gradient_accumulation_steps),
                            ("max_length", 1 if max_length is None else max_length)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(chunk_size, int) or chunk_size < 0:
            raise ValueError(f"chunk_size must be 0 (the plain path) or a positive number of positions, got "
                             f"{chunk_size!r}")
        if learning_rate < 0 or weight_decay < 0 or (max_grad_norm is not None and max_grad_norm < 0):
            raise ValueError(f"learning_rate, weight_decay and max_grad_norm must not be negative, got "
                             f"{learning_rate}, {weight_decay} and {max_grad_norm}")
        if tokenizer.pad_token_id is None:  # EOS doubles as pad: safe, since padding is masked by position
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self.per_device_train_batch_size = per_device_train_batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm, self.max_length, self.truncation_mode = max_grad_norm, max_length, truncation_mode
        self.seed, self.chunk_size = seed, chunk_size
        self.calls = 0  # step() calls so far: the shuffle of call k is seeded with seed + k
        self.optimizer_steps = 0

        # 1. Accelerator, optimizer and schedule. Not make_accelerator: a library class neither exits on a launch
        #    problem nor reseeds the caller's RNGs. Several processes without a GPU: one gloo group on CPU, as there.
        if accelerator is None:
            multi_process_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
            accelerator = Accelerator(cpu=multi_process_cpu, mixed_precision="bf16" if bf16 else None)
        self.accelerator = accelerator
        optimizer, scheduler = optimizers
        if optimizer is None:
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate,
                                          weight_decay=weight_decay)
        self.lr_scheduler = scheduler or torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        if accelerator.distributed_type == DistributedType.DEEPSPEED:  # what accelerate cannot infer
            deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
            deepspeed_config.update({"train_micro_batch_size_per_gpu": per_device_train_batch_size,
                                     "gradient_clipping": max_grad_norm or 0.0})
        self.model, self.optimizer = accelerator.prepare(model.to(accelerator.device), optimizer)

    def _check_inputs(self, input_ids, attention_mask, labels, texts, texts_labels) -> int:
        """Clear ValueErrors for inputs step() cannot train on; returns the number of examples."""
        if input_ids is None and texts is None:
            raise ValueError("step needs input_ids (a list of 1-D token-id tensors) or texts (a list of strings)")
        if input_ids is not None and texts is not None:  # the seed warned and silently trained on texts
            raise ValueError("step takes input_ids or texts, not both")
        if texts is None and texts_labels is not None:
            raise ValueError("texts_labels go with texts; with input_ids, pass labels")
        if texts is not None and (attention_mask is not None or labels is not None):
            raise ValueError("attention_mask and labels go with input_ids; with texts, pass texts_labels")
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels} if texts is None else \
            {"texts": texts, "texts_labels": texts_labels}
        first = next(iter(given))
        for name, items in ((name, items) for name, items in given.items() if items is not None):
            kind, what = (str, "strings") if name.startswith("texts") else (torch.Tensor, "1-D tensors")
            if not isinstance(items, (list, tuple)):
                raise ValueError(f"{name} must be a list of {what}, got {type(items).__name__}")
            if len(items) == 0:
                raise ValueError(f"{name} is empty; step needs at least one example")
            if len(items) != len(given[first]):
                raise ValueError(f"{name} has {len(items)} elements but {first} has {len(given[first])}")
            if bad := [i for i, item in enumerate(items) if not isinstance(item, kind)]:
                raise ValueError(f"the elements of {name} must be {what}; element {bad[0]} is a "
                                 f"{type(items[bad[0]]).__name__}")
            if kind is torch.Tensor and (bad := [i for i, item in enumerate(items) if item.dim() != 1]):
                raise ValueError(f"the elements of {name} must be 1-D tensors; element {bad[0]} has shape "
                                 f"{tuple(items[bad[0]].shape)}")
            if bad := [i for i, item in enumerate(items) if len(item) == 0]:
                raise ValueError(f"the elements of {name} must not be empty; elements {bad[:10]} are")
        if self.is_encoder_decoder and labels is None and texts_labels is None:
            raise ValueError("an encoder-decoder model needs its decoder targets: pass labels or texts_labels")
        for name, items in (("attention_mask", attention_mask), ("labels", labels)):
            if not self.is_encoder_decoder and texts is None and items is not None and \
                    (bad := [i for i, (a, b) in enumerate(zip(items, input_ids)) if len(a) != len(b)]):
                raise ValueError(f"{name}[i] must have the length of input_ids[i] (a decoder-only model's labels are "
                                 f"aligned with its inputs); example {bad[0]} has {len(items[bad[0]])} and "
                                 f"{len(input_ids[bad[0]])}")
        return len(given[first])

    def _examples(self, input_ids, attention_mask, labels, texts, texts_labels) -> list[dict]:
        """Per example: input_ids, attention_mask, labels (1-D, on the CPU), -100 wherever no loss is taken, each cut
        to max_length tokens (keep_end: the last ones, keep_start: the first; the seed sliced the batch dimension).

        texts are tokenised first. Encoder-decoder: texts are the encoder's inputs, texts_labels the decoder's targets.
        Decoder-only: without texts_labels every token of a text is a target (the seed's default); with them,
        texts_labels[i] must end texts[i] and only its tokens are targets (the prefix is tokenised with the
        tokenizer's special tokens, the suffix without). Decoder-only labels default to the input ids, and positions
        outside the attention mask never carry loss (by position, never by token id: pad may be EOS). Decoder targets
        keep their start when cut (a target can only end early).
        """
        if texts is not None and self.is_encoder_decoder:
            input_ids = [torch.tensor(self.tokenizer(text)["input_ids"]) for text in texts]
            labels = [torch.tensor(self.tokenizer(target)["input_ids"]) for target in texts_labels]
        elif texts is not None:
            input_ids, labels = [], []
            for i, text in enumerate(texts):
                suffix = "" if texts_labels is None else texts_labels[i]
                if not text.endswith(suffix):
                    raise ValueError(f"for a decoder-only model texts_labels[i] must be the end of texts[i] (the part "
                                     f"that carries the loss); example {i}: {suffix!r} does not end {text!r}")
                prefix = self.tokenizer(text[: len(text) - len(suffix)] if suffix else text)["input_ids"]
                target = self.tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
                input_ids.append(torch.tensor(prefix + target))
                labels.append(torch.tensor(prefix + target if texts_labels is None else [-100] * len(prefix) + target))

        def cut(sequence: torch.Tensor, mode: str) -> torch.Tensor:
            if self.max_length is None:
                return sequence
            return sequence[-self.max_length :] if mode == "keep_end" else sequence[: self.max_length]

        examples, mode = [], self.truncation_mode
        for i, ids in enumerate(input_ids):
            ids = ids.detach().long().cpu()
            mask = torch.ones_like(ids) if attention_mask is None else attention_mask[i].detach().long().cpu()
            target = ids.clone() if labels is None else labels[i].detach().long().cpu()
            if not self.is_encoder_decoder:
                target = target.masked_fill(mask == 0, -100)
            examples.append({"input_ids": cut(ids, mode), "attention_mask": cut(mask, mode),
                             "labels": cut(target, "keep_start" if self.is_encoder_decoder else mode)})
        return examples

    def _loss(self, batch: dict, num_items_in_batch: torch.Tensor) -> torch.Tensor:
        """sft_loss of one micro-batch. A decoder-only model's logits at t predict label t+1: token_log_probs, chunked
        (chunk_size) under autocast, since the chunked output layer runs in a hook outside the autocast accelerate
        wraps the forward in. An encoder-decoder's logits at t predict label t: the plain path, with one ignored
        label in front and one logit row at the end to line them up for selective_log_probs."""
        with self.accelerator.autocast():
            if not self.is_encoder_decoder:
                log_probs = token_log_probs(self.model, self.accelerator.unwrap_model(self.model), batch,
                                            self.chunk_size)
                return sft_loss(log_probs, num_items_in_batch)
            # the model builds the decoder's inputs from the labels (shifted right, -100 -> pad), as in the seed
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                labels=batch["labels"], use_cache=False).logits
        log_probs, _ = selective_log_probs(F.pad(logits, (0, 0, 0, 1)), F.pad(batch["labels"], (1, 0), value=-100))
        return sft_loss(log_probs, num_items_in_batch)

    def step(self, input_ids: list[torch.Tensor] | None = None, attention_mask: list[torch.Tensor] | None = None,
             labels: list[torch.Tensor] | None = None, texts: list[str] | None = None,
             texts_labels: list[str] | None = None) -> dict:
        """Train on the given examples: lists of 1-D tensors (input_ids; optional attention_mask; optional labels,
        -100 where no loss is taken, default: the input ids) or lists of strings (texts; optional texts_labels).

        The examples are shuffled (seeded by seed + the number of earlier calls), cut into micro-batches of
        per_device_train_batch_size, and every gradient_accumulation_steps micro-batches (a last, smaller group
        too) make one optimizer step on sum(token NLL) / (target tokens of that step over all processes). Every
        process must bring the same number of examples. Returns loss (per-token mean over the call), num_tokens
        (its target tokens), grad_norm (mean over its optimizer steps, before clipping), learning_rate,
        optimizer_steps and samples, all over every process. Raises FloatingPointError, with the weights unchanged
        by that optimizer step, when a loss or gradient is not finite.
        """
        count = self._check_inputs(input_ids, attention_mask, labels, texts, texts_labels)
        examples = self._examples(input_ids, attention_mask, labels, texts, texts_labels)
        accelerator, device = self.accelerator, self.accelerator.device
        counts = accelerator.gather(torch.tensor([count], device=device))
        if (counts != counts[0]).any():  # otherwise the processes would wait for each other's gradients forever
            raise ValueError(f"every process must pass step the same number of examples, got {counts.tolist()}")
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed + self.calls)).tolist()
        self.calls += 1
        size = self.per_device_train_batch_size
        pad = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "labels": -100}
        micro_batches = [{key: torch.nn.utils.rnn.pad_sequence([examples[i][key] for i in order[start : start + size]],
                                                               batch_first=True, padding_value=value)
                          for key, value in pad.items()} for start in range(0, count, size)]  # right padding
        self.model.train()
        total_nll, total_targets, grad_norms = 0.0, 0, []
        for first in range(0, len(micro_batches), self.gradient_accumulation_steps):
            group = micro_batches[first : first + self.gradient_accumulation_steps]
            # the step's target tokens over all micro-batches and processes: the loss's denominator (a decoder-only
            # label at position 0 is never predicted)
            targets = sum(int((mb["labels"] if self.is_encoder_decoder else mb["labels"][:, 1:]).ne(-100).sum())
                          for mb in group)
            num_items = accelerator.reduce(torch.tensor(targets, device=device), "sum")
            step_loss = torch.zeros((), device=device)
            for j, batch in enumerate(group):
                batch = {key: value.to(device) for key, value in batch.items()}
                with accumulating(accelerator, self.model, last=j == len(group) - 1):
                    loss = self._loss(batch, num_items.clamp(min=1))
                    # DDP averages gradients over processes; the loss is already a share of the global sum
                    accelerator.backward(loss * accelerator.num_processes)
                step_loss += loss.detach()
            step_loss = accelerator.reduce(step_loss, "sum")
            grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(self.model.parameters(),
                                                                    self.max_grad_norm or float("inf")))
            if not (torch.isfinite(step_loss) and torch.isfinite(grad_norm)):  # the same values on every process
                self.optimizer.zero_grad(set_to_none=True)
                raise FloatingPointError(f"loss is {step_loss.item()} (gradient norm {grad_norm.item()}) at optimizer "
                                         f"step {self.optimizer_steps + 1}; the optimizer was not stepped")
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer_steps += 1
            total_nll += step_loss.item() * num_items.item()
            total_targets += int(num_items.item())
            grad_norms.append(float(grad_norm))
        return {"loss": total_nll / max(total_targets, 1), "num_tokens": total_targets,
                "grad_norm": sum(grad_norms) / len(grad_norms), "learning_rate": self.lr_scheduler.get_last_lr()[0],
                "optimizer_steps": len(grad_norms), "samples": int(counts.sum())}


def fine_tune(trainer: IterativeSFTTrainer, input_ids: list[torch.Tensor], labels: list[torch.Tensor],
              sft_epochs: int) -> dict:
    """sft_epochs calls of trainer.step on one iteration's kept samples -> the iteration's training metrics: the loss
    of the last pass and of the first, grad_norm averaged over the passes, the learning rate, the target tokens of
    all passes, the optimizer steps so far. Raises FloatingPointError as step does (that pass left unstepped)."""
    epochs = [trainer.step(input_ids=input_ids, labels=labels) for _ in range(sft_epochs)]
    return {"loss": epochs[-1]["loss"], "loss/first_epoch": epochs[0]["loss"],
            "grad_norm": sum(e["grad_norm"] for e in epochs) / len(epochs),
            "learning_rate": epochs[-1]["learning_rate"], "num_tokens": sum(e["num_tokens"] for e in epochs),
            "optimizer_steps": trainer.optimizer_steps}


def resume_trainer(checkpoint: Path, accelerator, trainer: IterativeSFTTrainer) -> int:
    """Load a checkpoint-N directory (save_checkpoint's, with weights_only=True) into the trainer: optimizer, schedule,
    its step() call and optimizer-step counts, and this process's RNG states. Returns the iterations done (N)."""
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    load_optimizer_state(checkpoint, accelerator, trainer.model, trainer.optimizer, state["optimizer"])
    trainer.lr_scheduler.load_state_dict(state["scheduler"])
    rng = torch.load(checkpoint / f"rng_state_{accelerator.process_index}.pt", weights_only=True)
    random.setstate(rng["python"])
    name, keys, position, has_gauss, gauss = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    trainer.calls, trainer.optimizer_steps = state["calls"], state["optimizer_steps"]
    accelerator.print(f"resumed from {checkpoint} at iteration {state['step']}")
    return state["step"]


def main(args: Args) -> None:
    # 0. Check what can be checked before anything is loaded.
    check_positive(args, ["num_iterations", "prompts_per_iteration", "samples_per_prompt", "sft_epochs",
                          "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "logging_steps",
                          "output_min_length"])
    if args.chunk_size < 0:
        fail(f"--chunk_size must be 0 (the plain path) or a positive number of positions, got {args.chunk_size}")
    if not 0 < args.keep_fraction <= 1:
        fail(f"--keep_fraction must be in (0, 1] (the fraction of each prompt's samples trained on), got "
             f"{args.keep_fraction}")
    if args.output_max_length <= args.output_min_length:
        fail(f"--output_max_length must be above --output_min_length {args.output_min_length} (the range is "
             f"[min, max)), got {args.output_max_length}")
    if args.temperature <= 0:
        fail(f"--temperature must be positive, got {args.temperature}")
    if args.save_steps < 0 or args.max_grad_norm < 0 or args.weight_decay < 0:
        fail(f"--save_steps, --max_grad_norm and --weight_decay must not be negative, got {args.save_steps}, "
             f"{args.max_grad_norm} and {args.weight_decay}")
    try:
        parse_reward_spec(args.reward_model)
    except ValueError as error:
        fail(str(error))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # the accelerator comes later; sizes are needed now
    if args.prompts_per_iteration % world_size:
        fail(f"--prompts_per_iteration {args.prompts_per_iteration} must be a multiple of the {world_size} processes "
             "(each process samples and trains on an equal share)")
    check_run(args, ["model_name_or_path"])  # learning rate, model path, output_dir, --resume_from_checkpoint latest
    keep = math.ceil(round(args.keep_fraction * args.samples_per_prompt, 9))  # kept samples per prompt
    output_dir = Path(args.output_dir)

    # 1. Prompts, loaded and checked before any model is (one split, no evaluation: load_splits is not used).
    prompt_split, query_column = load_prompts(args.dataset_name, args.dataset_config, args.dataset_train_split,
                                              args.query_column)
    prompts = prompt_split[query_column]

    # 2. Tokenizer (without a pad token, EOS pads) and the tokenised queries.
    tokenizer = load_tokenizer(args, "to end responses")
    if isinstance(prompts[0], list) and tokenizer.chat_template is None:
        fail(f"the prompts are conversations but the tokenizer of {args.model_name_or_path} has no chat template")
    queries, reward_prompts = tokenize_queries(prompts, tokenizer, query_column)
    if len(queries) < args.prompts_per_iteration:
        fail(f"the dataset has {len(queries)} non-empty prompts but one iteration needs {args.prompts_per_iteration} "
             "(--prompts_per_iteration)")

    # 3. Accelerator (launch checks; every RNG seeded) and the policy: a seq2seq model when the config says
    #    encoder-decoder; LoRA; gradient checkpointing; when resuming, the checkpoint's weights (or adapter).
    accelerator = make_accelerator(args, "its reward model would be loaded partitioned and used outside an engine")
    world_size, batch = accelerator.num_processes, args.per_device_train_batch_size
    accelerator.print(f"run: {world_size} process(es) x {args.prompts_per_iteration // world_size} prompts x "
                      f"{args.samples_per_prompt} samples = {args.prompts_per_iteration * args.samples_per_prompt} "
                      f"completions per iteration, the best {keep} of each prompt's kept; {world_size} process(es) x "
                      f"{batch} per device x {args.gradient_accumulation_steps} accumulation = "
                      f"{world_size * batch * args.gradient_accumulation_steps} kept samples per optimizer step")
    is_encoder_decoder = AutoConfig.from_pretrained(args.model_name_or_path, revision=args.revision).is_encoder_decoder
    auto_class = AutoModelForSeq2SeqLM if is_encoder_decoder else AutoModelForCausalLM
    model = load_trainable_model(args, auto_class, "SEQ_2_SEQ_LM" if is_encoder_decoder else "CAUSAL_LM")

    # 4. The trainer (AdamW, constant learning rate), then each process's own sampling noise.
    trainer = IterativeSFTTrainer(model, tokenizer, learning_rate=args.learning_rate,
                                  per_device_train_batch_size=args.per_device_train_batch_size,
                                  gradient_accumulation_steps=args.gradient_accumulation_steps,
                                  max_grad_norm=args.max_grad_norm, weight_decay=args.weight_decay,
                                  max_length=args.max_length, truncation_mode=args.truncation_mode, seed=args.seed,
                                  accelerator=accelerator, chunk_size=args.chunk_size)
    torch.manual_seed(args.seed + accelerator.process_index)  # each process samples its own responses
    num_params = sum(p.numel() for p in model.parameters())
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"model: {num_params / 1e6:.2f}M parameters, {num_trainable / 1e6:.2f}M trainable; "
                      f"{len(queries)} prompts, {args.num_iterations} iterations")

    # 5. The reward: a sequence-classification model or a pipeline, on the same device.
    try:
        reward_fn = load_reward_function(args.reward_model, accelerator.device)
    except (OSError, ValueError) as error:
        fail(f"could not load reward model {args.reward_model}: {' '.join(str(error).split())[:500]}")

    # 6. Resumed state (by hand, not prepare_training: the trainer owns its optimizer and constant schedule; loaded
    #    with weights_only=True, as save_checkpoint writes it), and the logs. Row `step` k describes the samples of
    #    the policy after k iterations (and the training of iteration k + 1 on them), so a checkpoint after k
    #    iterations keeps the rows up to k - 1.
    start_step = 0
    if args.resume_from_checkpoint:
        start_step = resume_trainer(Path(args.resume_from_checkpoint), accelerator, trainer)
    log = open_logs(args, accelerator, start_step - 1, ("metrics.jsonl", "samples.jsonl"))

    # 7. Expert iteration. Iteration k samples from the policy after k iterations; the last round (k =
    #    num_iterations) only samples and scores, so the reward curve has a point before training and after each
    #    iteration.
    generation_kwargs = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": args.temperature,
                         "min_new_tokens": args.output_min_length}  # the tiny reward model overrates short answers
    length_sampler = LengthSampler(args.output_min_length, args.output_max_length)
    progress = tqdm(range(start_step, args.num_iterations + 1), initial=start_step, total=args.num_iterations + 1,
                    desc="iterative_sft", disable=not accelerator.is_local_main_process)
    preemption = Preemption()  # from here on, SIGTERM / SIGINT end the run with a checkpoint of the last iteration
    for iteration in progress:
        iteration_start = time.time()
        # 7a. This iteration's prompts: a seeded permutation per epoch over the prompts (exact on resume), each
        #     process taking every world_size-th one.
        indices = step_indices(iteration, len(queries), args.prompts_per_iteration, args.seed)
        mine = indices[accelerator.process_index :: accelerator.num_processes]
        query_tensors = [torch.tensor(queries[i]) for i in mine]

        # 7b. Sample samples_per_prompt responses per prompt in one left-padded generate call with the KV cache; each
        #     prompt's max_new_tokens is drawn by the LengthSampler, as ppo.py draws it; cut after the first EOS.
        with gathered_for_generation(accelerator, trainer.model) as policy:  # whole weights for this call only
            policy.eval()  # for generate only: under gradient checkpointing, train mode would switch the KV cache off
            responses = sample_responses(policy, query_tensors, args.samples_per_prompt,
                                         [length_sampler() for _ in query_tensors], tokenizer.pad_token_id,
                                         [tokenizer.eos_token_id], **generation_kwargs)
            policy.train()
        responses = [response for per_query in responses for response in per_query]  # samples_per_prompt per query
        sample_seconds = time.time() - iteration_start

        # 7c. Score prompt + response with the reward rule.
        score_start = time.time()
        response_texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        prompts_of_samples = [reward_prompts[i] for i in mine for _ in range(args.samples_per_prompt)]
        rewards = [float(r) for r in reward_fn(prompts_of_samples, response_texts)]
        score_seconds = time.time() - score_start

        # 7d. Keep each prompt's best samples (RAFT: the top-k by reward among the prompt's own samples, so every
        #     prompt contributes, whatever its reward scale).
        kept = keep_best(rewards, args.samples_per_prompt, keep)

        # 7e. Fine-tune on the kept samples: prompt + response tokens, the loss on the response alone (its EOS
        #     included when it ended), sft_epochs calls of step.
        stats, train_seconds = {}, 0.0
        if iteration < args.num_iterations:
            train_start = time.time()
            input_ids, labels = kept_examples(query_tensors, responses, kept, args.samples_per_prompt,
                                              is_encoder_decoder)
            try:
                stats = fine_tune(trainer, input_ids, labels, args.sft_epochs)
            except FloatingPointError as error:
                checkpoints = complete_checkpoints(output_dir)
                kept_at = (f"the last checkpoint is {checkpoints[-1]}" if checkpoints
                           else "no checkpoint was written yet")
                fail(f"{error} in iteration {iteration + 1}; stopping ({kept_at})")
            train_seconds = time.time() - train_start

        # 7f. Log: the fresh samples' reward over all processes, the kept ones', response lengths, throughput;
        #     samples.jsonl holds every sample of the round.
        if iteration % args.logging_steps == 0 or iteration == args.num_iterations:
            all_rewards = torch.tensor(gather_object(rewards))
            kept_rewards = torch.tensor(gather_object([rewards[i] for i in kept]))
            lengths = torch.tensor(gather_object([float(len(r)) for r in responses]))
            seconds = time.time() - iteration_start
            log({"step": iteration, "iteration": iteration, "reward/mean": all_rewards.mean().item(),
                 "reward/std": all_rewards.std().item() if len(all_rewards) > 1 else 0.0,
                 "reward/kept_mean": kept_rewards.mean().item(), "response_length/mean": lengths.mean().item(),
                 **stats, "samples_per_second": len(all_rewards) / seconds, "time/sample": sample_seconds,
                 "time/score": score_seconds, "time/train": train_seconds, "peak_memory_mb": peak_memory_mb()})
            progress.set_postfix(reward=f"{all_rewards.mean().item():.3f}")
            rows = gather_object([{"step": iteration, "prompt": reward_prompts[mine[i // args.samples_per_prompt]],
                                   "response": response_texts[i], "reward": rewards[i], "kept": i in kept}
                                  for i in range(len(responses))])  # every process's, in process order
            if accelerator.is_main_process:
                with open(output_dir / "samples.jsonl", "a") as f:
                    f.writelines(json.dumps(row) + "\n" for row in rows)
                if args.track:
                    import wandb

                    wandb.log({"samples": wandb.Table(columns=list(rows[0]), rows=[list(r.values()) for r in rows])},
                              step=iteration)

        # 7g. Checkpoint after every save_steps iterations (not after the last: the final model is saved below), and
        #     when a signal asks to stop before the run is over (the last, sampling-only round included).
        done = iteration + 1
        signum = preemption.requested(accelerator)  # the same answer on every process
        periodic = args.save_steps > 0 and done % args.save_steps == 0 and done < args.num_iterations
        if done <= args.num_iterations and (signum or periodic):
            save_checkpoint(output_dir / f"checkpoint-{done}", accelerator, trainer.model, tokenizer,
                            trainer.optimizer, trainer.lr_scheduler,
                            {"step": done, "calls": trainer.calls, "optimizer_steps": trainer.optimizer_steps},
                            args.save_total_limit)
            if signum:
                preemption.stop(accelerator, signum, output_dir / f"checkpoint-{done}")

    # 8. Save: plain save_pretrained weights that AutoModelForCausalLM (AutoModelForSeq2SeqLM) loads (LoRA: merged,
    #    and the adapter alone).
    save_final_model(args, accelerator, trainer.model, tokenizer, auto_class)
    del trainer, model  # the DDP-wrapped policy goes before its process group does
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
