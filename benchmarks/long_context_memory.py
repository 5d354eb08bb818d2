"""Peak memory on long sequences: our sft.py, dpo.py and grpo.py against TRL 1.16 on the same long work, and our peak
memory against the sequence length with the chunked log-probs (the default) and without (--chunk_size 0).

    python benchmarks/long_context_memory.py                       # the comparison and the curve, ~15 min on 2 cores
    python benchmarks/long_context_memory.py --algos sft --curve   # the curve only (no TRL)
    python benchmarks/long_context_memory.py --compare --algos dpo --chunk_sizes 1024 0

The work, identical on both sides (benchmarks/vs_trl.py runs TRL's side: benchmarks/vs_trl_runner.py in TRL 1.16's
virtualenv, `python benchmarks/vs_trl.py --setup` makes it): a random-init Llama-style model with the benchmarks'
llama-20m shape (hidden 256, 4 layers, vocabulary 32,000, untied output layer, 19.7M parameters) and 8,192 positions,
fp32, no gradient checkpointing, one process, --steps optimizer steps of:
  sft   one row per step, a 64-token prompt and a completion of --length - 64 tokens (the completion is the target);
  dpo   one pair per step: a prompt of --length / 2 tokens, chosen and rejected answers of --length / 2 tokens;
  grpo  4 completions of --length / 2 new tokens for one prompt (4 generations, no reference: beta 0 both sides),
        the tiny world's sentiment reward; a random-init model almost never samples its end-of-sequence token, so the
        completions run to the budget.
Texts are random words of the tiny tokenizer's vocabulary (so ids stay below 602; only memory and speed mean anything
here), written once under --work_dir. Peak memory is the process's peak resident set size (os.wait4's ru_maxrss):
weights, optimizer state, activations, the output layer's logits and the interpreter alike, as a user's `top` sees it;
on a GPU, torch's CUDA peak (max_memory_allocated) of each side instead.
"""

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from vs_trl import ASSETS, RL_REWARD, VENVS, gpu_present, run_timed  # noqa: E402

PROMPT_TOKENS = 64  # sft: the prompt part of a row


def build_model(work_dir: Path) -> Path:
    """llama-20m with 8,192 positions and the tiny tokenizer (built once)."""
    path = work_dir / "models" / "llama-20m-8k"
    if (path / "tokenizer_config.json").exists():
        return path
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-gpt2")
    tokenizer.model_max_length = 8192  # the scripts never read beyond it
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192,
                         tie_word_embeddings=False, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_text(tokenizer, n_tokens: int, rng: random.Random, words: list[str]) -> str:
    """Random words that the tokenizer encodes to exactly n_tokens tokens (one token a word)."""
    return "".join(rng.choice(words) for _ in range(n_tokens))


def build_data(algo: str, length: int, work_dir: Path, rows: int) -> Path:
    """A folder with train.jsonl of `rows` rows for algo at this length (written once)."""
    path = work_dir / "data" / f"{algo}-{length}"
    if (path / "train.jsonl").exists():
        return path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-gpt2")
    words = [token.replace("Ġ", " ") for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
             if token.startswith("Ġ") and token[1:].isalpha()]
    words = [word for word in words if len(tokenizer(word)["input_ids"]) == 1]  # one token each, also after a space
    rng = random.Random(0)
    path.mkdir(parents=True)
    with open(path / "train.jsonl", "w") as f:
        for _ in range(rows):
            if algo == "sft":
                row = {"prompt": random_text(tokenizer, PROMPT_TOKENS, rng, words),
                       "completion": random_text(tokenizer, length - PROMPT_TOKENS - 1, rng, words)}
            elif algo == "dpo":
                half = length // 2
                row = {"prompt": random_text(tokenizer, half - 1, rng, words),
                       "chosen": random_text(tokenizer, half - 1, rng, words),
                       "rejected": random_text(tokenizer, half - 1, rng, words)}
            else:
                row = {"prompt": random_text(tokenizer, 16, rng, words)}
            f.write(json.dumps(row) + "\n")
    return path


def ours(algo: str, length: int, model: Path, data: Path, run_dir: Path, args, chunk_size: int | None) -> float:
    """Peak RSS (MB) of our script on this work."""
    command = [sys.executable, str(REPO / f"{algo}.py"), "--model_name_or_path", str(model), "--dataset_name",
               str(data), "--output_dir", str(run_dir), "--overwrite_output_dir", "--max_steps", str(args.steps),
               "--learning_rate", "1e-5", "--logging_steps", "1", "--seed", "0",
               *(["--chunk_size", str(chunk_size)] if chunk_size is not None else [])]
    if algo == "grpo":
        command += ["--reward_funcs", RL_REWARD, "--per_device_train_batch_size", "4", "--num_generations", "4",
                    "--max_completion_length", str(length // 2), "--beta", "0.0"]
    else:
        command += ["--dataset_test_split", "None", "--per_device_train_batch_size", "1", "--max_length",
                    str(length), "--save_steps", "0"]
        if algo == "dpo":
            command += ["--max_prompt_length", str(length // 2)]
    _, rss_mb, _ = run_timed(command, args.threads)
    if gpu_present():  # on a GPU the scripts log torch's CUDA peak (max_memory_allocated) with every window
        return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["peak_memory_mb"]
    return rss_mb


def trl(algo: str, length: int, model: Path, data: Path, run_dir: Path, args) -> float:
    """Peak RSS (MB) of TRL 1.16's trainer on the same work."""
    command = [str(args.trl_python), str(REPO / "benchmarks" / "vs_trl_runner.py"), "--algo", algo, "--model",
               str(model), "--data", str(data), "--output_dir", str(run_dir), "--result",
               str(run_dir.with_suffix(".json")), "--steps", str(args.steps), "--learning_rate", "1e-5"]
    if algo == "grpo":
        command += ["--batch_size", "4", "--num_generations", "4", "--max_completion_length", str(length // 2),
                    "--reward_funcs", RL_REWARD]
    else:
        command += ["--batch_size", "1", "--max_length", str(length)]
    _, rss_mb, _ = run_timed(command, args.threads)
    cuda_peak_mb = json.loads(run_dir.with_suffix(".json").read_text())["cuda_peak_mb"]
    return cuda_peak_mb if cuda_peak_mb is not None else rss_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", nargs="*", default=["sft", "dpo", "grpo"], choices=["sft", "dpo", "grpo"])
    parser.add_argument("--length", type=int, default=4096, help="tokens per sequence (grpo: 2 x new tokens)")
    parser.add_argument("--compare", action="store_true", help="only the comparison with TRL 1.16")
    parser.add_argument("--curve", action="store_true", help="only our curve against the length")
    parser.add_argument("--curve_lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--chunk_sizes", type=int, nargs="*", default=[1024, 0],
                        help="ours: the --chunk_size values measured (0: the plain path)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every run (default: unset)")
    parser.add_argument("--trl_python", type=Path, default=VENVS / "trl-1.16" / "bin" / "python")
    parser.add_argument("--work_dir", type=Path, default=REPO / "runs" / "long_context_memory")
    args = parser.parse_args()
    compare, curve = (args.compare or not args.curve), (args.curve or not args.compare)
    if compare and not args.trl_python.exists():
        raise SystemExit(f"long_context_memory.py: error: {args.trl_python} does not exist: run "
                         "`python benchmarks/vs_trl.py --setup` (or pass --trl_python, or --curve for ours only)")
    model = build_model(args.work_dir)
    results = {"compare": {}, "curve": {}}
    if compare:
        print(f"peak RSS (MB) at {args.length} tokens, {args.steps} steps; ours with --chunk_size "
              f"{' / '.join(map(str, args.chunk_sizes))}")
        for algo in args.algos:
            data = build_data(algo, args.length, args.work_dir, rows=args.steps * 4)
            row = {"trl": trl(algo, args.length, model, data, args.work_dir / "runs" / f"trl-{algo}", args)}
            for chunk_size in args.chunk_sizes:
                row[f"ours_{chunk_size}"] = ours(algo, args.length, model, data,
                                                 args.work_dir / "runs" / f"ours-{algo}-{chunk_size}", args, chunk_size)
            results["compare"][algo] = row
            print(f"{algo}: TRL {row['trl']:,.0f}; " + "; ".join(
                f"ours ({size}) {row[f'ours_{size}']:,.0f} = {row[f'ours_{size}'] / row['trl']:.2f} of TRL"
                for size in args.chunk_sizes), flush=True)
    if curve:
        sizes = " / ".join(map(str, args.chunk_sizes))
        print(f"\nour sft's peak RSS (MB) against the sequence length, --chunk_size {sizes}")
        for length in args.curve_lengths:
            data = build_data("sft", length, args.work_dir, rows=args.steps * 4)
            row = {size: ours("sft", length, model, data, args.work_dir / "runs" / f"curve-{length}-{size}", args,
                              size) for size in args.chunk_sizes}
            results["curve"][length] = row
            print(f"{length:>6} tokens: " + "; ".join(f"{size}: {value:,.0f}" for size, value in row.items()),
                  flush=True)
    (args.work_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwritten: {args.work_dir / 'results.json'}")


if __name__ == "__main__":
    main()
