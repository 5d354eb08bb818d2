"""reward.py: the pairwise loss by hand, scoring at the last real token, learning, several processes, LoRA, resume,
bad input; and the tiny world's reward model against the ground-truth sentiment scorer."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import (ASSETS, assert_resumed_run_ends_where_the_uninterrupted_run_ends,
                      assert_same_training_however_the_global_batch_is_split, metric_series, read_metrics, run_ok,
                      error_line, run_script)
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from reward import (check_preference_columns, collate_pairs, get_rewards, pairwise_accuracy, reward_loss,
                    tokenize_pair)
from tiny_world import sentiment_score

PREFERENCE = ASSETS / "data" / "preference"
SHORT = ["--max_steps", 12, "--eval_steps", 6, "--logging_steps", 2, "--learning_rate", 1e-3]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def spearman(a, b) -> float:
    """Rank correlation, ties given their average rank."""
    def ranks(values):
        values = np.asarray(values, dtype=float)
        order = values.argsort(kind="stable")
        result = np.empty(len(values))
        result[order] = np.arange(len(values))
        for value in np.unique(values):
            result[values == value] = result[values == value].mean()
        return result
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


# ---------------------------------------------------------------------------------------------------------- unit tests
def test_reward_loss_against_hand_computation():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    expected = [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(2.0))]  # -log sigmoid(x) = log(1 + e^-x)
    assert reward_loss(chosen, rejected).tolist() == pytest.approx(expected, abs=1e-6)
    margin = torch.tensor([0.5, -1.0])  # -log sigmoid(r_c - r_r - margin)
    expected = [math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.0))]
    assert reward_loss(chosen, rejected, margin).tolist() == pytest.approx(expected, abs=1e-6)
    centred = reward_loss(chosen, rejected, margin, center_rewards_coefficient=0.1)  # + 0.1 * (r_c + r_r)^2
    assert centred.tolist() == pytest.approx([expected[0] + 0.1 * 1.0, expected[1] + 0.1 * 4.0], abs=1e-6)


def test_pairwise_accuracy_counts_ties_as_half():
    accuracy = pairwise_accuracy(torch.tensor([2.0, 1.0, 0.5]), torch.tensor([1.0, 1.0, 3.0]))
    assert accuracy.tolist() == [1.0, 0.5, 0.0]


def test_string_rows_score_prompt_plus_answer_ending_with_eos(tokenizer):
    row = tokenize_pair({"prompt": "Review of X:", "chosen": " Great.", "rejected": " Dull.", "margin": 2.0},
                        tokenizer, max_length=64)
    assert tokenizer.decode(row["chosen_input_ids"]) == "Review of X: Great.<|endoftext|>"
    assert tokenizer.decode(row["rejected_input_ids"]) == "Review of X: Dull.<|endoftext|>"
    assert row["margin"] == 2.0 and not row["truncated"] and not row["identical"]


def test_conversational_and_implicit_prompt_rows(tokenizer):
    prompt = [{"role": "user", "content": "Review X."}]
    row = tokenize_pair({"prompt": prompt, "chosen": [{"role": "assistant", "content": "Great."}],
                         "rejected": [{"role": "assistant", "content": "Dull."}]}, tokenizer, max_length=64)
    expected = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "Great."}], tokenize=False)
    assert tokenizer.decode(row["chosen_input_ids"]) == expected  # the template's EOS, not a second one
    assert expected.endswith("<|endoftext|>") and not expected.endswith("<|endoftext|><|endoftext|>")
    implicit = tokenize_pair({"chosen": "Review of X: Great.", "rejected": "Review of X: Dull."}, tokenizer, 64)
    assert tokenizer.decode(implicit["chosen_input_ids"]) == "Review of X: Great.<|endoftext|>"
    assert implicit["margin"] == 0.0


def test_truncation_and_identical_pairs_are_flagged(tokenizer):
    row = tokenize_pair({"prompt": "Review of X:", "chosen": " Great. " * 10, "rejected": " Dull."}, tokenizer, 10)
    assert row["truncated"] and len(row["chosen_input_ids"]) == 10 and len(row["rejected_input_ids"]) < 10
    assert set(row) == {"chosen_input_ids", "rejected_input_ids", "truncated", "identical", "margin"}
    assert tokenize_pair({"chosen": "Same.", "rejected": "Same."}, tokenizer, 64)["identical"]
    # texts that differ only beyond max_length are not identical pairs: they are truncated ones
    differ_late = tokenize_pair({"chosen": "Same start. Great.", "rejected": "Same start. Dull."}, tokenizer, 3)
    assert differ_late["truncated"] and not differ_late["identical"]


def test_collate_puts_chosen_first_then_rejected_right_padded():
    rows = [{"chosen_input_ids": [1, 2, 3], "rejected_input_ids": [4], "margin": 0.5},
            {"chosen_input_ids": [5], "rejected_input_ids": [6, 7], "margin": 0.0}]
    batch = collate_pairs(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 0, 0], [4, 0, 0], [6, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 0]]
    assert batch["margin"].tolist() == [0.5, 0.0]


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match=r"missing \['rejected'\]; found columns \['prompt', 'chosen'\]"):
        check_preference_columns(["prompt", "chosen"])


def test_scores_are_read_at_the_last_real_token_whatever_the_padding(llama_dir):
    """A single unpadded text scores the same alone and inside a padded batch: the reason config.pad_token_id must
    be set (without it transformers cannot find the last real token of a padded batch)."""
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    assert tokenizer.pad_token is None
    tokenizer.pad_token = tokenizer.eos_token  # what reward.py does
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(llama_dir, num_labels=1).eval()
    texts = ["Review of X: The plot was dull.", "Review of Y: The music was truly superb. I loved it."]
    batch = tokenizer([text + tokenizer.eos_token for text in texts], return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()  # really padded
    with torch.no_grad():
        model.config.pad_token_id = None  # the seed's bug: a batch of several padded texts cannot be scored
        with pytest.raises(ValueError, match="no padding token"):
            get_rewards(model, batch["input_ids"], batch["attention_mask"])
        model.config.pad_token_id = tokenizer.pad_token_id
        batched = get_rewards(model, batch["input_ids"], batch["attention_mask"])
        for i, text in enumerate(texts):
            single = tokenizer(text + tokenizer.eos_token, return_tensors="pt")
            alone = get_rewards(model, single["input_ids"], single["attention_mask"])
            assert alone.item() == pytest.approx(batched[i].item(), abs=1e-5)


def test_tiny_reward_model_agrees_with_the_sentiment_scorer():
    """The committed tiny reward model ranks held-out reviews (never seen in training) like the ground truth."""
    model = AutoModelForSequenceClassification.from_pretrained(ASSETS / "tiny-reward").eval()
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-reward")
    assert model.config.pad_token_id == tokenizer.pad_token_id
    texts = [row["text"] for row in read_jsonl(ASSETS / "data" / "sft_text" / "test.jsonl")]
    batch = tokenizer([text + tokenizer.eos_token for text in texts], return_tensors="pt", padding=True)
    with torch.no_grad():
        rewards = get_rewards(model, batch["input_ids"], batch["attention_mask"])
    correlation = spearman(rewards.tolist(), [sentiment_score(text) for text in texts])
    assert correlation >= 0.8, correlation


# ------------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_default_run_reaches_90_percent_accuracy_offline(tmp_path):
    run_ok("reward.py", cwd=tmp_path)  # no arguments: the tiny policy plus a new score head, on the tiny pairs
    output_dir = tmp_path / "runs" / "reward"
    accuracies = metric_series(output_dir, "eval_accuracy")
    assert accuracies[0] < 0.7 and accuracies[-1] >= 0.9, accuracies
    train_rows = [row for row in read_metrics(output_dir) if "loss" in row]
    assert {"accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(train_rows[-1])
    model = AutoModelForSequenceClassification.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["Review of X: The plot was superb. I loved it.<|endoftext|>",
                       "Review of X: The plot was awful.<|endoftext|>"], return_tensors="pt", padding=True)
    with torch.no_grad():
        good, bad = get_rewards(model, batch["input_ids"], batch["attention_mask"]).tolist()
    assert good > bad


@pytest.mark.slow
def test_llama_style_model_without_pad_token_learns_conversational_pairs(llama_dir, tmp_path):
    run_ok("reward.py", "--model_name_or_path", llama_dir, "--dataset_name", ASSETS / "data" /
           "preference_conversational", "--num_train_epochs", 1, "--eval_steps", 1000, "--output_dir", tmp_path)
    accuracies = metric_series(tmp_path, "eval_accuracy")
    assert accuracies[-1] >= 0.9, accuracies
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.pad_token_id == tokenizer.eos_token_id  # set for the tokenizer that had none


@pytest.mark.slow
def test_two_processes_and_accumulation_match_one_process_at_the_same_global_batch(tmp_path):
    assert_same_training_however_the_global_batch_is_split("reward.py", SHORT, tmp_path)


@pytest.mark.slow
def test_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path):
    assert_resumed_run_ends_where_the_uninterrupted_run_ends("reward.py", SHORT, tmp_path)


@pytest.mark.slow
def test_lora_trains_adapters_and_the_full_score_head(tmp_path):
    # the default learning rate: 0.485 -> 0.66 with 1 thread and with 2 (1e-2, used here before, diverges: 0.545)
    run_ok("reward.py", "--use_peft", "--max_steps", 150, "--eval_steps", 150, "--output_dir", tmp_path)
    accuracies = metric_series(tmp_path, "eval_accuracy")
    assert accuracies[-1] > accuracies[0] + 0.1, accuracies
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in name for name in adapter) and any("score" in name for name in adapter)
    AutoModelForSequenceClassification.from_pretrained(tmp_path)  # merged: plain transformers loads it


@pytest.mark.slow
def test_margins_and_reward_centring(tmp_path):
    rows = read_jsonl(PREFERENCE / "train.jsonl")[:400]
    for row in rows:  # Llama 2 style margin: how much better chosen is, on the ground-truth scale
        row["margin"] = sentiment_score(row["chosen"]) - sentiment_score(row["rejected"])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    shutil.copy(PREFERENCE / "test.jsonl", tmp_path / "data" / "test.jsonl")
    run_ok("reward.py", "--dataset_name", tmp_path / "data", "--center_rewards_coefficient", 0.1,
           "--num_train_epochs", 3, "--eval_steps", 1000, "--output_dir", tmp_path / "out")
    final = read_metrics(tmp_path / "out")[-1]
    assert final["eval_accuracy"] >= 0.8, final
    assert abs(final["eval_rewards/chosen"] + final["eval_rewards/rejected"]) / 2 < 0.5, final  # centred on 0
    assert final["eval_rewards/margins"] > 1.0, final


@pytest.mark.slow
def test_bad_input_is_one_clear_line_before_the_model_loads(tmp_path):
    (tmp_path / "no_rejected.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    result = run_script("reward.py", "--dataset_name", tmp_path / "no_rejected.jsonl", "--dataset_test_split", "None")
    assert error_line(result) == (
        "reward.py: error: expected 'chosen' and 'rejected' columns (and optionally 'prompt' and 'margin'); "
        "missing ['rejected']; found columns ['prompt', 'chosen']")
    assert "parameters," not in result.stdout  # failed before the model was loaded
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.csv").write_text("prompt,chosen,rejected\n")
    result = run_script("reward.py", "--dataset_name", tmp_path / "empty", "--dataset_test_split", "None")
    assert "every split needs at least one row" in error_line(result)
    (tmp_path / "same.jsonl").write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " b"}) + "\n")
    result = run_script("reward.py", "--dataset_name", tmp_path / "same.jsonl", "--dataset_test_split", "None")
    assert error_line(result).endswith("every pair has identical chosen and rejected texts")
    assert "1 of 1 train pairs have identical chosen and rejected texts" in result.stdout


@pytest.mark.slow
def test_over_long_and_identical_pairs_are_counted_and_training_goes_on(tmp_path):
    rows = read_jsonl(PREFERENCE / "train.jsonl")[:16]
    rows[0]["rejected"] = rows[0]["chosen"]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run_ok("reward.py", "--dataset_name", tmp_path / "pairs.jsonl", "--dataset_test_split", "None",
                    "--max_length", 12, "--max_steps", 1, "--output_dir", tmp_path / "out")
    assert "1 of 16 train pairs have identical chosen and rejected texts" in result.stdout
    assert "16 of 16 train pairs have a text longer than 12 tokens" in result.stdout


@pytest.mark.slow
def test_help_lists_the_arguments_with_their_docs():
    result = run_ok("reward.py", "--help")
    for text in ["--center_rewards_coefficient", "--max_length", "head is always trained in full"]:
        assert text in result.stdout
