"""A check by hand, not part of the suite (DeepSpeed is not a dependency of the project): the scripts' chunked
log-probs (chunked_log_probs) under DeepSpeed ZeRO-3 on 2 CPU processes (gloo), against the unsharded model. Every
weight is partitioned (stage 3, no parameter kept whole), the output layer included: its weights are gathered around
the model's one call of it in the forward and again, by ZeRO-3's own backward hooks, for the chunks' recompute.

    pip install deepspeed   # into a virtualenv of its own is fine (python -m venv --system-site-packages ...)
    DS_ACCELERATOR=cpu python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/zero3_chunked_worker.py dpo sft grpo

Prints "<script> <chunk_size>: ok" per case on rank 0 (values and every weight's gradient equal to the unsharded
model's, relative to the gradient's largest entry, within 1e-4), and raises otherwise.
"""

import importlib
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_grad
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TINY = REPO / "assets" / "tiny-gpt2"
CONFIG = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "SGD", "params": {"lr": 0.0}}}


def loss_of(log_probs: torch.Tensor) -> torch.Tensor:
    """Not linear in the log-probs, as DPO's loss is."""
    sums = log_probs.sum(-1)
    return -F.logsigmoid(sums[0] - sums[1]) + log_probs.pow(2).sum()


def main(scripts: list[str]) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    batch = dict(tokenizer(["the film was good and", "a dull story, badly told"], return_tensors="pt", padding=True))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :2] = -100
    for name in scripts:
        module = importlib.import_module(name)
        plain = AutoModelForCausalLM.from_pretrained(TINY).eval()
        with module.chunked_log_probs(plain, labels, 0):
            want = plain(**batch, use_cache=False).log_probs
        loss_of(want).backward()
        for chunk_size in [1, 3]:
            model = AutoModelForCausalLM.from_pretrained(TINY).eval()
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=CONFIG)
            with module.chunked_log_probs(engine.module, labels, chunk_size):
                got = engine(**batch, use_cache=False).log_probs
            assert torch.allclose(got, want, atol=1e-5), f"{name} {chunk_size}: the log-probs"
            engine.backward(loss_of(got))
            for key, parameter in engine.module.named_parameters():
                grad, expected = safe_get_full_grad(parameter), plain.get_parameter(key).grad
                assert (grad - expected).abs().max() <= 1e-4 * expected.abs().max(), f"{name} {chunk_size}: {key}"
            if dist.get_rank() == 0:
                print(f"{name} {chunk_size}: ok", flush=True)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
