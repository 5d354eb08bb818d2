"""kto.py: the loss by hand, the mismatched KL pairs, row formats and label checks, then learning (balanced, and
unbalanced 60/40 odd-sized data with an odd batch), several processes, the reference variants, resume and bad input."""

import json
import math
import random

import pytest
import torch
import tyro
from conftest import (ASSETS, answer_logps, assert_resumed_run_ends_where_the_uninterrupted_run_ends,
                      assert_same_training_however_the_global_batch_is_split, error_line, metric_series, read_metrics,
                      run_main_in_process, run_ok, run_script)
from transformers import AutoModelForCausalLM, AutoTokenizer

from kto import (Args, add_sums, check_kto_columns, check_labels, example_loss, kl_partners, kto_loss,
                 mismatched_example, summarize, tokenize_row)

UNPAIRED = ASSETS / "data" / "unpaired"
PREFERENCE = ASSETS / "data" / "preference"
SHORT = ["--max_steps", 12, "--eval_steps", 6, "--logging_steps", 2]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


# ---------------------------------------------------------------------------------------------------------- unit tests
def test_kto_loss_by_hand():
    policy_c, reference_c = torch.tensor([-5.0, -7.0]), torch.tensor([-6.0, -6.5])  # log-ratios 1.0, -0.5
    policy_r, reference_r = torch.tensor([-9.0]), torch.tensor([-8.0])  # log-ratio -1.0
    policy_kl, reference_kl = torch.tensor([-10.0, -12.0, -11.0]), torch.tensor([-11.0, -12.5, -11.0])  # kl 0.5
    losses, chosen_rewards, rejected_rewards, kl = kto_loss(policy_c, policy_r, policy_kl, reference_c, reference_r,
                                                            reference_kl, beta=0.2, desirable_weight=1.5,
                                                            undesirable_weight=0.5)
    assert kl.item() == pytest.approx(0.5)
    expected = [1.5 * (1 - sigmoid(0.2 * (1.0 - 0.5))), 1.5 * (1 - sigmoid(0.2 * (-0.5 - 0.5))),
                0.5 * (1 - sigmoid(0.2 * (0.5 - -1.0)))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([0.2, -0.1]) and rejected_rewards.tolist() == pytest.approx([-0.2])
    # a negative KL estimate is clamped to 0: the reference point never rewards moving away from the reference
    losses, _, _, kl = kto_loss(policy_c, policy_r, reference_kl, reference_c, reference_r, policy_kl, beta=0.2)
    assert kl.item() == 0.0
    assert losses.tolist() == pytest.approx([1 - sigmoid(0.2 * 1.0), 1 - sigmoid(-0.2 * 0.5), 1 - sigmoid(0.2)],
                                            abs=1e-6)


def test_a_batch_of_only_undesirable_examples_gives_a_finite_loss_and_gradient():
    policy_r = torch.tensor([-9.0, -4.0], requires_grad=True)
    empty = torch.zeros(0)
    losses, chosen_rewards, rejected_rewards, kl = kto_loss(empty, policy_r, torch.tensor([-3.0, -2.0]), empty,
                                                            torch.tensor([-8.0, -5.0]), torch.tensor([-3.5, -2.5]))
    loss = losses.sum() / 2
    loss.backward()
    assert len(chosen_rewards) == 0 and len(losses) == 2 and math.isfinite(loss.item())
    assert torch.isfinite(policy_r.grad).all() and (policy_r.grad != 0).all()
    assert losses.tolist() == pytest.approx([1 - sigmoid(0.1 * (0.5 - -1.0)), 1 - sigmoid(0.1 * (0.5 - 1.0))],
                                            abs=1e-6)


def test_metrics_summed_over_micro_batches_are_the_means_of_the_whole_batch():
    """example_loss's metric sums, added over two micro-batches, give each metric's mean over its own examples;
    a window without desirable examples leaves out what only they define."""
    args = Args(beta=0.2)
    policy, reference = torch.tensor([-5.0, -9.0, -7.0, -4.0]), torch.tensor([-6.0, -8.0, -6.5, -5.0])
    desirable = torch.tensor([True, False, True, False])
    policy_kl, reference_kl = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -12.0])
    sums = {}
    for part in (slice(0, 1), slice(1, 4)):
        sums = add_sums(sums, example_loss(policy[part], reference[part], desirable[part], policy_kl, reference_kl,
                                           args)[2])
    losses, chosen_rewards, rejected_rewards, kl = kto_loss(policy[desirable], policy[~desirable], policy_kl,
                                                            reference[desirable], reference[~desirable], reference_kl,
                                                            beta=0.2)
    metrics = summarize(sums, kl.item())
    assert metrics == pytest.approx({
        "loss": losses.mean().item(), "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": chosen_rewards.mean().item() - rejected_rewards.mean().item(), "kl": 0.5,
        "logps/chosen": -6.0, "logps/rejected": -6.5})
    only_undesirable = summarize(example_loss(policy[1:2], reference[1:2], desirable[1:2], policy_kl, reference_kl,
                                              args)[2], 0.5, prefix="eval_")
    assert set(only_undesirable) == {"eval_loss", "eval_rewards/rejected", "eval_logps/rejected", "eval_kl"}


@pytest.mark.parametrize("n", [2, 3, 5, 7, 8, 9])
def test_kl_pairs_never_pair_an_example_with_itself(n):
    partners = kl_partners([f"prompt {i}" for i in range(n)])
    assert all(j != k for k, j in enumerate(partners)), partners
    assert sorted(partners) == list(range(n))  # a permutation: every completion is used once


def test_kl_pairs_avoid_completions_written_for_the_same_prompt():
    # unrolled preference pairs: neighbours share their prompt, so a shift of one would meet matched completions
    prompts = ["a", "a", "b", "b", "c"]
    partners = kl_partners(prompts)
    assert all(prompts[j] != prompts[k] for k, j in enumerate(partners)), partners
    assert kl_partners(["a", "a", "a"]) == [1, 2, 0]  # impossible to avoid: still never the example itself
    with pytest.raises(ValueError, match="at least 2 examples; got 1"):
        kl_partners(["a"])


def test_mismatched_example_fits_max_length():
    row = mismatched_example({"prompt_ids": [1, 2, 3], "completion_ids": [4]}, {"prompt_ids": [5],
                             "completion_ids": [6, 7, 8, 9]}, max_length=5)
    assert row == {"prompt_ids": [1, 2, 3], "completion_ids": [6, 7]}


def test_unpaired_rows_and_pairs_unrolled(tokenizer):
    row = tokenize_row({"prompt": "Review of X:", "completion": " Great.", "label": True}, tokenizer, 64, 32,
                       "keep_end")
    assert row["prompt_ids"] == tokenizer("Review of X:")["input_ids"] and row["desirable"] == [True]
    assert tokenizer.decode(row["completion_ids"][0]) == " Great.<|endoftext|>"
    pair = tokenize_row({"prompt": "Review of X:", "chosen": " Great.", "rejected": " Dull."}, tokenizer, 64, 32,
                        "keep_end")
    assert pair["desirable"] == [True, False] and not pair["identical"]
    assert [tokenizer.decode(ids) for ids in pair["completion_ids"]] == [" Great.<|endoftext|>", " Dull.<|endoftext|>"]
    implicit = tokenize_row({"chosen": "Review of X: Great.", "rejected": "Review of X: Dull."}, tokenizer, 64, 32,
                            "keep_end")
    assert implicit["prompt_ids"] == row["prompt_ids"] and implicit["completion_ids"] == pair["completion_ids"]


def test_conversational_unpaired_rows_use_the_chat_template(tokenizer):
    prompt = [{"role": "user", "content": "Review X."}]
    row = tokenize_row({"prompt": prompt, "completion": [{"role": "assistant", "content": "Great."}], "label": 0},
                       tokenizer, 64, 32, "keep_end")
    assert tokenizer.decode(row["prompt_ids"]) == tokenizer.apply_chat_template(prompt, tokenize=False,
                                                                                add_generation_prompt=True)
    assert tokenizer.decode(row["completion_ids"][0]) == "Great.<|endoftext|>" and row["desirable"] == [False]


def test_columns_and_labels_are_checked():
    assert check_kto_columns(["prompt", "completion", "label"]) == "unpaired"
    assert check_kto_columns(["chosen", "rejected"]) == "paired"
    with pytest.raises(ValueError, match=r"missing \['label'\]; found columns \['prompt', 'completion'\]"):
        check_kto_columns(["prompt", "completion"])
    assert check_labels([True, False, 1, 0, True], "train") == (3, 2)
    with pytest.raises(ValueError, match=r"train row 1 has 'yes' \(str\)"):
        check_labels([True, "yes"], "train")
    with pytest.raises(ValueError, match=r"train row 0 has 2 \(int\)"):
        check_labels([2], "train")


# ------------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_default_run_learns_the_implicit_reward_of_held_out_preference_pairs(tmp_path):
    run_ok("kto.py", cwd=tmp_path)  # the README's quickstart command
    output_dir = tmp_path / "runs" / "kto"
    keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "kl", "logps/chosen", "logps/rejected"}
    rows = read_metrics(output_dir)
    assert keys <= set(rows[-2]) and {f"eval_{k}" for k in keys} <= set(rows[-1])
    margins = metric_series(output_dir, "eval_rewards/margins")
    assert margins[0] == 0 and margins[-1] > 1, margins
    # implicit reward beta * log(pi / pi_ref) on held-out PAIRS, computed here with plain transformers
    pairs = read_jsonl(PREFERENCE / "test.jsonl")
    policy, reference = answer_logps(output_dir, pairs), answer_logps(ASSETS / "tiny-gpt2", pairs)
    accuracy = sum((pc - rc) > (pr - rr) for (pc, pr), (rc, rr) in zip(policy, reference)) / len(pairs)
    assert accuracy >= 0.85, accuracy


@pytest.mark.slow
def test_unbalanced_odd_sized_unpaired_data_with_an_odd_batch(tmp_path):
    # 60/40 desirable/undesirable, 1001 rows, 7 examples per step; evaluated on held-out preference PAIRS (a
    # DatasetDict whose splits have different columns)
    from datasets import Dataset, DatasetDict

    rows = read_jsonl(UNPAIRED / "train.jsonl")
    keep = [row for row in rows if row["label"]][:601] + [row for row in rows if not row["label"]][:400]
    random.Random(0).shuffle(keep)
    DatasetDict(train=Dataset.from_list(keep), test=Dataset.from_list(read_jsonl(PREFERENCE / "test.jsonl"))
                ).save_to_disk(tmp_path / "data")
    result = run_ok("kto.py", "--dataset_name", tmp_path / "data", "--per_device_train_batch_size", 7,
                    "--output_dir", tmp_path / "out")
    assert ("warning: desirable_weight x desirable / (undesirable_weight x undesirable) = 1 x 601 / (1 x 400) = "
            "1.502, outside the [1, 4/3] the KTO paper advises; e.g. --undesirable_weight in [1.127, 1.502] or "
            "--desirable_weight in [0.666, 0.887]") in result.stdout
    accuracies = metric_series(tmp_path / "out", "eval_rewards/accuracies")
    assert accuracies[0] == 0.5 and accuracies[-1] >= 0.85, accuracies  # policy == reference at step 0: all ties
    assert all(math.isfinite(loss) for loss in metric_series(tmp_path / "out", "loss"))


@pytest.mark.slow
def test_two_processes_and_accumulation_match_one_process_at_the_same_global_batch(tmp_path):
    # the KL reference point is estimated over the whole step, so it does not depend on the split either
    assert_same_training_however_the_global_batch_is_split("kto.py", SHORT, tmp_path)


@pytest.mark.slow
def test_precomputed_reference_resumes_and_matches_the_live_reference(tmp_path):
    assert_resumed_run_ends_where_the_uninterrupted_run_ends("kto.py", SHORT + ["--precompute_ref_log_probs"],
                                                             tmp_path)
    run_ok("kto.py", *SHORT, "--output_dir", tmp_path / "live")
    for key in ["loss", "kl", "rewards/margins", "eval_loss", "eval_kl", "eval_rewards/margins"]:
        assert metric_series(tmp_path / "full", key) == pytest.approx(metric_series(tmp_path / "live", key),
                                                                     rel=1e-5, abs=1e-6), key
    assert read_metrics(tmp_path / "full")[0]["params_in_memory"] * 2 == read_metrics(tmp_path / "live")[0][
        "params_in_memory"]  # the reference was freed


@pytest.mark.slow
def test_lora_reference_is_the_policy_with_adapters_off_and_learns(tmp_path):
    run_ok("kto.py", "--use_peft", "--learning_rate", 5e-3, "--max_steps", 60, "--eval_steps", 60,
           "--output_dir", tmp_path)
    rows = read_metrics(tmp_path)
    policy_params = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-gpt2").num_parameters()
    assert rows[0]["params_in_memory"] < 1.2 * policy_params  # the base weights and adapters, no second copy
    margins = metric_series(tmp_path, "eval_rewards/margins")
    assert margins[0] == 0 and margins[-1] > 0.3, margins  # adapters off == reference at step 0
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.slow
def test_bad_input_is_one_clear_line(tmp_path, monkeypatch):
    def write(name: str, rows: list[dict]):
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        return ["--dataset_name", tmp_path / name, "--dataset_test_split", "None"]

    result = run_script("kto.py", *write("no_label.jsonl", [{"prompt": "a", "completion": " b"}]))
    assert error_line(result) == ("kto.py: error: expected 'prompt', 'completion' and 'label' columns (or preference "
                                  "pairs: 'chosen' and 'rejected'); missing ['label']; found columns ['prompt', "
                                  "'completion']")
    assert "parameters in memory" not in result.stdout  # failed before the model was loaded
    result = run_script("kto.py", *write("words.jsonl", [{"prompt": "a", "completion": " b", "label": "good"}]))
    assert error_line(result) == ("kto.py: error: column 'label' must hold booleans (true: desirable, false: "
                                  "undesirable) or 0/1; train row 0 has 'good' (str)")
    result = run_script("kto.py", *write("one_class.jsonl", [{"prompt": "a", "completion": " b", "label": True}] * 4))
    assert error_line(result) == ("kto.py: error: KTO needs both desirable and undesirable examples, but the 'train' "
                                  "split has 4 with label true and 0 with label false")
    (tmp_path / "empty.jsonl").write_text("")
    result = run_script("kto.py", "--dataset_name", tmp_path / "empty.jsonl", "--dataset_test_split", "None")
    assert error_line(result) == (f"kto.py: error: could not load dataset {tmp_path / 'empty.jsonl'}: StopIteration "
                                  "(is a data file empty? every split needs at least one row)")
    assert error_line(run_script("kto.py", "--per_device_train_batch_size", 1)).startswith(
        "kto.py: error: the KL reference point is estimated from mismatched pairs inside each optimizer step's "
        "batch, which needs at least 2 examples; got 1")
    assert run_main_in_process(monkeypatch, "kto.py", "--chunk_size", -1) == (
        "kto.py: error: --chunk_size must be >= 0 (0: the plain path, the model's logits at once), got -1")


def test_help_lists_the_arguments_as_users_type_them(monkeypatch, capsys):
    assert run_main_in_process(monkeypatch, "kto.py", "--help") == "0"  # the script's own command line
    text = capsys.readouterr().out
    for flag in ["--beta", "--desirable_weight", "--undesirable_weight", "--precompute_ref_log_probs", "4/3"]:
        assert flag in text, flag
    args = tyro.cli(Args, args=["--desirable-weight", "1.5", "--no-lm_head_only_at_labels", "--no-disable-dropout"],
                    use_underscores=True)  # the dashed spellings and the --no- forms still parse
    assert (args.desirable_weight, args.lm_head_only_at_labels, args.disable_dropout) == (1.5, False, False)
