"""DDPO throughput on the tiny pipeline: images/s of sampling (trajectories with log-probs) and of training (the
clipped PPO loss over every stored timestep, backward and optimizer steps).

    python benchmarks/ddpo_throughput.py --threads 1            # ~1 min on a 2-core machine
    python benchmarks/ddpo_throughput.py --batch_size 16 --steps 20 --no_lora

Both halves are DDPOTrainer's own methods (`_generate_samples` and `_train_batched_samples`) on assets/tiny-sd with
classifier-free guidance, LoRA unless --no_lora, medians of --repeats runs after a warm-up. Sampling images/s counts
decoded images; training images/s counts samples whose --steps timesteps were all trained on.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from ddpo import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline, brightness, fixed_prompt  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_lora", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=str, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        config = DDPOConfig(output_dir=tmp, sample_num_steps=args.steps, sample_batch_size=args.batch_size,
                            sample_num_batches_per_epoch=1, train_batch_size=args.batch_size,
                            use_lora=not args.no_lora)
        pipeline = DefaultDDPOStableDiffusionPipeline(str(REPO / "assets" / "tiny-sd"), use_lora=not args.no_lora)
        trainer = DDPOTrainer(config, brightness(), fixed_prompt("cat"), pipeline)
        sample_times, train_times = [], []
        for repeat in range(args.repeats + 1):
            start = time.perf_counter()
            samples, _ = trainer._generate_samples(1, args.batch_size)
            sampled = time.perf_counter()
            batch = {**samples[0], "advantages": torch.randn(args.batch_size)}
            trainer.unet.train()
            trainer._train_batched_samples(0, 0, 0, [batch], {"loss": [], "approx_kl": [], "clipfrac": []})
            if repeat:  # the first run is the warm-up
                sample_times.append(sampled - start)
                train_times.append(time.perf_counter() - sampled)
    result = {"batch_size": args.batch_size, "steps": args.steps, "lora": not args.no_lora,
              "sampling_images_per_second": args.batch_size / statistics.median(sample_times),
              "training_images_per_second": args.batch_size / statistics.median(train_times)}
    print(f"tiny-sd, {args.steps} DDIM steps, batch {args.batch_size}, {'LoRA' if result['lora'] else 'full UNet'}: "
          f"sampling {result['sampling_images_per_second']:.1f} images/s, training "
          f"{result['training_images_per_second']:.1f} images/s")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
