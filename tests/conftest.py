"""Shared fixtures: run a script as a user would, read its metrics, and build a Llama-style tiny model.

Everything is offline: the tiny world under assets/ is every test's fixture.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(ASSETS))

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(OFFLINE_ENV)


def run_script(script: str, *args, cwd: Path | None = None, launcher: list[str] | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python <script> args...` (or `<launcher> <script> args...`) and return the finished process."""
    command = (launcher or [sys.executable]) + [str(REPO / script)] + [str(arg) for arg in args]
    return subprocess.run(command, cwd=cwd or REPO, env={**os.environ, **OFFLINE_ENV}, capture_output=True,
                          text=True, timeout=timeout)


def run_ok(script: str, *args, **kwargs) -> subprocess.CompletedProcess:
    """run_script that fails the test with the script's own output when it exits non-zero."""
    result = run_script(script, *args, **kwargs)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def metric_series(output_dir: Path, key: str) -> list[float]:
    return [row[key] for row in read_metrics(output_dir) if key in row]


def relative_weight_difference(a: dict, b: dict, initial: dict) -> float:
    """||a - b|| / ||a - initial|| over all shared tensors: how far two trainings ended apart, relative to how far
    training moved. (Element-wise comparison is too strict under Adam: parameters whose true gradient is zero,
    such as attention key biases, take lr-sized steps on float noise.)"""
    import torch

    names = [name for name in initial if name in a and name in b]
    apart = torch.cat([(a[name] - b[name]).flatten() for name in names]).norm()
    moved = torch.cat([(a[name] - initial[name]).flatten() for name in names]).norm()
    return (apart / moved).item()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A Llama-style tiny model built from config: random init, a tokenizer that adds BOS and has NO pad token, and a
    chat template that starts with BOS (the case where naive pipelines double the BOS or never learn EOS)."""
    import torch
    from tokenizers import processors
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    bos = "<|begin_of_text|>"
    bos_id = tokenizer.convert_tokens_to_ids(bos)
    tokenizer.bos_token = bos
    tokenizer.pad_token = None
    tokenizer._tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]),
    ])
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=bos_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    return path
