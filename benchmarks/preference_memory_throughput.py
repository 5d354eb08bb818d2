"""Samples/s and peak memory of the preference scripts, each with its reference-model and LoRA variants.

    python benchmarks/preference_memory_throughput.py                              # dpo, kto, orpo, cpo; ~12 min CPU
    python benchmarks/preference_memory_throughput.py --scripts kto --sizes 768x12  # a GPT-2-small-sized random model

Each configuration runs the script as a user would (a subprocess) on its default tiny-world data for --steps steps of 8
samples (a sample is a preference pair for dpo.py, orpo.py and cpo.py, and one unpaired example plus its KL pair for
kto.py), without evaluation, and averages the logged windows after the first (warm-up). Models larger than the tiny
policy are random-init GPT-2s built from a config with the tiny tokenizer (nothing is downloaded), so only speed and
memory are meaningful for them. Peak memory is torch.cuda.max_memory_allocated on a GPU and the process's peak resident
set size on CPU (which includes the ~0.5 GB that Python, torch and transformers take by themselves).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WITH_REFERENCE = {"live reference copy": [], "precompute_ref_log_probs": ["--precompute_ref_log_probs"],
                  "LoRA (reference = adapters off)": ["--use_peft"]}
REFERENCE_FREE = {"no reference, full": [], "no reference, LoRA": ["--use_peft"]}
CONFIGS = {"dpo": WITH_REFERENCE, "kto": WITH_REFERENCE, "orpo": REFERENCE_FREE, "cpo": REFERENCE_FREE}


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


def run(script: str, model: Path, extra: list[str], steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(REPO / f"{script}.py"), "--model_name_or_path", str(model), "--output_dir", out,
                   "--max_steps", str(steps), "--logging_steps", str(max(1, steps // 4)),
                   "--dataset_test_split", "None", "--save_steps", "0", *extra]
        subprocess.run(command, check=True, capture_output=True, text=True)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    windows = [row for row in rows if "samples_per_second" in row]  # not the params_in_memory row
    steady = windows[1:] or windows  # skip the first window (warm-up)
    return {"samples_per_second": sum(row["samples_per_second"] for row in steady) / len(steady),
            "peak_memory_mb": rows[-1]["peak_memory_mb"], "params_in_memory": rows[0]["params_in_memory"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scripts", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--sizes", nargs="*", default=["512x8"], help="extra random GPT-2s as WIDTHxDEPTH")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = {"tiny-gpt2 (1M)": REPO / "assets" / "tiny-gpt2"}
        models.update({f"gpt2 {size}": make_model(size, Path(tmp)) for size in args.sizes})
        print(f"{'model':<16} {'script':<6} {'configuration':<33} {'params':>8} {'samples/s':>10} {'peak MB':>8}")
        for model_name, path in models.items():
            for script in args.scripts:
                for config_name, extra in CONFIGS[script].items():
                    result = run(script, path, extra, args.steps)
                    print(f"{model_name:<16} {script:<6} {config_name:<33} {result['params_in_memory'] / 1e6:>7.2f}M "
                          f"{result['samples_per_second']:>10.1f} {result['peak_memory_mb']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
