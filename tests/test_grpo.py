"""grpo.py end to end on the tiny world: learning with the reward model and with a Python reward function (the
saved model's samples are more positive by the ground truth), two processes against one at the same global batch,
exact resume, SIGTERM then `--resume_from_checkpoint latest`, the KL term, reward functions that break their contract
(a wrong signature, an exception, nothing scored: the assert_* helpers below, which tests/test_rloo.py runs too), and
bad command lines."""

import json
import signal

import pytest
import torch
from conftest import (ASSETS, ONLINE_RL_SMALL, TWO_PROCESSES, assert_each_fails_with_one_line,
                      assert_online_rl_learns, assert_online_rl_two_processes_match_one,
                      assert_resumed_run_ends_where_the_uninterrupted_run_ends, error_line, metric_series,
                      read_metrics, run_main_in_process, run_ok, run_script)
from test_runs import same_weights, signal_at_step, snapshot

from grpo import check_reward_signature, score_completions


@pytest.mark.slow
@pytest.mark.parametrize("reward, metric, rise", [
    ([], "rewards/tiny-reward/mean", 4.0),  # the default: the tiny world's reward model (about -0.6 -> 10)
    (["--reward_funcs", ASSETS / "tiny_rewards.py:sentiment"], "rewards/sentiment/mean", 0.15),  # about 0 -> 0.35
])
def test_default_run_learns_and_the_saved_model_writes_more_positive_reviews(tmp_path, reward, metric, rise):
    output_dir = assert_online_rl_learns("grpo.py", reward, metric, rise, tmp_path, ground_truth_rise=0.15)
    assert metric_series(output_dir, "reward") == metric_series(output_dir, metric)  # one reward, weight 1
    row = read_metrics(output_dir)[-1]
    for key in ("loss", "entropy", "clip_ratio/region_mean", "reward_std", "frac_reward_zero_std",
                "completions/mean_length", "completions/clipped_ratio", "samples_per_second", "grad_norm"):
        assert key in row, key
    samples = [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 40 * 32 and {"step", "prompt", "completion", "advantage"} <= set(samples[0])


@pytest.mark.slow
def test_two_processes_make_the_update_of_one_process_at_the_same_global_batch(tmp_path):
    assert_online_rl_two_processes_match_one(
        "grpo.py", ["reward", "reward_std", "completions/mean_length", "loss", "grad_norm"], tmp_path)


@pytest.mark.slow
def test_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path):
    assert_resumed_run_ends_where_the_uninterrupted_run_ends(script="grpo.py", tmp_path=tmp_path, save_steps=2,
                                                            args=[*ONLINE_RL_SMALL, "--max_steps", 4])


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--use_peft"]])
def test_beta_adds_the_kl_to_the_reference_which_starts_at_zero(tmp_path, extra):
    """With beta the reference is the initial policy (a frozen copy, or the adapters-off policy with LoRA): the KL is
    0 before the first update and positive after it; several passes over a batch (num_iterations 2) compute the old
    log-probs and clip."""
    run_ok("grpo.py", "--max_steps", 4, "--beta", 0.1, "--num_iterations", 2, "--per_device_train_batch_size", 16,
           "--max_completion_length", 12, *extra, "--output_dir", tmp_path / "out")
    kl = metric_series(tmp_path / "out", "kl")
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 1e-4, kl


def test_score_completions_turns_none_into_nan_and_rejects_broken_reward_functions():
    def fine(prompts, completions, completion_ids, **columns):
        return [len(c) if c else None for c in completions]

    def short(prompts, completions, **columns):
        return [1.0]

    def words(prompts, completions, **columns):
        return ["good" for _ in completions]

    def columns_seen(prompts, completions, answer, **columns):
        return [float(c == a) for c, a in zip(completions, answer)]

    scores = score_completions([("fine", fine), ("answer", columns_seen)], ["p", "q"], ["abc", ""], [[1], [2]],
                               {"answer": ["abc", "x"]})
    assert scores[0].tolist() == [3.0, 1.0] and torch.isnan(scores[1, 0]) and scores[1, 1] == 0.0
    with pytest.raises(ValueError, match="reward function short must return one value per completion \\(2\\), got 1"):
        score_completions([("short", short)], ["p", "q"], ["a", "b"], [[1], [2]], {})
    with pytest.raises(ValueError, match="reward function words returned 'good' \\(str\\) for completion 0"):
        score_completions([("words", words)], ["p", "q"], ["a", "b"], [[1], [2]], {})

    def raises(prompts, completions, **columns):
        return [1 / 0 for _ in completions]

    with pytest.raises(ValueError, match=r"^reward function raises raised ZeroDivisionError: division by zero "
                                         r"\(test_grpo.py, line \d+\)$"):
        score_completions([("raises", raises)], ["p", "q"], ["a", "b"], [[1], [2]], {})


def test_a_reward_function_must_take_trls_keywords_and_the_dataset_columns():
    """TRL calls f(prompts=, completions=, completion_ids=, **columns): these pass, by name or through **kwargs."""
    def named(prompts, completions, completion_ids, answer):
        return []

    def through_kwargs(completions, **kwargs):
        return []

    def keyword_only(*, completion_ids, answer=None, **kwargs):
        return []

    for function in (named, through_kwargs, keyword_only):
        check_reward_signature(f"r.py:{function.__name__}", function)  # when the file is loaded
        check_reward_signature(f"r.py:{function.__name__}", function, ["answer"])  # once the columns are known

    def positional_only(prompts, completions, /, **kwargs):
        return []

    def no_columns(prompts, completions, completion_ids):
        return []

    with pytest.raises(ValueError, match=r"^--reward_funcs r.py:positional_only: reward function positional_only must "
                                         r"accept the keyword arguments prompts, completions, completion_ids, as TRL "
                                         r"calls it \(or take \*\*kwargs\); it has positional_only\(prompts, "
                                         r"completions, /, \*\*kwargs\): 'prompts' parameter is positional only, "
                                         r"but was passed as a keyword$"):
        check_reward_signature("r.py:positional_only", positional_only)
    check_reward_signature("r.py:no_columns", no_columns, [])
    with pytest.raises(ValueError, match=r"it has named\(prompts, completions, completion_ids, answer\): missing a "
                                         r"required argument: 'answer'$"):  # a column the dataset does not have
        check_reward_signature("r.py:named", named, [])
    with pytest.raises(ValueError, match=r"completion_ids and the dataset's other columns \(answer, level\), as TRL "
                                         r".* it has no_columns\(prompts, completions, completion_ids\): got an "
                                         r"unexpected keyword argument 'answer'$"):
        check_reward_signature("r.py:no_columns", no_columns, ["answer", "level"])


# A reward file for the tests of broken reward functions: `fragile` scores its first two generation batches, raises on
# the third (on process FAIL_RANK only, when that is set) unless the file FIXED exists, and scores every later one.
REWARDS = """import os

calls = [0]


def fragile(prompts, completions, **columns):
    calls[0] += 1
    if calls[0] == 3 and os.environ.get("RANK", "0") == os.environ.get("FAIL_RANK", os.environ.get("RANK", "0")) \\
            and not os.path.exists(os.environ.get("FIXED", "")):
        raise ValueError("cannot score\\n this batch")
    return [float(len(completion)) for completion in completions]


def steady(prompts, completions, **columns):
    return [float(len(completion)) for completion in completions]


def unscored(prompts, completions, **columns):
    return [float("nan") if i % 2 else None for i, _ in enumerate(completions)]


def unscored_once(prompts, completions, **columns):
    calls[0] += 1
    return [None if calls[0] == 1 else float(len(completion)) for completion in completions]


def one_argument(x):
    return [0.0] * len(x)
"""
BROKEN_REWARD_ARGS = ["--per_device_train_batch_size", 16, "--max_completion_length", 8]


def assert_a_wrong_signature_is_one_line_before_anything_loads(monkeypatch, capsys, tmp_path, script: str) -> None:
    """A reward function that cannot take TRL's call: one line naming it, what it must accept and what it has, before
    any model loads; the previous run in the default output_dir (which a fresh run would move aside) is untouched."""
    (tmp_path / "rewards.py").write_text(REWARDS)
    (tmp_path / "with_answer.jsonl").write_text("".join(json.dumps({"prompt": f"Review of {i}:", "answer": "good"})
                                                        + "\n" for i in range(8)))
    monkeypatch.chdir(tmp_path)  # the default output_dir, runs/<script>, is relative to the working directory
    previous = tmp_path / "runs" / script[:-3]
    (previous / "checkpoint-2").mkdir(parents=True)
    (previous / "checkpoint-2" / "training_state.pt").write_bytes(b"state")
    (previous / "metrics.jsonl").write_text('{"step": 2, "reward": 1.0}\n')
    before = snapshot(tmp_path / "runs")
    line = run_main_in_process(monkeypatch, script, "--reward_funcs", f"{tmp_path / 'rewards.py'}:one_argument")
    assert line == (f"{script}: error: --reward_funcs {tmp_path / 'rewards.py'}:one_argument: reward function "
                    "one_argument must accept the keyword arguments prompts, completions, completion_ids, as TRL calls "
                    "it (or take **kwargs); it has one_argument(x): got an unexpected keyword argument 'prompts'")
    # a function without **kwargs must also take the dataset's other columns, which TRL passes by name
    (tmp_path / "named.py").write_text("def exact(prompts, completions, completion_ids):\n    return [0.0]\n")
    line = run_main_in_process(monkeypatch, script, "--reward_funcs", f"{tmp_path / 'named.py'}:exact",
                               "--dataset_name", tmp_path / "with_answer.jsonl")
    assert line.startswith(f"{script}: error: --reward_funcs {tmp_path / 'named.py'}:exact: reward function exact "
                           "must accept the keyword arguments prompts, completions, completion_ids and the dataset's "
                           "other columns (answer)") and "\n" not in line, line
    assert line.endswith("it has exact(prompts, completions, completion_ids): got an unexpected keyword argument "
                         "'answer'"), line
    assert "parameters," not in capsys.readouterr().out  # no model was loaded
    assert snapshot(tmp_path / "runs") == before and [path.name for path in (tmp_path / "runs").iterdir()] == [
        script[:-3]]


def assert_a_raising_reward_function_saves_the_last_step_and_latest_resumes(monkeypatch, tmp_path, script: str,
                                                                            compare: bool) -> None:
    """A reward function that raises at step 3: one line naming the function, the step and the error, after a
    checkpoint of step 2 (the last completed one); once fixed, the same command with --resume_from_checkpoint latest
    resumes from it and (compare) ends on the weights of a run whose function never raised."""
    (tmp_path / "rewards.py").write_text(REWARDS)
    monkeypatch.setenv("FIXED", str(tmp_path / "fixed"))
    command = ["--reward_funcs", f"{tmp_path / 'rewards.py'}:fragile", *BROKEN_REWARD_ARGS, "--max_steps", 4,
               "--output_dir", tmp_path / "run"]
    failed = run_script(script, *command)
    raise_line = REWARDS.splitlines().index('        raise ValueError("cannot score\\n this batch")') + 1
    assert error_line(failed) == (
        f"{script}: error: at step 3: reward function fragile raised ValueError: cannot score this batch (rewards.py, "
        f"line {raise_line}); saved {tmp_path / 'run' / 'checkpoint-2'}, the last completed step (once fixed, "
        "--resume_from_checkpoint latest)")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert [path.name for path in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-2"]
    assert [row["step"] for row in read_metrics(tmp_path / "run")] == [1, 2]
    (tmp_path / "fixed").touch()
    resumed = run_ok(script, *command, "--resume_from_checkpoint", "latest")
    assert f"resuming from the latest checkpoint, {tmp_path / 'run' / 'checkpoint-2'}" in resumed.stdout
    assert "at step 2" in resumed.stdout and [row["step"] for row in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    if compare:
        run_ok(script, "--reward_funcs", f"{tmp_path / 'rewards.py'}:steady", *BROKEN_REWARD_ARGS, "--max_steps", 4,
               "--output_dir", tmp_path / "whole")
        assert same_weights(tmp_path / "run", tmp_path / "whole")


def assert_a_run_no_reward_scores_stops_with_strict_json_metrics(tmp_path, script: str, max_steps: int) -> None:
    """A reward function that returns only None and NaN: the run stops at the MAX_UNSCORED_GENERATIONS-th (3rd)
    generation batch in a row, or at the last batch of a shorter run, with a checkpoint of the step before, instead of
    saving an untrained model; metrics.jsonl holds null, never NaN."""
    (tmp_path / "rewards.py").write_text(REWARDS)
    result = run_script(script, "--reward_funcs", f"{tmp_path / 'rewards.py'}:unscored", *BROKEN_REWARD_ARGS,
                        "--max_steps", max_steps, "--output_dir", tmp_path / "run")
    stop = min(3, max_steps)  # the batch (and step: one batch a step) that stops the run
    batches = "3 generation batches in a row" if max_steps >= 3 else f"any of the run's {max_steps} generation batches"
    assert error_line(result) == (
        f"{script}: error: at step {stop}: no reward function scored any completion (every value None or NaN) in "
        f"{batches}; saved {tmp_path / 'run' / f'checkpoint-{stop - 1}'}, the last completed step (once fixed, "
        "--resume_from_checkpoint latest)")
    assert result.stdout.count("no reward function scored any completion; the batch brings no policy update") == \
        stop - 1
    assert not (tmp_path / "run" / "model.safetensors").exists()  # no final model
    rows = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
            for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, stop))
    assert all(row["reward"] is None and row["rewards/unscored/mean"] is None for row in rows), rows


def test_a_wrong_signature_is_one_line_before_anything_loads(monkeypatch, capsys, tmp_path):
    assert_a_wrong_signature_is_one_line_before_anything_loads(monkeypatch, capsys, tmp_path, "grpo.py")


@pytest.mark.slow
def test_a_raising_reward_function_saves_the_last_step_and_latest_resumes_it_exactly(monkeypatch, tmp_path):
    assert_a_raising_reward_function_saves_the_last_step_and_latest_resumes(monkeypatch, tmp_path, "grpo.py",
                                                                            compare=True)


@pytest.mark.slow
def test_a_reward_function_that_raises_on_one_process_stops_both_with_one_line(monkeypatch, tmp_path):
    """The exception happens on the second process only: both learn of it, save checkpoint-2 together and stop (no
    hang), and the line is printed once."""
    (tmp_path / "rewards.py").write_text(REWARDS)
    monkeypatch.setenv("FAIL_RANK", "1")
    result = run_script("grpo.py", "--reward_funcs", f"{tmp_path / 'rewards.py'}:fragile", "--max_steps", 4,
                        "--per_device_train_batch_size", 8, "--max_completion_length", 8, "--output_dir",
                        tmp_path / "run", launcher=TWO_PROCESSES, timeout=300)  # a hang would be a timeout
    assert result.returncode != 0
    assert result.stderr.count("grpo.py: error: at step 3: reward function fragile raised ValueError") == 1, \
        result.stderr[-3000:]
    (checkpoint,) = (tmp_path / "run").glob("checkpoint-*")
    assert checkpoint.name == "checkpoint-2" and not list((tmp_path / "run").glob("*.incomplete"))
    assert {path.name for path in checkpoint.glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}


@pytest.mark.slow
def test_a_run_no_reward_scores_stops_with_strict_json_metrics(tmp_path):
    assert_a_run_no_reward_scores_stops_with_strict_json_metrics(tmp_path, "grpo.py", max_steps=4)


@pytest.mark.slow
def test_sigterm_saves_the_step_in_progress_and_latest_resumes_to_the_uninterrupted_weights(tmp_path):
    """What Slurm and Kubernetes do: SIGTERM mid-run, then the same command with --resume_from_checkpoint latest."""
    args = [*ONLINE_RL_SMALL, "--max_steps", 10, "--logging_steps", 1]
    interrupted = signal_at_step("grpo.py", args, tmp_path / "run", step=3)
    assert interrupted.returncode == 128 + signal.SIGTERM, interrupted.stderr[-2000:]
    (checkpoint,) = (tmp_path / "run").glob("checkpoint-*")
    assert 3 <= int(checkpoint.name.split("-")[1]) < 10
    assert f"stopped by SIGTERM: saved {checkpoint}; resume with: python " in interrupted.stdout
    resumed = run_ok("grpo.py", *args, "--output_dir", tmp_path / "run", "--resume_from_checkpoint", "latest")
    assert f"resuming from the latest checkpoint, {checkpoint}" in resumed.stdout
    run_ok("grpo.py", *args, "--output_dir", tmp_path / "whole")
    assert same_weights(tmp_path / "run", tmp_path / "whole")
    assert [row["step"] for row in read_metrics(tmp_path / "run")] == list(range(1, 11))


@pytest.mark.slow
def test_a_batch_no_reward_function_scores_is_skipped_with_a_warning_and_a_broken_one_stops(tmp_path):
    (tmp_path / "rewards.py").write_text(REWARDS + "\n\ndef short(prompts, completions, **columns):\n"
                                                   "    return [0.0]\n")
    result = run_ok("grpo.py", "--reward_funcs", f"{tmp_path / 'rewards.py'}:unscored_once", "--max_steps", 2,
                    "--per_device_train_batch_size", 16, "--max_completion_length", 8, "--output_dir", tmp_path / "a")
    assert ("generation 0: no reward function scored any completion; the batch brings no policy update (1 in a row; "
            "the run stops at 2)") in result.stdout
    rows = read_metrics(tmp_path / "a")
    assert rows[0]["loss"] == 0.0 and rows[0]["reward"] is None and rows[1]["reward"] > 0  # advantages 0: no NaN
    line = error_line(run_script("grpo.py", "--reward_funcs", f"{tmp_path / 'rewards.py'}:short", "--max_steps", 1,
                                 "--output_dir", tmp_path / "b"))
    assert line == ("grpo.py: error: at step 1: reward function short must return one value per completion (32), got "
                    "1 values; nothing was saved (no step was completed)")


def test_bad_command_lines_fail_with_one_clear_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    (tmp_path / "no_prompt.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "rewards.py").write_text("def exact(prompts, completions, **columns):\n    return [0.0]\n")
    cases = [
        (["--num_generations", 1], "--num_generations must be at least 2"),
        (["--per_device_train_batch_size", 10], "must be a multiple of --num_generations 8"),
        (["--reward_funcs", tmp_path / "missing.py:exact"], f"there is no file {tmp_path / 'missing.py'}"),
        (["--reward_funcs", f"{tmp_path / 'rewards.py'}:nothing"], "defines no function nothing"),
        (["--reward_funcs", "rewards"], "expected FILE.py:NAME"),
        (["--reward_weights", 1.0, 2.0], "--reward_weights has 2 values but there are 1 rewards"),
        (["--sync_ref_model"], "--sync_ref_model needs a reference model, and --beta 0 loads none"),
        (["--sync_ref_model", "--beta", 0.04, "--use_peft"], "--sync_ref_model moves a separate reference model, and "
                                                            "--use_peft has none"),
        (["--dataset_name", tmp_path / "no_prompt.jsonl"], "expected a 'prompt' or 'query' column"),
        (["--top_entropy_quantile", 0], "--top_entropy_quantile must be in (0, 1]"),
        (["--chunk_size", -1], "--chunk_size must be >= 0 (0: the plain path), got -1"),
        (["--num_iterations", 2, "--save_steps", 1], "--save_steps 1 must be a multiple of the optimizer steps"),
    ]
    assert_each_fails_with_one_line(monkeypatch, "grpo.py", cases, tmp_path / "out")
    assert "parameters," not in capsys.readouterr().out  # no model was loaded


@pytest.mark.parametrize("flag, value", [("--loss_type", "ppo"), ("--importance_sampling_level", "batch"),
                                         ("--scale_rewards", "global")])
def test_an_unknown_choice_names_the_choices(monkeypatch, capsys, flag, value):
    assert run_main_in_process(monkeypatch, "grpo.py", flag, value) == "2"  # tyro's usage error
    message = " ".join(capsys.readouterr().err.split())
    assert f"invalid choice '{value}' for argument '{flag}'" in message  # --help and errors spell flags with _


@pytest.mark.slow
def test_conversational_prompts_give_reward_functions_conversational_completions(tmp_path):
    """As TRL: message-list prompts are rendered with the chat template, and a Python reward function receives each
    completion as [{"role": "assistant", "content": ...}] and the dataset's other columns; reward models get the
    text (scored as reward.py scores conversations)."""
    (tmp_path / "rewards.py").write_text(
        "def shape(prompts, completions, completion_ids, chosen, **columns):\n"
        "    assert isinstance(prompts[0], list) and prompts[0][-1]['role'] == 'user', prompts[0]\n"
        "    assert all(c[0]['role'] == 'assistant' and isinstance(c[0]['content'], str) for c in completions)\n"
        "    assert len(chosen) == len(completions) and isinstance(chosen[0], list)\n"
        "    return [float(len(ids)) for ids in completion_ids]\n")
    run_ok("grpo.py", "--dataset_name", ASSETS / "data" / "preference_conversational", "--reward_funcs",
           f"{tmp_path / 'rewards.py'}:shape", "--reward_model", ASSETS / "tiny-reward", "--max_steps", 2,
           "--per_device_train_batch_size", 16, "--max_completion_length", 8, "--output_dir", tmp_path / "out")
    row = read_metrics(tmp_path / "out")[-1]
    assert 1 <= row["rewards/shape/mean"] <= 8 and "rewards/tiny-reward/mean" in row
