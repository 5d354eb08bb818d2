"""Odds Ratio Preference Optimization (ORPO): SFT and preference alignment in one loss, with no reference model.

ORPO (Hong et al. 2024, https://arxiv.org/abs/2403.07691) adds to the usual next-token NLL on the chosen answer a
penalty on the odds ratio of the two answers: with P the per-token averaged likelihood of an answer and
odds(y|x) = P / (1 - P), the loss is NLL(chosen) - beta * log sigmoid(log(odds(chosen) / odds(rejected))) (eq. 6-7;
the paper's lambda is beta here). There is no reference model: one model in memory, one forward per pair. This file
reproduces TRL's `ORPOTrainer` (v0.8 era) in one readable loop; the NLL counts the chosen answer's tokens and never
padding (the seed used the input ids as labels, so padding and the prompt were targets; --nll_include_prompt keeps
its prompt choice) and is normalised per token over the whole optimizer step (see docs/orpo.md). "The seed",
wherever this file says it, is that reference: TRL v0.8.6's `ORPOTrainer` as documented.

    # offline quickstart: the tiny world (assets/), CPU, under a minute
    python orpo.py
    # a real model and dataset from the Hub (ORPO starts from a base model: no SFT stage)
    python orpo.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/ultrafeedback_binarized \
        --learning_rate 8e-6 --beta 0.1 --per_device_train_batch_size 4 --gradient_accumulation_steps 8 \
        --max_length 1024 --max_prompt_length 512 --lr_scheduler_type linear --warmup_ratio 0.1 \
        --gradient_checkpointing --bf16 --eval_steps 200
    # several GPUs (the global batch is per_device_train_batch_size x gradient_accumulation_steps x processes)
    accelerate launch --multi_gpu --num_processes 8 orpo.py --model_name_or_path Qwen/Qwen2.5-0.5B --bf16
    # models larger than one GPU holds: FSDP2 or DeepSpeed ZeRO (docs/scaling.md: which config for which size)
    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 8 orpo.py \
        --model_name_or_path Qwen/Qwen2.5-7B --gradient_checkpointing
"""

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
    output_dir: str = "runs/orpo"
    """where the final model, metrics.jsonl, args.json and checkpoints are written"""
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
    dataset_name: str = str(ASSETS / "data" / "preference")
    """a Hub id, a .json/.jsonl/.csv/.parquet file, a save_to_disk directory, or a directory of split files"""
    dataset_config: str | None = None
    """the dataset configuration (subset) name"""
    dataset_train_split: str = "train"
    """the split to train on"""
    dataset_test_split: str | None = "auto"
    """the split to evaluate on (auto: 'test' if the data has one; None: no evaluation)"""
    max_length: int = 512
    """tokens per prompt + answer; the prompt is truncated first (to max_prompt_length), then the answers"""
    max_prompt_length: int | None = None
    """tokens a too-long prompt is cut to (None: half of max_length, at most 128)"""
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    """which end of a long prompt is kept (keep_end keeps the BOS token too)"""

    # --- optimisation ---
    learning_rate: float = 5e-4
    """peak learning rate of AdamW (the default suits the tiny world; real models want about 8e-6)"""
    per_device_train_batch_size: int = 8
    """preference pairs per process per micro-batch"""
    per_device_eval_batch_size: int = 16
    """preference pairs per process per evaluation batch"""
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

    # --- ORPO ---
    beta: float = 1.0
    """weight of the odds-ratio term against the NLL (the paper's lambda; real models want ORPOConfig's 0.1)"""
    nll_include_prompt: bool = False
    """also count the prompt tokens in the NLL term, as the seed does (padding never counts)"""
    disable_dropout: bool = True
    """turn dropout off in the policy, as the seed does"""
    generate_during_eval: bool = False
    """at each evaluation, sample answers to a few eval prompts from the policy (samples.jsonl)"""


# ----------------------------------------------------------------------------------------------------------------------
# The algorithm: rows -> prompt + chosen / rejected tokens -> one forward per pair -> NLL and odds-ratio loss
# ----------------------------------------------------------------------------------------------------------------------
def check_preference_columns(column_names: list[str]) -> None:
    """Preference rows need 'chosen' and 'rejected'; 'prompt' is optional (else it is the answers' common prefix)."""
    missing = [column for column in ("chosen", "rejected") if column not in column_names]
    if missing:
        raise ValueError(f"expected 'chosen' and 'rejected' columns (and optionally 'prompt'); "
                         f"missing {missing}; found columns {column_names}")


def split_implicit_prompt(chosen, rejected):
    """Rows with only 'chosen' and 'rejected' full texts (or conversations): the prompt is their common prefix.
    Strings split before the last whitespace of the common prefix, so no word is cut and both answers start with
    their space, as in the string format; conversations split at the first message that differs."""
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and not (n < len(chosen) and chosen[n].isspace() and n < len(rejected) and rejected[n].isspace()):
        n -= 1  # back off to a whitespace both answers start with
    return chosen[:n], chosen[n:], rejected[n:]


def format_pair(example: dict, tokenizer) -> tuple[str, str, str, bool]:
    """THE place to change how a preference row becomes (prompt_text, chosen_answer, rejected_answer, templated).

    Message lists are rendered with the chat template: the prompt with the generation prompt, and each answer as
    what the template adds after it (end-of-turn included). Strings are used as they are.
    """
    if "prompt" in example and example["prompt"] is not None:
        prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
    else:
        prompt, chosen, rejected = split_implicit_prompt(example["chosen"], example["rejected"])
    if not isinstance(chosen, list):
        return prompt, chosen, rejected, False
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    answers = []
    for answer in (chosen, rejected):
        full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError("the chat template renders the prompt differently once an answer follows it, so the "
                             "answer cannot be separated; pass string prompt/chosen/rejected rows instead")
        answers.append(full[len(prompt_text) :])
    return prompt_text, answers[0], answers[1], True


def tokenize_pair(example: dict, tokenizer, max_length: int, max_prompt_length: int, truncation_mode: str) -> dict:
    """One preference row -> prompt+answer token ids and labels for chosen and rejected, with truncation flags.

    The prompt and each answer are tokenised apart and concatenated, so the prompt tokens are by construction a true
    prefix of both sequences, and the answer tokens are those the model would generate after the prompt (joint
    tokenisation can merge the last prompt token with the first answer token). BOS comes from the tokenizer (plain
    text) or the template (chat), never twice; EOS ends each plain answer. Labels are -100 on the prompt. Too long:
    the prompt is cut to max_prompt_length first (keep_end keeps BOS and the prompt's end), then the answers.
    """
    prompt_text, chosen_text, rejected_text, templated = format_pair(example, tokenizer)
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=not templated)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and len(prompt_ids) > 1 and prompt_ids[0] == prompt_ids[1] == bos:
        prompt_ids = prompt_ids[1:]  # the text already started with BOS and the tokenizer added another
    if not prompt_ids:  # an empty prompt: start from BOS (or EOS, GPT-2's document separator) so that the first
        prompt_ids = [bos if bos is not None else tokenizer.eos_token_id]  # answer token is predicted too
    answers = []
    for text in (chosen_text, rejected_text):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not templated and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        answers.append(ids)
    longer = max(len(ids) for ids in answers)
    prompt_truncated = answer_truncated = False
    if len(prompt_ids) + longer > max_length and len(prompt_ids) > max_prompt_length:
        prompt_truncated = True
        if truncation_mode == "keep_start":
            prompt_ids = prompt_ids[:max_prompt_length]
        else:
            keeps_bos = bos is not None and prompt_ids[0] == bos
            prompt_ids = ([bos] if keeps_bos else []) + prompt_ids[len(prompt_ids) - max_prompt_length + keeps_bos :]
    if len(prompt_ids) + longer > max_length:
        answer_truncated = True
        answers = [ids[: max_length - len(prompt_ids)] for ids in answers]
    row = {"prompt_length": len(prompt_ids), "prompt_truncated": prompt_truncated,
           "answer_truncated": answer_truncated, "identical": answers[0] == answers[1]}
    for name, ids in zip(("chosen", "rejected"), answers):
        row[f"{name}_input_ids"] = prompt_ids + ids
        row[f"{name}_labels"] = [-100] * len(prompt_ids) + ids
    return row


def tokenize_splits(args, accelerator, raw: DatasetDict, tokenizer, max_length: int) -> dict[str, list[dict]]:
    """The train split and the eval split (if any) as lists of tokenised pairs (tokenize_pair), each kind of truncation
    counted in a warning; pairs whose answers are identical carry no preference and are dropped, saying so. A row that
    cannot be formatted, or a split with no pair left, stops the run with one line."""
    try:
        with accelerator.main_process_first():  # the main process fills the datasets cache first
            tokenized = {
                split: raw[split].map(tokenize_pair, remove_columns=raw[split].column_names,
                                      fn_kwargs={"tokenizer": tokenizer, "max_length": max_length,
                                                 "max_prompt_length": args.max_prompt_length,
                                                 "truncation_mode": args.truncation_mode},
                                      desc=f"tokenizing {split}")
                for split in [args.dataset_train_split, args.dataset_test_split] if split
            }
    except (ValueError, KeyError, TypeError) as error:
        fail(f"could not format the preference rows of {args.dataset_name}: {error!r}")
    splits = {}
    for split, dataset in tokenized.items():
        rows = dataset.to_list()
        if num_truncated := sum(row["prompt_truncated"] for row in rows):
            accelerator.print(f"warning: {num_truncated} of {len(rows)} {split} prompts were cut to "
                              f"--max_prompt_length {args.max_prompt_length} ({args.truncation_mode})")
        if num_truncated := sum(row["answer_truncated"] for row in rows):
            accelerator.print(f"warning: {num_truncated} of {len(rows)} {split} pairs had answers cut to fit "
                              f"{max_length} tokens")
        if num_identical := sum(row["identical"] for row in rows):
            accelerator.print(f"warning: {num_identical} of {len(rows)} {split} pairs have identical chosen and "
                              "rejected answers; they carry no preference and are dropped")
        splits[split] = [row for row in rows if not row["identical"]]
        if not splits[split]:
            fail(f"no {split} pair is left: every pair has identical chosen and rejected answers")
    return splits


def collate_pairs(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one batch of 2B sequences for a single forward: input_ids, attention_mask and labels (2B, T), the B
    chosen sequences first and the B rejected after them, right-padded (labels -100 on padding)."""
    sequences = [row["chosen_input_ids"] for row in rows] + [row["rejected_input_ids"] for row in rows]
    labels = [row["chosen_labels"] for row in rows] + [row["rejected_labels"] for row in rows]
    longest = max(len(ids) for ids in sequences)
    batch = {
        "input_ids": torch.tensor([ids + [pad_token_id] * (longest - len(ids)) for ids in sequences]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in sequences]),
        "labels": torch.tensor([ids + [-100] * (longest - len(ids)) for ids in labels]),
    }
    return batch


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


def token_log_probs(model, unwrapped, batch: dict, chunk_size: int, lm_head_only_at_labels: bool = True,
                    extras: tuple[str, ...] = ()) -> TokenLogProbs:
    """Per-token log-probs (B, T-1) of a collated batch's labels under `model` (as the loop calls it: wrapped for DDP,
    FSDP or DeepSpeed; `unwrapped` is the model underneath), and the extras asked for. chunk_size > 0:
    chunked_log_probs. 0: the plain path, the model's own logits at the scored positions (at every position with
    lm_head_only_at_labels off), then label_log_probs on them."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if chunk_size:
        with chunked_log_probs(unwrapped, batch["labels"], chunk_size, extras=extras):
            return model(**inputs)
    targets = batch["labels"][:, 1:] != -100
    with lm_head_only_at(unwrapped, scored_positions(batch["labels"]) if lm_head_only_at_labels else None):
        logits = model(**inputs).logits  # (N, V), or (B, T, V) at every position
    values = label_log_probs(logits if logits.dim() == 2 else logits[:, :-1][targets], batch["labels"][:, 1:][targets],
                             extras=extras)
    zeros = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
    return TokenLogProbs(**{name: zeros.masked_scatter(targets, value) for name, value in values.items()})


def sequence_log_probs(token_logps: torch.Tensor, labels: torch.Tensor, average_log_prob: bool = False) -> torch.Tensor:
    """(B, T-1) per-token log-probs (0 where not scored) and (B, T) labels -> (B,) their sum over each answer, or
    their mean per scored token (average_log_prob: IPO's, as the seed)."""
    if average_log_prob:
        return token_logps.sum(-1) / (labels[:, 1:] != -100).sum(-1).clamp(min=1)
    return token_logps.sum(-1)


def chosen_nll_labels(batch: dict[str, torch.Tensor], include_prompt: bool = False) -> torch.Tensor:
    """The NLL term's targets (B, T) from a collate_pairs batch of 2B sequences: the B chosen answers (EOS included),
    -100 elsewhere; with include_prompt their prompt tokens too, the seed's choice. Padding is never a target (the
    seed's labels were the input ids, padding included: fixed in TRL 0.9)."""
    pairs = len(batch["labels"]) // 2
    if include_prompt:
        return batch["input_ids"][:pairs].masked_fill(batch["attention_mask"][:pairs] == 0, -100)
    return batch["labels"][:pairs]


def chosen_nll_sum(token_logps: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T-1) per-token log-probs of the (B, T) labels (0 where not scored, as token_log_probs gives them) ->
    (summed next-token NLL of the labels, float32 scalar; number of labels).

    Labels of -100 (padding, and the prompt unless it is meant to be learned) are not targets. The caller divides by
    the target count of the whole optimizer step, so the NLL is a per-token mean however the step is split.
    """
    return -sequence_log_probs(token_logps, labels).sum(), (labels[:, 1:] != -100).sum()


def odds_ratio_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    beta: float = 0.1) -> tuple[torch.Tensor, ...]:
    """The seed's `odds_ratio_loss`. Per-token averaged log-probs (B,) -> (losses (B,), chosen_rewards (B,),
    rejected_rewards (B,), log_odds_ratio (), log_odds_chosen ()).

    With c, r the averaged log-probs, log odds = log(e^c / (1 - e^c)) - log(e^r / (1 - e^r))
    = (c - r) - (log(1 - e^c) - log(1 - e^r)) (ORPO eq. 4 and 7), and losses = beta * log sigmoid(log odds): the term
    the total loss SUBTRACTS from the NLL. log(1 - e^x) is log(-expm1(x)), exact near 0 where log1p(-exp(x)) gives
    -inf; the log-probs are clamped just below 0 so that a certain answer (log-prob exactly 0) stays finite.
    Rewards are beta * log-probs, detached. log_odds_ratio is the mean of log sigmoid(log odds) and
    log_odds_chosen the mean of log odds, as the seed logs them (detached).
    """
    chosen = policy_chosen_logps.clamp(max=-1e-6)
    rejected = policy_rejected_logps.clamp(max=-1e-6)
    log_odds = (chosen - rejected) - (torch.log(-torch.expm1(chosen)) - torch.log(-torch.expm1(rejected)))
    ratio = F.logsigmoid(log_odds)
    losses = beta * ratio
    chosen_rewards = beta * policy_chosen_logps.detach()
    rejected_rewards = beta * policy_rejected_logps.detach()
    return losses, chosen_rewards, rejected_rewards, ratio.detach().mean(), log_odds.detach().mean()


def nll_tokens(batch: dict, include_prompt: bool = False) -> torch.Tensor:
    """Targets of the NLL term: the chosen answers' tokens (their EOS included), and with include_prompt
    (--nll_include_prompt) their prompts' tokens too; never padding."""
    return (chosen_nll_labels(batch, include_prompt)[:, 1:] != -100).sum()


def pair_forward(model, accelerator, batch: dict, args) -> dict[str, torch.Tensor]:
    """Per-token averaged log-probs, (B,) each, of the B pairs of a batch and the summed NLL of its chosen answers: ONE
    forward over the 2B sequences (chosen then rejected), as the seed's concatenated_forward; and the mean logits of
    the chosen and of the rejected answers. No (tokens x vocabulary) logits are held whole (--chunk_size; 0: the
    model's logits at the scored positions)."""
    # the forward scores the union of what the two terms need: in the chosen half the NLL's targets (the answers,
    # and with --nll_include_prompt the prompts too), in the rejected half the answers; the odds ratio then keeps
    # the answers' positions only
    pairs = len(batch["labels"]) // 2
    nll_labels = chosen_nll_labels(batch, args.nll_include_prompt)  # without the prompt: the chosen labels
    with accelerator.autocast():
        policy = token_log_probs(model, accelerator.unwrap_model(model),
                                 {**batch, "labels": torch.cat((nll_labels, batch["labels"][pairs:]))},
                                 args.chunk_size, args.lm_head_only_at_labels, extras=("mean_logits",))
    target = batch["labels"][:, 1:] != -100  # the answers' targets
    summed = sequence_log_probs(policy.log_probs.masked_fill(~target, 0), batch["labels"])
    counts = target.sum(-1)
    # ORPO's likelihoods are per-token averages (sequence_log_probs(average_log_prob=True), from the sums at hand)
    policy_chosen, policy_rejected = (summed / counts.clamp(min=1)).chunk(2)
    nll_sum, _ = chosen_nll_sum(policy.log_probs[:pairs], nll_labels)  # without the prompt: -summed[:pairs].sum()
    # mean logit over the vocabulary at each answer position, averaged over the chosen and the rejected answers
    mean_logits = policy.mean_logits.masked_fill(~target, 0)
    (chosen_logits, rejected_logits), (chosen_target, rejected_target) = mean_logits.chunk(2), target.chunk(2)
    return {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected, "nll_sum": nll_sum,
            "nll_tokens": nll_tokens(batch, args.nll_include_prompt),
            "logits_chosen": chosen_logits.sum() / chosen_target.sum(),
            "logits_rejected": rejected_logits.sum() / rejected_target.sum()}


def pair_metrics(out: dict, loss_sum: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                 log_odds_ratio: torch.Tensor, log_odds_chosen: torch.Tensor) -> dict[str, torch.Tensor]:
    """THE place to add a metric: name -> its sum over the batch's B pairs (a float32 scalar): the odds-ratio term of
    the loss, the chosen/rejected rewards, accuracy (ties count half), margin, log-probs, logits and log odds (means
    times pairs); then the NLL sum, its target count and the pair count. Summed over micro-batches and processes
    (add_sums, reduce_sums), then turned into means (summarize)."""
    pairs = len(chosen_rewards)
    accuracy = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
    return {"loss": -loss_sum.detach(),  # the term the loss subtracts from the NLL
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": accuracy.sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": out["policy_chosen"].detach().sum(),
            "logps/rejected": out["policy_rejected"].detach().sum(),
            "logits/chosen": out["logits_chosen"] * pairs,
            "logits/rejected": out["logits_rejected"] * pairs,
            "log_odds_ratio": log_odds_ratio * pairs,
            "log_odds_chosen": log_odds_chosen * pairs,
            "nll_sum": out["nll_sum"].detach(),
            "nll_tokens": out["nll_tokens"].float(),
            "pairs": torch.tensor(float(pairs), device=chosen_rewards.device)}


def pair_loss(model, accelerator, batch: dict, args) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A batch of B pairs (on the device) -> (the sum of its pair odds-ratio terms and the summed NLL of its chosen
    answers, both with gradient; pair_metrics' sums)."""
    out = pair_forward(model, accelerator, batch, args)  # autocast under --bf16
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = odds_ratio_loss(
        out["policy_chosen"], out["policy_rejected"], beta=args.beta)
    loss_sum = losses.sum()
    return loss_sum, out["nll_sum"], pair_metrics(out, loss_sum, chosen_rewards, rejected_rewards, log_odds_ratio,
                                                  log_odds_chosen)


def add_sums(total: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Metric sums added name by name (to an empty total: the sums themselves)."""
    return {name: total.get(name, 0) + value for name, value in sums.items()}


def reduce_sums(accelerator, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This process's metric sums -> their sums over every process, on the CPU: one all-reduce of the stacked values."""
    return dict(zip(sums, accelerator.reduce(torch.stack(list(sums.values())), "sum").cpu()))


def summarize(totals: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """pair_metrics' sums (over micro-batches, steps and processes) -> means per pair, nll_loss per target token,
    loss = nll_loss - mean odds-ratio term; the names prefixed."""
    sums = {name: float(value) for name, value in totals.items()}
    nll_sum, nll_targets, pairs = sums.pop("nll_sum"), sums.pop("nll_tokens"), sums.pop("pairs")
    metrics = {name: value / pairs for name, value in sums.items()}
    metrics["nll_loss"] = nll_sum / max(nll_targets, 1.0)
    metrics["loss"] += metrics["nll_loss"]
    return {f"{prefix}{name}": value for name, value in metrics.items()}


def generate_samples(model, accelerator, tokenizer, rows: list[dict], step: int, args) -> None:
    """Answers of the policy to the first eval prompts, to samples.jsonl (and wandb)."""
    prompts = [row["chosen_input_ids"][: row["prompt_length"]] for row in rows[: args.per_device_eval_batch_size]]
    longest = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (longest - len(ids)) + ids for ids in prompts])
    attention_mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in prompts])
    max_new_tokens = min(args.max_length, tokenizer.model_max_length) - args.max_prompt_length  # the answers' room
    kwargs = {"input_ids": input_ids.to(accelerator.device), "attention_mask": attention_mask.to(accelerator.device),
              "max_new_tokens": max_new_tokens, "do_sample": True, "top_k": 0, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad(), gathered_for_generation(accelerator, model) as policy:  # whole weights for this call
        policy_out = policy.generate(**kwargs)
    answers = tokenizer.batch_decode(policy_out[:, longest:], skip_special_tokens=True)
    samples = [{"step": step, "prompt": tokenizer.decode(ids, skip_special_tokens=True), "policy": answer}
               for ids, answer in zip(prompts, answers)]
    if not accelerator.is_main_process:  # every process generates (sharded weights are gathered together)
        return
    with open(Path(args.output_dir) / "samples.jsonl", "a") as f:
        f.writelines(json.dumps(sample) + "\n" for sample in samples)
    if args.track:
        import wandb

        wandb.log({"game_log": wandb.Table(columns=list(samples[0]), rows=[list(s.values()) for s in samples])},
                  step=step)


def evaluate(model, accelerator, tokenizer, rows: list[dict], step: int, args) -> dict[str, float]:
    """ORPO metrics over every pair of the eval split (each process takes every N-th pair), prefixed eval_; with
    --generate_during_eval, samples of the first prompts too (generate_samples)."""
    model.eval()
    my_rows, sums = rows[accelerator.process_index :: accelerator.num_processes], {}
    with torch.no_grad():
        for start in range(0, len(my_rows), args.per_device_eval_batch_size):
            batch = collate_pairs(my_rows[start : start + args.per_device_eval_batch_size], tokenizer.pad_token_id)
            sums = add_sums(sums, pair_loss(model, accelerator, {
                key: value.to(accelerator.device) for key, value in batch.items()}, args)[-1])
        if not sums:  # fewer eval pairs than processes: this one adds zeros, named as the others' sums (first pair)
            batch = collate_pairs(rows[:1], tokenizer.pad_token_id)
            *_, named = pair_loss(model, accelerator, {
                key: value.to(accelerator.device) for key, value in batch.items()}, args)
            sums = {name: torch.zeros_like(value) for name, value in named.items()}
    if args.generate_during_eval:
        generate_samples(model, accelerator, tokenizer, rows, step, args)
    model.train()
    return summarize(reduce_sums(accelerator, sums), prefix="eval_")


def main(args: Args) -> None:
    # 0. Check what can be checked before anything is loaded.
    check_positive(args, ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                          "max_length", "logging_steps", "eval_steps"])
    if args.chunk_size < 0:
        fail(f"--chunk_size must be >= 0 (0: the plain path, the model's logits at once), got {args.chunk_size}")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        fail(f"need --max_steps > 0 or --num_train_epochs > 0, got {args.max_steps} and {args.num_train_epochs}")
    check_run(args, ["model_name_or_path"])  # learning rate, model path, output_dir, --resume_from_checkpoint latest
    if args.max_prompt_length is None:  # the default follows --max_length (resolved here, once, for all below)
        args.max_prompt_length = min(128, args.max_length // 2)
    if not 0 < args.max_prompt_length < args.max_length:
        fail(f"--max_prompt_length must be positive and below --max_length {args.max_length} so that answers keep "
             f"some tokens, got {args.max_prompt_length}")
    if args.beta <= 0:
        fail(f"need --beta > 0, got {args.beta}")

    # 1. Accelerator (checks how the run was launched; seeds every RNG). The global batch is computed here, once.
    accelerator = make_accelerator(args)
    world_size = accelerator.num_processes
    global_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    accelerator.print(f"run: {world_size} process(es) x {args.per_device_train_batch_size} per device x "
                      f"{args.gradient_accumulation_steps} accumulation = {global_batch_size} pairs per optimizer step")
    output_dir = Path(args.output_dir)

    # 2. Data, loaded and checked before the model is.
    raw = load_splits(args, accelerator, check_preference_columns)

    # 3. Tokenizer: EOS ends every plain answer (and pads, if there is no pad token).
    tokenizer = load_tokenizer(args, "to end every answer")
    max_length = min(args.max_length, tokenizer.model_max_length)
    if args.max_prompt_length >= max_length:
        fail(f"--max_prompt_length {args.max_prompt_length} leaves no room for answers within the model's "
             f"{max_length} tokens (tokenizer.model_max_length)")
    if isinstance(raw[args.dataset_train_split][0]["chosen"], list) and tokenizer.chat_template is None:
        fail(f"the rows are conversations but the tokenizer of {args.model_name_or_path} has no chat template")

    # 4. Tokenise every pair (prompt masked); count truncations; drop pairs whose answers are identical.
    splits = tokenize_splits(args, accelerator, raw, tokenizer, max_length)
    train_rows = splits[args.dataset_train_split]
    eval_rows = equal_eval_share(accelerator, splits.get(args.dataset_test_split, []))
    steps_per_epoch = len(train_rows) // global_batch_size
    if steps_per_epoch == 0:
        fail(f"the training set has {len(train_rows)} pairs but one optimizer step needs {global_batch_size} "
             f"(per_device_train_batch_size {args.per_device_train_batch_size} x gradient_accumulation_steps "
             f"{args.gradient_accumulation_steps} x {world_size} processes)")
    total_steps = args.max_steps if args.max_steps > 0 else max(1, int(args.num_train_epochs * steps_per_epoch))
    accelerator.print(f"preference data: {len(train_rows)} train / {len(eval_rows)} eval pairs; "
                      f"{total_steps} steps of {global_batch_size}")

    # 5. Policy (LoRA, gradient checkpointing), dropout off after wrapping so that LoRA's is off too, as in the seed.
    #    ORPO has no reference model: one model in memory.
    model = load_trainable_model(args, AutoModelForCausalLM, "CAUSAL_LM")
    if args.disable_dropout:
        disable_dropout_in_model(model)
    model.to(accelerator.device)
    params_in_memory = sum(p.numel() for p in model.parameters())
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"model: {params_in_memory / 1e6:.2f}M parameters in memory (policy only), "
                      f"{num_trainable / 1e6:.2f}M trainable")

    # 6. Optimizer, schedule, resumed state; the logs.
    model, optimizer, scheduler, state = prepare_training(args, accelerator, model, total_steps)
    start_step, num_tokens_seen = state["step"], state.get("num_tokens", 0)
    log = open_logs(args, accelerator, start_step, files=("metrics.jsonl", "samples.jsonl"))

    # 7. Training loop. One optimizer step = gradient_accumulation_steps micro-batches of pairs on each process.
    model.train()
    if start_step == 0:
        log({"step": 0, "epoch": 0.0, "params_in_memory": params_in_memory})
    if eval_rows and start_step == 0:
        log({"step": 0, "epoch": 0.0, **evaluate(model, accelerator, tokenizer, eval_rows, 0, args)})
    # running sums over the current logging window; train_seconds excludes evaluation and checkpointing
    running, running_tokens, train_seconds = {}, 0, 0.0
    progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="orpo",
                    disable=not accelerator.is_local_main_process)
    preemption = Preemption()  # from here on, SIGTERM / SIGINT end the run with a checkpoint
    for step in progress:
        step_start = time.time()
        # 7a. This process's micro-batches of this step, and the NLL targets of the whole step (all micro-batches,
        #     all processes), counted before any forward.
        indices = step_indices(step, len(train_rows), global_batch_size, args.seed)
        mine = indices[accelerator.process_index :: world_size]
        micro_batches = [collate_pairs([train_rows[i] for i in mine[j : j + args.per_device_train_batch_size]],
                                       tokenizer.pad_token_id)
                         for j in range(0, len(mine), args.per_device_train_batch_size)]
        local_nll_tokens = sum(nll_tokens(mb, args.nll_include_prompt) for mb in micro_batches)
        step_nll_tokens = accelerator.reduce(local_nll_tokens.to(accelerator.device), "sum").clamp(min=1)

        # 7b. Forward and backward each micro-batch. The NLL is summed over tokens and divided by the step's NLL
        #     targets (as sft.py), the odds-ratio term summed over pairs and divided by the step's pairs (as dpo.py);
        #     the loss is scaled by world_size because DDP averages gradients over processes. The update is the
        #     gradient of the step's per-token NLL minus its mean odds-ratio term, however the step is split.
        step_sums = {}
        for j, batch in enumerate(micro_batches):
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            with accumulating(accelerator, model, last=j == len(micro_batches) - 1):
                loss_sum, nll_sum, sums = pair_loss(model, accelerator, batch, args)
                loss = nll_sum / step_nll_tokens - loss_sum / global_batch_size  # ORPO eq. 6
                accelerator.backward(loss * world_size)
            step_sums = add_sums(step_sums, sums)
        step_totals = reduce_sums(accelerator, step_sums)

        # 7c. Clip (max_grad_norm 0: only measure the norm); stop before a non-finite update; step.
        grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf")))
        stop_if_not_finite(summarize(step_totals)["loss"], grad_norm, step, output_dir)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 7d. Log, evaluate, checkpoint.
        tokens = int(accelerator.reduce(torch.tensor(sum(int(mb["attention_mask"].sum()) for mb in micro_batches),
                                                     device=accelerator.device), "sum"))
        num_tokens_seen += tokens
        running = add_sums(running, step_totals)
        running_tokens += tokens
        train_seconds += time.time() - step_start
        done = step + 1
        if done % args.logging_steps == 0 or done == total_steps:
            pairs = float(running["pairs"])
            metrics = {"step": done, "epoch": done / steps_per_epoch, **summarize(running),
                       "grad_norm": float(grad_norm), "learning_rate": scheduler.get_last_lr()[0],
                       "num_tokens": num_tokens_seen, "samples_per_second": pairs / train_seconds,
                       "tokens_per_second": running_tokens / train_seconds, "peak_memory_mb": peak_memory_mb()}
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", accuracy=f"{metrics['rewards/accuracies']:.3f}")
            log(metrics)
            running, running_tokens, train_seconds = {}, 0, 0.0
        if eval_rows and (done % args.eval_steps == 0 or done == total_steps):
            log({"step": done, "epoch": done / steps_per_epoch,
                 **evaluate(model, accelerator, tokenizer, eval_rows, done, args)})
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


def disable_dropout_in_model(model: torch.nn.Module) -> None:
    """Dropout off (p = 0) in every module, as the seed does for the policy (and the reference, where there is one)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


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


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
