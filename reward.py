"""Reward modelling: learn a scalar score r(x) from pairwise preferences with the Bradley-Terry loss.

The reward model is a causal LM with a one-output linear head read at the last token that is not padding
(`AutoModelForSequenceClassification(num_labels=1)`), trained so that the preferred text scores higher:
loss = -log sigmoid(r(chosen) - r(rejected) - margin) (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155;
the optional per-pair margin is Llama 2's, https://arxiv.org/abs/2307.09288). This file reproduces TRL's
`RewardTrainer` (v0.8 era) in one readable loop, fixes its pad-token bug (see docs/reward.md), and adds reward
centring. The score it learns is the tiny world's default reward for ppo.py, best_of_n.py and iterative_sft.py.

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
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

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
    """dtype the weights are loaded in; keep float32 and use --bf16 for mixed precision unless memory forbids it"""
    attn_implementation: str | None = None
    """attention kernel, e.g. "sdpa", "eager" or "flash_attention_2" (default: transformers' choice)"""
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
    """a Hub id, a local .json/.jsonl/.csv/.parquet file, a save_to_disk directory, or a directory of split files"""
    dataset_config: str | None = None
    """the dataset configuration (subset) name"""
    dataset_train_split: str = "train"
    """the split to train on"""
    dataset_test_split: str | None = "auto"
    """the split to evaluate on; auto: 'test' if the data has one, else no evaluation (a single data file has only
    'train'); None: no evaluation; a split named here must exist"""
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
    """fraction of the steps during which the learning rate ramps up linearly from 0"""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """the learning-rate schedule after warm-up"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (0: no clipping)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    optim: Literal["adamw_torch_fused", "adamw_torch"] = "adamw_torch_fused"
    """AdamW kernels (transformers' names): fused, one pass over all parameters (transformers' default); or torch's
    per-tensor loop, as the seed"""
    eval_steps: int = 100
    """evaluate every this many optimizer steps (also before the first and after the last)"""
    save_steps: int = 500
    """write a resumable checkpoint every this many optimizer steps (0: never)"""
    resume_from_checkpoint: str | None = None
    """a checkpoint-N directory written by this script to continue from"""

    # --- reward modelling ---
    center_rewards_coefficient: float | None = None
    """add coefficient * mean((r_chosen + r_rejected)^2) to the loss so scores stay centred on 0 (e.g. 0.01)"""


# ----------------------------------------------------------------------------------------------------------------------
# Data: loading, validation, formatting, tokenisation, collation
# ----------------------------------------------------------------------------------------------------------------------
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


def check_preference_columns(column_names: list[str]) -> None:
    """Preference rows need 'chosen' and 'rejected'; 'prompt' (else the prompt is implicit) and 'margin' are optional."""
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


def collate_pairs(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one batch of 2B texts for a single forward: input_ids and attention_mask (2B, T) with the B chosen
    texts first and the B rejected texts after them, right-padded; margin (B,)."""
    texts = [row["chosen_input_ids"] for row in rows] + [row["rejected_input_ids"] for row in rows]
    longest = max(len(ids) for ids in texts)
    input_ids = [ids + [pad_token_id] * (longest - len(ids)) for ids in texts]
    attention_mask = [[1] * len(ids) + [0] * (longest - len(ids)) for ids in texts]
    return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(attention_mask),
            "margin": torch.tensor([row["margin"] for row in rows], dtype=torch.float32)}


def step_indices(step: int, num_rows: int, global_batch_size: int, seed: int) -> list[int]:
    """Row indices of optimizer step `step` over all processes and micro-batches.

    Each epoch is a permutation seeded by (seed + epoch), consumed global_batch_size rows at a time; the incomplete
    tail of an epoch is dropped. The data order depends on the step alone, which makes resuming exact and makes
    N processes see the same global batches as one.
    """
    steps_per_epoch = num_rows // global_batch_size
    epoch, position = divmod(step, steps_per_epoch)
    permutation = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return permutation[position * global_batch_size : (position + 1) * global_batch_size]


# ----------------------------------------------------------------------------------------------------------------------
# Scores and loss
# ----------------------------------------------------------------------------------------------------------------------
def get_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) -> (N,) float32 scores.

    transformers reads a sequence-classification head at the rightmost token that is not `config.pad_token_id`,
    which works for right and left padding alike. That is why `config.pad_token_id` must be set: without it
    transformers cannot find the last real token of a padded batch (current versions refuse the batch; older ones
    read the last position, i.e. padding). When pad == EOS, the trailing EOS counts as padding and the score is read
    at the token before it. Reading the score the same way as plain transformers means anyone who loads the saved
    model gets the scores it was trained to give.
    """
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


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------------
def get_scheduler(name: str, optimizer: torch.optim.Optimizer, num_warmup_steps: int,
                  num_training_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' get_scheduler for these schedules, with its multipliers, without importing its trainer module
    (which imports peft: about 2 s of every start-up). linear / cosine (half a cycle): a linear warm-up, then decay to
    0 at num_training_steps; constant; constant_with_warmup: the warm-up, then 1."""
    def multiplier(step: int) -> float:
        if name == "constant":
            return 1.0
        if step < num_warmup_steps:
            return step / max(1.0, num_warmup_steps)
        if name == "linear":
            return max(0.0, (num_training_steps - step) / max(1.0, num_training_steps - num_warmup_steps))
        if name == "cosine":
            progress = (step - num_warmup_steps) / max(1.0, num_training_steps - num_warmup_steps)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return 1.0  # constant_with_warmup after its warm-up
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def gathered_state_dict(accelerator, model) -> dict:
    """The model's full weights for save_pretrained, complete on the main process. Every process must call it: under
    FSDP each process holds a shard of every weight and under DeepSpeed ZeRO-3 a slice, so the full tensors are
    gathered here (to CPU, so that a model that fills a GPU can still be written)."""
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


def save_checkpoint(path: Path, accelerator, model, tokenizer, optimizer, scheduler, progress: dict) -> None:
    """A resumable checkpoint: weights (or LoRA adapter) in save_pretrained form, optimizer, scheduler, progress
    counters (step, tokens seen), and the RNG states of every process. Every process calls it (see
    gathered_state_dict). Under FSDP the optimizer state is gathered too, keyed by parameter name, and sharded again on
    resume; DeepSpeed's engine writes its own optimizer partitions to path/deepspeed."""
    weights = gathered_state_dict(accelerator, model)
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer_state = get_optimizer_state_dict(model, optimizer.optimizer,
                                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        model.save_checkpoint(str(path / "deepspeed"), exclude_frozen_parameters=True)
        optimizer_state = None
    else:
        optimizer_state = optimizer.state_dict()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(path, state_dict=weights)
        tokenizer.save_pretrained(path)
        torch.save({**progress, "optimizer": optimizer_state, "scheduler": scheduler.state_dict()},
                   path / "training_state.pt")
    accelerator.wait_for_everyone()
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save(rng, path / f"rng_state_{accelerator.process_index}.pt")
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


def load_rng_state(path: Path, process_index: int) -> None:
    rng = torch.load(path / f"rng_state_{process_index}.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


if __name__ == "__main__":
    args = tyro.cli(Args)

    def fail(message: str):
        sys.exit(f"{Path(__file__).name}: error: {message}")

    # 0. Validate what can be checked before anything is loaded.
    for name in ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "max_length", "logging_steps", "eval_steps"]:
        if getattr(args, name) <= 0:
            fail(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        fail(f"need --max_steps > 0 or --num_train_epochs > 0, got {args.max_steps} and {args.num_train_epochs}")
    if args.resume_from_checkpoint and not (Path(args.resume_from_checkpoint) / "training_state.pt").exists():
        fail(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a checkpoint directory of this script "
             "(no training_state.pt in it)")

    # 1. Seed and accelerator. Derived sizes live here, in one place.
    # FSDP and DeepSpeed ZeRO shard a model over GPUs. Asked for on a machine without one, say so, rather than let
    # Accelerator(cpu=True) below quietly train with plain data parallelism.
    requested = [name for variable, name in [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")]
                 if os.environ.get(variable, "false").lower() == "true"]
    if requested and not torch.cuda.is_available():
        fail(f"{requested[0]} was requested (accelerate config or --use_fsdp / --use_deepspeed) but this machine has "
             "no GPU, and FSDP and DeepSpeed shard over GPUs; for several CPU processes (gloo data parallelism) use "
             "`accelerate launch --multi_gpu --num_processes N`")
    if requested == ["DeepSpeed"] and importlib.util.find_spec("deepspeed") is None:
        fail("DeepSpeed was requested (accelerate config or --use_deepspeed) but it is not installed: "
             "`pip install deepspeed` (an optional dependency of these scripts)")
    # Several processes but no GPU (e.g. `accelerate launch --multi_gpu` on a CPU machine): make them one gloo
    # process group on CPU; otherwise accelerate would start independent copies that never exchange gradients.
    multi_process_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(cpu=multi_process_cpu, mixed_precision="bf16" if args.bf16 else None)
    set_seed(args.seed)
    world_size = accelerator.num_processes
    global_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    output_dir = Path(args.output_dir)

    # 2. Data: load and validate before the model is loaded.
    try:
        raw = load_any_dataset(args.dataset_name, args.dataset_config)
    except Exception as error:  # not found, unreadable, unknown type, empty, network: one line, not a traceback
        message = str(error) or type(error).__name__  # an empty JSON file raises a bare StopIteration
        cause = error.__cause__  # datasets wraps the real reason, e.g. split files whose columns differ
        if cause is not None and str(cause):
            message += f" ({type(cause).__name__}: {' '.join(str(cause).split())})"
        elif isinstance(error, StopIteration) or "corresponds to no data" in message or "generating the dataset" in \
                message:  # how datasets says "empty"
            message += " (is a data file empty? every split needs at least one row)"
        fail(f"could not load dataset {args.dataset_name}: {message}")
    if args.dataset_test_split == "auto":  # resolved here, so everything below sees a split name or None
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
            check_preference_columns(raw[split].column_names)
    except ValueError as error:
        fail(str(error))

    # 3. Tokenizer. A tokenizer without a pad token gets EOS as pad; the model config gets the same id in step 5.
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, revision=args.revision)
    if tokenizer.eos_token_id is None:
        fail(f"the tokenizer of {args.model_name_or_path} has no EOS token; expected one to end every text")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_length = min(args.max_length, tokenizer.model_max_length)
    if isinstance(raw[args.dataset_train_split][0]["chosen"], list) and tokenizer.chat_template is None:
        fail(f"the rows are conversations but the tokenizer of {args.model_name_or_path} has no chat template")

    # 4. Tokenise both texts of every pair; count truncated pairs; drop pairs whose two texts are identical.
    try:
        with accelerator.main_process_first():  # the main process fills the datasets cache first
            tokenized = {
                split: raw[split].map(tokenize_pair, remove_columns=raw[split].column_names,
                                      fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
                                      desc=f"tokenizing {split}")
                for split in [args.dataset_train_split, args.dataset_test_split] if split
            }
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
    train_rows = splits[args.dataset_train_split]
    eval_rows = splits.get(args.dataset_test_split, [])
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED) and \
            len(eval_rows) % world_size:
        # every forward of a sharded model is collective: each process must run as many eval batches as the others
        kept = len(eval_rows) - len(eval_rows) % world_size
        accelerator.print(f"evaluating on {kept} of {len(eval_rows)} eval rows: a multiple of the {world_size} "
                          "processes, since every forward of a sharded model involves all of them")
        eval_rows = eval_rows[:kept]
    steps_per_epoch = len(train_rows) // global_batch_size
    if steps_per_epoch == 0:
        fail(f"the training set has {len(train_rows)} pairs but one optimizer step needs {global_batch_size} "
             f"(per_device_train_batch_size {args.per_device_train_batch_size} x gradient_accumulation_steps "
             f"{args.gradient_accumulation_steps} x {world_size} processes)")
    total_steps = args.max_steps if args.max_steps > 0 else max(1, int(args.num_train_epochs * steps_per_epoch))
    accelerator.print(f"preference data: {len(train_rows)} train / {len(eval_rows)} eval pairs; "
                      f"{total_steps} steps of {global_batch_size}")

    # 5. Model: a causal LM backbone with a new one-output score head; optional LoRA (the head is trained in full).
    #    config.pad_token_id is what transformers uses to find the last real token: set it (the seed's bug).
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    load_path = args.model_name_or_path
    if args.resume_from_checkpoint and not args.use_peft:
        load_path = args.resume_from_checkpoint  # full weights live in the checkpoint
    model = AutoModelForSequenceClassification.from_pretrained(
        load_path, revision=None if load_path != args.model_name_or_path else args.revision, num_labels=1,
        dtype=dtype, attn_implementation=args.attn_implementation)
    model.config.pad_token_id = tokenizer.pad_token_id
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.use_peft:
        from peft import LoraConfig, PeftModel, get_peft_model

        if args.resume_from_checkpoint:
            model = PeftModel.from_pretrained(model, args.resume_from_checkpoint, is_trainable=True)
        else:  # task_type SEQ_CLS keeps a fully trainable copy of the score head (peft's modules_to_save)
            lora_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                     target_modules=args.lora_target_modules or "all-linear", task_type="SEQ_CLS")
            model = get_peft_model(model, lora_config)
    model.to(accelerator.device)
    num_params = sum(p.numel() for p in model.parameters())
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"model: {num_params / 1e6:.2f}M parameters, {num_trainable / 1e6:.2f}M trainable")

    # 6. Optimizer and schedule. The scheduler is stepped once per optimizer step by us (not wrapped by accelerate,
    #    which would step it once per process).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay, fused=args.optim == "adamw_torch_fused")
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_training_steps=total_steps,
                              num_warmup_steps=math.ceil(args.warmup_ratio * total_steps))
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # what accelerate cannot infer without a dataloader
        deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
        deepspeed_config.update({"train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
                                 "gradient_clipping": args.max_grad_norm})
    model, optimizer = accelerator.prepare(model, optimizer)
    start_step, num_tokens_seen = 0, 0
    if args.resume_from_checkpoint:
        checkpoint = Path(args.resume_from_checkpoint)
        state = torch.load(checkpoint / "training_state.pt", weights_only=False)
        load_optimizer_state(checkpoint, accelerator, model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        load_rng_state(checkpoint, accelerator.process_index)
        start_step, num_tokens_seen = state["step"], state["num_tokens"]
        accelerator.print(f"resumed from {checkpoint} at step {start_step}")

    # 7. Logging: metrics.jsonl always, wandb with --track.
    metrics_file = output_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
        if not args.resume_from_checkpoint:  # a fresh run starts a fresh log
            metrics_file.unlink(missing_ok=True)
        elif metrics_file.exists():  # a resumed one keeps what was logged up to its checkpoint, and appends
            logged = [line for line in metrics_file.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            metrics_file.write_text("".join(line + "\n" for line in logged))
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args),
                       name=f"{args.exp_name}__{args.seed}__{int(time.time())}")

    def log(metrics: dict) -> None:
        """A compact console line, a metrics.jsonl row and (with --track) a wandb point, from the main process."""
        if accelerator.is_main_process:
            tqdm.write(" ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                                for key, value in metrics.items()))
            with open(metrics_file, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if args.track:
                wandb.log(metrics, step=metrics["step"])

    def score_pairs(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over the 2B texts of B pairs -> (chosen rewards (B,), rejected rewards (B,))."""
        rewards = get_rewards(model, batch["input_ids"], batch["attention_mask"])
        return rewards.chunk(2)

    def evaluate() -> dict:
        """Loss, accuracy (ties count half) and mean rewards over every pair of the eval split, summed over
        processes (each process takes every N-th pair)."""
        model.eval()
        sums = torch.zeros(5, device=accelerator.device)  # loss, accuracy, chosen, rejected, pairs
        my_rows = eval_rows[accelerator.process_index :: world_size]
        with torch.no_grad():
            for start in range(0, len(my_rows), args.per_device_eval_batch_size):
                batch = collate_pairs(my_rows[start : start + args.per_device_eval_batch_size], tokenizer.pad_token_id)
                batch = {key: value.to(accelerator.device) for key, value in batch.items()}
                chosen, rejected = score_pairs(batch)
                losses = reward_loss(chosen, rejected, batch["margin"], args.center_rewards_coefficient)
                sums += torch.stack([losses.sum(), pairwise_accuracy(chosen, rejected).sum(), chosen.sum(),
                                     rejected.sum(), torch.tensor(float(len(chosen)), device=accelerator.device)])
        model.train()
        loss, accuracy, chosen, rejected, pairs = accelerator.reduce(sums, "sum").tolist()
        return {"eval_loss": loss / pairs, "eval_accuracy": accuracy / pairs, "eval_rewards/chosen": chosen / pairs,
                "eval_rewards/rejected": rejected / pairs, "eval_rewards/margins": (chosen - rejected) / pairs}

    # 8. Training loop. One optimizer step = gradient_accumulation_steps micro-batches of pairs on each process.
    model.train()
    if eval_rows and start_step == 0:
        log({"step": 0, "epoch": 0.0, **evaluate()})
    # running sums over the current logging window; train_seconds excludes evaluation and checkpointing
    running, running_steps, running_tokens, running_samples, train_seconds = {}, 0, 0, 0, 0.0
    progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="reward",
                    disable=not accelerator.is_local_main_process)
    for step in progress:
        step_start = time.time()
        # 8a. This process's micro-batches of this step.
        indices = step_indices(step, len(train_rows), global_batch_size, args.seed)
        mine = indices[accelerator.process_index :: world_size]
        micro_batches = [
            collate_pairs([train_rows[i] for i in mine[j : j + args.per_device_train_batch_size]],
                          tokenizer.pad_token_id)
            for j in range(0, len(mine), args.per_device_train_batch_size)
        ]

        # 8b. Forward and backward each micro-batch: chosen and rejected texts in one forward. Each micro-batch's
        #     summed pair losses are divided by the pairs of the whole step, and scaled by world_size because DDP
        #     averages gradients over processes: the update is the gradient of the step's mean pair loss.
        step_sums = torch.zeros(4, device=accelerator.device)  # loss, accuracy, chosen, rejected
        for j, batch in enumerate(micro_batches):
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            is_last = j == len(micro_batches) - 1
            accelerator.gradient_state._set_sync_gradients(is_last)  # DeepSpeed's engine steps in the last backward
            with accelerator.no_sync(model) if not is_last else nullcontext():  # sync gradients once per step
                chosen, rejected = score_pairs(batch)  # under --bf16, accelerate.prepare wrapped forward in autocast
                losses = reward_loss(chosen, rejected, batch["margin"], args.center_rewards_coefficient)
                loss = losses.sum() / global_batch_size
                accelerator.backward(loss * world_size)
            step_sums += torch.stack([losses.sum(), pairwise_accuracy(chosen, rejected).sum(), chosen.sum(),
                                      rejected.sum()]).detach()
        step_loss, step_accuracy, step_chosen, step_rejected = (accelerator.reduce(step_sums, "sum")
                                                                / global_batch_size).tolist()

        # 8c. Clip (max_grad_norm 0: only measure the norm). Stop cleanly on a non-finite loss or gradient, before the
        #     update would poison the weights; every process sees the same reduced values and stops together.
        grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf")))
        if not (np.isfinite(step_loss) and torch.isfinite(grad_norm)):
            checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            kept = f"the last checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
            fail(f"loss is {step_loss} (gradient norm {grad_norm.item()}) at step {step + 1}; stopping "
                 f"without updating the weights ({kept})")

        # 8d. Update and schedule.
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 8e. Log, evaluate, checkpoint.
        tokens = int(accelerator.reduce(torch.tensor(sum(int(mb["attention_mask"].sum()) for mb in micro_batches),
                                                     device=accelerator.device), "sum"))
        num_tokens_seen += tokens
        for key, value in {"loss": step_loss, "accuracy": step_accuracy, "rewards/chosen": step_chosen,
                           "rewards/rejected": step_rejected, "rewards/margins": step_chosen - step_rejected}.items():
            running[key] = running.get(key, 0.0) + value
        running_steps += 1
        running_tokens += tokens
        running_samples += global_batch_size
        train_seconds += time.time() - step_start
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
        if args.save_steps > 0 and done % args.save_steps == 0 and done < total_steps:
            save_checkpoint(output_dir / f"checkpoint-{done}", accelerator, model, tokenizer, optimizer, scheduler,
                            {"step": done, "num_tokens": num_tokens_seen})

    # 9. Save: plain save_pretrained weights that AutoModelForSequenceClassification loads (pad_token_id in the
    #    config); with LoRA, the merged model in output_dir and the adapter alone in output_dir/adapter.
    #    Every process takes part in gathering the weights (see gathered_state_dict). A sharded
    #    LoRA model cannot be merged in place: a CPU copy of the base model merges the adapter just saved.
    accelerator.wait_for_everyone()
    weights = gathered_state_dict(accelerator, model)
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        if args.use_peft:
            final.save_pretrained(output_dir / "adapter", state_dict=weights)
            if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
                base = AutoModelForSequenceClassification.from_pretrained(
                    args.model_name_or_path, revision=args.revision, num_labels=1, dtype=dtype)
                base.config.pad_token_id = tokenizer.pad_token_id
                final = PeftModel.from_pretrained(base, output_dir / "adapter")
            final, weights = final.merge_and_unload(), None
        final.save_pretrained(output_dir, state_dict=weights)
        tokenizer.save_pretrained(output_dir)
        if args.push_to_hub:
            final.push_to_hub(output_dir.name)
            tokenizer.push_to_hub(output_dir.name)
        if args.track:
            wandb.finish()
    accelerator.wait_for_everyone()  # every process leaves together, once the main one has saved
    accelerator.print(f"saved to {output_dir}")
    accelerator.end_training()  # an orderly end of the process group: a peer torn down mid-exit can abort the other
