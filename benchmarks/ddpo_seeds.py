"""Does ddpo.py make the tiny pipeline's images brighter on every seed? An independent check of the saved result.

    python benchmarks/ddpo_seeds.py                                    # the defaults, seeds 0-5 (~3 min, 2 cores)
    python benchmarks/ddpo_seeds.py --args "--train_learning_rate 3e-3" --seeds 0 1 2 3 4 5

Each seed runs `python ddpo.py --seed S --output_dir runs/ddpo_seeds/<tag>/seedS <args>` (two runs side by side,
each with OMP_NUM_THREADS=1: two torch processes with two threads each thrash on two cores). The score does not use
the script's logged reward: the saved adapter is loaded with plain diffusers (`load_lora_weights` on assets/tiny-sd),
32 images are drawn with fixed prompts and fixed sampling noise, and their mean pixel value is compared with the
untrained pipeline's on the same prompts and noise. The noise floor is the difference between two sets of sampling
noise on the untrained pipeline. Prints one row per seed and a JSON summary line.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TINY_SD = REPO / "assets" / "tiny-sd"
PROMPTS = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird"] * 4  # 32 images


def mean_brightness(pipe, noise_seed: int) -> float:
    """The mean pixel value of 32 images of PROMPTS (10 DDIM steps, eta 1, guidance 5), noise from noise_seed."""
    images = pipe(prompt=PROMPTS, num_inference_steps=10, guidance_scale=5.0, eta=1.0, output_type="pt",
                  generator=torch.Generator().manual_seed(noise_seed)).images
    return images.float().mean().item()


def base_pipeline():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TINY_SD, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--args", default="", help="extra ddpo.py arguments, one string")
    parser.add_argument("--tag", default="", help="the runs' folder under runs/ddpo_seeds (default: from --args)")
    parser.add_argument("--parallel", type=int, default=2)
    options = parser.parse_args()
    tag = options.tag or ("defaults" if not options.args else "_".join(
        part.lstrip("-") for part in shlex.split(options.args)))
    root = REPO / "runs" / "ddpo_seeds" / tag
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}

    # 1. Train: the runs, `--parallel` at a time, each timed.
    pending, running, seconds = list(options.seeds), {}, {}
    while pending or running:
        while pending and len(running) < options.parallel:
            seed = pending.pop(0)
            out = root / f"seed{seed}"
            command = [sys.executable, str(REPO / "ddpo.py"), "--seed", str(seed), "--output_dir", str(out),
                       *shlex.split(options.args)]
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)
            running[seed] = (subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                              text=True), time.time())
        for seed, (process, start) in list(running.items()):
            if process.poll() is not None:
                if process.returncode != 0:
                    sys.exit(f"seed {seed} failed:\n{process.stderr.read()[-3000:]}")
                seconds[seed] = time.time() - start
                del running[seed]
        time.sleep(0.5)

    # 2. Score each saved adapter against the untrained pipeline on the same prompts and noise.
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    pipe = base_pipeline()
    before = mean_brightness(pipe, noise_seed=1234)
    noise = abs(mean_brightness(pipe, noise_seed=4321) - before)
    gains = {}
    for seed in options.seeds:
        pipe = base_pipeline()
        pipe.load_lora_weights(str(root / f"seed{seed}"))
        gains[seed] = mean_brightness(pipe, noise_seed=1234) - before
        print(f"seed {seed}: brightness {before:.4f} -> {before + gains[seed]:.4f} (gain {gains[seed]:+.4f}), "
              f"run {seconds[seed]:.0f} s")
    above = sum(gain > noise for gain in gains.values())
    print(f"noise {noise:.4f}; gain above the noise on {above} of {len(gains)} seeds; smallest gain "
          f"{min(gains.values()):+.4f}")
    print(json.dumps({"args": options.args, "before": before, "noise": noise, "gains": gains,
                      "seconds": seconds, "above_noise": above}))


if __name__ == "__main__":
    main()
