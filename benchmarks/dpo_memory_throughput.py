"""Samples/s and peak memory of dpo.py: live reference copy vs precomputed reference log-probs vs LoRA.

    python benchmarks/dpo_memory_throughput.py                      # tiny-gpt2 and a 25M-parameter GPT-2, ~4 min CPU
    python benchmarks/dpo_memory_throughput.py --sizes 768x12       # a GPT-2-small-sized random model (GPU advised)

Each configuration runs dpo.py as a user would (a subprocess) on the tiny world's preference pairs. Models larger than
the tiny policy are random-init GPT-2s built from a config with the tiny tokenizer (nothing is downloaded), so only
speed and memory are meaningful for them. Peak memory is torch.cuda.max_memory_allocated on a GPU and the process's
peak resident set size on CPU (which includes the ~0.5 GB that Python, torch and transformers take by themselves).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {
    "live reference copy": [],
    "precompute_ref_log_probs": ["--precompute_ref_log_probs"],
    "LoRA (reference = adapters off)": ["--use_peft"],
}


def make_model(size: str, directory: Path) -> Path:
    """A random-init GPT-2 of width x depth (e.g. 512x8) with the tiny world's tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    width, depth = (int(x) for x in size.split("x"))
    tokenizer = AutoTokenizer.from_pretrained(REPO / "assets" / "tokenizer")
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=width, n_layer=depth, n_head=max(1, width // 64),
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    path = directory / f"gpt2-{size}"
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run(model: Path, extra: list[str], steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(REPO / "dpo.py"), "--model_name_or_path", str(model), "--output_dir", out,
                   "--max_steps", str(steps), "--logging_steps", str(max(1, steps // 4)),
                   "--dataset_test_split", "None", "--save_steps", "0", *extra]
        subprocess.run(command, check=True, capture_output=True, text=True)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    windows = [row for row in rows if "samples_per_second" in row]  # not the params_in_memory row
    steady = windows[1:] or windows  # skip the first window (warm-up)
    return {"samples_per_second": sum(r["samples_per_second"] for r in steady) / len(steady),
            "peak_memory_mb": rows[-1]["peak_memory_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["512x8"], help="extra random GPT-2s as WIDTHxDEPTH")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = {"tiny-gpt2 (1M)": REPO / "assets" / "tiny-gpt2"}
        models.update({f"gpt2 {size}": make_model(size, Path(tmp)) for size in args.sizes})
        print(f"{'model':<18} {'reference':<34} {'pairs/s':>8} {'peak MB':>9}")
        for model_name, path in models.items():
            for config_name, extra in CONFIGS.items():
                result = run(path, extra, args.steps)
                print(f"{model_name:<18} {config_name:<34} {result['samples_per_second']:>8.1f} "
                      f"{result['peak_memory_mb']:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
