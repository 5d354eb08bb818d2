"""rloo.py end to end on the tiny world: learning with the reward model and with a Python reward function, two
processes against one at the same global batch, exact resume, the KL penalty with a frozen and a LoRA reference,
broken reward functions (tests/test_grpo.py's checks: the code is shared), bad command lines; and the blocks grpo.py
and rloo.py share are the same text."""

import ast

import pytest
from conftest import (ASSETS, ONLINE_RL_SMALL, REPO, TOOL_WORLD, assert_each_fails_with_one_line,
                      assert_online_rl_learns, assert_online_rl_two_processes_match_one,
                      assert_resumed_run_ends_where_the_uninterrupted_run_ends, metric_series, run_ok)
from test_grpo import (assert_a_raising_reward_function_saves_the_last_step_and_latest_resumes,
                       assert_a_run_no_reward_scores_stops_with_strict_json_metrics,
                       assert_a_wrong_signature_is_one_line_before_anything_loads)


@pytest.mark.slow
@pytest.mark.parametrize("reward, metric, rise", [
    ([], "rewards/tiny-reward/mean", 4.0),  # the default: the tiny world's reward model (about 0 -> 9)
    (["--reward_funcs", ASSETS / "tiny_rewards.py:sentiment"], "rewards/sentiment/mean", 0.1),
])
def test_default_run_learns_and_the_saved_model_writes_more_positive_reviews(tmp_path, reward, metric, rise):
    output_dir = assert_online_rl_learns("rloo.py", reward, metric, rise, tmp_path, ground_truth_rise=0.1)
    kl = metric_series(output_dir, "kl")  # beta 0.05 by default: the policy moves away from the reference
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 0.01, kl


@pytest.mark.slow
def test_two_processes_make_the_update_of_one_process_at_the_same_global_batch(tmp_path):
    assert_online_rl_two_processes_match_one(
        "rloo.py", ["reward", "kl", "completions/mean_length", "loss", "grad_norm"], tmp_path)


@pytest.mark.slow
def test_resumed_run_ends_where_the_uninterrupted_run_ends_and_lora_trains(tmp_path):
    assert_resumed_run_ends_where_the_uninterrupted_run_ends(script="rloo.py", tmp_path=tmp_path, save_steps=2,
                                                            args=[*ONLINE_RL_SMALL, "--max_steps", 4])
    # LoRA: the reference is the adapters-off policy; the merged model and the adapter are saved
    run_ok("rloo.py", "--use_peft", "--max_steps", 2, "--per_device_train_batch_size", 16,
           "--max_completion_length", 12, "--output_dir", tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").exists()
    assert metric_series(tmp_path / "lora", "kl")[0] == pytest.approx(0.0, abs=1e-6)


def test_bad_command_lines_fail_with_one_clear_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    cases = [
        (["--num_generations", 1], "--num_generations must be at least 2"),
        (["--num_generations", 3], "must be a multiple of --num_generations 3"),
        (["--reward_funcs", tmp_path / "missing.py:exact"], f"there is no file {tmp_path / 'missing.py'}"),
        (["--reward_weights", 1.0, 2.0], "--reward_weights has 2 values but there are 1 rewards"),
        (["--reward_clip_range", 1.0, -1.0], "--reward_clip_range must be LOW HIGH with LOW < HIGH"),
        (["--chunk_size", -1], "--chunk_size must be >= 0 (0: the plain path), got -1"),
    ]
    assert_each_fails_with_one_line(monkeypatch, "rloo.py", cases, tmp_path / "out")
    assert "parameters," not in capsys.readouterr().out  # no model was loaded


def test_a_wrong_signature_is_one_line_before_anything_loads(monkeypatch, capsys, tmp_path):
    assert_a_wrong_signature_is_one_line_before_anything_loads(monkeypatch, capsys, tmp_path, "rloo.py")


@pytest.mark.slow
def test_a_raising_reward_function_saves_the_last_step_and_latest_resumes_it(monkeypatch, tmp_path):
    assert_a_raising_reward_function_saves_the_last_step_and_latest_resumes(monkeypatch, tmp_path, "rloo.py",
                                                                            compare=False)


@pytest.mark.slow
def test_a_run_no_reward_scores_stops_with_strict_json_metrics(tmp_path):
    assert_a_run_no_reward_scores_stops_with_strict_json_metrics(tmp_path, "rloo.py", max_steps=2)  # a short run


def test_the_blocks_grpo_and_rloo_share_are_the_same_text():
    """Every function and class both scripts define is the same text, except Args, check_args, generate_and_score
    and main; so are main's stages that are not the algorithm (setup, sampling and scoring, the loop's bookkeeping,
    logging, saving: all but the loss and grpo's reference sync) and generate_and_score's stages a-c."""
    texts = {script: (REPO / script).read_text() for script in ("grpo.py", "rloo.py")}

    def definitions(text):
        return {node.name: ast.get_source_segment(text, node) for node in ast.parse(text).body
                if isinstance(node, (ast.FunctionDef, ast.ClassDef))}

    grpo, rloo = definitions(texts["grpo.py"]), definitions(texts["rloo.py"])
    shared = {"nanstd", "score_completions", "load_python_reward", "sample_completions", "collate_rollouts",
              "completion_log_probs", "load_reward_function", "save_checkpoint", "gathered_for_generation",
              "roll_out", "parse_turn", "call_tools", "tool_suffix_ids", "check_tool_template", "reset_environments",
              "load_environment_factory", "load_tools", "run_tool", "rollout_metrics",  # the rollout, tools or not
              "GenerationSetup", "GenerationFailed", "stop_if_any", "prompts_of_process", "sample_rollouts",
              "score_rollouts", "old_and_reference_log_probs", "share_advantages", "metrics_and_samples",
              "count_unscored",  # a generation batch's stages
              "load_reward_specs", "generation_schedule", "load_prompt_data", "tokenize_prompts", "load_reward_funcs",
              "rollout_environments", "write_samples"}  # main's setup
    assert shared <= set(grpo) & set(rloo)
    for name in set(grpo) & set(rloo) - {"Args", "check_args", "generate_and_score", "main"}:
        assert grpo[name] == rloo[name], name
    for start, end in [("def main(args: Args) -> None:", "    progress = tqdm("),
                       ("    for step in progress:", "            # 8b. Loss and backward"),
                       ("                accelerator.backward(loss)\n", "        # 8c. Clip"),
                       ("        step_loss = accelerator.reduce(", "        done = step + 1\n"),
                       ("        # 8d. Log", "\n\n\n"),
                       ("    # a. The prompts of this process", "\n\n    # d. "),
                       ("    return micro_batches, metrics, samples, count_unscored(", "\n\n\n")]:
        grpo_block, rloo_block = (text[text.index(start) : text.index(end, text.index(start))]
                                  for text in texts.values())
        assert grpo_block == rloo_block, start


@pytest.mark.slow
def test_the_tool_world_learns_with_the_same_rollout(tmp_path):
    """rloo.py rolls out with grpo.py's functions: on the tool world (TRL 1.16's RLOOTrainer has no tools) the calls
    and the reward rise from the warm start's in 20 steps, and the KL to the reference is over the sampled tokens."""
    run_ok("rloo.py", *TOOL_WORLD, "--learning_rate", 2e-4, "--max_steps", 20, "--output_dir", tmp_path / "out")
    calls, reward, kl = (metric_series(tmp_path / "out", key) for key in ("tools/call_frequency", "reward", "kl"))
    assert sum(calls[:3]) / 3 < 0.5 and sum(calls[-3:]) / 3 > 0.8, calls
    assert sum(reward[:3]) / 3 < 0.6 and sum(reward[-3:]) / 3 > 0.8, reward
    assert kl[0] == 0.0 and 0 < kl[-1] < 1, kl
