"""PPO's side of benchmarks/vs_trl.py: the seed's training loop, timed, with the seed's PPOTrainer or with ppo.py's.

    <seed venv>/bin/python benchmarks/vs_trl_ppo_runner.py --side seed --model M --result R.json   # TRL 0.8.6
    python benchmarks/vs_trl_ppo_runner.py --side ours --model M --result R.json                  # ppo.py

The loop is the seed's quickstart at scale: each step takes --batch_size prompts of the tiny world, generates a
response to each (sampling with top_k 0, top_p 1, up to --max_new_tokens tokens; `generate_batch_size` queries per
generate call: the seed's default of 4 unless told otherwise), scores prompt + response with the tiny reward model,
and runs PPOTrainer.step (mini_batch_size 16, 4 PPO epochs, the other knobs at the seed's defaults). The two sides
differ only in the import. episodes/s = episodes of the steps after --warmup ÷ their wall time; generate_seconds and
step_seconds are the mean seconds of one `generate` and one `step` call after the warm-up.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", required=True, choices=["seed", "ours"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--mini_batch_size", type=int, default=16)
    parser.add_argument("--generate_batch_size", type=int, default=None,
                        help="queries per generate call (default: the seed's 4 for --side seed, all for ours)")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    args = parser.parse_args()
    if args.side == "seed":
        from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, create_reference_model
    else:
        sys.path.insert(0, str(REPO))
        from ppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, create_reference_model
    generate_batch_size = args.generate_batch_size or (4 if args.side == "seed" else args.batch_size)
    model_path, reward_path = Path(args.model), REPO / "assets" / "tiny-reward"
    if args.side == "seed":  # transformers 4.40 reads neither today's tokenizer files nor `dtype`: convert copies
        sys.path.insert(0, str(REPO / "benchmarks" / "seed_reference"))
        from ppo_seed_step import old_transformers_copy

        converted = Path(args.output_dir) / "converted"
        shutil.rmtree(converted, ignore_errors=True)
        model_path = old_transformers_copy(model_path, converted / "policy")
        reward_path = old_transformers_copy(reward_path, converted / "reward")

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(model_path))
    reference = create_reference_model(model)
    config = PPOConfig(batch_size=args.batch_size, mini_batch_size=args.mini_batch_size, ppo_epochs=4,
                       learning_rate=1.41e-5, seed=0)
    trainer = PPOTrainer(config, model, reference, tokenizer)
    reward_tokenizer = AutoTokenizer.from_pretrained(reward_path)
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_path).eval()
    prompts = [json.loads(line)["prompt"] for line in
               (REPO / "assets" / "data" / "prompts" / "train.jsonl").read_text().splitlines()]
    generation_kwargs = dict(min_length=-1, top_k=0, top_p=1.0, do_sample=True, pad_token_id=tokenizer.eos_token_id,
                             max_new_tokens=args.max_new_tokens)

    step_ends, lengths, seconds_of = [], [], {"generate": [], "step": []}
    for step in range(args.steps):
        batch = [prompts[(step * args.batch_size + i) % len(prompts)] for i in range(args.batch_size)]
        queries = [tokenizer(prompt, return_tensors="pt").input_ids[0] for prompt in batch]
        start = time.time()
        responses = trainer.generate(queries, batch_size=generate_batch_size, return_prompt=False,
                                     **generation_kwargs)
        seconds_of["generate"].append(time.time() - start)
        texts = [q + r for q, r in zip(batch, tokenizer.batch_decode(responses, skip_special_tokens=True))]
        with torch.no_grad():
            inputs = reward_tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
            scores = list(reward_model(**inputs).logits[:, 0])
        start = time.time()
        trainer.step(queries, responses, scores)
        seconds_of["step"].append(time.time() - start)
        step_ends.append(time.time())
        lengths += [len(r) for r in responses]
    trainer.model.save_pretrained(args.output_dir)  # as a user's run ends: the trained policy with its value head
    seconds = step_ends[-1] - step_ends[args.warmup - 1] if args.warmup else None
    result = {"episodes_per_second": args.batch_size * (args.steps - args.warmup) / seconds,
              "mean_response_length": sum(lengths) / len(lengths), "generate_batch_size": generate_batch_size,
              **{f"{name}_seconds": sum(times[args.warmup:]) / (args.steps - args.warmup)  # per step, after warm-up
                 for name, times in seconds_of.items()},
              "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}
    Path(args.result).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
