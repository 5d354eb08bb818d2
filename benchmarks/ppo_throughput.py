"""Rollout and update throughput of ppo.py's PPOTrainer, on the tiny world policy and a random GPT-2.

    python benchmarks/ppo_throughput.py --threads 1                  # ~5 min on a 2-core machine shared with a job
    python benchmarks/ppo_throughput.py --sizes                      # the tiny policy only, ~20 s
    python benchmarks/ppo_throughput.py --sizes 512x6 768x12 --output ppo_throughput.json

Rollout: PPOTrainer.generate on --queries prompts of the tiny world's train split (sampling as the seed: top_k=0,
top_p=1, min_length=-1, up to --max_new_tokens tokens, stopping at EOS), once with all queries in one left-padded
generate call (batch_size = --queries, as ppo.py's training loop) and once 4 queries at a time (the seed's default).
torch.manual_seed is reset before every call, so every repeat samples the same responses; since sampling stops at EOS
the mean response length is reported too. Update: PPOTrainer.step on --queries rollouts (mini_batch_size 16,
ppo_epochs 4, the other knobs at their defaults) with fixed random responses of exactly --max_new_tokens tokens and
random scores. Every time is the median of --repeats runs after one warm-up run. Larger models are random-init GPT-2s
built from a config with the tiny tokenizer (its ids stay < 602, the vocabulary is 32000): only speed is meaningful.
On a shared machine use --threads 1: with torch's default of one thread per core, every op waits for a thread that
another process has descheduled, and generation (thousands of small ops) gets tens of times slower.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from ppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # noqa: E402


def median_time(function, repeats: int, seed: int | None = None) -> tuple[float, object]:
    """Median wall time of `repeats` calls after one warm-up call (torch.manual_seed(seed) before each if given)."""
    times, result = [], None
    for i in range(repeats + 1):
        if seed is not None:
            torch.manual_seed(seed)
        start = time.perf_counter()
        result = function()
        if i:  # the first call is the warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times), result


def load_policy(name: str, tokenizer):
    """The tiny world policy, or a random GPT-2 of WIDTHxDEPTH (e.g. 512x6) with a vocabulary of 32000."""
    if name == "tiny-gpt2":
        return AutoModelForCausalLMWithValueHead.from_pretrained(str(REPO / "assets" / "tiny-gpt2"))
    width, depth = (int(x) for x in name.split("x"))
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=32000, n_embd=width, n_layer=depth, n_head=max(1, width // 64), resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=eos, bos_token_id=eos, pad_token_id=eos)
    return AutoModelForCausalLMWithValueHead.from_pretrained(GPT2LMHeadModel(config))


def benchmark(name: str, queries: list[torch.Tensor], tokenizer, args) -> dict:
    model = load_policy(name, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    config = PPOConfig(batch_size=len(queries), mini_batch_size=args.mini_batch_size, ppo_epochs=4, seed=args.seed)
    trainer = PPOTrainer(config=config, model=model, tokenizer=tokenizer)
    generation_kwargs = dict(return_prompt=False, do_sample=True, top_k=0, top_p=1.0, min_length=-1,
                             max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.eos_token_id)
    row = {"model": name, "params": params}
    for label, batch_size in (("batched", len(queries)), ("4_at_a_time", 4)):
        seconds, responses = median_time(lambda: trainer.generate(queries, batch_size=batch_size, **generation_kwargs),
                                         args.repeats, seed=args.seed)
        row[f"rollout_{label}_s"] = seconds
        row[f"rollout_{label}_episodes_per_s"] = len(queries) / seconds
        row[f"rollout_{label}_mean_response_len"] = sum(len(r) for r in responses) / len(responses)
    row["rollout_speedup"] = row["rollout_4_at_a_time_s"] / row["rollout_batched_s"]

    generator = torch.Generator().manual_seed(args.seed)  # fixed responses (no EOS) and scores for every step
    vocab = min(len(tokenizer), model.pretrained_model.config.vocab_size)
    responses = [torch.randint(1, vocab, (args.max_new_tokens,), generator=generator) for _ in queries]
    scores = [score for score in torch.randn(len(queries), generator=generator)]
    seconds, _ = median_time(lambda: trainer.step(queries, responses, scores), args.repeats)
    row.update(update_s_per_step=seconds, update_episodes_per_s=len(queries) / seconds)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["512x6"], help="random GPT-2s as WIDTHxDEPTH")
    parser.add_argument("--queries", type=int, default=64, help="prompts per rollout = rollouts per PPO step")
    parser.add_argument("--mini_batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own); 1 if other processes share the cores")
    parser.add_argument("--output", default=None, help="also write the results to this JSON file")
    parser.add_argument("--seed_reference", default=None,
                        help="a JSON with the seed's 4-at-a-time generate timing ('median_s') to compare with")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(REPO / "assets" / "tiny-gpt2")
    prompts = [json.loads(line)["prompt"] for line in
               (REPO / "assets" / "data" / "prompts" / "train.jsonl").read_text().splitlines()][: args.queries]
    queries = [torch.tensor(tokenizer.encode(prompt), dtype=torch.long) for prompt in prompts]
    rows, load_before = [], os.getloadavg()[0]  # other processes on the machine slow everything down
    for name in ["tiny-gpt2", *args.sizes]:
        rows.append(benchmark(name, queries, tokenizer, args))
        print(f"done {name} ({rows[-1]['params'] / 1e6:.1f}M params)", file=sys.stderr, flush=True)

    print(f"\n{args.queries} rollouts of up to {args.max_new_tokens} new tokens; update: mini_batch_size "
          f"{args.mini_batch_size}, 4 PPO epochs, {args.max_new_tokens}-token responses; torch threads "
          f"{torch.get_num_threads()}; medians of {args.repeats} after a warm-up; 1-min load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    print("| model | params | rollout batched s (ep/s, mean len) | rollout 4-at-a-time s (ep/s, mean len) | speed-up "
          "| update s/step | update episodes/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.2f}M "
              f"| {r['rollout_batched_s']:.3f} ({r['rollout_batched_episodes_per_s']:.0f}, "
              f"{r['rollout_batched_mean_response_len']:.1f}) "
              f"| {r['rollout_4_at_a_time_s']:.3f} ({r['rollout_4_at_a_time_episodes_per_s']:.0f}, "
              f"{r['rollout_4_at_a_time_mean_response_len']:.1f}) "
              f"| {r['rollout_speedup']:.1f}x | {r['update_s_per_step']:.2f} | {r['update_episodes_per_s']:.1f} |")
    result = {"rows": rows, "settings": vars(args), "torch_num_threads": torch.get_num_threads(),
              "torch": torch.__version__, "load_average_before_after": [load_before, os.getloadavg()[0]]}
    if args.seed_reference:
        seed = json.loads(Path(args.seed_reference).read_text())
        ours = rows[0]["rollout_4_at_a_time_s"]
        result["seed_reference"] = seed
        print(f"\nseed generate, 4 at a time (tiny-gpt2): {seed['median_s']:.3f} s (mean response length "
              f"{seed.get('mean_response_len', float('nan')):.1f}); ours: {ours:.3f} s "
              f"(ratio ours/seed {ours / seed['median_s']:.2f})")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
