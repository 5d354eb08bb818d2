"""Shared fixtures: run a script as a user would, read its metrics, and build a Llama-style tiny model.

Everything is offline: the tiny world under assets/ is every test's fixture.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(ASSETS))

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(OFFLINE_ENV)
# The suite runs as two pytest workers (README: `-n 2`) on two cores, so each torch process gets one thread: two
# processes with two threads each thrash, and on the tiny world a second thread saves almost nothing (ddpo.py: 65 s
# with two, 67 s with one). Set before torch is imported here; every script a test starts inherits it, so runs that
# are compared bit for bit always use the same thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_script(script: str, *args, cwd: Path | None = None, launcher: list[str] | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python <script> args...` (or `<launcher> <script> args...`) and return the finished process."""
    command = (launcher or [sys.executable]) + [str(REPO / script)] + [str(arg) for arg in args]
    return subprocess.run(command, cwd=cwd or REPO, env={**os.environ, **OFFLINE_ENV}, capture_output=True,
                          text=True, timeout=timeout)


def run_ok(script: str, *args, **kwargs) -> subprocess.CompletedProcess:
    """run_script that fails the test with the script's own output when it exits non-zero."""
    result = run_script(script, *args, **kwargs)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


TWO_PROCESSES = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", "0"]  # a free port: the other pytest worker may be running two processes too


def run_main_in_process(monkeypatch, script: str, *args) -> str:
    """A script's __main__ in this process, for command lines that must fail before any model loads (the imports are
    already paid for: seconds saved per case); returns the message it exits with."""
    import runpy

    monkeypatch.setattr(sys, "argv", [script, *[str(arg) for arg in args]])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / script), run_name="__main__")
    return str(exit_info.value.code)


def assert_each_fails_with_one_line(monkeypatch, script: str, cases: list, output_dir: Path) -> None:
    """Each (args, message) case: the script's __main__ (in process) exits with one line that starts with
    '<script>: error:' and contains the message, and writes nothing to output_dir."""
    for args, message in cases:
        line = run_main_in_process(monkeypatch, script, *args, "--output_dir", output_dir)
        assert line.startswith(f"{script}: error:") and message in line and "\n" not in line, line
    assert not Path(output_dir).exists()  # nothing was written


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a failed run ends with (asserting that it did fail)."""
    assert result.returncode != 0, f"expected a failure, got exit 0:\n{result.stdout[-2000:]}"
    return result.stderr.strip().splitlines()[-1]


def mean_sentiment_of_samples(model_dir, prompts, chat: bool = False, n_tokens: int = 48) -> float:
    """Sample one answer per prompt (seeded) and average the ground-truth sentiment of the answers."""
    import torch
    from tiny_world import sentiment_score
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if chat:
        prompts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    torch.manual_seed(0)
    with torch.no_grad():
        output = model.generate(**batch, do_sample=True, top_k=0, max_new_tokens=n_tokens, pad_token_id=pad)
    answers = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(sentiment_score(answer) for answer in answers) / len(answers)


def answer_logps(model_dir, rows: list[dict], average: bool = False) -> list[tuple[float, float]]:
    """(log p(chosen | prompt), log p(rejected | prompt)) under a saved model, for string preference rows, computed
    here with plain transformers (independently of the scripts): the sum, or the per-token mean, over the answer
    tokens and the EOS that ends them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    sequences, answer_starts = [], []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        for answer in (row["chosen"], row["rejected"]):
            sequences.append(prompt + tokenizer(answer, add_special_tokens=False)["input_ids"] +
                             [tokenizer.eos_token_id])
            answer_starts.append(len(prompt))
    logps = []
    with torch.no_grad():
        for start in range(0, len(sequences), 64):
            chunk = sequences[start : start + 64]
            longest = max(len(ids) for ids in chunk)
            input_ids = torch.tensor([ids + [0] * (longest - len(ids)) for ids in chunk])
            attention_mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in chunk])
            log_probs = torch.log_softmax(model(input_ids, attention_mask=attention_mask).logits.float(), dim=-1)
            for b, ids in enumerate(chunk):
                first = answer_starts[start + b]
                token_logps = [log_probs[b, t - 1, ids[t]].item() for t in range(first, len(ids))]
                logps.append(sum(token_logps) / (len(token_logps) if average else 1))
    return list(zip(logps[0::2], logps[1::2]))


def assert_prefers_chosen_and_writes_more_positive_reviews(output_dir: Path) -> None:
    """The reference-free preference scripts' learning check, on the tiny world's held-out pairs: the trained policy
    gives the chosen answer a higher per-token mean log-prob than the rejected one in >= 90% of the pairs (computed
    here, independently of the script), and its sampled answers to the first 64 prompts are more positive than the
    initial policy's by at least 0.3 of ground-truth sentiment."""
    rows = [json.loads(line) for line in (ASSETS / "data" / "preference" / "test.jsonl").read_text().splitlines()]
    logps = answer_logps(output_dir, rows, average=True)
    accuracy = sum(chosen > rejected for chosen, rejected in logps) / len(logps)
    assert accuracy >= 0.9, accuracy
    prompts = [row["prompt"] for row in rows][:64]
    before = mean_sentiment_of_samples(ASSETS / "tiny-gpt2", prompts)
    after = mean_sentiment_of_samples(output_dir, prompts)
    assert after > before + 0.3, (before, after)


def help_text(args_class, capsys) -> str:
    """A script's --help, produced in-process as the script's entry point parses (`tyro.cli(Args,
    use_underscores=True)`), which saves the seconds a subprocess spends importing torch and transformers."""
    import tyro

    with pytest.raises(SystemExit):
        tyro.cli(args_class, args=["--help"], use_underscores=True)
    return capsys.readouterr().out


def assert_help_lists(args_class, capsys, flags: list[str]) -> None:
    """--help names every flag as users type it, with underscores (`--learning_rate`)."""
    text = help_text(args_class, capsys)
    for flag in flags:
        assert flag.replace("-", "_").replace("__", "--", 1) in text, flag


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def metric_series(output_dir: Path, key: str) -> list[float]:
    return [row[key] for row in read_metrics(output_dir) if key in row]


def relative_weight_difference(a: dict, b: dict, initial: dict) -> float:
    """||a - b|| / ||a - initial|| over all shared tensors: how far two trainings ended apart, relative to how far
    training moved. (Element-wise comparison is too strict under Adam: parameters whose true gradient is zero,
    such as attention key biases, take lr-sized steps on float noise.)"""
    import torch

    names = [name for name in initial if name in a and name in b]
    apart = torch.cat([(a[name] - b[name]).flatten() for name in names]).norm()
    moved = torch.cat([(a[name] - initial[name]).flatten() for name in names]).norm()
    return (apart / moved).item()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A Llama-style tiny model built from config: random init, a tokenizer that adds BOS and has NO pad token, and a
    chat template that starts with BOS (the case where naive pipelines double the BOS or never learn EOS)."""
    import torch
    from tokenizers import processors
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    bos = "<|begin_of_text|>"
    bos_id = tokenizer.convert_tokens_to_ids(bos)
    tokenizer.bos_token = bos
    tokenizer.pad_token = None
    tokenizer._tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]),
    ])
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=bos_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def assert_same_training_however_the_global_batch_is_split(script: str, args: list, tmp_path: Path) -> None:
    """Train on global batches of 8 three ways: 1 process x 8, 1 process x 4 x 2 accumulation steps, and
    `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU) x 4. They must be the same training."""
    from safetensors.torch import load_file

    run_ok(script, *args, "--output_dir", tmp_path / "one", "--per_device_train_batch_size", 8)
    run_ok(script, *args, "--output_dir", tmp_path / "accumulated", "--per_device_train_batch_size", 4,
           "--gradient_accumulation_steps", 2)
    run_ok(script, *args, "--output_dir", tmp_path / "two", "--per_device_train_batch_size", 4,
           launcher=TWO_PROCESSES)
    one = load_file(tmp_path / "one" / "model.safetensors")
    initial = load_file(ASSETS / "tiny-gpt2" / "model.safetensors")
    for other in ["accumulated", "two"]:
        # Adam ignores the gradient's scale, so the scale-sensitive gradient norm is what shows the normalisation
        for key, tolerance in [("loss", 1e-4), ("grad_norm", 1e-3), ("eval_loss", 1e-4)]:
            expected = metric_series(tmp_path / "one", key)
            assert expected and metric_series(tmp_path / other, key) == pytest.approx(expected, rel=tolerance), \
                (other, key)
        weights = load_file(tmp_path / other / "model.safetensors")
        assert relative_weight_difference(one, weights, initial) < 1e-2, other
    # and training really moved the weights, so the comparisons above are not trivially true
    assert max((one[name] - initial[name]).abs().max().item() for name in initial) > 1e-3


def assert_resumed_run_ends_where_the_uninterrupted_run_ends(script: str, args: list, tmp_path: Path,
                                                            save_steps: int = 6) -> None:
    """Run `args` with checkpoints every save_steps; resume from the first checkpoint, copied alone into a fresh
    directory; the resumed run must log the same metrics after the checkpoint and end on the same weights."""
    import shutil

    import torch
    from safetensors.torch import load_file

    run_ok(script, *args, "--save_steps", save_steps, "--output_dir", tmp_path / "full")
    checkpoint = tmp_path / f"checkpoint-{save_steps}"
    shutil.copytree(tmp_path / "full" / checkpoint.name, checkpoint)
    run_ok(script, *args, "--output_dir", tmp_path / "resumed", "--resume_from_checkpoint", checkpoint)
    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.allclose(full[name], resumed[name], atol=1e-6), name
    timing = {"samples_per_second", "tokens_per_second", "peak_memory_mb"}
    after = [row for row in read_metrics(tmp_path / "full") if row["step"] > save_steps]
    logged = read_metrics(tmp_path / "resumed")
    assert [row["step"] for row in logged] == [row["step"] for row in after]
    for expected, got in zip(after, logged):
        assert expected.keys() == got.keys()
        for key in expected.keys() - timing:
            if key.startswith("time/"):  # wall times (grpo.py, rloo.py)
                continue
            assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-6), (expected["step"], key)


# grpo.py and rloo.py share their rollout and checkpoint blocks; these checks run each of them.
ONLINE_RL_SMALL = ["--per_device_train_batch_size", 16, "--max_completion_length", 12]


def assert_online_rl_two_processes_match_one(script: str, keys: list[str], tmp_path: Path) -> None:
    """1 process x 2 accumulated micro-batches of 16 and 2 processes x 16, 2 steps: the same samples (each micro-batch
    is seeded by its place in the generation batch), the same advantages and normalisation, so the same metrics and
    weights."""
    import torch
    from safetensors.torch import load_file

    run_ok(script, *ONLINE_RL_SMALL, "--max_steps", 2, "--gradient_accumulation_steps", 2,
           "--output_dir", tmp_path / "one")
    run_ok(script, *ONLINE_RL_SMALL, "--max_steps", 2, "--output_dir", tmp_path / "two", launcher=TWO_PROCESSES)
    for key in keys:
        assert metric_series(tmp_path / "two", key) == pytest.approx(metric_series(tmp_path / "one", key),
                                                                     rel=1e-4, abs=1e-6), key
    one, two = (load_file(tmp_path / run / "model.safetensors") for run in ("one", "two"))
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5), name


def assert_online_rl_learns(script: str, reward_args: list, metric: str, rise: float, tmp_path: Path,
                            ground_truth_rise: float) -> Path:
    """The script's default run (40 steps), with reward_args: `metric` rises by more than `rise` from the first 5 steps
    to the last 5, and the saved model (plain AutoModelForCausalLM) writes reviews more positive by the ground truth
    than the initial policy does, by more than ground_truth_rise. Returns the output directory."""
    output_dir = tmp_path / "out"
    run_ok(script, *reward_args, "--output_dir", output_dir)
    rewards = metric_series(output_dir, metric)
    assert len(rewards) == 40 and sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + rise, rewards
    prompts = [json.loads(line)["prompt"] for line in
               (ASSETS / "data" / "prompts" / "test.jsonl").read_text().splitlines()][:64]
    before = mean_sentiment_of_samples(ASSETS / "tiny-gpt2", prompts, n_tokens=24)
    after = mean_sentiment_of_samples(output_dir, prompts, n_tokens=24)
    assert after > before + ground_truth_rise, (before, after)
    return output_dir


# The tiny tool world (assets/tiny_tools.py): the warm-started policy, its questions, the environment and the reward.
TOOL_WORLD = ["--model_name_or_path", ASSETS / "tiny-tools", "--dataset_name", ASSETS / "data" / "tool_prompts",
              "--environment_factory", f"{ASSETS / 'tiny_tools.py'}:MovieRatings", "--reward_funcs",
              f"{ASSETS / 'tiny_tools.py'}:correct", "--max_completion_length", 48]


def tool_world_scores(model_dir, environment: str = "MovieRatings", n: int = 128) -> dict[str, float]:
    """Roll out a saved policy on the tool world's held-out questions with grpo.py's roll_out, under the environment
    class `environment` of assets/tiny_tools.py (the real one, or one whose tool is broken), sampling at temperature
    1 with a fixed seed: the fraction of rollouts that call the tool, the accuracy of the answers against the
    episode's rating, and how often the answer repeats what the tool said (of the rollouts that called it)."""
    import random

    import tiny_tools
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo import environment_tools, format_query, roll_out, tool_schema

    random.seed(0)  # the episodes' ratings
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = [json.loads(line) for line in (ASSETS / "data" / "tool_prompts" / "test.jsonl").read_text().splitlines()]
    rows = (rows * (n // len(rows) + 1))[:n]
    environments = [getattr(tiny_tools, environment)() for _ in rows]
    for environment_, row in zip(environments, rows):
        environment_.reset(**row)
    schemas = [tool_schema("", "", name, tool) for name, tool in environment_tools(environments[0]).items()]
    queries = [tokenizer(format_query(row["prompt"], tokenizer, schemas)[0], add_special_tokens=False)["input_ids"]
               for row in rows]
    rollouts = []
    for start in range(0, n, 64):
        part = slice(start, start + 64)
        rollouts += roll_out(model, tokenizer, queries[part], 48, seed=start, tools=[
            environment_tools(environment_) for environment_ in environments[part]], tool_schemas=schemas,
            max_length=256, parse=True, do_sample=True, temperature=1.0, top_k=0)
    completions = [rollout.messages for rollout in rollouts]
    followed = [value for value in tiny_tools.follows_tool(None, completions, environments) if value is not None]
    return {"calls": sum(rollout.calls > 0 for rollout in rollouts) / n,
            "accuracy": sum(tiny_tools.correct(None, completions, environments)) / n,
            "follows_tool": sum(followed) / max(1, len(followed))}
