"""Reward modelling: learn a scalar score r(x) from pairwise preferences with the Bradley-Terry loss.

The reward model is a causal LM with a one-output linear head read at the last token that is not padding
(`AutoModelForSequenceClassification(num_labels=1)`), trained so that the preferred text scores higher:
loss = -log sigmoid(r(chosen) - r(rejected) - margin) (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155;
the optional per-pair margin is Llama 2's, https://arxiv.org/abs/2307.09288). This file reproduces TRL v0.8.6's
`RewardTrainer` as documented ("the seed" wherever this file says it) in one readable loop, fixes its pad-token bug
(see docs/reward.md), and adds reward centring. The score it learns is the tiny world's default reward for ppo.py,
grpo.py, rloo.py, best_of_n.py and iterative_sft.py.

    # offline quickstart: the tiny world (assets/), CPU, under a minute
    python reward.py
    # a real model and dataset from the Hub
    python reward.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/ultrafeedback_binarized \
        --learning_rate 1e-5 --per_device_train_batch_size 8 --gradient_accumulation_steps 4 --max_length 1024 \
        --gradient_checkpointing --bf16 --eval_steps 200 --save_steps 500
    # several GPUs (the global batch is per_device_train_batch_size x gradient_accumulation_steps x processes)
    accelerate launch --multi_gpu --num_processes 8 reward.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --bf16
    # models larger than one GPU holds: FSDP2 or DeepSpeed ZeRO (docs/scaling.md: which config for which size)
    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 8 reward.py \
        --model_name_or_path Qwen/Qwen2.5-7B-Instruct --gradient_checkpointing
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
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (used in the wandb run name)"""
    seed: int = 42
    """seed of the experiment: data order, initialisation of new weights, sampling noise"""
    output_dir: str = "runs/reward"
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
    """a Hub id or a local directory (default: the tiny world's pretrained GPT-2; a new score head is added)"""
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
    use_peft: bool = False
    """train LoRA adapters instead of all weights"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)"""
    lora_dropout: float = 0.05
    """dropout on the LoRA branch"""
    lora_target_modules: list[str] | None = None
    """module names that get adapters (default: all linear layers); the score head is always trained in full"""

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
    """tokens per text (prompt + answer); longer texts are truncated at the end and counted"""

    # --- optimisation ---
    learning_rate: float = 1e-3
    """peak learning rate of AdamW (the default suits the tiny world; real models want about 1e-5)"""
    per_device_train_batch_size: int = 8
    """preference pairs per process per micro-batch"""
    per_device_eval_batch_size: int = 16
    """preference pairs per process per evaluation batch"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    num_train_epochs: float = 2.0
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

    # --- reward modelling ---
    center_rewards_coefficient: float | None = None
    """add coefficient * mean((r_chosen + r_rejected)^2) to the loss so scores stay centred on 0 (e.g. 0.01)"""


# ----------------------------------------------------------------------------------------------------------------------
# The algorithm: a pair -> two texts -> one batch of 2B texts -> scores at the last real token -> Bradley-Terry loss
# ----------------------------------------------------------------------------------------------------------------------
def check_preference_columns(column_names: list[str]) -> None:
    """Preference rows need 'chosen' and 'rejected'; 'prompt' (else the prompt is implicit) and 'margin' optional."""
    missing = [column for column in ("chosen", "rejected") if column not in column_names]
    if missing:
        raise ValueError(f"expected 'chosen' and 'rejected' columns (and optionally 'prompt' and 'margin'); "
                         f"missing {missing}; found columns {column_names}")


def format_pair(example: dict, tokenizer) -> tuple[str, str, bool]:
    """THE place to change how a preference row becomes the two texts the reward model scores.

    Returns (chosen_text, rejected_text, templated). Message lists are rendered with the chat template (which then
    holds its own special tokens); strings are concatenated as prompt + answer. Without a 'prompt' column the
    answers are full texts (the implicit-prompt format): the reward model scores whole texts, so nothing is split.
    """
    chosen, rejected = example["chosen"], example["rejected"]
    if isinstance(chosen, list):
        prompt = example.get("prompt") or []
        return (tokenizer.apply_chat_template(prompt + chosen, tokenize=False),
                tokenizer.apply_chat_template(prompt + rejected, tokenize=False), True)
    prompt = example.get("prompt") or ""
    return prompt + chosen, prompt + rejected, False


def tokenize_pair(example: dict, tokenizer, max_length: int) -> dict:
    """One preference row -> token ids of both texts (each ending with EOS, then cut to max_length tokens), the
    margin, and flags for truncation and for identical texts (which carry no preference signal)."""
    chosen_text, rejected_text, templated = format_pair(example, tokenizer)
    full = {}
    for name, text in (("chosen", chosen_text), ("rejected", rejected_text)):
        input_ids = list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
        if not input_ids or input_ids[-1] != tokenizer.eos_token_id:
            input_ids.append(tokenizer.eos_token_id)
        full[name] = input_ids
    return {"chosen_input_ids": full["chosen"][:max_length],  # truncation keeps the start
            "rejected_input_ids": full["rejected"][:max_length],
            "truncated": max(len(full["chosen"]), len(full["rejected"])) > max_length,
            "identical": full["chosen"] == full["rejected"],
            "margin": float(example.get("margin") or 0.0)}


def tokenize_splits(args, accelerator, raw: DatasetDict, tokenizer, max_length: int) -> dict[str, list[dict]]:
    """The train split and the eval split (if any) as lists of tokenised pairs (tokenize_pair), with a warning for
    the pairs cut at max_length, and without the pairs whose two texts are identical. A row that cannot be formatted,
    or a split with no pair left, stops the run with one line."""
    try:
        with accelerator.main_process_first():  # the main process fills the datasets cache first
            tokenized = {split: raw[split].map(tokenize_pair, remove_columns=raw[split].column_names,
                                               fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
                                               desc=f"tokenizing {split}")
                         for split in [args.dataset_train_split, args.dataset_test_split] if split}
    except (ValueError, KeyError, TypeError) as error:
        fail(f"could not format the preference rows of {args.dataset_name}: {error!r}")
    splits = {}
    for split, dataset in tokenized.items():
        rows = dataset.to_list()
        if num_truncated := sum(row["truncated"] for row in rows):
            accelerator.print(f"warning: {num_truncated} of {len(rows)} {split} pairs have a text longer than "
                              f"{max_length} tokens; it is truncated at the end (raise --max_length to keep it)")
        if num_identical := sum(row["identical"] for row in rows):
            accelerator.print(f"warning: {num_identical} of {len(rows)} {split} pairs have identical chosen and "
                              "rejected texts; they carry no preference and are dropped")
        splits[split] = [row for row in rows if not row["identical"]]
        if not splits[split]:
            fail(f"no {split} pair is left: every pair has identical chosen and rejected texts")
    return splits


def collate_pairs(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one batch of 2B texts for a single forward: input_ids and attention_mask (2B, T) with the B chosen
    texts first and the B rejected texts after them, right-padded; margin (B,)."""
    texts = [row["chosen_input_ids"] for row in rows] + [row["rejected_input_ids"] for row in rows]
    longest = max(len(ids) for ids in texts)
    input_ids = [ids + [pad_token_id] * (longest - len(ids)) for ids in texts]
    attention_mask = [[1] * len(ids) + [0] * (longest - len(ids)) for ids in texts]
    return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(attention_mask),
            "margin": torch.tensor([row["margin"] for row in rows], dtype=torch.float32)}


def get_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) -> (N,) float32 scores, read where plain transformers reads them: at the rightmost token that is not
    config.pad_token_id (right or left padding alike; with pad == EOS, at the token before the final EOS). Hence
    config.pad_token_id must be set (the seed's bug: without it a padded batch cannot be scored), and whoever loads
    the saved model gets the scores it was trained to give."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0].float()


def reward_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Per-pair loss (B,): -log sigmoid(r_chosen - r_rejected - margin), plus, with a centring coefficient c,
    c * (r_chosen + r_rejected)^2. Its mean over pairs is the seed's loss (with TRL's later centring term)."""
    margin = torch.zeros_like(rewards_chosen) if margin is None else margin
    losses = -F.logsigmoid(rewards_chosen - rewards_rejected - margin)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (rewards_chosen + rewards_rejected) ** 2
    return losses


def pairwise_accuracy(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> torch.Tensor:
    """Per pair (B,): 1 if chosen scores higher, 0 if lower, 0.5 for a tie (the seed's argmax counts ties as right)."""
    return (rewards_chosen > rewards_rejected).float() + 0.5 * (rewards_chosen == rewards_rejected).float()


def pair_metric_sums(losses: torch.Tensor, rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """What is logged of B pairs, as name -> scalar sum over the pairs, to be added up over micro-batches and
    processes and divided by the number of pairs: the loss (reward_loss's (B,) losses), the accuracy (ties count
    half) and the mean chosen and rejected rewards ((B,) each). A new metric is one more entry here. B = 0 gives the
    zeros a sum starts from."""
    return {"loss": losses.sum(), "accuracy": pairwise_accuracy(rewards_chosen, rewards_rejected).sum(),
            "rewards/chosen": rewards_chosen.sum(), "rewards/rejected": rewards_rejected.sum()}


def reduce_sums(accelerator, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each scalar of `sums` added up over every process, all of them in one all-reduce; the names kept."""
    return dict(zip(sums, accelerator.reduce(torch.stack(list(sums.values())), "sum")))


def main(args: Args) -> None:
    # 0. Check what can be checked before anything is loaded.
    check_positive(args, ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                          "max_length", "logging_steps", "eval_steps"])
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        fail(f"need --max_steps > 0 or --num_train_epochs > 0, got {args.max_steps} and {args.num_train_epochs}")
    check_run(args, ["model_name_or_path"])  # learning rate, model path, output_dir, --resume_from_checkpoint latest

    # 1. Accelerator (checks how the run was launched; seeds every RNG). The global batch is computed here, once.
    accelerator = make_accelerator(args)
    world_size = accelerator.num_processes
    global_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    accelerator.print(f"run: {world_size} process(es) x {args.per_device_train_batch_size} per device x "
                      f"{args.gradient_accumulation_steps} accumulation = {global_batch_size} pairs per optimizer step")
    output_dir = Path(args.output_dir)

    # 2. Data, loaded and checked before the model is; then the tokenizer (without a pad token, EOS pads).
    raw = load_splits(args, accelerator, check_preference_columns)
    tokenizer = load_tokenizer(args, "to end every text")
    max_length = min(args.max_length, tokenizer.model_max_length)
    if isinstance(raw[args.dataset_train_split][0]["chosen"], list) and tokenizer.chat_template is None:
        fail(f"the rows are conversations but the tokenizer of {args.model_name_or_path} has no chat template")

    # 3. Tokenise both texts of every pair; count truncated pairs; drop pairs whose two texts are identical (their
    #    reward difference is 0 whatever the weights: no gradient, and the seed counts them as correct).
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

    # 4. Model: the causal LM with a new one-output score head (LoRA: peft's SEQ_CLS trains the head in full).
    #    config.pad_token_id is how transformers finds the last real token: set it (the seed's bug). It is set after
    #    loading, not passed to from_pretrained, where it would also make that token's embedding a padding_idx.
    model = load_trainable_model(args, AutoModelForSequenceClassification, "SEQ_CLS", num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(accelerator.device)
    num_params = sum(p.numel() for p in model.parameters())
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"model: {num_params / 1e6:.2f}M parameters, {num_trainable / 1e6:.2f}M trainable")

    # 5. Optimizer, schedule, resumed state; the logs.
    model, optimizer, scheduler, state = prepare_training(args, accelerator, model, total_steps)
    start_step, num_tokens_seen = state["step"], state.get("num_tokens", 0)
    log = open_logs(args, accelerator, start_step)

    def evaluate() -> dict:
        """Loss, accuracy (ties count half) and mean rewards over every pair of the eval split, summed over
        processes (each process takes every N-th pair)."""
        model.eval()
        sums = {**pair_metric_sums(*[torch.zeros(0, device=accelerator.device)] * 3),
                "pairs": torch.zeros((), device=accelerator.device)}  # a process may have no eval pair
        my_rows = eval_rows[accelerator.process_index :: world_size]
        with torch.no_grad():
            for start in range(0, len(my_rows), args.per_device_eval_batch_size):
                batch = collate_pairs(my_rows[start : start + args.per_device_eval_batch_size], tokenizer.pad_token_id)
                batch = {key: value.to(accelerator.device) for key, value in batch.items()}
                chosen, rejected = get_rewards(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
                losses = reward_loss(chosen, rejected, batch["margin"], args.center_rewards_coefficient)
                batch_sums = {**pair_metric_sums(losses, chosen, rejected), "pairs": len(chosen)}
                sums = {name: sums[name] + value for name, value in batch_sums.items()}
        model.train()
        totals = {name: value.item() for name, value in reduce_sums(accelerator, sums).items()}
        pairs = totals.pop("pairs")
        return {**{f"eval_{name}": value / pairs for name, value in totals.items()},
                "eval_rewards/margins": (totals["rewards/chosen"] - totals["rewards/rejected"]) / pairs}

    # 6. Training loop. One optimizer step = gradient_accumulation_steps micro-batches of pairs on each process.
    model.train()
    if eval_rows and start_step == 0:
        log({"step": 0, "epoch": 0.0, **evaluate()})
    # running sums over the current logging window; train_seconds excludes evaluation and checkpointing
    running, running_steps, running_tokens, running_samples, train_seconds = {}, 0, 0, 0, 0.0
    progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="reward",
                    disable=not accelerator.is_local_main_process)
    preemption = Preemption()  # from here on, SIGTERM / SIGINT end the run with a checkpoint
    for step in progress:
        step_start = time.time()
        # 6a. This process's micro-batches of this step.
        indices = step_indices(step, len(train_rows), global_batch_size, args.seed)
        mine = indices[accelerator.process_index :: world_size]
        micro_batches = [collate_pairs([train_rows[i] for i in mine[j : j + args.per_device_train_batch_size]],
                                       tokenizer.pad_token_id)
                         for j in range(0, len(mine), args.per_device_train_batch_size)]

        # 6b. Forward and backward each micro-batch, chosen and rejected texts in one forward (the seed runs two).
        #     Each micro-batch's summed pair losses are divided by the pairs of the whole step, and scaled by
        #     world_size because DDP averages gradients over processes: the update is the gradient of the step's
        #     mean pair loss, however the step is split.
        step_sums = pair_metric_sums(*[torch.zeros(0, device=accelerator.device)] * 3)
        for j, batch in enumerate(micro_batches):
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            with accumulating(accelerator, model, last=j == len(micro_batches) - 1):
                chosen, rejected = get_rewards(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
                losses = reward_loss(chosen, rejected, batch["margin"], args.center_rewards_coefficient)
                accelerator.backward(losses.sum() / global_batch_size * world_size)  # autocast under --bf16
            batch_sums = pair_metric_sums(losses.detach(), chosen.detach(), rejected.detach())
            step_sums = {name: step_sums[name] + value for name, value in batch_sums.items()}
        step_metrics = {name: (value / global_batch_size).item()
                        for name, value in reduce_sums(accelerator, step_sums).items()}
        step_metrics["rewards/margins"] = step_metrics["rewards/chosen"] - step_metrics["rewards/rejected"]

        # 6c. Clip (max_grad_norm 0: only measure the norm); stop before a non-finite update; step.
        grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf")))
        stop_if_not_finite(step_metrics["loss"], grad_norm, step, output_dir)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 6d. Log, evaluate, checkpoint.
        tokens = int(accelerator.reduce(torch.tensor(sum(int(mb["attention_mask"].sum()) for mb in micro_batches),
                                                     device=accelerator.device), "sum"))
        num_tokens_seen += tokens
        for key, value in step_metrics.items():
            running[key] = running.get(key, 0.0) + value
        running_steps, running_tokens = running_steps + 1, running_tokens + tokens
        running_samples, train_seconds = running_samples + global_batch_size, train_seconds + time.time() - step_start
        done = step + 1
        if done % args.logging_steps == 0 or done == total_steps:
            metrics = {"step": done, "epoch": done / steps_per_epoch,
                       **{key: value / running_steps for key, value in running.items()},
                       "grad_norm": float(grad_norm), "learning_rate": scheduler.get_last_lr()[0],
                       "num_tokens": num_tokens_seen, "samples_per_second": running_samples / train_seconds,
                       "tokens_per_second": running_tokens / train_seconds, "peak_memory_mb": peak_memory_mb()}
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", accuracy=f"{metrics['accuracy']:.3f}")
            log(metrics)
            running, running_steps, running_tokens, running_samples, train_seconds = {}, 0, 0, 0, 0.0
        if eval_rows and (done % args.eval_steps == 0 or done == total_steps):
            log({"step": done, "epoch": done / steps_per_epoch, **evaluate()})
        signum = preemption.requested(accelerator)  # the same answer on every process
        if done < total_steps and (signum or args.save_steps > 0 and done % args.save_steps == 0):
            save_checkpoint(output_dir / f"checkpoint-{done}", accelerator, model, tokenizer, optimizer, scheduler,
                            {"step": done, "num_tokens": num_tokens_seen}, args.save_total_limit)
            if signum:
                preemption.stop(accelerator, signum, output_dir / f"checkpoint-{done}")

    # 7. Save: plain save_pretrained weights that AutoModelForSequenceClassification loads, pad_token_id in the
    #    config (LoRA: merged, and the adapter alone; a sharded LoRA run merges into a base of the same shape).
    save_final_model(args, accelerator, model, tokenizer, AutoModelForSequenceClassification, num_labels=1,
                     pad_token_id=tokenizer.pad_token_id)
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
