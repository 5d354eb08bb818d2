"""On-policy distillation (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", https://arxiv.org/abs/2306.13649): the student samples completions, the teacher scores the
same tokens, and the student's next-token distribution is pulled toward the teacher's at every completion token under
a generalized Jensen-Shannon divergence (beta = 1: reverse KL, the default; beta = 0: forward KL). This is TRL 1.16's
DistillationTrainer, with its experimental GKDTrainer's mixing: --lmbda, the fraction of steps on the student's own
samples (the others train on the dataset's completions, or with --seq_kd on the teacher's), and the policy-gradient
form with the per-token reverse KL as reward (--loss_type reverse_kl_reward). See docs/distill.md. "TRL's", in
this file, means TRL 1.16's; "the seed", a word of the shared plumbing after the banner, is TRL v0.8.6's documented
behaviour, the reference of the v0.8-era scripts (dpo.py, ppo.py, ...).

    # offline quickstart: the tiny world (assets/), CPU, about a minute: a tiny GPT-2 learns from a larger one that
    # writes positive reviews
    python distill.py
    # GKD's mix: half of the steps on the dataset's own completions, the symmetric JSD
    python distill.py --dataset_name assets/data/sft_prompt_completion --lmbda 0.5 --beta 0.5
    # a real student and teacher (the same vocabulary)
    python distill.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --teacher_model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --dataset_name trl-lib/tldr --learning_rate 1e-6 \
        --max_completion_length 512 --per_device_train_batch_size 8 --gradient_accumulation_steps 4 --bf16
    # several GPUs (the global batch is per_device_train_batch_size x gradient_accumulation_steps x processes)
    accelerate launch --multi_gpu --num_processes 8 distill.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --teacher_model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --dataset_name trl-lib/tldr --bf16
"""

import copy
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
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList,
                          MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (used in the wandb run name)"""
    seed: int = 42
    """seed of the experiment: data order, initialisation of new weights, sampling noise"""
    output_dir: str = "runs/distill"
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
    """the student: a Hub id or a local directory (default: the tiny world's pretrained GPT-2)"""
    revision: str | None = None
    """the Hub revision (branch, tag or commit) of the student"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """dtype the student is loaded in (keep float32 and use --bf16 for mixed precision)"""
    attn_implementation: str | None = None
    """attention kernel of both models, e.g. sdpa, eager, flash_attention_2 (default: transformers' choice)"""
    bf16: bool = False
    """bf16 mixed precision (autocast) through accelerate"""
    gradient_checkpointing: bool = False
    """recompute the student's activations in the backward pass: less memory, about a third more compute"""
    disable_dropout: bool = False
    """switch dropout off in the student (TRL's default keeps it; the teacher always runs in eval mode)"""
    use_peft: bool = False
    """train LoRA adapters on the student instead of all its weights"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)"""
    lora_dropout: float = 0.05
    """dropout on the LoRA branch"""
    lora_target_modules: list[str] | None = None
    """module names that get adapters (default: all linear layers)"""
    teacher_model_name_or_path: str = str(ASSETS / "tiny-teacher")
    """the teacher: a Hub id or a local directory, any size, the student's vocabulary (default: the tiny world's)"""
    teacher_model_revision: str | None = None
    """the Hub revision of the teacher"""
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """dtype the teacher is loaded in (auto: as stored, which is TRL's default)"""

    # --- data ---
    dataset_name: str = str(ASSETS / "data" / "prompts")
    """prompts ('prompt'), prompts with completions ('prompt' + 'completion', or 'messages'): Hub id, file or folder"""
    dataset_config: str | None = None
    """the dataset configuration (subset) name"""
    dataset_train_split: str = "train"
    """the split to train on"""
    dataset_test_split: str | None = "auto"
    """the split whose prompts measure the divergence (auto: 'test' if the data has one; None: no evaluation)"""

    # --- optimisation ---
    learning_rate: float = 5e-4
    """peak learning rate of AdamW (the default suits the tiny world; TRL's default is 1e-6)"""
    per_device_train_batch_size: int = 32
    """completions per process per micro-batch (TRL's default is 8)"""
    per_device_eval_batch_size: int = 32
    """prompts per process per evaluation batch"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
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
    """AdamW kernels: fused, one pass over all parameters (transformers' default), or torch's loop"""
    eval_steps: int = 20
    """evaluate every this many optimizer steps (also before the first and after the last)"""
    save_steps: int = 0
    """write a resumable checkpoint every this many optimizer steps (0: only when stopped by SIGTERM / SIGINT)"""
    save_total_limit: int | None = None
    """keep only the newest this many checkpoints (None: all)"""
    resume_from_checkpoint: str | None = None
    """a checkpoint-N directory to continue from, or latest: the newest complete one in output_dir (none: start)"""

    # --- generation ---
    max_completion_length: int = 32
    """new tokens per completion, and the length dataset completions are cut to (TRL's default is 512)"""
    temperature: float = 1.0
    """sampling temperature, also applied to both models' logits in the loss (as TRL's DistillationTrainer)"""
    top_p: float = 1.0
    """nucleus sampling: the smallest set of tokens whose probabilities add up to top_p"""
    top_k: int = 0
    """sample among the top_k most likely tokens only (0: all)"""
    min_p: float | None = None
    """drop tokens less likely than min_p times the most likely one"""
    repetition_penalty: float = 1.0
    """penalty on tokens already in the prompt or the completion (1: none)"""

    # --- distillation ---
    beta: float = 1.0
    """the divergence: 0 forward KL(teacher || student), 1 reverse KL(student || teacher), between: generalized JSD"""
    lmbda: float = 1.0
    """fraction of the optimizer steps on the student's own samples (GKD); the others are off-policy"""
    seq_kd: bool = False
    """off-policy steps train on completions the teacher samples (sequence-level KD), not on the dataset's"""
    loss_type: Literal["jsd", "reverse_kl_reward"] = "jsd"
    """jsd: the divergence over the vocabulary; reverse_kl_reward: policy gradient, reward -(log p_s - log p_t)"""
    chunk_size: int = 256
    """completion tokens projected to the vocabulary at a time in the loss (0: all at once, both models' logits)"""


# ----------------------------------------------------------------------------------------------------------------------
# The algorithm: rows -> prompts (and completions) -> samples of the student, the teacher or the data -> the loss
# ----------------------------------------------------------------------------------------------------------------------
def detect_format(column_names: list[str]) -> Literal["messages", "prompt-completion", "prompt"]:
    """Which row format a dataset holds: conversations, prompts with completions, or prompts alone (a clear error if
    none)."""
    if "messages" in column_names:
        return "messages"
    if "prompt" in column_names:
        return "prompt-completion" if "completion" in column_names else "prompt"
    raise ValueError("expected a 'prompt' column (and optionally 'completion') or a 'messages' column; found columns "
                     f"{column_names}")


def tokenize_row(example: dict, tokenizer, max_completion_length: int
                 ) -> tuple[list[int], list[int] | None, str | list]:
    """THE place to change how a row becomes tokens: (prompt ids, the dataset's completion ids or None, the prompt).

    A message-list prompt is rendered with the chat template and the generation prompt, as TRL does, a string prompt
    is tokenised as it is; 'messages' rows are prompted with all turns but the last, which must be the assistant's
    completion. A string completion gets EOS appended; a conversational one is the template's rendering of the
    completion turns after the prompt (its end-of-turn included). Completions are cut to max_completion_length.
    """
    if "messages" in example:
        if example["messages"][-1]["role"] != "assistant":
            raise ValueError("the last turn of a 'messages' row must be the assistant's (the completion)")
        prompt, completion = example["messages"][:-1], example["messages"][-1:]
    else:
        prompt, completion = example["prompt"], example.get("completion")
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prompt_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        prompt_ids = list(tokenizer(prompt)["input_ids"])
    if completion is None:
        return prompt_ids, None, prompt
    if isinstance(completion, list):
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False) if isinstance(prompt, list) else ""
        if not isinstance(prompt, list) or not full.startswith(text):
            raise ValueError("a conversational completion needs a conversational prompt that the chat template "
                             "renders as a prefix of prompt + completion")
        completion_ids = list(tokenizer(full[len(text) :], add_special_tokens=False)["input_ids"])
    else:
        completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids[:max_completion_length], prompt


def completion_source(step: int, seed: int, lmbda: float, seq_kd: bool) -> Literal["student", "teacher", "dataset"]:
    """Where the completions of optimizer step `step` come from (GKD's schedule): the student's own samples with
    probability lmbda, else the teacher's samples (seq_kd) or the dataset's completions. Drawn from a generator seeded
    by (seed, step): every process, a resumed run and any split of the batch make the same draw."""
    if random.Random(seed * 1_000_003 + step).random() < lmbda:
        return "student"
    return "teacher" if seq_kd else "dataset"


class GumbelMaxSampling(LogitsProcessor):
    """generate's last logits processor: Gumbel noise on the (warped) scores, so that its greedy argmax draws from
    softmax(scores), exactly as softmax + torch.multinomial do (the Gumbel-max trick). torch.multinomial costs 48 ms
    per token on CPU at batch 32 and a 32k vocabulary, more than the whole forward of a 20M-parameter model; the noise
    costs about 2 ms. A uniform draw of exactly 0 gives the noise -inf: that token is skipped, never chosen."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores - torch.log(-torch.log(torch.rand_like(scores)))


@torch.no_grad()
def sample_completions(model, queries: list[list[int]], max_new_tokens: int, pad_token_id: int, eos_token_id: int,
                       seed: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                       min_p: float | None = None, repetition_penalty: float = 1.0) -> list[list[int]]:
    """One completion per query, all in ONE left-padded `generate` call with the KV cache, the sampling noise seeded
    by `seed`. The warpers are generate's own, in its order (temperature, top-k, top-p, min-p; repetition penalty
    before them), then GumbelMaxSampling draws the token. Each completion is cut after its first EOS (kept)."""
    device = next(model.parameters()).device
    longest = max(len(query) for query in queries)
    input_ids = torch.full((len(queries), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, query in enumerate(queries):
        input_ids[i, longest - len(query) :], attention_mask[i, longest - len(query) :] = torch.tensor(query), 1
    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    warpers += [MinPLogitsWarper(min_p)] if min_p is not None else []
    torch.manual_seed(seed)
    generations = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                                 do_sample=False, repetition_penalty=repetition_penalty, top_p=None, top_k=None,
                                 temperature=None, logits_processor=LogitsProcessorList([*warpers,
                                                                                         GumbelMaxSampling()])
                                 ).cpu()[:, longest:]
    return [row[: row.index(eos_token_id) + 1] if eos_token_id in row else row for row in generations.tolist()]


def collate_completions(queries: list[list[int]], completions: list[list[int]], pad_token_id: int
                        ) -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion sequences: input_ids and attention_mask (B, T), and completion_mask (B, T-1),
    True at the shifted positions t whose next token t+1 is a completion token (the positions the loss scores)."""
    longest = max(len(query) + len(completion) for query, completion in zip(queries, completions))
    input_ids = torch.full((len(queries), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros(len(queries), longest - 1, dtype=torch.bool)
    for i, (query, completion) in enumerate(zip(queries, completions)):
        input_ids[i, : len(query) + len(completion)] = torch.tensor(query + completion)
        attention_mask[i, : len(query) + len(completion)] = 1
        completion_mask[i, len(query) - 1 : len(query) - 1 + len(completion)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0,
                    temperature: float = 1.0) -> torch.Tensor:
    """The generalized Jensen-Shannon divergence between the student's and the teacher's next-token distributions,
    both at `temperature`, per position: (..., V) logits -> (...) float32 (Eq. 1 of the paper; beta weighs the sides
    as TRL's). beta = 0: forward KL(teacher || student); beta = 1: reverse KL(student || teacher); in between, with
    the mixture m = (1 - beta) p_student + beta p_teacher: beta KL(teacher || m) + (1 - beta) KL(student || m)
    (beta = 0.5: the symmetric JSD). Computed in log space; no probability is ever divided or logged."""
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0.0:
        return (teacher.exp() * (teacher - student)).sum(-1)
    if beta == 1.0:
        return (student.exp() * (student - teacher)).sum(-1)
    mixture = torch.logaddexp(student + math.log(1 - beta), teacher + math.log(beta))
    return (beta * (teacher.exp() * (teacher - mixture)).sum(-1)
            + (1 - beta) * (student.exp() * (student - mixture)).sum(-1))


def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                         beta: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """The mean of generalized_jsd over the positions where mask (...) is True (all when None): (..., V) logits ->
    scalar. The loss of TRL's DistillationTrainer and of GKDTrainer.generalized_jsd_loss, per completion token."""
    divergence = generalized_jsd(student_logits, teacher_logits, beta, temperature)
    if mask is None:
        return divergence.mean()
    return divergence[mask.bool()].sum() / mask.sum().clamp(min=1)


def token_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, loss_type: str,
                 beta: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token loss at n completion positions, from (n, V) student and teacher logits and the (n,) tokens that
    follow them; returns (loss (n,), the student's entropy at temperature (n,), no gradient).

    jsd: generalized_jsd. reverse_kl_reward: the policy-gradient form, each sampled token y rewarded with its own
    -(log p_student(y) - log p_teacher(y)) and nothing from later tokens (discount 0, as in Thinking Machines'
    on-policy distillation); the loss -A exp(log p - detach(log p)) has the value log p_student(y) - log p_teacher(y),
    a one-sample estimate of the reverse KL, and the gradient -A grad log p_student(y)."""
    with torch.no_grad():
        student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
        entropy = -(student.exp() * student).sum(-1)
    if loss_type == "jsd":
        return generalized_jsd(student_logits, teacher_logits, beta, temperature), entropy
    student_logits, teacher_logits = student_logits.float() / temperature, teacher_logits.float() / temperature
    logp = student_logits.gather(1, labels.unsqueeze(1)).squeeze(1) - torch.logsumexp(student_logits, dim=-1)
    with torch.no_grad():
        teacher_logp = teacher_logits.gather(1, labels.unsqueeze(1)).squeeze(1) - torch.logsumexp(teacher_logits, -1)
        advantage = teacher_logp - logp
    return -advantage * torch.exp(logp - logp.detach()), entropy


def output_logits(project: Callable, config, hidden: torch.Tensor) -> torch.Tensor:
    """The logits a model computes from its last hidden states, (n, H) -> (n, V): project (its output layer's forward:
    bias, LoRA and all), then the scaling and soft-capping some architectures apply after it (Cohere's logit_scale,
    Gemma's final_logit_softcapping; config: the model's)."""
    logits = project(hidden)
    config = config.get_text_config()
    if getattr(config, "logit_scale", None) is not None:
        logits = logits * config.logit_scale
    if getattr(config, "final_logit_softcapping", None) is not None:
        logits = config.final_logit_softcapping * torch.tanh(logits / config.final_logit_softcapping)
    return logits


@contextmanager
def output_layer_replaced(model: torch.nn.Module, replacement: Callable):
    """Inside the block one forward of `model` (unwrapped; call it through its DDP / FSDP / DeepSpeed wrapper as
    usual) returns replacement(project, hidden) instead of its logits. The model calls its output layer once, as
    always, but the layer's forward is replaced: it gets the layer's (B, T, H) input and project, the layer's own
    forward (which projects without entering the module's hooks again). So FSDP and ZeRO-3 gather the layer's weights
    around that call, and treat what it returns as they treat logits: their backward hooks on it gather the weights
    again when its gradient arrives. A hook on the layer, registered last, keeps what the layer returned (after the
    wrappers' hooks); a hook at the end of the model's forward returns it, whatever the model did with it after
    (soft-capping, for one)."""
    head = model.get_output_embeddings()
    project = head.forward  # the layer's own forward, kept
    outputs = []

    def keep_output(module, inputs, output):
        outputs.append(output)

    head.forward = lambda hidden, *args, **kwargs: replacement(project, hidden)
    handles = [head.register_forward_hook(keep_output),
               model.register_forward_hook(lambda module, args, output: outputs.pop(), prepend=True)]
    try:
        yield
    finally:
        del head.forward  # the class's forward again
        for handle in handles:
            handle.remove()


@torch.no_grad()
def output_logits_match(model) -> bool:
    """Whether output_logits reproduces the model's own logits, on a few tokens (it does not for an architecture that
    transforms its logits in a way output_logits does not know)."""
    was_training = model.training
    model.eval()
    input_ids = torch.arange(1, 9, device=model.get_output_embeddings().weight.device).unsqueeze(0)
    with output_layer_replaced(model, lambda project, hidden: output_logits(project, model.config, hidden)):
        rebuilt = model(input_ids=input_ids, use_cache=False)
    expected = model(input_ids=input_ids, use_cache=False).logits
    model.train(was_training)
    return torch.allclose(rebuilt.float(), expected.float(), rtol=1e-3, atol=1e-3)


class _Projection(torch.nn.Module):
    """An output layer's own forward behind a module with no hooks, for torch.func.functional_call: the parameters
    are swapped on the layer (head.weight, ...) while its forward runs, and none of the layer's hooks (ZeRO-3's)
    fire."""

    def __init__(self, head: torch.nn.Module, project: Callable):
        super().__init__()
        self.head, self.project = head, project

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.project(hidden)


@contextmanager
def teacher_hidden_at(model: torch.nn.Module, positions: torch.Tensor, kept: dict, copy_weights: bool = False):
    """Inside the block one forward of the teacher (`model` unwrapped, called through its wrapper, without gradients)
    projects nothing: its output layer keeps its input at `positions` ((B, T) bool), kept["hidden"] (N, H) in
    row-major order, and kept["logits"] becomes the teacher's logits function, (n, H) -> (n, V) (output_logits).
    copy_weights (FSDP, ZeRO-3: the layer's weights are whole only during its own call): a detached copy of the
    layer's parameters is taken in that call and the function projects with it (torch.func.functional_call);
    otherwise with the layer's own forward, no copy."""
    def keep(project: Callable, hidden: torch.Tensor) -> torch.Tensor:
        kept["hidden"] = hidden[positions]
        if copy_weights:
            head = model.get_output_embeddings()
            weights = {f"head.{name}": p.detach().clone() for name, p in head.named_parameters()}
            module = _Projection(head, project)
            project = lambda h: torch.func.functional_call(module, weights, (h,))  # noqa: E731
        kept["logits"] = lambda h: output_logits(project, model.config, h)
        return kept["hidden"]

    with output_layer_replaced(model, keep):
        yield


@contextmanager
def chunked_distillation_at(model: torch.nn.Module, positions: torch.Tensor, labels: torch.Tensor,
                            token_loss: Callable, chunk_size: int, teacher_hidden: torch.Tensor,
                            teacher_logits: Callable):
    """Inside the block one forward of the student (`model` unwrapped, called through its wrapper) returns its
    ChunkedDistillationLoss at `positions` ((B, T) bool; `labels` (N,) the tokens that follow them) against the
    teacher's (teacher_hidden (N, H) and teacher_logits from teacher_hidden_at), computed inside its output layer's
    call (output_layer_replaced): the layer's weights are gathered there under FSDP and ZeRO-3, where the loss takes
    its chunks' gradients. The forward returns one (1 + 2N,) float32 tensor, unpack it with unpack_distillation:
    the loss sum (the differentiable part), the per-token losses, the entropies."""
    def loss_in_forward(project: Callable, hidden: torch.Tensor) -> torch.Tensor:
        head_params = [p for p in model.get_output_embeddings().parameters() if p.requires_grad]  # as gathered here
        total, per_token, entropy = ChunkedDistillationLoss.apply(
            token_loss, lambda h: output_logits(project, model.config, h), teacher_logits, chunk_size,
            hidden[positions], teacher_hidden, labels, *head_params)
        return torch.cat([total.float().reshape(1), per_token.float(), entropy.float()])

    with output_layer_replaced(model, loss_in_forward):
        yield


def unpack_distillation(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """chunked_distillation_at's (1 + 2N,) output -> (the loss sum, the per-token losses (N,), the entropies (N,))."""
    n = (len(packed) - 1) // 2
    return packed[0], packed[1 : 1 + n].detach(), packed[1 + n :].detach()


class ChunkedDistillationLoss(torch.autograd.Function):
    """The per-token loss (token_losses) at n completion positions from both models' last hidden states, chunk_size
    positions at a time: returns (the loss summed over the positions, the per-token losses (n,), the entropies (n,)).
    student_logits, teacher_logits: each model's (n, H) -> (n, V) logits (output_logits with its output layer).

    No (n, V) logits are ever held whole. The student's gradient is taken chunk by chunk in the forward pass (with
    autograd, through its output layer and output_logits) and only scaled by the incoming gradient in the backward, so
    each output layer projects every position once; TRL 1.16's kernel (trl/kernels/chunked_divergence.py) projects both
    models again in the backward. head_params: the student's output-layer parameters that require a gradient. The
    training path runs it inside the student's output-layer call (chunked_distillation_at)."""

    @staticmethod
    def forward(ctx, token_loss: Callable, student_logits: Callable, teacher_logits: Callable, chunk_size: int,
                student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, labels: torch.Tensor,
                *head_params: torch.Tensor):
        needs_grad = ctx.needs_input_grad[4]
        grads = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (student_hidden, *head_params)]
        losses, entropies = [], []
        for start in range(0, len(labels), chunk_size):
            part = slice(start, start + chunk_size)
            teacher_chunk = teacher_logits(teacher_hidden[part])
            with torch.enable_grad():
                hidden = student_hidden[part].detach().requires_grad_(needs_grad)
                loss, entropy = token_loss(student_logits(hidden), teacher_chunk, labels[part])
                if needs_grad:
                    chunk_grads = torch.autograd.grad(loss.sum(), [hidden, *head_params], allow_unused=True)
                    grads[0][part] = chunk_grads[0]
                    for total, grad in zip(grads[1:], chunk_grads[1:]):
                        if grad is not None:
                            total += grad
            losses.append(loss.detach())
            entropies.append(entropy)
        ctx.save_for_backward(*grads)
        ctx.dtypes = [x.dtype for x in (student_hidden, *head_params)]
        per_token, entropy = torch.cat(losses), torch.cat(entropies)
        ctx.mark_non_differentiable(per_token, entropy)
        return per_token.sum(), per_token, entropy

    @staticmethod
    def backward(ctx, grad_sum, *_):
        grads = [grad.mul_(grad_sum).to(dtype) for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes)]  # in place
        return None, None, None, None, grads[0], None, None, *grads[1:]


def generate_completions(model, queries: list[list[int]], seed: int, tokenizer, args: Args, accelerator
                         ) -> list[list[int]]:
    """Completions (token ids, each cut after its first EOS) of `queries` by `model`, the student or the teacher as
    accelerate prepared it: sample_completions with args' sampling settings and the whole weights of a sharded
    model, the noise seeded by `seed`."""
    with gathered_for_generation(accelerator, model) as unwrapped:
        was_training = unwrapped.training
        unwrapped.eval()  # for generate only: under gradient checkpointing, train mode switches the KV cache off
        completions = sample_completions(unwrapped, queries, args.max_completion_length, tokenizer.pad_token_id,
                                         tokenizer.eos_token_id, seed, temperature=args.temperature, top_p=args.top_p,
                                         top_k=args.top_k, min_p=args.min_p,
                                         repetition_penalty=args.repetition_penalty)
        unwrapped.train(was_training)
    return completions


def step_completions(model, teacher, rows: list[tuple], source: str, step: int, tokenizer, args: Args, accelerator
                     ) -> tuple[list[dict[str, torch.Tensor]], list[tuple]]:
    """This process's micro-batches of optimizer step `step`, from its rows (tokenize_row's (prompt ids, dataset
    completion ids, prompt)) per_device_train_batch_size at a time: collate_completions of the prompts and their
    completions from `source` (completion_source): the dataset's, or the student's or the teacher's samples, one
    micro-batch per generate call, seeded by its place in the global batch, so the samples depend neither on the
    process count nor on resuming. Also returns (prompt, completion ids) per row, for the logs."""
    per_process = args.per_device_train_batch_size * args.gradient_accumulation_steps
    micro_batches, texts = [], []
    for start in range(0, per_process, args.per_device_train_batch_size):
        part = rows[start : start + args.per_device_train_batch_size]
        queries = [row[0] for row in part]
        if source == "dataset":
            completions = [row[1] for row in part]
        else:
            place = accelerator.process_index * per_process + start
            completions = generate_completions(model if source == "student" else teacher, queries,
                                               args.seed * 1_000_003 + step * 10_007 + place, tokenizer, args,
                                               accelerator)
        micro_batches.append(collate_completions(queries, completions, tokenizer.pad_token_id))
        texts += [(row[2], completion) for row, completion in zip(part, completions)]
    return micro_batches, texts


def distillation_loss(model, teacher, batch: dict[str, torch.Tensor], args: Args, accelerator, sharded: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the loss summed over the completion tokens, the per-token losses (N,), the student's entropies (N,)) of a
    micro-batch (collate_completions' tensors on the device; N: its completion tokens): both models (as accelerate
    prepared them) read the same tokens, the teacher without gradients, and token_losses compares them with args'
    loss_type, beta and temperature. Chunked (args.chunk_size): the teacher's output layer keeps its completion
    positions' hidden states (and, sharded under FSDP / ZeRO-3, a copy of its weights), then the student's output
    layer computes the loss in its own call, projecting both chunk_size positions at a time. Plain (chunk_size 0):
    both models' logits at every completion position at once (the output layer still skips the prompts and the
    padding)."""
    mask = batch["completion_mask"]
    positions = F.pad(mask, (0, 1), value=False)  # position t scores token t + 1
    labels = batch["input_ids"][:, 1:][mask]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    student, frozen = accelerator.unwrap_model(model), accelerator.unwrap_model(teacher)
    token_loss = lambda s, t, y: token_losses(s, t, y, args.loss_type, args.beta, args.temperature)  # noqa: E731
    if args.chunk_size:
        kept = {}
        with accelerator.autocast():
            with torch.no_grad(), teacher_hidden_at(frozen, positions, kept, copy_weights=sharded):
                teacher(**inputs)
            with chunked_distillation_at(student, positions, labels, token_loss, args.chunk_size, kept["hidden"],
                                         kept["logits"]):
                return unpack_distillation(model(**inputs))
    with accelerator.autocast():
        with lm_head_only_at(student, positions):
            student_logits = model(**inputs).logits
        with torch.no_grad(), lm_head_only_at(frozen, positions):
            teacher_logits = teacher(**inputs).logits
        loss, entropy = token_loss(student_logits, teacher_logits, labels)
    return loss.sum(), loss.detach(), entropy


def evaluate(model, teacher, eval_rows: list[tuple], tokenizer, args: Args, accelerator, sharded: bool
             ) -> dict[str, float]:
    """The divergence (eval_loss) and the student's entropy, per token, over the student's samples for the eval
    prompts (each process takes every N-th), seeded apart from training's so every evaluation draws the same."""
    model.eval()
    totals = torch.zeros(3, device=accelerator.device)  # loss, entropy, tokens
    my_rows = eval_rows[accelerator.process_index :: accelerator.num_processes]
    with torch.no_grad():
        for start in range(0, len(my_rows), args.per_device_eval_batch_size):
            queries = [row[0] for row in my_rows[start : start + args.per_device_eval_batch_size]]
            completions = generate_completions(model, queries, -(args.seed * 1_000_003 + start + 1), tokenizer, args,
                                               accelerator)
            batch = collate_completions(queries, completions, tokenizer.pad_token_id)
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            _, per_token, entropy = distillation_loss(model, teacher, batch, args, accelerator, sharded)
            totals += torch.stack([per_token.sum(), entropy.sum(), per_token.new_tensor(float(len(per_token)))])
    model.train()
    loss, entropy, tokens = accelerator.reduce(totals, "sum").tolist()
    return {"eval_loss": loss / tokens, "eval_entropy": entropy / tokens}


def completion_metrics(texts: list[tuple], eos_token_id: int) -> dict[str, float]:
    """TRL's completions/* metrics over every process's completions (texts: this process's (prompt, completion ids)):
    their lengths, the fraction clipped (cut at max_completion_length before an EOS), and the lengths of those that
    ended with one."""
    lengths = torch.tensor(gather_object([float(len(completion)) for _, completion in texts]))
    ended = torch.tensor(gather_object([bool(c) and c[-1] == eos_token_id for _, c in texts]))
    terminated = lengths[ended] if ended.any() else torch.zeros(1)
    return {"completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": 1.0 - ended.float().mean().item(),
            "completions/mean_terminated_length": terminated.mean().item(),
            "completions/min_terminated_length": terminated.min().item(),
            "completions/max_terminated_length": terminated.max().item()}


def main(args: Args) -> None:
    # 0. Check what can be checked before anything is loaded.
    check_positive(args, ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                          "max_steps", "max_completion_length", "logging_steps", "eval_steps"])
    for name in ["beta", "lmbda"]:
        if not 0.0 <= getattr(args, name) <= 1.0:
            fail(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    if args.temperature <= 0:
        fail(f"--temperature must be positive, got {args.temperature}")
    if args.chunk_size < 0 or args.save_steps < 0:
        fail(f"--chunk_size and --save_steps must be >= 0, got {args.chunk_size} and {args.save_steps}")
    if args.loss_type == "reverse_kl_reward" and args.lmbda < 1.0:
        fail(f"--loss_type reverse_kl_reward is a policy gradient on the student's own samples; it needs --lmbda 1, "
             f"got {args.lmbda}")
    check_run(args, ["model_name_or_path", "teacher_model_name_or_path"])  # also output_dir, --resume_from_checkpoint

    # 1. Accelerator (checks how the run was launched; seeds every RNG). The global batch is computed here, once.
    accelerator = make_accelerator(args)
    # FSDP and ZeRO-3 hold an output layer's weights whole only during its call (the chunked loss then copies the
    # teacher's there: teacher_hidden_at)
    sharded = accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.distributed_type == DistributedType.DEEPSPEED and
        accelerator.state.deepspeed_plugin.zero_stage == 3)
    world_size = accelerator.num_processes
    per_process = args.per_device_train_batch_size * args.gradient_accumulation_steps
    global_batch_size = per_process * world_size
    accelerator.print(f"run: {world_size} process(es) x {args.per_device_train_batch_size} per device x "
                      f"{args.gradient_accumulation_steps} accumulation = {global_batch_size} completions per "
                      "optimizer step")
    output_dir = Path(args.output_dir)

    # 2. Data, loaded and checked before the models are: the format, and completions for the off-policy steps.
    raw = load_splits(args, accelerator, detect_format)
    data_format = detect_format(raw[args.dataset_train_split].column_names)
    if args.lmbda < 1.0 and not args.seq_kd and data_format == "prompt":
        fail(f"--lmbda {args.lmbda} trains {1 - args.lmbda:.0%} of the steps on the dataset's completions, but "
             f"{args.dataset_name} has prompts only (expected a 'completion' or a 'messages' column); pass --seq_kd "
             "to train those steps on the teacher's samples, or --lmbda 1")

    # 3. The vocabularies, from the configs (no weights loaded yet): the loss compares the two distributions token by
    #    token, so they must be over the same tokens.
    try:
        sizes = [AutoConfig.from_pretrained(name, revision=revision).get_text_config().vocab_size for name, revision in
                 [(args.model_name_or_path, args.revision), (args.teacher_model_name_or_path,
                                                             args.teacher_model_revision)]]
    except (OSError, ValueError) as error:
        fail(f"could not read the student's or the teacher's config: {' '.join(str(error).split())[:400]}")
    if sizes[0] != sizes[1]:
        fail(f"the student {args.model_name_or_path} has a vocabulary of {sizes[0]} tokens but the teacher "
             f"{args.teacher_model_name_or_path} has {sizes[1]}; distillation compares the two next-token "
             "distributions token by token, so they must share the vocabulary (and its tokenizer)")

    # 4. Tokenizer (the student's; the teacher reads the same ids) and the tokenised rows (empty prompts skipped).
    tokenizer = load_tokenizer(args, "to end completions")
    first = raw[args.dataset_train_split][0]
    if (data_format == "messages" or isinstance(first.get("prompt"), list)) and tokenizer.chat_template is None:
        fail(f"the rows are conversations but the tokenizer of {args.model_name_or_path} has no chat template")
    splits = {}
    for split in [args.dataset_train_split, args.dataset_test_split] if args.dataset_test_split else \
            [args.dataset_train_split]:
        try:
            rows = [tokenize_row(row, tokenizer, args.max_completion_length) for row in raw[split]]
        except (ValueError, KeyError, TypeError) as error:
            fail(f"could not format the {data_format} rows of {args.dataset_name}: {error!r}")
        splits[split] = [row for row in rows if row[0]]
    train_rows = splits[args.dataset_train_split]
    eval_rows = equal_eval_share(accelerator, splits.get(args.dataset_test_split, []))
    if len(train_rows) < global_batch_size:
        fail(f"the training set has {len(train_rows)} prompts but one optimizer step needs {global_batch_size} "
             f"(per_device_train_batch_size {args.per_device_train_batch_size} x gradient_accumulation_steps "
             f"{args.gradient_accumulation_steps} x {world_size} processes)")
    accelerator.print(f"{data_format} data: {len(train_rows)} train / {len(eval_rows)} eval prompts; {args.max_steps} "
                      f"steps of {global_batch_size} completions, {args.lmbda:.0%} of them on-policy")

    # 5. Student (LoRA, gradient checkpointing) and teacher: frozen, in eval mode, placed as the preference scripts
    #    place their reference (sharded like the student under FSDP / ZeRO-3).
    model = load_trainable_model(args, AutoModelForCausalLM, "CAUSAL_LM")
    try:
        teacher = AutoModelForCausalLM.from_pretrained(
            args.teacher_model_name_or_path, revision=args.teacher_model_revision,
            attn_implementation=args.attn_implementation,
            dtype=args.teacher_dtype if args.teacher_dtype == "auto" else getattr(torch, args.teacher_dtype))
    except (OSError, ValueError) as error:
        fail(f"could not load the teacher {args.teacher_model_name_or_path}: {' '.join(str(error).split())[:400]}")
    if args.disable_dropout:
        disable_dropout_in_model(model)
    if args.chunk_size:  # the chunked loss rebuilds each model's logits from its hidden states: check it can
        for name, module in [("student", model), ("teacher", teacher)]:
            if not output_logits_match(module):
                fail(f"the {name}'s logits are not its output layer's (its architecture transforms them further), "
                     "which the chunked loss cannot reproduce; use --chunk_size 0")
    model, optimizer, scheduler, state = prepare_training(args, accelerator, model.to(accelerator.device),
                                                          args.max_steps)
    teacher = prepare_frozen(accelerator, teacher)
    start_step, num_tokens_seen = state["step"], state.get("num_tokens", 0)
    num_params = sum(p.numel() for p in model.parameters())
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"student: {num_params / 1e6:.2f}M parameters, {num_trainable / 1e6:.2f}M trainable; teacher: "
                      f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M parameters")

    # 6. Logs: metrics.jsonl and samples.jsonl always, wandb with --track.
    log = open_logs(args, accelerator, start_step, files=("metrics.jsonl", "samples.jsonl"))

    # 7. Training loop. One optimizer step = gradient_accumulation_steps micro-batches on each process; its
    #    completions all come from one source, drawn per step (completion_source).
    model.train()
    if eval_rows and start_step == 0:
        log({"step": 0, **evaluate(model, teacher, eval_rows, tokenizer, args, accelerator, sharded)})
    # running sums over the current logging window; train_seconds excludes evaluation and checkpointing
    running, running_steps, train_seconds = {}, 0, 0.0
    progress = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps, desc="distill",
                    disable=not accelerator.is_local_main_process)
    preemption = Preemption()  # from here on, SIGTERM / SIGINT end the run with a checkpoint
    for step in progress:
        step_start = time.time()
        # 7a. This process's prompts (a contiguous slice of the step's, so N processes see the micro-batches one
        #     process with N-fold accumulation sees) and their completions, from the source drawn for this step.
        source = completion_source(step, args.seed, args.lmbda, args.seq_kd)
        indices = step_indices(step, len(train_rows), global_batch_size, args.seed)
        mine = indices[accelerator.process_index * per_process : (accelerator.process_index + 1) * per_process]
        micro_batches, texts = step_completions(model, teacher, [train_rows[i] for i in mine], source, step, tokenizer,
                                                args, accelerator)
        generate_seconds = time.time() - step_start
        local_tokens = sum(int(batch["completion_mask"].sum()) for batch in micro_batches)
        num_items_in_batch = accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum")

        # 7b. Forward and backward each micro-batch. The loss is the sum of token losses / the completion tokens of
        #     the whole step (all micro-batches, all processes), scaled by world_size since DDP averages gradients:
        #     the update is that of the step's per-token mean, however the batch is split (TRL's normalisation).
        sums = torch.zeros(2, device=accelerator.device)  # loss, entropy
        per_sample = []
        for j, batch in enumerate(micro_batches):
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            with accumulating(accelerator, model, last=j == len(micro_batches) - 1):
                loss_sum, per_token, entropy = distillation_loss(model, teacher, batch, args, accelerator, sharded)
                accelerator.backward(loss_sum / num_items_in_batch * world_size)
            sums += torch.stack([per_token.sum(), entropy.sum()])
            per_sample += [values.mean().item() for values in per_token.split(batch["completion_mask"].sum(1).tolist())]
        step_loss, step_entropy = (accelerator.reduce(sums, "sum") / num_items_in_batch).tolist()

        # 7c. Clip (max_grad_norm 0: only measure the norm); stop before a non-finite update; step.
        grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf")))
        stop_if_not_finite(step_loss, grad_norm, step, output_dir)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 7d. Log (TRL's metric names; lengths over every process's completions), evaluate, checkpoint.
        completion_stats = completion_metrics(texts, tokenizer.eos_token_id)
        num_tokens = int(accelerator.reduce(torch.tensor(sum(int(b["attention_mask"].sum()) for b in micro_batches),
                                                         device=accelerator.device), "sum"))
        num_tokens_seen += num_tokens
        train_seconds += time.time() - step_start
        running_steps += 1
        for key, value in {"loss": step_loss, "entropy": step_entropy, "on_policy": float(source == "student"),
                           **completion_stats, "tokens": num_tokens, "time/generate": generate_seconds}.items():
            running[key] = running.get(key, 0.0) + value
        done = step + 1
        if done % args.logging_steps == 0 or done == args.max_steps:
            tokens = running.pop("tokens")
            log({"step": done, **{key: value / running_steps for key, value in running.items()},
                 "grad_norm": float(grad_norm), "learning_rate": scheduler.get_last_lr()[0],
                 "num_tokens": num_tokens_seen, "samples_per_second": running_steps * global_batch_size / train_seconds,
                 "tokens_per_second": tokens / train_seconds, "peak_memory_mb": peak_memory_mb()})
            progress.set_postfix(loss=f"{step_loss:.4f}")
            samples = gather_object([{"prompt": prompt, "completion": tokenizer.decode(completion,
                                                                                      skip_special_tokens=True),
                                      "source": source, "loss": value}
                                     for (prompt, completion), value in zip(texts, per_sample)])
            if accelerator.is_main_process:
                with open(output_dir / "samples.jsonl", "a") as f:
                    f.writelines(json.dumps({"step": done, **row}) + "\n" for row in samples)
                if args.track:
                    import wandb

                    wandb.log({"completions": wandb.Table(columns=list(samples[0]),
                                                          rows=[list(s.values()) for s in samples])}, step=done)
            running, running_steps, train_seconds = {}, 0, 0.0
        if eval_rows and (done % args.eval_steps == 0 or done == args.max_steps):
            log({"step": done, **evaluate(model, teacher, eval_rows, tokenizer, args, accelerator, sharded)})
        signum = preemption.requested(accelerator)  # the same answer on every process
        if done < args.max_steps and (signum or args.save_steps > 0 and done % args.save_steps == 0):
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
