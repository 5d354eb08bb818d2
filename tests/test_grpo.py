"""grpo.py end to end on the tiny world: learning with the reward model and with a Python reward function (the
saved model's samples are more positive by the ground truth), two processes against one at the same global batch,
exact resume, the KL term, reward functions that break their contract, and bad command lines."""

import json

import pytest
import torch
from conftest import (ASSETS, ONLINE_RL_SMALL, assert_each_fails_with_one_line, assert_online_rl_learns,
                      assert_online_rl_two_processes_match_one,
                      assert_resumed_run_ends_where_the_uninterrupted_run_ends, error_line, metric_series,
                      read_metrics, run_main_in_process, run_ok, run_script)
from safetensors.torch import load_file

from grpo import score_completions

TINY = ASSETS / "tiny-gpt2"


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


@pytest.mark.slow
def test_a_batch_no_reward_function_scores_is_skipped_with_a_warning_and_a_broken_one_stops(tmp_path):
    (tmp_path / "rewards.py").write_text(
        "def never(prompts, completions, **columns):\n    return [None] * len(completions)\n\n"
        "def short(prompts, completions, **columns):\n    return [0.0]\n")
    result = run_ok("grpo.py", "--reward_funcs", f"{tmp_path / 'rewards.py'}:never", "--max_steps", 2,
                    "--per_device_train_batch_size", 16, "--max_completion_length", 8, "--output_dir", tmp_path / "a")
    assert "no reward function scored any completion" in result.stdout + result.stderr
    assert all(row["loss"] == 0.0 for row in read_metrics(tmp_path / "a"))  # advantages 0: no NaN, no update
    before, after = load_file(TINY / "model.safetensors"), load_file(tmp_path / "a" / "model.safetensors")
    assert all(torch.equal(before[name], after[name]) for name in before)
    line = error_line(run_script("grpo.py", "--reward_funcs", f"{tmp_path / 'rewards.py'}:short", "--max_steps", 1,
                                 "--output_dir", tmp_path / "b"))
    assert line == "grpo.py: error: reward function short must return one value per completion (32), got 1 values"


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
        (["--dataset_name", tmp_path / "no_prompt.jsonl"], "expected a 'prompt' or 'query' column"),
        (["--top_entropy_quantile", 0], "--top_entropy_quantile must be in (0, 1]"),
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
