"""Throughput of sft.py on the tiny world, with and without packing.

    python benchmarks/sft_throughput.py            # about a minute on 2 CPU cores
    python benchmarks/sft_throughput.py --steps 200 --model_name_or_path Qwen/Qwen2.5-0.5B   # on a GPU machine

Each configuration runs sft.py as a user would (a subprocess, no evaluation, no checkpoints) and reads the
tokens_per_second it logs: real (non-padding) tokens per second of the training loop, after a warm-up window.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(name: str, extra: list[str], args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(REPO / "sft.py"), "--output_dir", out, "--dataset_name", args.dataset_name,
                   "--model_name_or_path", args.model_name_or_path, "--max_steps", str(args.steps),
                   "--logging_steps", str(args.steps // 4), "--dataset_test_split", "None", "--save_steps", "0",
                   *extra]
        start = time.time()
        subprocess.run(command, check=True, capture_output=True, text=True)
        wall = time.time() - start
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steady = [row for row in rows if "tokens_per_second" in row][1:]  # skip the first window (warm-up)
    return {"config": name, "tokens_per_second": sum(r["tokens_per_second"] for r in steady) / len(steady),
            "samples_per_second": sum(r["samples_per_second"] for r in steady) / len(steady),
            "peak_memory_mb": rows[-1]["peak_memory_mb"], "wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--model_name_or_path", default=str(REPO / "assets" / "tiny-gpt2"))
    parser.add_argument("--dataset_name", default=str(REPO / "assets" / "data" / "sft_messages"))
    parser.add_argument("--max_length", type=int, default=512)
    args = parser.parse_args()
    configs = {
        "unpacked, batch 8": ["--per_device_train_batch_size", "8"],
        f"packed into {args.max_length}-token blocks, batch 1": ["--packing", "--max_length", str(args.max_length),
                                                                 "--per_device_train_batch_size", "1"],
        f"packed into {args.max_length}-token blocks, batch 4": ["--packing", "--max_length", str(args.max_length),
                                                                 "--per_device_train_batch_size", "4"],
    }
    print(f"{'config':<42} {'tokens/s':>10} {'samples/s':>10} {'peak MB':>9} {'wall s':>7}")
    for name, extra in configs.items():
        result = run(name, extra, args)
        print(f"{name:<42} {result['tokens_per_second']:>10.0f} {result['samples_per_second']:>10.1f} "
              f"{result['peak_memory_mb']:>9.0f} {result['wall_seconds']:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
