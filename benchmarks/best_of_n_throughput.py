"""Best-of-n throughput: best_of_n.py's batched BestOfNSampler against the seed's query-by-query loop.

    python benchmarks/best_of_n_throughput.py --threads 1                     # ~3 min on a 2-core machine
    python benchmarks/best_of_n_throughput.py --sizes tiny-gpt2 --queries 16  # ~20 s
    python benchmarks/best_of_n_throughput.py --sizes 512x6 --output best_of_n_throughput.json

Both sides are the same BestOfNSampler, the same model, queries, seed, sample size and scorer: `batch_size=1` is the
seed's loop (one `generate` of the query repeated sample_size times, then one scoring call, per query; a test checks
that it draws exactly the seed's samples), `batch_size=--queries` is the batched path (every query's samples in one
left-padded `generate` call, one scoring call). The scorer is the tiny world's reward model under the repository's
reward rule. Sampling as the seed's example (top_k 0, top_p 1), response budgets from LengthSampler(min, max) per
query, stopping at EOS. Samples/s = queries x sample_size / seconds, the median of --repeats runs after a warm-up.
Larger models are random-init GPT-2s of WIDTHxDEPTH with a 32000-token vocabulary (the tiny tokenizer's ids stay
below 602): only their speed means anything. On a shared machine use --threads 1 (see ppo_throughput.py).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from best_of_n import BestOfNSampler, LengthSampler, load_reward_function  # noqa: E402


def load_policy(name: str, tokenizer):
    """The tiny world policy, or a random GPT-2 of WIDTHxDEPTH (e.g. 512x6) with a vocabulary of 32000."""
    if name == "tiny-gpt2":
        return AutoModelForCausalLM.from_pretrained(str(REPO / "assets" / "tiny-gpt2")).eval()
    width, depth = (int(x) for x in name.split("x"))
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=32000, n_embd=width, n_layer=depth, n_head=max(1, width // 64), resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=eos, bos_token_id=eos, pad_token_id=eos)
    return GPT2LMHeadModel(config).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=["tiny-gpt2", "512x6"])
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--sample_size", type=int, default=8)
    parser.add_argument("--min_new_tokens", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=str, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = AutoTokenizer.from_pretrained(str(REPO / "assets" / "tiny-gpt2"))
    tokenizer.pad_token = tokenizer.eos_token
    prompts = [json.loads(line)["prompt"] for line in (REPO / "assets" / "data" / "prompts" / "train.jsonl")
               .read_text().splitlines()[: args.queries]]
    queries = [torch.tensor(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    reward_fn = load_reward_function(str(REPO / "assets" / "tiny-reward"), "cpu")

    def queries_to_scores(texts):  # the prompts are strings: scoring the whole text is the reward rule's prompt+response
        return reward_fn([""] * len(texts), texts)

    generation = {"do_sample": True, "top_k": 0, "top_p": 1.0, "pad_token_id": tokenizer.eos_token_id}
    results = []
    for size in args.sizes:
        model = load_policy(size, tokenizer)
        row = {"model": size, "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
               "queries": args.queries, "sample_size": args.sample_size}
        for label, batch_size in (("per_query_loop", 1), ("batched", args.queries)):
            times = []
            for repeat in range(args.repeats + 1):
                sampler = BestOfNSampler(model, tokenizer, queries_to_scores,
                                         LengthSampler(args.min_new_tokens, args.max_new_tokens),
                                         sample_size=args.sample_size, seed=0, batch_size=batch_size)
                start = time.perf_counter()
                sampler.generate(queries, **generation)
                if repeat:  # the first run is the warm-up
                    times.append(time.perf_counter() - start)
            row[f"{label}_samples_per_second"] = args.queries * args.sample_size / statistics.median(times)
        row["speedup"] = row["batched_samples_per_second"] / row["per_query_loop_samples_per_second"]
        print(f"{size:>10} ({row['parameters_m']:.1f}M): per-query loop "
              f"{row['per_query_loop_samples_per_second']:8.1f} samples/s, batched "
              f"{row['batched_samples_per_second']:8.1f} samples/s, x{row['speedup']:.1f}", flush=True)
        results.append(row)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    np.random.seed(0)
    main()
