"""cpo.py: every loss type by hand (sigmoid with and without label smoothing, hinge, ipo, simpo), then learning,
several processes (SimPO), resume with LoRA (which also shows LoRA learning and its outputs) and bad input."""

import json
import math

import pytest
import torch
import tyro
from conftest import (ASSETS, assert_prefers_chosen_and_writes_more_positive_reviews,
                      assert_resumed_run_ends_where_the_uninterrupted_run_ends,
                      assert_same_training_however_the_global_batch_is_split, error_line, metric_series,
                      read_metrics, run_main_in_process, run_ok, run_script)
from transformers import AutoModelForCausalLM

from cpo import Args, cpo_loss

PREFERENCE = ASSETS / "data" / "preference"
SHORT = ["--max_steps", 12, "--eval_steps", 6, "--logging_steps", 2]
KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss"}


def log_sigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------------------- unit tests
CHOSEN, REJECTED = torch.tensor([-5.0, -7.0]), torch.tensor([-6.0, -4.0])
LOGITS = [1.0, -3.0]  # chosen - rejected: no reference model


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_sigmoid_loss_and_rewards_by_hand(label_smoothing):
    losses, chosen_rewards, rejected_rewards = cpo_loss(CHOSEN, REJECTED, beta=0.1, label_smoothing=label_smoothing)
    expected = [-log_sigmoid(0.1 * x) * (1 - label_smoothing) - log_sigmoid(-0.1 * x) * label_smoothing
                for x in LOGITS]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([-0.5, -0.7], abs=1e-6)  # beta * policy log-prob
    assert rejected_rewards.tolist() == pytest.approx([-0.6, -0.4], abs=1e-6)


def test_hinge_and_ipo_losses_by_hand():
    hinge, _, _ = cpo_loss(CHOSEN, REJECTED, beta=0.5, loss_type="hinge")
    assert hinge.tolist() == pytest.approx([max(0.0, 1 - 0.5 * x) for x in LOGITS], abs=1e-6)
    ipo, _, _ = cpo_loss(CHOSEN, REJECTED, beta=0.5, loss_type="ipo")
    assert ipo.tolist() == pytest.approx([(x - 1 / (2 * 0.5)) ** 2 for x in LOGITS], abs=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_loss_by_hand(label_smoothing):
    chosen, rejected = torch.tensor([-1.2, -2.0]), torch.tensor([-1.5, -1.0])  # per-token averaged log-probs
    losses, chosen_rewards, _ = cpo_loss(chosen, rejected, beta=2.0, loss_type="simpo",
                                         label_smoothing=label_smoothing, simpo_gamma=0.5)
    # SimPO eq. 6: -log sigmoid(beta * (avg_c - avg_r) - gamma), smoothed like cDPO
    margins = [2.0 * (c - r) - 0.5 for c, r in [(-1.2, -1.5), (-2.0, -1.0)]]
    expected = [-log_sigmoid(m) * (1 - label_smoothing) - log_sigmoid(-m) * label_smoothing for m in margins]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([-2.4, -4.0], abs=1e-6)


def test_unknown_loss_type_raises():
    with pytest.raises(ValueError, match="unknown loss_type 'kto_pair'"):
        cpo_loss(CHOSEN, REJECTED, loss_type="kto_pair")


# ------------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_default_run_prefers_chosen_on_held_out_pairs_and_writes_more_positive_reviews(tmp_path):
    run_ok("cpo.py", cwd=tmp_path)  # the README's quickstart command
    output_dir = tmp_path / "runs" / "cpo"
    assert_prefers_chosen_and_writes_more_positive_reviews(output_dir)
    metrics = read_metrics(output_dir)
    assert metrics[0] == {"step": 0, "epoch": 0.0, "params_in_memory": metrics[0]["params_in_memory"]}
    assert KEYS | {"grad_norm", "num_tokens", "samples_per_second", "peak_memory_mb"} <= set(metrics[-2])
    assert {f"eval_{key}" for key in KEYS} <= set(metrics[-1])
    accuracies = metric_series(output_dir, "eval_rewards/accuracies")
    assert accuracies[-1] > accuracies[0] + 0.2, accuracies


@pytest.mark.slow
def test_simpo_two_processes_and_accumulation_match_one_process_at_the_same_global_batch(tmp_path):
    # SimPO (with the NLL term, i.e. CPO-SimPO): per-token averaged log-probs, the margin gamma
    assert_same_training_however_the_global_batch_is_split("cpo.py", SHORT + ["--loss_type", "simpo", "--beta", 2.0],
                                                           tmp_path)
    logps = metric_series(tmp_path / "one", "eval_logps/chosen")
    assert all(-5 < value < 0 for value in logps), logps  # averages, not sums (about -30 on these answers)
    margins = metric_series(tmp_path / "one", "eval_rewards/margins")
    assert margins[-1] > margins[0], margins


@pytest.mark.slow
def test_lora_resumed_run_ends_where_the_uninterrupted_run_ends_learns_and_saves_plain_weights(tmp_path):
    args = SHORT + ["--use_peft", "--learning_rate", 5e-3, "--generate_during_eval", "--per_device_eval_batch_size", 4]
    assert_resumed_run_ends_where_the_uninterrupted_run_ends("cpo.py", args, tmp_path)
    full = tmp_path / "full"
    accuracies = metric_series(full, "eval_rewards/accuracies")
    margins = metric_series(full, "eval_rewards/margins")
    assert margins[-1] > margins[0] and accuracies[-1] > accuracies[0], (margins, accuracies)
    assert (full / "adapter" / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(full)  # merged: plain transformers weights
    samples = [json.loads(line) for line in (full / "samples.jsonl").read_text().splitlines()]
    assert [sample["step"] for sample in samples] == [0] * 4 + [6] * 4 + [12] * 4
    assert all(set(sample) == {"step", "prompt", "policy"} and sample["prompt"].startswith("Review of")
               for sample in samples)  # the policy's answers only: there is no reference model


@pytest.mark.slow
def test_bad_hyper_parameters_are_one_clear_line(monkeypatch):
    result = run_script("cpo.py", "--loss_type", "hinge", "--label_smoothing", 0.1)
    assert error_line(result) == (
        "cpo.py: error: --label_smoothing applies to the sigmoid and simpo losses only, not --loss_type hinge")
    assert "parameters in memory" not in result.stdout  # failed before the model was loaded
    assert run_main_in_process(monkeypatch, "cpo.py", "--chunk_size", -1) == (
        "cpo.py: error: --chunk_size must be >= 0 (0: the plain path, the model's logits at once), got -1")
    # (bad data: see test_orpo.py; the two scripts validate alike, and each run costs seconds)


def test_help_lists_the_arguments_as_users_type_them(monkeypatch, capsys):
    assert run_main_in_process(monkeypatch, "cpo.py", "--help") == "0"  # the script's own command line
    text = capsys.readouterr().out
    for flag in ["--beta", "--loss_type", "simpo", "--cpo_alpha", "--simpo_gamma", "--label_smoothing", "cDPO"]:
        assert flag in text, flag
    args = tyro.cli(Args, args=["--cpo-alpha", "0", "--no-lm_head_only_at_labels"], use_underscores=True)
    assert (args.cpo_alpha, args.lm_head_only_at_labels) == (0, False)  # dashes and --no- forms still parse
