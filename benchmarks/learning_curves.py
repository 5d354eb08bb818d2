"""Learning curves of every script on the tiny world: 3 seeds each, one PNG per algorithm under docs/curves/.

    python benchmarks/learning_curves.py                        # all thirteen scripts x 3 seeds: about 35 min (2 cores)
    python benchmarks/learning_curves.py --algos dpo kto        # a subset
    python benchmarks/learning_curves.py --seeds 0 1 2 3 4      # more seeds
    python benchmarks/learning_curves.py --replot               # re-read the runs and redraw the PNGs, no training

Each run is the script's offline quickstart (its default command line, i.e. the tiny world under assets/) plus
`--seed S --output_dir OUTPUT_DIR/<algo>/seed<S>`, run one at a time with `sys.executable` and OMP_NUM_THREADS=1
(`--threads`). A few scripts get flags that only make them log more, never change what they train:
`--eval_steps` (evaluation more often than the default 100 steps, so a curve has more than 3 to 5 points; training
is identical, the batch order is drawn from its own generator and dropout is off) and, for the preference methods,
`--generate_during_eval` (samples of the policy, and of the reference for dpo/kto, on the first 16 eval prompts at
every evaluation, written to samples.jsonl). Every command is printed and stored in
`OUTPUT_DIR/<algo>/seed<S>/learning_curve_run.json` with its wall time; a run's log is `OUTPUT_DIR/<algo>/seed<S>.log`.

What is plotted (the mean over seeds as a line, the min-max range over seeds as a shaded band):

    sft            eval_loss against step
    reward         eval_accuracy (held-out pairwise accuracy) against step
    dpo orpo cpo   eval_rewards/accuracies (held-out implicit-reward accuracy) | ground truth of samples | grammar
    kto            eval_rewards/margins (the default data is unpaired, so there is no accuracy: mean implicit
                   reward of the held-out desirable minus undesirable completions) | ground truth | grammar
    ppo            env/reward_mean | objective/kl | ground truth of the rollouts, against PPO step
    best_of_n      mean reward of the chosen sample against n (results.json) | ground truth of the chosen sample
    iterative_sft  reward/mean of fresh samples | their ground truth, against iteration
    grpo           reward of the fresh completions | entropy | their ground truth | grammar, against step
    grpo_tools     grpo.py on the tool world (assets/tiny_tools.py): reward (answers right) | tool calls per
                   rollout | failed calls per call, against step
    rloo           reward of the fresh completions | KL to the reference | their ground truth | grammar
    distill        held-out reverse KL to the teacher (eval_loss) | training loss on the fresh completions | their
                   ground truth | grammar, against step
    ddpo           reward_mean (image brightness) against epoch

"Ground truth" is the tiny world's `sentiment_score` (assets/tiny_world.py), which no training ever sees, averaged
over the samples the script wrote at that step (16 per evaluation for the preference methods, so a point is noisy
by about +-0.1; 32 rollouts per PPO step; 64 prompts x 8 samples per iteration for iterative_sft; 64 chosen samples
per n for best_of_n). The score only counts sentiment words, so degenerate text can score high: "grammar" is the
fraction of the samples' complete sentences that are sentences of the tiny world's language (a subject, a verb, an
optional adverb or "not", an adjective; or one of its closing remarks), pooled over the step's samples.

Measured on 2 CPU cores shared with other jobs: the 30 runs of the first command took 1835 s (31 min). Median
seconds per run: sft 23, reward 106, dpo 126, kto 99, orpo 69, cpo 69, ppo 29, best_of_n 18, iterative_sft 25,
ddpo 50 (60 at the 16-epoch defaults, measured later, alone); measured later, alone: grpo 22, rloo 26, distill 50.
`--replot` takes about 5 s.
"""

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402  (a matplotlib dependency)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "assets"))
from tiny_world import (  # noqa: E402
    NEGATIVE_ADJECTIVES, NEGATIVE_CLOSERS, POSITIVE_ADJECTIVES, POSITIVE_CLOSERS, SUBJECTS, VERBS, sentiment_score)

# One sentence of the tiny world's grammar (tiny_world.sample_sentence) or one of its closing remarks.
SENTENCE = re.compile(
    rf"(?:{'|'.join(s.capitalize() for s in SUBJECTS)}) (?:{'|'.join(VERBS)}) (?:not |truly |really |quite |very )?"
    rf"(?:{'|'.join(POSITIVE_ADJECTIVES + NEGATIVE_ADJECTIVES)})\.|"
    + "|".join(re.escape(closer) for closer in POSITIVE_CLOSERS + NEGATIVE_CLOSERS))

# A series reader takes a run directory and returns {x: value}.
Reader = Callable[[Path], dict[float, float]]


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def metric(key: str, x: str = "step") -> Reader:
    """`key` of every metrics.jsonl row that has it, indexed by the row's `x`."""
    def read(run: Path) -> dict[float, float]:
        return {row[x]: row[key] for row in read_jsonl(run / "metrics.jsonl") if key in row and x in row}
    return read


def sample_sentiment(text_key: str, group_key: str = "step") -> Reader:
    """Mean ground-truth sentiment of samples.jsonl's `text_key` texts, grouped by `group_key`."""
    def read(run: Path) -> dict[float, float]:
        groups: dict[float, list[float]] = {}
        for row in read_jsonl(run / "samples.jsonl"):
            if row.get(text_key) is not None:
                groups.setdefault(row[group_key], []).append(sentiment_score(row[text_key]))
        return {x: float(np.mean(scores)) for x, scores in groups.items()}
    return read


def best_of_n_reward(run: Path) -> dict[float, float]:
    """Mean reward of the chosen sample per n, from best_of_n.py's results.json."""
    return {row["n"]: row["mean_reward"] for row in json.loads((run / "results.json").read_text())["rows"]}


def sentences(text: str) -> tuple[int, int]:
    """(well-formed, all) complete sentences of a text; a cut-off last sentence (no full stop) is not counted."""
    found = [sentence.strip() for sentence in re.findall(r"[^.]*\.", text)]
    return sum(bool(SENTENCE.fullmatch(sentence)) for sentence in found), len(found)


def sample_grammar(text_key: str, group_key: str = "step") -> Reader:
    """Fraction of the complete sentences of samples.jsonl's `text_key` texts that are in the tiny world's grammar,
    pooled over the samples of each `group_key` (a sample without a full stop counts as one bad sentence)."""
    def read(run: Path) -> dict[float, float]:
        groups: dict[float, list[int]] = {}
        for row in read_jsonl(run / "samples.jsonl"):
            if row.get(text_key) is not None:
                good, total = sentences(row[text_key])
                counts = groups.setdefault(row[group_key], [0, 0])
                counts[0] += good
                counts[1] += max(total, 1)
        return {x: good / total for x, (good, total) in groups.items()}
    return read


@dataclass
class Series:
    label: str
    read: Reader
    color: str = "C0"


@dataclass
class Panel:
    ylabel: str
    series: list[Series]
    title: str = ""
    ylim: tuple[float, float] | None = None


@dataclass
class Algo:
    script: str
    xlabel: str
    panels: list[Panel]
    extra_args: list[str] = field(default_factory=list)  # flags that only add logging (grpo_tools: its world)
    logx: bool = False


def sentiment_panel(policy_key: str, reference_key: str | None = None, group_key: str = "step",
                    title: str = "ground truth of samples", label: str = "policy samples") -> Panel:
    series = [Series(label, sample_sentiment(policy_key, group_key), "C2")]
    if reference_key:
        series.append(Series("reference samples", sample_sentiment(reference_key, group_key), "0.5"))
    return Panel("mean sentiment_score", series, title)


def grammar_panel(policy_key: str, reference_key: str | None = None, group_key: str = "step",
                  title: str = "samples' sentences in the tiny grammar", label: str = "policy samples") -> Panel:
    series = [Series(label, sample_grammar(policy_key, group_key), "C4")]
    if reference_key:
        series.append(Series("reference samples", sample_grammar(reference_key, group_key), "0.5"))
    return Panel("fraction of sentences", series, title, ylim=(0.0, 1.05))


def online_rl(script: str, second: Panel) -> Algo:
    """grpo.py / rloo.py: the reward of the fresh completions, a second panel, and the completions' ground truth and
    grammar, against optimizer step."""
    return Algo(script, "optimizer step",
                [Panel("reward", [Series("tiny-reward score", metric("reward"))], "reward of fresh completions"),
                 second,
                 sentiment_panel("completion", title="ground truth of completions", label="completions"),
                 grammar_panel("completion", title="completions' sentences in the tiny grammar", label="completions")])


PREFERENCE_LOGGING = ["--eval_steps", "25", "--generate_during_eval"]
ALGOS = {
    "sft": Algo("sft.py", "optimizer step", [Panel("eval_loss", [Series("held-out NLL per token", metric("eval_loss"))],
                                                   "held-out loss")], ["--eval_steps", "10"]),
    "reward": Algo("reward.py", "optimizer step",
                   [Panel("eval_accuracy", [Series("held-out pairs", metric("eval_accuracy"))],
                          "held-out pairwise accuracy")], ["--eval_steps", "25"]),
    "dpo": Algo("dpo.py", "optimizer step",
                [Panel("eval_rewards/accuracies", [Series("held-out pairs", metric("eval_rewards/accuracies"))],
                       "held-out implicit-reward accuracy"), sentiment_panel("policy", "reference"),
                 grammar_panel("policy", "reference")],
                PREFERENCE_LOGGING),
    "kto": Algo("kto.py", "optimizer step",
                [Panel("eval_rewards/margins", [Series("desirable - undesirable", metric("eval_rewards/margins"))],
                       "held-out implicit-reward margin"), sentiment_panel("policy", "reference"),
                 grammar_panel("policy", "reference")],
                PREFERENCE_LOGGING),
    "orpo": Algo("orpo.py", "optimizer step",
                 [Panel("eval_rewards/accuracies", [Series("held-out pairs", metric("eval_rewards/accuracies"))],
                        "held-out implicit-reward accuracy"), sentiment_panel("policy"),
                 grammar_panel("policy")], PREFERENCE_LOGGING),
    "cpo": Algo("cpo.py", "optimizer step",
                [Panel("eval_rewards/accuracies", [Series("held-out pairs", metric("eval_rewards/accuracies"))],
                       "held-out implicit-reward accuracy"), sentiment_panel("policy"),
                 grammar_panel("policy")], PREFERENCE_LOGGING),
    "ppo": Algo("ppo.py", "PPO step",
                [Panel("env/reward_mean", [Series("tiny-reward score", metric("env/reward_mean"))], "reward"),
                 Panel("objective/kl", [Series("KL to reference (nats)", metric("objective/kl"), "C3")], "KL"),
                 sentiment_panel("response", title="ground truth of rollouts", label="rollouts"),
                 grammar_panel("response", title="rollouts' sentences in the tiny grammar", label="rollouts")]),
    "best_of_n": Algo("best_of_n.py", "n (samples per prompt)",
                      [Panel("mean reward", [Series("chosen sample", best_of_n_reward)], "reward of the best of n"),
                       sentiment_panel("response", group_key="n", title="ground truth of the chosen sample",
                                       label="chosen sample"),
                       grammar_panel("response", group_key="n", title="chosen samples' sentences in the grammar",
                                     label="chosen sample")],
                      logx=True),
    "iterative_sft": Algo("iterative_sft.py", "iteration",
                          [Panel("reward/mean", [Series("fresh samples", metric("reward/mean", "iteration"))],
                                 "reward of fresh samples"),
                           sentiment_panel("response", title="ground truth of fresh samples", label="fresh samples"),
                           grammar_panel("response", title="fresh samples' sentences in the grammar",
                                         label="fresh samples")]),
    "grpo": online_rl("grpo.py", Panel("entropy", [Series("per-token entropy (nats)", metric("entropy"), "C3")],
                                       "entropy")),
    "rloo": online_rl("rloo.py", Panel("kl", [Series("KL to reference per token (nats)", metric("kl"), "C3")],
                                       "KL")),
    # the tool world (assets/tiny_tools.py): the reward is the ground truth itself (the answer is the episode's rating)
    "grpo_tools": Algo("grpo.py", "optimizer step",
                       [Panel("reward", [Series("answers right (correct)", metric("reward"))], "reward",
                              ylim=(0.0, 1.05)),
                        Panel("calls per rollout", [Series("tools/call_frequency", metric("tools/call_frequency"),
                                                           "C3")], "tool calls"),
                        Panel("failed / calls", [Series("tools/failure_frequency",
                                                        metric("tools/failure_frequency"), "C4")],
                              "failed calls (wrong title: 'unknown')", ylim=(0.0, 1.05))],
                       ["--model_name_or_path", str(REPO / "assets" / "tiny-tools"), "--dataset_name",
                        str(REPO / "assets" / "data" / "tool_prompts"), "--environment_factory",
                        f"{REPO / 'assets' / 'tiny_tools.py'}:MovieRatings", "--reward_funcs",
                        f"{REPO / 'assets' / 'tiny_tools.py'}:correct", "--max_completion_length", "48",
                        "--learning_rate", "2e-4"]),
    "distill": Algo("distill.py", "optimizer step",
                    [Panel("eval_loss", [Series("held-out KL(student || teacher) per token", metric("eval_loss"))],
                           "held-out reverse KL to the teacher"),
                     Panel("loss", [Series("fresh completions, per token", metric("loss"), "C3")], "training loss"),
                     sentiment_panel("completion", title="ground truth of completions (teacher: about 0.76)",
                                     label="completions"),
                     grammar_panel("completion", title="completions' sentences in the tiny grammar",
                                   label="completions")],
                    ["--eval_steps", "5"]),
    "ddpo": Algo("ddpo.py", "epoch",
                 [Panel("reward_mean", [Series("mean image brightness", metric("reward_mean", "epoch"))],
                        "reward (brightness)")]),
}


def run_dir(output_dir: Path, algo: str, seed: int) -> Path:
    return output_dir / algo / f"seed{seed}"


def command(algo: str, seed: int, output_dir: Path) -> list[str]:
    spec = ALGOS[algo]
    return [sys.executable, str(REPO / spec.script), *spec.extra_args, "--seed", str(seed),
            "--output_dir", str(run_dir(output_dir, algo, seed))]


def train(algo: str, seed: int, output_dir: Path, threads: int) -> float:
    """Run one script (fresh output directory, log to <run>.log); return its wall time. Raises on failure."""
    run = run_dir(output_dir, algo, seed)
    if run.exists():  # a fresh run every time: the scripts would resume or append otherwise
        shutil.rmtree(run)
    run.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(algo, seed, output_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    print(" ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    with open(run.parent / f"seed{seed}.log", "w") as log:
        returncode = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if returncode:
        raise RuntimeError(f"{algo} seed {seed} failed with exit code {returncode}; see {run.parent}/seed{seed}.log")
    (run / "learning_curve_run.json").write_text(json.dumps(
        {"command": cmd[1:], "seconds": seconds, "threads": threads}, indent=1) + "\n")
    print(f"  {seconds:.1f} s", flush=True)
    return seconds


def aggregate(values: list[dict[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """x values common to all seeds, and the (seeds, x) matrix of values there."""
    xs = sorted(set.intersection(*(set(v) for v in values)))
    return np.array(xs, dtype=float), np.array([[v[x] for x in xs] for v in values], dtype=float)


def plot(algo: str, seeds: list[int], output_dir: Path, figure_dir: Path) -> tuple[Path, dict]:
    """Draw docs/curves/<algo>.png from the seeds' runs; return its path and the mean first/last value per series."""
    spec = ALGOS[algo]
    runs = [run_dir(output_dir, algo, seed) for seed in seeds]
    missing = [str(run) for run in runs if not (run / "metrics.jsonl").exists()]
    if missing:
        raise FileNotFoundError(f"{algo}: no finished run in {', '.join(missing)} (run without --replot first)")
    rows, columns = {1: (1, 1), 2: (1, 2), 3: (1, 3), 4: (2, 2)}[len(spec.panels)]
    fig, axes = plt.subplots(rows, columns, figsize=(3 + 3 * columns, 0.5 + 3 * rows), dpi=100, squeeze=False)
    summary = {}
    for ax, panel in zip(axes.flat, spec.panels):
        for series in panel.series:
            xs, ys = aggregate([series.read(run) for run in runs])
            mean = ys.mean(axis=0)
            ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=series.color, alpha=0.25, linewidth=0)
            ax.plot(xs, mean, color=series.color, marker="o" if len(xs) <= 12 else None, markersize=3,
                    label=f"{series.label}: mean")
            summary[f"{panel.ylabel} ({series.label})"] = {
                "x": [xs[0], xs[-1]], "mean": [round(float(mean[0]), 4), round(float(mean[-1]), 4)],
                "min_max_last": [round(float(ys[:, -1].min()), 4), round(float(ys[:, -1].max()), 4)]}
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(spec.xlabel)
        ax.set_ylabel(panel.ylabel)
        if panel.ylim:
            ax.set_ylim(*panel.ylim)
        if spec.logx:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(int(x)) for x in xs])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title=f"band: min-max of {len(seeds)} seeds", title_fontsize=7)
    fig.suptitle(f"{spec.script} on the tiny world ({len(seeds)} seeds: {', '.join(map(str, seeds))})", fontsize=11)
    fig.tight_layout()
    figure_dir.mkdir(parents=True, exist_ok=True)
    path = figure_dir / f"{algo}.png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    # a 256-colour palette keeps a 3-panel PNG near 25 KB instead of 90 KB, with no visible change
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    return path, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", nargs="+", choices=list(ALGOS), default=list(ALGOS), metavar="ALGO",
                        help=f"scripts to run (default: all of {' '.join(ALGOS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (one run each)")
    parser.add_argument("--output_dir", type=Path, default=REPO / "runs" / "learning_curves",
                        help="where the runs go (OUTPUT_DIR/<algo>/seed<S>)")
    parser.add_argument("--figure_dir", type=Path, default=REPO / "docs" / "curves", help="where the PNGs go")
    parser.add_argument("--replot", action="store_true", help="only re-read existing runs and redraw, no training")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    args = parser.parse_args()
    output_dir = args.output_dir.resolve()

    start, failed, timings = time.perf_counter(), [], {}
    for algo in args.algos:
        if not args.replot:
            try:
                timings[algo] = [round(train(algo, seed, output_dir, args.threads), 1) for seed in args.seeds]
            except RuntimeError as error:
                print(error, file=sys.stderr)
                failed.append(algo)
                continue
        path, summary = plot(algo, args.seeds, output_dir, args.figure_dir)
        print(f"{algo}: wrote {path} ({path.stat().st_size / 1024:.0f} KB)")
        for name, values in summary.items():
            (first, last), (low, high) = values["mean"], values["min_max_last"]
            print(f"  {name}: {first:.3g} at {values['x'][0]:g} -> {last:.3g} at {values['x'][1]:g} "
                  f"(last: min {low:.3g}, max {high:.3g})")
    if timings:
        print("seconds per run:", json.dumps(timings))
    print(f"total {time.perf_counter() - start:.0f} s")
    if failed:
        sys.exit(f"failed: {' '.join(failed)}")


if __name__ == "__main__":
    main()
