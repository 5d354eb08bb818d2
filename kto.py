"""Kahneman-Tversky Optimization (KTO): align a model from unpaired thumbs-up / thumbs-down examples.

KTO (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306) needs no preference pairs, only completions labelled
desirable or undesirable. With the implicit reward r(x, y) = log(pi(y|x) / pi_ref(y|x)) and a reference point z0, an
estimate of KL(pi || pi_ref) taken from mismatched prompt/completion pairs, it minimises
desirable_weight * (1 - sigmoid(beta * (r - z0))) on desirable and undesirable_weight * (1 - sigmoid(beta * (z0 - r)))
on undesirable examples: a prospect-theory value function, loss-averse around the reference point. This file
reproduces "the seed", TRL v0.8.6's `KTOTrainer` as documented, in one readable loop: unpaired rows (and preference
pairs unrolled into them), desirable/undesirable weights, a frozen or LoRA adapters-off reference, precomputed
reference log-probs. It fixes the seed's KL pairing, which matches an example with itself in odd batches (see
docs/kto.md).

    # offline quickstart: the tiny world (assets/), CPU, under a minute
    python kto.py
    # a real model and dataset from the Hub
    python kto.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/kto-mix-14k \
        --learning_rate 5e-7 --per_device_train_batch_size 8 --gradient_accumulation_steps 4 --max_length 1024 \
        --max_prompt_length 512 --gradient_checkpointing --bf16 --precompute_ref_log_probs --eval_steps 200
    # several GPUs (the global batch is per_device_train_batch_size x gradient_accumulation_steps x processes)
    accelerate launch --multi_gpu --num_processes 8 kto.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --bf16
    # models larger than one GPU holds: FSDP2 or DeepSpeed ZeRO (docs/scaling.md: which config for which size)
    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 8 kto.py \
        --model_name_or_path Qwen/Qwen2.5-7B-Instruct --gradient_checkpointing
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
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
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
    output_dir: str = "runs/kto"
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
    """a Hub id or a local directory (default: the tiny world's pretrained GPT-2); also the reference model"""
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
    dataset_name: str = str(ASSETS / "data" / "unpaired")
    """a Hub id, a .json/.jsonl/.csv/.parquet file, a save_to_disk directory, or a directory of split files"""
    dataset_config: str | None = None
    """the dataset configuration (subset) name"""
    dataset_train_split: str = "train"
    """the split to train on"""
    dataset_test_split: str | None = "auto"
    """the split to evaluate on (auto: 'test' if the data has one; None: no evaluation)"""
    max_length: int = 512
    """tokens per prompt + completion; the prompt is truncated first (to max_prompt_length), then the completion"""
    max_prompt_length: int | None = None
    """tokens a too-long prompt is cut to (None: half of max_length, at most 128)"""
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    """which end of a long prompt is kept (keep_end keeps the BOS token too)"""

    # --- optimisation ---
    learning_rate: float = 5e-4
    """peak learning rate of AdamW (the default suits the tiny world; real models want about 5e-7)"""
    per_device_train_batch_size: int = 8
    """examples per process per micro-batch (a pair counts as two examples)"""
    per_device_eval_batch_size: int = 16
    """examples per process per evaluation batch"""
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

    # --- KTO ---
    beta: float = 0.1
    """temperature of the implicit reward beta * log(pi / pi_ref): lower stays further from the reference"""
    desirable_weight: float = 1.0
    """weight of the desirable examples' losses (lambda_D in the paper)"""
    undesirable_weight: float = 1.0
    """weight of the undesirable ones (lambda_U); aim for lambda_D * n_D / (lambda_U * n_U) in [1, 4/3]"""
    precompute_ref_log_probs: bool = False
    """compute the reference log-probs (examples and KL pairs) once before training and free the reference model"""
    disable_dropout: bool = True
    """turn dropout off in the policy and the reference, as the seed does"""
    generate_during_eval: bool = False
    """at each evaluation, sample answers to a few eval prompts (samples.jsonl): policy and reference (if held)"""


# ----------------------------------------------------------------------------------------------------------------------
# The algorithm: rows -> prompt + completions (pairs unrolled) -> tokens -> KL pairs -> log-probs -> the KTO loss
# ----------------------------------------------------------------------------------------------------------------------
def check_kto_columns(column_names: list[str]) -> str:
    """Which row format the columns hold: 'unpaired' (prompt, completion, label) or 'paired' (chosen, rejected and
    optionally prompt, unrolled into a desirable and an undesirable example). Anything else is a clear error."""
    if "chosen" in column_names and "rejected" in column_names and "completion" not in column_names:
        return "paired"
    missing = [column for column in ("prompt", "completion", "label") if column not in column_names]
    if missing:
        raise ValueError(f"expected 'prompt', 'completion' and 'label' columns (or preference pairs: 'chosen' and "
                         f"'rejected'); missing {missing}; found columns {column_names}")
    return "unpaired"


def check_labels(labels: list, split: str) -> tuple[int, int]:
    """Every label must be a boolean (or 0/1): True is desirable. Returns (n_desirable, n_undesirable)."""
    for i, label in enumerate(labels):
        if not (type(label) is bool or (type(label) is int and label in (0, 1))):
            raise ValueError(f"column 'label' must hold booleans (true: desirable, false: undesirable) or 0/1; "
                             f"{split} row {i} has {label!r} ({type(label).__name__})")
    n_desirable = sum(bool(label) for label in labels)
    return n_desirable, len(labels) - n_desirable


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


def format_example(example: dict, tokenizer) -> tuple[str, list[str], list[bool], bool]:
    """THE place to change how a row becomes (prompt_text, completions, desirable, templated).

    An unpaired row gives its one completion and label; a preference pair is unrolled into its chosen answer
    (desirable) and its rejected answer (undesirable), as the seed's KTO examples do. Message lists are rendered with
    the chat template: the prompt with the generation prompt, and each completion as what the template adds after it
    (end-of-turn included). Strings are used as they are.
    """
    if "completion" in example:
        prompt, completions, desirable = example["prompt"], [example["completion"]], [bool(example["label"])]
    else:
        if "prompt" in example and example["prompt"] is not None:
            prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
        else:
            prompt, chosen, rejected = split_implicit_prompt(example["chosen"], example["rejected"])
        completions, desirable = [chosen, rejected], [True, False]
    if not isinstance(completions[0], list):
        return prompt, completions, desirable, False
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    texts = []
    for completion in completions:
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError("the chat template renders the prompt differently once a completion follows it, so the "
                             "completion cannot be separated; pass string prompt/completion rows instead")
        texts.append(full[len(prompt_text) :])
    return prompt_text, texts, desirable, True


def tokenize_row(example: dict, tokenizer, max_length: int, max_prompt_length: int, truncation_mode: str) -> dict:
    """One row -> the prompt's token ids and each completion's token ids (one, or two for a pair), with truncation
    flags.

    The prompt and the completions are tokenised apart, so the prompt tokens are a true prefix of every sequence and
    the completion tokens are those the model would generate after the prompt (joint tokenisation can merge the last
    prompt token with the first completion token). BOS comes from the tokenizer (plain text) or the template (chat),
    never twice; EOS ends each plain completion. Too long: the prompt is cut to max_prompt_length first (keep_end
    keeps BOS and the prompt's end), then the completions.
    """
    prompt_text, texts, desirable, templated = format_example(example, tokenizer)
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=not templated)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and len(prompt_ids) > 1 and prompt_ids[0] == prompt_ids[1] == bos:
        prompt_ids = prompt_ids[1:]  # the text already started with BOS and the tokenizer added another
    if not prompt_ids:  # an empty prompt: start from BOS (or EOS, GPT-2's document separator) so that the first
        prompt_ids = [bos if bos is not None else tokenizer.eos_token_id]  # completion token is predicted too
    completions = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not templated and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        completions.append(ids)
    longer = max(len(ids) for ids in completions)
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
        completions = [ids[: max_length - len(prompt_ids)] for ids in completions]
    return {"prompt_ids": prompt_ids, "completion_ids": completions, "desirable": desirable,
            "prompt_truncated": prompt_truncated, "answer_truncated": answer_truncated,
            "identical": len(completions) == 2 and completions[0] == completions[1]}


def unroll_pairs(rows: list[dict]) -> list[dict]:
    """Tokenised rows (tokenize_row) -> examples: prompt_ids, completion_ids, desirable, and the index of the pair it
    came from (-1: unpaired). A pair gives its chosen example, then its rejected one; a pair whose answers are
    identical gives none."""
    return [{"prompt_ids": row["prompt_ids"], "completion_ids": completion, "desirable": desirable,
             "pair": i if len(row["completion_ids"]) == 2 else -1}
            for i, row in enumerate(rows) if not row["identical"]
            for completion, desirable in zip(row["completion_ids"], row["desirable"])]


def tokenize_splits(args, accelerator, raw: DatasetDict, tokenizer, max_length: int) -> dict[str, list[dict]]:
    """The train split and the eval split (if any) as lists of tokenised examples (tokenize_row, then unroll_pairs),
    each kind of truncation counted in a warning; pairs whose answers are identical carry no preference and are
    dropped, saying so. A row that cannot be formatted, or a split with fewer than 2 examples left (the KL reference
    point needs mismatched pairs), stops the run with one line."""
    try:
        with accelerator.main_process_first():  # the main process fills the datasets cache first
            tokenized = {
                split: raw[split].map(tokenize_row, remove_columns=raw[split].column_names,
                                      fn_kwargs={"tokenizer": tokenizer, "max_length": max_length,
                                                 "max_prompt_length": args.max_prompt_length,
                                                 "truncation_mode": args.truncation_mode},
                                      desc=f"tokenizing {split}")
                for split in [args.dataset_train_split, args.dataset_test_split] if split
            }
    except (ValueError, KeyError, TypeError) as error:
        fail(f"could not format the rows of {args.dataset_name}: {error!r}")
    splits = {}
    for split, dataset in tokenized.items():
        rows = dataset.to_list()
        if num_truncated := sum(row["prompt_truncated"] for row in rows):
            accelerator.print(f"warning: {num_truncated} of {len(rows)} {split} prompts were cut to "
                              f"--max_prompt_length {args.max_prompt_length} ({args.truncation_mode})")
        if num_truncated := sum(row["answer_truncated"] for row in rows):
            accelerator.print(f"warning: {num_truncated} of {len(rows)} {split} rows had completions cut to fit "
                              f"{max_length} tokens")
        if num_identical := sum(row["identical"] for row in rows):
            accelerator.print(f"warning: {num_identical} of {len(rows)} {split} pairs have identical chosen and "
                              "rejected answers; they carry no preference and are dropped")
        splits[split] = unroll_pairs(rows)
        if len(splits[split]) < 2:
            fail(f"the {split} split has {len(splits[split])} usable examples; the KL reference point needs at least 2")
    return splits


def check_weight_ratio(accelerator, args, n_desirable: int, n_undesirable: int) -> None:
    """The paper's eq. (8): desirable_weight * n_desirable / (undesirable_weight * n_undesirable) should lie in
    [1, 4/3]; outside it, a warning with weights that would bring it there."""
    ratio = args.desirable_weight * n_desirable / (args.undesirable_weight * n_undesirable)
    if not 1 <= ratio <= 4 / 3 + 1e-9:
        up, down = lambda x: math.ceil(x * 1000) / 1000, lambda x: math.floor(x * 1000) / 1000  # noqa: E731
        accelerator.print(  # the suggested ranges are rounded inwards, so that their printed ends are inside
            f"warning: desirable_weight x desirable / (undesirable_weight x undesirable) = {args.desirable_weight:g} x "
            f"{n_desirable} / ({args.undesirable_weight:g} x {n_undesirable}) = {ratio:.3f}, outside the [1, 4/3] the "
            f"KTO paper advises; e.g. --undesirable_weight in [{up(3 * ratio * args.undesirable_weight / 4):.3f}, "
            f"{down(ratio * args.undesirable_weight):.3f}] or --desirable_weight in "
            f"[{up(args.desirable_weight / ratio):.3f}, {down(4 * args.desirable_weight / (3 * ratio)):.3f}]")


def kl_partners(prompts: list) -> list[int]:
    """For each example k of a batch, the example whose completion its prompt is paired with to estimate the KL
    reference point: (k + s) mod n, with the smallest shift s >= 1 (up to 100 tried) under which no example meets a
    completion written for its own prompt (s = 1 if none does).

    A rotation is a permutation without fixed points for any n >= 2, odd or even, so every completion is used once
    and no example is ever paired with itself. (The seed reverses the batch, which pairs the middle example of an odd
    batch with itself: its KL estimate then contains a matched pair.) `prompts`: anything comparable, one per example.
    """
    n = len(prompts)
    if n < 2:
        raise ValueError(f"the KL reference point needs mismatched pairs, i.e. at least 2 examples; got {n}")
    for shift in range(1, min(n, 101)):
        if all(prompts[k] != prompts[(k + shift) % n] for k in range(n)):
            return [(k + shift) % n for k in range(n)]
    return [(k + 1) % n for k in range(n)]


def mismatched_example(prompt_row: dict, completion_row: dict, max_length: int) -> dict:
    """The prompt of one example followed by the completion of another (cut to fit max_length): a KL pair."""
    return {"prompt_ids": prompt_row["prompt_ids"],
            "completion_ids": completion_row["completion_ids"][: max_length - len(prompt_row["prompt_ids"])]}


def kl_pair_rows(rows: list[dict], indices, max_length: int) -> list[dict]:
    """The KL pairs of a batch (rows[i] for i in indices: one optimizer step's global batch, or the whole eval split):
    for each example k, its prompt with the completion of another example of the same batch (kl_partners)."""
    partners = kl_partners([tuple(rows[i]["prompt_ids"]) for i in indices])
    return [mismatched_example(rows[indices[k]], rows[indices[partners[k]]], max_length) for k in range(len(indices))]


def collate_examples(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """n examples -> input_ids, attention_mask and labels (n, T), prompt + completion right-padded (labels -100 on
    the prompt and padding), and `desirable` (n,) bool when the rows carry labels; plus the precomputed reference
    log-probs (n,) when the rows carry them."""
    sequences = [row["prompt_ids"] + row["completion_ids"] for row in rows]
    labels = [[-100] * len(row["prompt_ids"]) + row["completion_ids"] for row in rows]
    longest = max(len(ids) for ids in sequences)
    batch = {
        "input_ids": torch.tensor([ids + [pad_token_id] * (longest - len(ids)) for ids in sequences]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in sequences]),
        "labels": torch.tensor([ids + [-100] * (longest - len(ids)) for ids in labels]),
    }
    if "desirable" in rows[0]:
        batch["desirable"] = torch.tensor([row["desirable"] for row in rows], dtype=torch.bool)
    if "reference_logps" in rows[0]:
        batch["reference_logps"] = torch.tensor([row["reference_logps"] for row in rows], dtype=torch.float32)
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


def kto_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, policy_KL_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             reference_KL_logps: torch.Tensor, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seed's `kto_loss`. Desirable (Nc,) and undesirable (Nr,) log-probs, KL pairs (K,) -> (losses (Nc + Nr,),
    chosen_rewards (Nc,), rejected_rewards (Nr,), kl ()).

      kl   = max(0, mean(policy_KL - reference_KL))                       the reference point z0, detached
      desirable:   desirable_weight   * (1 - sigmoid(beta * (logratio - kl)))
      undesirable: undesirable_weight * (1 - sigmoid(beta * (kl - logratio)))     logratio = policy - reference
    Rewards are beta * logratio, detached. Pass the KL pairs of every process (the training loop gathers them), so
    that kl is their mean over processes, as the seed's gather-then-mean. Nc or Nr may be 0: a batch holding only
    one kind of example gives empty tensors for the other and a finite loss.
    """
    kl = (policy_KL_logps - reference_KL_logps).mean().detach().clamp(min=0)
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach(), kl


def example_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, desirable: torch.Tensor,
                 policy_KL_logps: torch.Tensor, reference_KL_logps: torch.Tensor,
                 args) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """kto_loss on a batch of n examples, desirable and undesirable together: their log-probs (n,) under the policy
    and the reference (summed over each completion, never averaged: the seed's KTO sums), `desirable` (n,) bool, and
    the KL pairs of the whole step (K,). Returns (losses (n,), the desirable ones first; the reference point kl ();
    the batch's metric sums, example_metrics)."""
    losses, chosen_rewards, rejected_rewards, kl = kto_loss(
        policy_logps[desirable], policy_logps[~desirable], policy_KL_logps, reference_logps[desirable],
        reference_logps[~desirable], reference_KL_logps, beta=args.beta, desirable_weight=args.desirable_weight,
        undesirable_weight=args.undesirable_weight)
    return losses, kl, example_metrics(policy_logps, desirable, losses, chosen_rewards, rejected_rewards)


def example_metrics(policy_logps: torch.Tensor, desirable: torch.Tensor, losses: torch.Tensor,
                    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """THE place to add a metric: name -> (its sum over the batch's examples, the number of examples it is a mean
    over), a (2,) float32 tensor. Summed over micro-batches, processes and steps (add_sums, reduce_sums), then each
    sum divided by its count (summarize): rewards/chosen is the mean over the desirable examples, rewards/rejected
    over the undesirable ones, as the seed logs them."""
    policy_logps, losses = policy_logps.detach(), losses.detach()
    n_chosen, n_rejected = desirable.sum().float(), (~desirable).sum().float()
    return {"loss": torch.stack([losses.sum(), n_chosen + n_rejected]),
            "rewards/chosen": torch.stack([chosen_rewards.sum(), n_chosen]),
            "rewards/rejected": torch.stack([rejected_rewards.sum(), n_rejected]),
            "logps/chosen": torch.stack([policy_logps[desirable].sum(), n_chosen]),
            "logps/rejected": torch.stack([policy_logps[~desirable].sum(), n_rejected])}


def add_sums(total: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Metric sums added name by name (to an empty total: the sums themselves)."""
    return {name: total.get(name, 0) + value for name, value in sums.items()}


def reduce_sums(accelerator, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This process's metric sums -> their sums over every process, on the CPU: one all-reduce of the stacked values."""
    return dict(zip(sums, accelerator.reduce(torch.stack(list(sums.values())), "sum").cpu()))


def summarize(totals: dict[str, torch.Tensor], kl: float, prefix: str = "") -> dict[str, float]:
    """example_metrics' sums -> means, each over its own count and left out when that is 0 (no desirable, or no
    undesirable, example in the window); rewards/margins where both kinds were seen; kl, the reference point, as
    given. The names prefixed."""
    means = {name: total / count for name, (total, count) in
             ((name, value.tolist()) for name, value in totals.items()) if count}
    if "rewards/chosen" in means and "rewards/rejected" in means:
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    return {prefix + name: value for name, value in {**means, "kl": kl}.items()}


def load_reference_model(args, accelerator) -> torch.nn.Module:
    """pi_ref: a frozen copy of the initial policy, always --model_name_or_path (also when resuming), its dropout off as
    the policy's; eval mode, no gradients, sharded under FSDP / ZeRO-3 (prepare_frozen)."""
    reference = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, revision=args.revision, dtype=(
        args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)),
        attn_implementation=args.attn_implementation)
    if args.disable_dropout:
        disable_dropout_in_model(reference)
    return prepare_frozen(accelerator, reference)


def reference_logps(model, reference_model, accelerator, batch: dict, args) -> torch.Tensor:
    """(n,) reference log-probs of a collated batch (on the device), at the policy's precision under --bf16: under
    reference_model, or with LoRA (reference_model None) under the policy `model` with its adapters off."""
    with torch.no_grad(), accelerator.autocast():
        if reference_model is not None:
            out = token_log_probs(reference_model, accelerator.unwrap_model(reference_model), batch, args.chunk_size,
                                  args.lm_head_only_at_labels)
        else:  # LoRA: the reference is the base model, i.e. the policy with its adapters off
            with accelerator.unwrap_model(model).disable_adapter():
                out = token_log_probs(model, accelerator.unwrap_model(model), batch, args.chunk_size,
                                      args.lm_head_only_at_labels)
        return sequence_log_probs(out.log_probs, batch["labels"])


def reference_logps_of_rows(reference_model, accelerator, rows: list[dict], pad_token_id: int, desc: str,
                            args) -> list[float]:
    """The reference log-prob of each of `rows` (examples or KL pairs), on every process: each process scores its
    share, then every process receives all of them."""
    world_size = accelerator.num_processes
    # as many rows on every process (a sharded reference's forwards are collective): the last row
    # is scored again where the rows do not divide evenly
    mine = [min(i, len(rows) - 1) for i in range(accelerator.process_index,
                                                  math.ceil(len(rows) / world_size) * world_size, world_size)]
    scored = []
    for start in tqdm(range(0, len(mine), args.per_device_eval_batch_size), desc=f"reference {desc}",
                      disable=not accelerator.is_local_main_process):
        chunk = mine[start : start + args.per_device_eval_batch_size]
        batch = collate_examples([rows[i] for i in chunk], pad_token_id)
        scored += list(zip(chunk, reference_logps(None, reference_model, accelerator, {
            key: value.to(accelerator.device) for key, value in batch.items()}, args).tolist()))
    logps = [0.0] * len(rows)
    for i, logp in gather_object(scored):
        logps[i] = logp
    return logps


def precompute_reference_logps(args, accelerator, train_rows: list[dict], eval_rows: list[dict],
                               eval_kl_rows: list[dict], total_steps: int, global_batch_size: int, max_length: int,
                               pad_token_id: int) -> list[list[float]]:
    """--precompute_ref_log_probs: the reference log-probs of every example and every KL pair, before the policy is
    loaded so that the two never share memory; then the reference is freed. The examples' (and the eval KL pairs')
    are written into their rows (collate_examples carries them on); the training KL pairs', known in advance because
    the data order is a function of the step, are returned per step: (total_steps, global_batch_size)."""
    reference_model = load_reference_model(args, accelerator)
    for rows, desc in ((train_rows, "train"), (eval_rows, "eval"), (eval_kl_rows, "eval KL pairs")):
        for row, logp in zip(rows, reference_logps_of_rows(reference_model, accelerator, rows, pad_token_id, desc,
                                                            args)):
            row["reference_logps"] = logp
    kl_rows = [row for step in range(total_steps) for row in kl_pair_rows(
        train_rows, step_indices(step, len(train_rows), global_batch_size, args.seed), max_length)]
    logps = reference_logps_of_rows(reference_model, accelerator, kl_rows, pad_token_id, "train KL pairs", args)
    del reference_model, kl_rows
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [logps[s * global_batch_size : (s + 1) * global_batch_size] for s in range(total_steps)]


def example_forward(model, reference_model, accelerator, batch: dict, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy and reference log-probs (n,) of a batch of examples, desirable and undesirable together: ONE policy
    forward (with gradient unless the caller turned it off), and one reference forward unless the reference log-probs
    were precomputed. The KL pairs (mismatched prompt and completion) take the same path. No (tokens x vocabulary)
    logits are held whole (--chunk_size; 0: the model's logits at the completions)."""
    with accelerator.autocast():
        out = token_log_probs(model, accelerator.unwrap_model(model), batch, args.chunk_size,
                              args.lm_head_only_at_labels)
    policy = sequence_log_probs(out.log_probs, batch["labels"])
    if "reference_logps" in batch:
        return policy, batch["reference_logps"]
    return policy, reference_logps(model, reference_model, accelerator, batch, args)


def kl_pair_logps(model, reference_model, accelerator, kl_rows: list[dict], chunks: list[torch.Tensor],
                  pad_token_id: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL reference point's inputs, without gradient: the policy's and the reference's log-probs of a batch's KL
    pairs (kl_pair_rows), each process scoring the positions in its `chunks` (one forward each), then summed into
    (len(kl_rows),) vectors that every process holds. kto_loss takes their mean, i.e. the mean over all processes
    and micro-batches, so the estimate does not depend on how the batch is split."""
    policy_kl, reference_kl = (torch.zeros(len(kl_rows), device=accelerator.device) for _ in range(2))
    with torch.no_grad():
        for chunk in chunks:
            batch = collate_examples([kl_rows[k] for k in chunk.tolist()], pad_token_id)
            policy_kl[chunk], reference_kl[chunk] = example_forward(model, reference_model, accelerator, {
                key: value.to(accelerator.device) for key, value in batch.items()}, args)
    return accelerator.reduce(policy_kl, "sum"), accelerator.reduce(reference_kl, "sum")


def generate_samples(model, reference_model, accelerator, tokenizer, rows: list[dict], step: int, args) -> None:
    """Answers of the policy and of the reference to the first eval prompts, to samples.jsonl (and wandb)."""
    prompts = [list(ids) for ids in dict.fromkeys(tuple(row["prompt_ids"]) for row in rows)]
    prompts = prompts[: args.per_device_eval_batch_size]
    longest = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (longest - len(ids)) + ids for ids in prompts])
    attention_mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in prompts])
    max_new_tokens = min(args.max_length, tokenizer.model_max_length) - args.max_prompt_length  # the answers' room
    kwargs = {"input_ids": input_ids.to(accelerator.device), "attention_mask": attention_mask.to(accelerator.device),
              "max_new_tokens": max_new_tokens, "do_sample": True, "top_k": 0, "pad_token_id": tokenizer.pad_token_id}
    reference_out = None  # the frozen copy was freed (precomputed)
    with torch.no_grad():
        with gathered_for_generation(accelerator, model) as policy:  # whole weights for these calls only
            policy_out = policy.generate(**kwargs)
            if args.use_peft:  # the reference is the policy with its adapters off
                with policy.disable_adapter():
                    reference_out = policy.generate(**kwargs)
        if reference_model is not None:
            with gathered_for_generation(accelerator, reference_model) as reference:
                reference_out = reference.generate(**kwargs)
    decode = lambda out: tokenizer.batch_decode(out[:, longest:], skip_special_tokens=True)  # noqa: E731
    samples = [{"step": step, "prompt": tokenizer.decode(ids, skip_special_tokens=True), "policy": p,
                "reference": r} for ids, p, r in zip(prompts, decode(policy_out), decode(reference_out)
                                                      if reference_out is not None else [None] * len(prompts))]
    if not accelerator.is_main_process:  # every process generates (sharded weights are gathered together)
        return
    with open(Path(args.output_dir) / "samples.jsonl", "a") as f:
        f.writelines(json.dumps(sample) + "\n" for sample in samples)
    if args.track:
        import wandb

        wandb.log({"game_log": wandb.Table(columns=list(samples[0]), rows=[list(s.values()) for s in samples])},
                  step=step)


def evaluate(model, reference_model, accelerator, tokenizer, rows: list[dict], kl_rows: list[dict], step: int,
             args) -> dict[str, float]:
    """KTO metrics over every example of the eval split (each process takes every N-th one), with the KL reference
    point of the whole split (kl_rows, fixed once); when the split holds preference pairs, also the accuracy of the
    implicit reward on them (ties count half). Prefixed eval_; with --generate_during_eval, samples of the first
    prompts too (generate_samples)."""
    model.eval()
    chunks = torch.arange(accelerator.process_index, len(rows), accelerator.num_processes).split(
        args.per_device_eval_batch_size)
    # the KL pairs first: the loss of every example needs their mean
    policy_kl, reference_kl = kl_pair_logps(model, reference_model, accelerator, kl_rows, chunks,
                                            tokenizer.pad_token_id, args)
    kl = (policy_kl - reference_kl).mean().clamp(min=0)  # the reference point kto_loss uses, for the log
    rewards = torch.zeros(len(rows), device=accelerator.device)
    nothing = torch.zeros(0, device=accelerator.device)  # the sums of no example: a process without eval rows adds 0
    sums = example_loss(nothing, nothing, nothing.bool(), policy_kl, reference_kl, args)[2]
    with torch.no_grad():
        for chunk in chunks:
            batch = collate_examples([rows[k] for k in chunk.tolist()], tokenizer.pad_token_id)
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            policy, reference = example_forward(model, reference_model, accelerator, batch, args)
            sums = add_sums(sums, example_loss(policy, reference, batch["desirable"], policy_kl, reference_kl, args)[2])
            rewards[chunk] = args.beta * (policy - reference)
    if args.generate_during_eval:
        generate_samples(model, reference_model, accelerator, tokenizer, rows, step, args)
    model.train()
    metrics = summarize(reduce_sums(accelerator, sums), kl.item(), prefix="eval_")
    # a pair's chosen example k has its rejected one at k + 1 (unless the sharded share cut the split between them)
    pairs = [k for k, row in enumerate(rows[:-1]) if row["pair"] >= 0 and row["desirable"]
             and rows[k + 1]["pair"] == row["pair"]]
    if pairs:
        rewards = accelerator.reduce(rewards, "sum")
        chosen, rejected = rewards[pairs], rewards[[k + 1 for k in pairs]]
        metrics["eval_rewards/accuracies"] = ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()
                                              ).mean().item()
    return metrics


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
    if args.beta <= 0 or args.desirable_weight <= 0 or args.undesirable_weight <= 0:
        fail(f"need --beta, --desirable_weight and --undesirable_weight > 0, got {args.beta}, "
             f"{args.desirable_weight} and {args.undesirable_weight}")

    # 1. Accelerator (checks how the run was launched; seeds every RNG). The global batch is computed here, once.
    accelerator = make_accelerator(args)
    world_size = accelerator.num_processes
    global_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    accelerator.print(f"run: {world_size} process(es) x {args.per_device_train_batch_size} per device x "
                      f"{args.gradient_accumulation_steps} accumulation = {global_batch_size} examples per optimizer "
                      "step")
    output_dir = Path(args.output_dir)
    if global_batch_size < 2:  # the seed raises this too
        fail(f"the KL reference point is estimated from mismatched pairs inside each optimizer step's batch, which "
             f"needs at least 2 examples; got {global_batch_size} (per_device_train_batch_size "
             f"{args.per_device_train_batch_size} x gradient_accumulation_steps {args.gradient_accumulation_steps} x "
             f"{world_size} processes)")

    # 2. Data, loaded and checked before the model is: unpaired rows need boolean labels, and training needs both kinds.
    raw = load_splits(args, accelerator, check_kto_columns)
    try:
        for split in filter(None, [args.dataset_train_split, args.dataset_test_split]):
            if check_kto_columns(raw[split].column_names) == "unpaired":
                n_desirable, n_undesirable = check_labels(raw[split]["label"], split)
                if split == args.dataset_train_split and not (n_desirable and n_undesirable):
                    raise ValueError(f"KTO needs both desirable and undesirable examples, but the '{split}' split has "
                                     f"{n_desirable} with label true and {n_undesirable} with label false")
    except ValueError as error:
        fail(str(error))

    # 3. Tokenizer: EOS ends every plain completion (and pads, if there is no pad token).
    tokenizer = load_tokenizer(args, "to end every answer")
    max_length = min(args.max_length, tokenizer.model_max_length)
    if args.max_prompt_length >= max_length:
        fail(f"--max_prompt_length {args.max_prompt_length} leaves no room for answers within the model's "
             f"{max_length} tokens (tokenizer.model_max_length)")
    first = raw[args.dataset_train_split][0]
    if isinstance(first.get("completion", first.get("chosen")), list) and tokenizer.chat_template is None:
        fail(f"the rows are conversations but the tokenizer of {args.model_name_or_path} has no chat template")

    # 4. Tokenise every row (prompt and completion apart; the prompt is masked when collated); count truncations;
    #    unroll pairs into a desirable and an undesirable example, dropping pairs whose answers are identical.
    splits = tokenize_splits(args, accelerator, raw, tokenizer, max_length)
    train_rows = splits[args.dataset_train_split]
    eval_rows = equal_eval_share(accelerator, splits.get(args.dataset_test_split, []))
    n_desirable = sum(row["desirable"] for row in train_rows)
    n_undesirable = len(train_rows) - n_desirable
    check_weight_ratio(accelerator, args, n_desirable, n_undesirable)
    steps_per_epoch = len(train_rows) // global_batch_size
    if steps_per_epoch == 0:
        fail(f"the training set has {len(train_rows)} examples but one optimizer step needs {global_batch_size} "
             f"(per_device_train_batch_size {args.per_device_train_batch_size} x gradient_accumulation_steps "
             f"{args.gradient_accumulation_steps} x {world_size} processes)")
    total_steps = args.max_steps if args.max_steps > 0 else max(1, int(args.num_train_epochs * steps_per_epoch))
    # The evaluation's KL pairs are fixed once, over the whole eval split, so that the eval metrics do not depend on
    # how the split is sharded over processes or batched.
    eval_kl_rows = kl_pair_rows(eval_rows, range(len(eval_rows)), max_length) if eval_rows else []
    accelerator.print(f"KTO data: {len(train_rows)} train examples ({n_desirable} desirable, {n_undesirable} "
                      f"undesirable) / {len(eval_rows)} eval; {total_steps} steps of {global_batch_size}")

    # 5. The reference pi_ref: a frozen copy of the initial policy (always --model_name_or_path, also when resuming),
    #    or with LoRA the policy itself with its adapters off (no second copy). --precompute_ref_log_probs scores
    #    every example and every KL pair once, before the policy is loaded, and frees the reference.
    reference_kl_logps = None  # precomputed: per step, the (global_batch_size,) reference log-probs of its KL pairs
    if args.precompute_ref_log_probs:
        reference_kl_logps = precompute_reference_logps(args, accelerator, train_rows, eval_rows, eval_kl_rows,
                                                        total_steps, global_batch_size, max_length,
                                                        tokenizer.pad_token_id)

    # 6. Policy (LoRA, gradient checkpointing), dropout off after wrapping so that LoRA's is off too, as in the seed.
    model = load_trainable_model(args, AutoModelForCausalLM, "CAUSAL_LM")
    if args.disable_dropout:
        disable_dropout_in_model(model)
    model.to(accelerator.device)
    needs_live_reference = not (args.precompute_ref_log_probs or args.use_peft)
    reference_model = load_reference_model(args, accelerator) if needs_live_reference else None
    params_in_memory = sum(p.numel() for m in (model, reference_model) if m is not None for p in m.parameters())
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"model: {params_in_memory / 1e6:.2f}M parameters in memory (policy"
                      f"{' + reference' if reference_model is not None else ''}), {num_trainable / 1e6:.2f}M trainable")

    # 7. Optimizer, schedule, resumed state; the logs.
    model, optimizer, scheduler, state = prepare_training(args, accelerator, model, total_steps)
    start_step, num_tokens_seen = state["step"], state.get("num_tokens", 0)
    log = open_logs(args, accelerator, start_step, files=("metrics.jsonl", "samples.jsonl"))

    # 8. Training loop. One optimizer step = gradient_accumulation_steps micro-batches of examples on each process.
    model.train()
    if start_step == 0:
        log({"step": 0, "epoch": 0.0, "params_in_memory": params_in_memory})
    if eval_rows and start_step == 0:
        log({"step": 0, "epoch": 0.0,
             **evaluate(model, reference_model, accelerator, tokenizer, eval_rows, eval_kl_rows, 0, args)})
    # running sums over the current logging window; train_seconds excludes evaluation and checkpointing
    running, running_kl, running_tokens, train_seconds = {}, [], 0, 0.0
    progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="kto",
                    disable=not accelerator.is_local_main_process)
    preemption = Preemption()  # from here on, SIGTERM / SIGINT end the run with a checkpoint
    for step in progress:
        step_start = time.time()
        # 8a. This process's micro-batches of this step: positions process_index, process_index + N, ... of the
        #     step's global batch, split into micro-batches.
        indices = step_indices(step, len(train_rows), global_batch_size, args.seed)
        positions = torch.arange(accelerator.process_index, global_batch_size, world_size)
        micro_positions = positions.split(args.per_device_train_batch_size)

        # 8b. The KL reference point of the step, without gradient, from the step's mismatched pairs (kl_pair_logps):
        #     the same (global_batch_size,) log-probs on every process, whatever the split into processes and
        #     micro-batches.
        kl_rows = kl_pair_rows(train_rows, indices, max_length)
        if reference_kl_logps is not None:
            for row, logp in zip(kl_rows, reference_kl_logps[step]):
                row["reference_logps"] = logp
        policy_kl, reference_kl = kl_pair_logps(model, reference_model, accelerator, kl_rows, micro_positions,
                                                tokenizer.pad_token_id, args)

        # 8c. Forward and backward each micro-batch. The losses are averaged over the examples of the whole step
        #     (the micro-batch sum divided by the step's example count, as the seed's mean over a batch), and scaled
        #     by world_size because DDP averages gradients over processes.
        micro_batches = [collate_examples([train_rows[indices[k]] for k in chunk.tolist()], tokenizer.pad_token_id)
                         for chunk in micro_positions]
        step_sums = {}
        for j, batch in enumerate(micro_batches):
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            with accumulating(accelerator, model, last=j == len(micro_batches) - 1):
                policy, reference = example_forward(model, reference_model, accelerator, batch, args)  # autocast
                losses, kl, sums = example_loss(policy, reference, batch["desirable"], policy_kl, reference_kl, args)
                accelerator.backward(losses.sum() / global_batch_size * world_size)
            step_sums = add_sums(step_sums, sums)
        step_totals = reduce_sums(accelerator, step_sums)

        # 8d. Clip (max_grad_norm 0: only measure the norm); stop before a non-finite update; step.
        grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf")))
        stop_if_not_finite(summarize(step_totals, kl.item())["loss"], grad_norm, step, output_dir)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 8e. Log, evaluate, checkpoint.
        tokens = int(accelerator.reduce(torch.tensor(sum(int(mb["attention_mask"].sum()) for mb in micro_batches),
                                                     device=accelerator.device), "sum"))
        num_tokens_seen += tokens
        running = add_sums(running, step_totals)
        running_kl.append(kl.item())  # one KL estimate per step
        running_tokens += tokens
        train_seconds += time.time() - step_start
        done = step + 1
        if done % args.logging_steps == 0 or done == total_steps:
            examples = float(running["loss"][1])
            metrics = {"step": done, "epoch": done / steps_per_epoch,
                       **summarize(running, sum(running_kl) / len(running_kl)),
                       "grad_norm": float(grad_norm), "learning_rate": scheduler.get_last_lr()[0],
                       "num_tokens": num_tokens_seen, "samples_per_second": examples / train_seconds,
                       "tokens_per_second": running_tokens / train_seconds, "peak_memory_mb": peak_memory_mb()}
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{metrics['kl']:.3f}")
            log(metrics)
            running, running_kl, running_tokens, train_seconds = {}, [], 0, 0.0
        if eval_rows and (done % args.eval_steps == 0 or done == total_steps):
            log({"step": done, "epoch": done / steps_per_epoch,
                 **evaluate(model, reference_model, accelerator, tokenizer, eval_rows, eval_kl_rows, done, args)})
        signum = preemption.requested(accelerator)  # the same answer on every process
        if done < total_steps and (signum or args.save_steps > 0 and done % args.save_steps == 0):
            save_checkpoint(output_dir / f"checkpoint-{done}", accelerator, model, tokenizer, optimizer, scheduler,
                            {"step": done, "num_tokens": num_tokens_seen}, args.save_total_limit)
            if signum:
                preemption.stop(accelerator, signum, output_dir / f"checkpoint-{done}")

    # 9. Save: plain save_pretrained weights that AutoModelForCausalLM loads (LoRA: merged, and the adapter alone).
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


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
