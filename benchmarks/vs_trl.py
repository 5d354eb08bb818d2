"""Our scripts against TRL on the same work, side by side: steady-state samples/s, whole-process seconds, peak memory.

    python benchmarks/vs_trl.py --setup                      # once: TRL 1.16 (and the seed's TRL 0.8.6) in venvs
    python benchmarks/vs_trl.py                  # sft reward dpo kto orpo cpo ppo grpo rloo grpo_tools distill
    python benchmarks/vs_trl.py --algos dpo --models tiny --repeats 1            # a quick look, ~1 min
    python benchmarks/vs_trl.py --models qwen2-0.5b --bf16                       # on a GPU

TRL is not a dependency of the project: --setup installs TRL 1.16 with the project's own pins of torch, transformers,
datasets, accelerate and peft into benchmarks/.venvs/trl-1.16, and the seed's TRL 0.8.6 with a transformers of its era
into benchmarks/.venvs/trl-0.8.6 (--trl_python / --seed_python point at existing ones instead).

The work, identical on both sides: the same model (read from the same folder), the same rows (the tiny world's
train.jsonl: sft_prompt_completion for sft, preference for reward/dpo/orpo/cpo, unpaired for kto), --batch_size samples
per optimizer step on one process, no gradient accumulation, --max_length tokens (no tiny-world row is that long, so
nothing is truncated on either side), --steps steps, learning rate 5e-4 with linear decay, no evaluation, no
checkpoints, gradient checkpointing off, fp32 (or --bf16), and the final model saved. A sample is one sequence (sft),
one preference pair (reward, dpo, orpo, cpo) or one example with its KL partner (kto). Each repeat runs the two sides
back to back, in alternating order, as subprocesses started the way a user starts them.

Measured, per run: steady-state samples/s = samples of steps --warmup+1..--steps ÷ their wall time (TRL: a
TrainerCallback's step-end times; ours: the train_seconds of the logged windows, which exclude logging and evaluation
as TRL's step times include its logging); whole-process seconds from the subprocess's start to its exit, saved model
included; peak memory = the process's peak resident set size (os.wait4's ru_maxrss), or torch's CUDA peak on a GPU.
Each number is the median over --repeats. Ratios: steady state ours ÷ TRL, whole process TRL ÷ ours (both > 1 when we
are faster), peak memory ours ÷ TRL (< 1 when we use less).

distill is compared with TRL 1.16's DistillationTrainer on --rl_batch_size completions per step of up to
--distill_max_new_tokens tokens, sampled by the student from the tiny world's prompts and scored by a larger teacher of
the same vocabulary (the tiny world's tiny-teacher for `tiny`; `llama-20m-teacher`, hidden 512 and 6 layers, 52M
parameters, for `llama-20m`; a Qwen2-1.5B-shaped config for `qwen2-0.5b`), both models in fp32 (bf16 with --bf16),
TRL's defaults otherwise (beta 1, temperature 1). A sample is one completion, generation included.

grpo_tools is grpo.py with tools against TRL 1.16's GRPOTrainer(environment_factory=...) on the tiny tool world: the
tiny-tools model (always: --models does not apply, it is one run per repeat under the model name `tiny-tools`), the
tool_prompts rows, assets/tiny_tools.py's MovieRatings environment (its `lookup` tool) and `correct` reward, loaded from
that file by path on both sides, --rl_batch_size completions per step (8 per prompt), up to --tools_max_new_tokens
tokens per completion (sampled turns and tool results together), learning rate 2e-4 with linear decay, TRL's defaults
for the tool loop (no limit on tool-calling rounds). A sample is one multi-turn completion, its generation and tool
calls included. Both sides log every step, and besides speed each side's learning is reported: the mean reward and
tools/call_frequency (tool calls per completion) over the first and the last 5 steps (ours from metrics.jsonl, TRL's
from trainer.state.log_history), so that a faster side is seen to do the same learning.

ppo is compared with the seed's PPOTrainer (TRL 0.8.6) rather than TRL 1.16, which has no PPO trainer of the seed's
form: benchmarks/vs_trl_ppo_runner.py runs the same loop (generate, score with the tiny reward model, step) with either
`from trl import ...` (seed venv) or `from ppo import ...` (ours), and reports episodes/s of rollout + update.

Models: `tiny` (the tiny world's policy, 0.2M parameters, vocabulary 602), `llama-20m` (a random-init Llama-style model
built from a config: hidden 256, 4 layers, vocabulary 32000, untied head, 19.7M parameters; the tiny tokenizer, so its
ids stay < 602 and only speed and memory mean anything), and `qwen2-0.5b` (a random-init Qwen2-0.5B-shaped config, for
a GPU, with --bf16). Models are built once under --work_dir.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets"
VENVS = REPO / "benchmarks" / ".venvs"
ALGOS = ["sft", "reward", "dpo", "kto", "orpo", "cpo", "ppo", "grpo", "rloo", "grpo_tools", "distill"]
DATA = {"sft": "sft_prompt_completion", "reward": "preference", "dpo": "preference", "kto": "unpaired",
        "orpo": "preference", "cpo": "preference", "grpo": "prompts", "rloo": "prompts", "grpo_tools": "tool_prompts",
        "distill": "prompts"}
TEACHERS = {"tiny": "tiny-teacher", "llama-20m": "llama-20m-teacher", "qwen2-0.5b": "qwen2-1.5b"}  # distill
RL_REWARD = f"{ASSETS / 'tiny_rewards.py'}:sentiment"  # grpo / rloo: the Python reward both sides call
TOOLS_MODEL = ASSETS / "tiny-tools"  # grpo_tools: the tool world's model, environment, reward and learning rate
TOOLS_ENVIRONMENT = f"{ASSETS / 'tiny_tools.py'}:MovieRatings"
TOOLS_REWARD = f"{ASSETS / 'tiny_tools.py'}:correct"
TOOLS_LEARNING_RATE = "2e-4"
LEARNING_STEPS = 5  # grpo_tools: the learning is the mean over the first and the last this many steps
PINS = ["torch==2.13.0", "transformers==5.23.0", "datasets==5.2.0", "accelerate==1.15.0", "peft==0.21.2"]
SEED_PINS = ["torch==2.13.0", "trl==0.8.6", "transformers==4.40.2", "accelerate==0.30.1", "datasets>=2.19,<2.20",
             "peft==0.10.0", "numpy<2", "pyarrow<17", "pandas<2.3", "rich"]
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def setup(trl_python: Path, seed_python: Path) -> None:
    """Create the two virtualenvs (TRL 1.16 with the project's pins; TRL 0.8.6 with its era's transformers)."""
    for python, pins in ((trl_python, PINS + ["trl==1.16.0"]), (seed_python, SEED_PINS)):
        venv = python.parent.parent
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pins], check=True)
        print(f"ready: {venv}")


def build_model(name: str, work_dir: Path) -> Path:
    """The tiny policy, or a random-init model from a config saved with the tiny tokenizer (built once)."""
    if name == "tiny":
        return ASSETS / "tiny-gpt2"
    if name == "tiny-tools":
        return TOOLS_MODEL
    if name == "tiny-teacher":
        return ASSETS / "tiny-teacher"
    path = work_dir / "models" / name
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-gpt2")
    ids = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    torch.manual_seed(0)
    if name == "llama-20m":
        config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                             tie_word_embeddings=False, **ids)
        model = LlamaForCausalLM(config)
    elif name == "llama-20m-teacher":  # distill's teacher for llama-20m: wider and deeper, the same vocabulary
        config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                             tie_word_embeddings=False, **ids)
        model = LlamaForCausalLM(config)
    elif name == "qwen2-1.5b":  # distill's teacher for qwen2-0.5b
        config = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                             num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                             tie_word_embeddings=True, **ids)
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    elif name == "qwen2-0.5b":
        config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                             tie_word_embeddings=True, **ids)
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    else:
        raise SystemExit(f"vs_trl.py: error: unknown model '{name}': expected tiny, llama-20m or qwen2-0.5b")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_timed(command: list[str], threads: int | None) -> tuple[float, float, str]:
    """Run a command; return its wall seconds, its peak RSS in MB and its output (raising with the output on failure)."""
    env = {**os.environ, **ENV, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    start = time.time()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.time() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{output[-4000:]}")
    return seconds, usage.ru_maxrss / 1024, output  # ru_maxrss is in KB on Linux


def rl_batch(algo: str, args) -> tuple[int, int]:
    """grpo / rloo / grpo_tools: (completions per step, completions per prompt): TRL's num_generations, 8 and 2."""
    return args.rl_batch_size, (2 if algo == "rloo" else 8)


def run_ours(algo: str, model: Path, run_dir: Path, args) -> dict:
    if algo == "distill":
        command = [sys.executable, str(REPO / "distill.py"), "--model_name_or_path", str(model),
                   "--teacher_model_name_or_path", str(teacher_of(model, args)),
                   "--dataset_name", str(ASSETS / "data" / DATA[algo]),
                   "--dataset_test_split", "None", "--output_dir", str(run_dir), "--max_steps", str(args.steps),
                   "--per_device_train_batch_size", str(args.rl_batch_size), "--max_completion_length",
                   str(args.distill_max_new_tokens), "--learning_rate", "5e-4", "--logging_steps", str(args.warmup),
                   "--seed", "0", *(["--bf16", "--teacher_dtype", "bfloat16"] if args.bf16 else [])]
        return steady_state_of_ours(command, run_dir, args.rl_batch_size, args)
    if algo in ("grpo", "rloo"):
        batch, generations = rl_batch(algo, args)
        command = [sys.executable, str(REPO / f"{algo}.py"), "--model_name_or_path", str(model), "--dataset_name",
                   str(ASSETS / "data" / DATA[algo]), "--reward_funcs", RL_REWARD, "--output_dir", str(run_dir),
                   "--max_steps", str(args.steps), "--per_device_train_batch_size", str(batch),
                   "--num_generations", str(generations), "--max_completion_length", str(args.rl_max_new_tokens),
                   "--learning_rate", "5e-4", "--logging_steps", str(args.warmup), "--seed", "0",
                   *(["--bf16"] if args.bf16 else [])]
        return steady_state_of_ours(command, run_dir, batch, args)
    if algo == "grpo_tools":  # every step logged: the learning curve
        batch, generations = rl_batch(algo, args)
        command = [sys.executable, str(REPO / "grpo.py"), "--model_name_or_path", str(model), "--dataset_name",
                   str(ASSETS / "data" / DATA[algo]), "--environment_factory", TOOLS_ENVIRONMENT, "--reward_funcs",
                   TOOLS_REWARD, "--output_dir", str(run_dir), "--max_steps", str(args.steps),
                   "--per_device_train_batch_size", str(batch), "--num_generations", str(generations),
                   "--max_completion_length", str(args.tools_max_new_tokens), "--learning_rate", TOOLS_LEARNING_RATE,
                   "--logging_steps", "1", "--seed", "0", *(["--bf16"] if args.bf16 else [])]
        result = steady_state_of_ours(command, run_dir, batch, args)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {**result, **learning({row["step"]: row for row in rows if "reward" in row}, args.steps)}
    command = [sys.executable, str(REPO / f"{algo}.py"), "--model_name_or_path", str(model),
               "--dataset_name", str(ASSETS / "data" / DATA[algo]), "--dataset_test_split", "None",
               "--output_dir", str(run_dir), "--max_steps", str(args.steps),
               "--per_device_train_batch_size", str(args.batch_size), "--gradient_accumulation_steps", "1",
               "--max_length", str(args.max_length), "--learning_rate", "5e-4", "--logging_steps", str(args.warmup),
               "--save_steps", "0", "--seed", "0", *(["--bf16"] if args.bf16 else [])]
    if algo in ("dpo", "kto", "orpo", "cpo"):  # TRL 1.16 has no prompt limit; no tiny-world prompt comes near this one
        command += ["--max_prompt_length", str(args.max_length // 2)]
    seconds, rss_mb, _ = run_timed(command, args.threads)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [row for row in rows if "samples_per_second" in row and row["step"] > args.warmup]
    samples = args.batch_size * args.warmup * len(windows)
    train_seconds = sum(args.batch_size * args.warmup / row["samples_per_second"] for row in windows)
    cuda = rows[-1]["peak_memory_mb"] if args.bf16 else None  # on a GPU the scripts log the CUDA peak
    return {"samples_per_second": samples / train_seconds, "process_seconds": seconds,
            "peak_memory_mb": cuda if cuda is not None and gpu_present() else rss_mb}


def teacher_of(model: Path, args) -> Path:
    """distill: the teacher of a benchmark model (built once), by the model's folder name."""
    return build_model(TEACHERS["tiny" if model == ASSETS / "tiny-gpt2" else model.name], args.work_dir)


def steady_state_of_ours(command: list[str], run_dir: Path, batch: int, args) -> dict:
    """grpo / rloo / grpo_tools / distill: run, then the steady state from the windows logged after --warmup steps (a
    window is the steps since the previous logged one: --warmup of them, or 1 for grpo_tools, which logs every step)."""
    seconds, rss_mb, _ = run_timed(command, args.threads)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "samples_per_second" in row]
    windows = [(row["step"] - previous, row["samples_per_second"])  # (steps, samples/s) of each window after warmup
               for previous, row in zip([0] + [row["step"] for row in logged], logged) if previous >= args.warmup]
    steady = sum(batch * steps for steps, _ in windows) / sum(batch * steps / speed for steps, speed in windows)
    cuda = rows[-1]["peak_memory_mb"] if args.bf16 else None
    return {"samples_per_second": steady, "process_seconds": seconds,
            "peak_memory_mb": cuda if cuda is not None and gpu_present() else rss_mb}


def learning(per_step: dict[int, dict], steps: int) -> dict:
    """grpo_tools: a side's learning from its per-step metrics (step -> {"reward": ..., "tools/call_frequency": ...}):
    the means over the first and the last LEARNING_STEPS steps, and the whole curve."""
    missing = sorted(set(range(1, steps + 1)) - set(per_step))
    if missing:
        raise RuntimeError(f"no reward logged for steps {missing}: every step must be logged")
    curve = {step: {"reward": per_step[step]["reward"], "calls": per_step[step]["tools/call_frequency"]}
             for step in range(1, steps + 1)}
    first, last = list(curve.values())[:LEARNING_STEPS], list(curve.values())[-LEARNING_STEPS:]
    return {"reward_first": statistics.mean(row["reward"] for row in first),
            "reward_last": statistics.mean(row["reward"] for row in last),
            "calls_first": statistics.mean(row["calls"] for row in first),
            "calls_last": statistics.mean(row["calls"] for row in last), "curve": curve}


def run_trl(algo: str, model: Path, run_dir: Path, args) -> dict:
    result_file = run_dir.with_suffix(".json")
    command = [str(args.trl_python), str(REPO / "benchmarks" / "vs_trl_runner.py"), "--algo", algo, "--model",
               str(model), "--data", str(ASSETS / "data" / DATA[algo]), "--output_dir", str(run_dir), "--result",
               str(result_file), "--steps", str(args.steps), "--batch_size", str(args.batch_size), "--max_length",
               str(args.max_length), *(["--bf16"] if args.bf16 else [])]
    batch = args.batch_size
    if algo in ("grpo", "rloo"):
        batch, generations = rl_batch(algo, args)
        command += ["--batch_size", str(batch), "--num_generations", str(generations), "--max_completion_length",
                    str(args.rl_max_new_tokens), "--reward_funcs", RL_REWARD]  # the later --batch_size wins
    if algo == "grpo_tools":
        batch, generations = rl_batch(algo, args)
        command += ["--batch_size", str(batch), "--num_generations", str(generations), "--max_completion_length",
                    str(args.tools_max_new_tokens), "--reward_funcs", TOOLS_REWARD, "--environment_factory",
                    TOOLS_ENVIRONMENT, "--learning_rate", TOOLS_LEARNING_RATE]
    if algo == "distill":
        batch = args.rl_batch_size
        command += ["--batch_size", str(batch), "--max_completion_length", str(args.distill_max_new_tokens),
                    "--teacher", str(teacher_of(model, args))]
    seconds, rss_mb, _ = run_timed(command, args.threads)
    result = json.loads(result_file.read_text())
    ends = result["step_ends"]
    steady = batch * (args.steps - args.warmup) / (ends[-1] - ends[args.warmup - 1])
    measured = {"samples_per_second": steady, "process_seconds": seconds,
                "peak_memory_mb": result["cuda_peak_mb"] if result["cuda_peak_mb"] is not None else rss_mb}
    if algo == "grpo_tools":  # the runner logs every step: the learning curve from the trainer's log history
        measured.update(learning({row["step"]: row for row in result["log_history"] if "reward" in row}, args.steps))
    return measured


def run_ppo(side: str, model: Path, run_dir: Path, args) -> dict:
    python = str(args.seed_python) if side == "trl" else sys.executable
    result_file = run_dir.with_suffix(".json")
    command = [python, str(REPO / "benchmarks" / "vs_trl_ppo_runner.py"), "--side", "seed" if side == "trl" else
               "ours", "--model", str(model), "--result", str(result_file), "--steps", str(args.ppo_steps),
               "--warmup", str(args.ppo_warmup), "--batch_size", str(args.ppo_batch_size),
               "--max_new_tokens", str(args.ppo_max_new_tokens), "--output_dir", str(run_dir)]
    seconds, rss_mb, _ = run_timed(command, args.threads)
    result = json.loads(result_file.read_text())
    return {"samples_per_second": result["episodes_per_second"], "process_seconds": seconds,
            "peak_memory_mb": result["cuda_peak_mb"] if result["cuda_peak_mb"] is not None else rss_mb}


def gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", action="store_true", help="create the TRL virtualenvs, then exit")
    parser.add_argument("--algos", nargs="*", default=ALGOS, choices=ALGOS)
    parser.add_argument("--models", nargs="*", default=["llama-20m", "tiny"],
                        choices=["tiny", "llama-20m", "qwen2-0.5b"], help="grpo_tools always runs tiny-tools, once")
    parser.add_argument("--repeats", type=int, default=2, help="alternated runs of each side; medians are reported")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the steady state")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and autocast on both sides (for a GPU)")
    parser.add_argument("--ppo_steps", type=int, default=6, help="PPO steps (rollout + update) per ppo run")
    parser.add_argument("--ppo_warmup", type=int, default=1)
    parser.add_argument("--ppo_batch_size", type=int, default=64, help="episodes per PPO step")
    parser.add_argument("--ppo_max_new_tokens", type=int, default=24)
    parser.add_argument("--rl_batch_size", type=int, default=32, help="grpo/rloo/grpo_tools: completions per step")
    parser.add_argument("--rl_max_new_tokens", type=int, default=24, help="grpo/rloo: max_completion_length")
    parser.add_argument("--tools_max_new_tokens", type=int, default=48,
                        help="grpo_tools: max_completion_length (sampled turns and tool results together)")
    parser.add_argument("--distill_max_new_tokens", type=int, default=64, help="distill: max_completion_length")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both sides (default: unset)")
    parser.add_argument("--trl_python", type=Path, default=VENVS / "trl-1.16" / "bin" / "python")
    parser.add_argument("--seed_python", type=Path, default=VENVS / "trl-0.8.6" / "bin" / "python")
    parser.add_argument("--work_dir", type=Path, default=REPO / "runs" / "vs_trl")
    parser.add_argument("--output", type=Path, default=None, help="results JSON (default: WORK_DIR/results.json)")
    args = parser.parse_args()
    if args.setup:
        setup(args.trl_python, args.seed_python)
        return
    for python, needed in ((args.trl_python, set(args.algos) - {"ppo"}), (args.seed_python, {"ppo"} & set(args.algos))):
        if needed and not python.exists():
            raise SystemExit(f"vs_trl.py: error: {python} does not exist: run `python benchmarks/vs_trl.py --setup` "
                             "(or pass --trl_python / --seed_python)")
    if not 0 < args.warmup < args.steps or args.steps % args.warmup:
        raise SystemExit(f"vs_trl.py: error: --warmup {args.warmup} must divide --steps {args.steps} and be smaller")

    jobs = [(model_name, algo) for model_name in args.models for algo in args.algos if algo != "grpo_tools"]
    if "grpo_tools" in args.algos:  # the tool world has its own model: one job, whatever --models says
        jobs.append(("tiny-tools", "grpo_tools"))
    results, load_before = [], os.getloadavg()[0]
    for model_name, algo in jobs:
        model = build_model(model_name, args.work_dir)
        runs = {"ours": [], "trl": []}
        for repeat in range(args.repeats):
            for side in (("ours", "trl") if repeat % 2 == 0 else ("trl", "ours")):
                run_dir = args.work_dir / "runs" / f"{model_name}-{algo}-{side}-{repeat}"
                shutil.rmtree(run_dir, ignore_errors=True)  # the scripts keep a previous run: start clean
                runner = run_ppo if algo == "ppo" else run_ours if side == "ours" else run_trl
                runs[side].append(runner(side, model, run_dir, args) if algo == "ppo" else
                                  runner(algo, model, run_dir, args))
                shown = {key: value for key, value in runs[side][-1].items() if key != "curve"}
                print(f"{model_name} {algo} {side} repeat {repeat}: {shown}", file=sys.stderr, flush=True)
        row = {"model": model_name, "algo": algo, "runs": runs}
        learned = ("reward_first", "reward_last", "calls_first", "calls_last") if algo == "grpo_tools" else ()
        for side in runs:
            for key in ("samples_per_second", "process_seconds", "peak_memory_mb", *learned):
                row[f"{side}_{key}"] = statistics.median(run[key] for run in runs[side])
        row["steady_ratio"] = row["ours_samples_per_second"] / row["trl_samples_per_second"]
        row["process_ratio"] = row["trl_process_seconds"] / row["ours_process_seconds"]
        row["memory_ratio"] = row["ours_peak_memory_mb"] / row["trl_peak_memory_mb"]
        results.append(row)

    memory = "CUDA peak" if gpu_present() else "peak RSS"
    print(f"\n{args.batch_size} samples/step, max_length {args.max_length}, {args.steps} steps (steady state after "
          f"{args.warmup}), {'bf16' if args.bf16 else 'fp32'}, medians of {args.repeats} alternated runs; ppo: "
          f"{args.ppo_batch_size} episodes/step, up to {args.ppo_max_new_tokens} new tokens, {args.ppo_steps} steps; "
          f"grpo/rloo: {args.rl_batch_size} completions/step (8 / 2 per prompt), up to {args.rl_max_new_tokens} new "
          f"tokens, the Python sentiment reward; distill: {args.rl_batch_size} completions/step, up to "
          f"{args.distill_max_new_tokens} new tokens, scored by a larger teacher; grpo_tools: the tiny tool world, "
          f"{args.rl_batch_size} completions/step (8 per prompt), up to {args.tools_max_new_tokens} tokens with the "
          f"tool results, learning rate {TOOLS_LEARNING_RATE}, every step logged; "
          f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    print(f"| model | script | ours samples/s | TRL samples/s | steady ours ÷ TRL | ours process s | TRL process s "
          f"| process TRL ÷ ours | ours {memory} MB | TRL {memory} MB | memory ours ÷ TRL |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        versus = "seed 0.8.6" if r["algo"] == "ppo" else "TRL 1.16"
        print(f"| {r['model']} | {r['algo']} (vs {versus}) | {r['ours_samples_per_second']:.1f} "
              f"| {r['trl_samples_per_second']:.1f} | **{r['steady_ratio']:.2f}** | {r['ours_process_seconds']:.1f} "
              f"| {r['trl_process_seconds']:.1f} | **{r['process_ratio']:.2f}** | {r['ours_peak_memory_mb']:.0f} "
              f"| {r['trl_peak_memory_mb']:.0f} | **{r['memory_ratio']:.2f}** |")
    tools = [r for r in results if r["algo"] == "grpo_tools"]
    if tools:  # the same learning: reward and tool calls per completion, first steps -> last steps (medians)
        print(f"\n| model | script | ours reward, first {LEARNING_STEPS} → last {LEARNING_STEPS} steps | TRL reward "
              f"| ours tool calls per completion | TRL tool calls per completion |")
        print("|---|---|---:|---:|---:|---:|")
        for r in tools:
            print(f"| {r['model']} | grpo_tools (vs TRL 1.16) "
                  f"| {r['ours_reward_first']:.2f} → {r['ours_reward_last']:.2f} "
                  f"| {r['trl_reward_first']:.2f} → {r['trl_reward_last']:.2f} "
                  f"| {r['ours_calls_first']:.2f} → {r['ours_calls_last']:.2f} "
                  f"| {r['trl_calls_first']:.2f} → {r['trl_calls_last']:.2f} |")
    output = args.output or args.work_dir / "results.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": results,
                                  "load_average_before_after": [load_before, os.getloadavg()[0]]}, indent=1))
    print(f"\nwritten: {output}")


if __name__ == "__main__":
    main()
