"""dpo.py: every loss type by hand, log-prob gathering, prompt/answer boundaries, then learning, the reference model
variants (live copy, precomputed, LoRA adapters off, reference-free), several processes, resume and bad input."""

import json
import math

import pytest
import torch
import tyro
from conftest import (ASSETS, assert_resumed_run_ends_where_the_uninterrupted_run_ends,
                      assert_same_training_however_the_global_batch_is_split, error_line, mean_sentiment_of_samples,
                      metric_series, read_metrics, run_main_in_process, run_ok, run_script)
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo import (Args, collate_pairs, dpo_loss, label_log_probs, sequence_log_probs, split_implicit_prompt,
                 tokenize_pair)

PREFERENCE = ASSETS / "data" / "preference"
SHORT = ["--max_steps", 12, "--eval_steps", 6, "--logging_steps", 2]


def log_sigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


# ---------------------------------------------------------------------------------------------------------- unit tests
POLICY_C, POLICY_R, REF_C, REF_R = torch.tensor([-5.0, -7.0]), torch.tensor([-6.0, -4.0]), \
    torch.tensor([-5.5, -6.0]), torch.tensor([-5.0, -5.0])
# logits = (pi_c - pi_r) - (ref_c - ref_r) = [1 - (-0.5), -3 - (-1)] = [1.5, -2.0]
LOGITS = [1.5, -2.0]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_sigmoid_loss_and_rewards_by_hand(label_smoothing):
    losses, chosen_rewards, rejected_rewards = dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=0.1,
                                                        label_smoothing=label_smoothing)
    expected = [-log_sigmoid(0.1 * x) * (1 - label_smoothing) - log_sigmoid(-0.1 * x) * label_smoothing
                for x in LOGITS]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([0.1 * 0.5, 0.1 * -1.0], abs=1e-6)  # beta * (pi - ref)
    assert rejected_rewards.tolist() == pytest.approx([0.1 * -1.0, 0.1 * 1.0], abs=1e-6)


def test_hinge_and_ipo_losses_by_hand():
    hinge, _, _ = dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=0.5, loss_type="hinge")
    assert hinge.tolist() == pytest.approx([max(0.0, 1 - 0.5 * x) for x in LOGITS], abs=1e-6)
    ipo, _, _ = dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=0.5, loss_type="ipo")
    assert ipo.tolist() == pytest.approx([(x - 1 / (2 * 0.5)) ** 2 for x in LOGITS], abs=1e-6)


def test_kto_pair_loss_by_hand():
    losses, _, _ = dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=0.1, loss_type="kto_pair")
    chosen_ratios, rejected_ratios = [0.5, -1.0], [-1.0, 1.0]
    chosen_kl = max(0.0, sum(chosen_ratios) / 2)  # mean(-0.25) clamped to 0
    rejected_kl = max(0.0, sum(rejected_ratios) / 2)  # 0
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [1 - sigmoid(0.1 * (r - rejected_kl)) for r in chosen_ratios] + \
               [1 - sigmoid(0.1 * (chosen_kl - r)) for r in rejected_ratios]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_reference_free_ignores_the_reference_in_the_loss():
    losses, _, _ = dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=0.1, reference_free=True)
    assert losses.tolist() == pytest.approx([-log_sigmoid(0.1 * 1.0), -log_sigmoid(0.1 * -3.0)], abs=1e-6)
    with pytest.raises(ValueError, match="unknown loss_type 'nope'"):
        dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, loss_type="nope")


@pytest.mark.parametrize("average", [False, True])
def test_label_and_sequence_log_probs_match_a_naive_log_softmax(average):
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[:, :2] = -100
    labels[1, 4:] = -100
    expected = []
    naive = torch.log_softmax(logits, dim=-1)
    for b in range(3):
        values = [naive[b, t - 1, labels[b, t]].item() for t in range(1, 6) if labels[b, t] != -100]
        expected.append(sum(values) / len(values) if average else sum(values))
    targets = labels[:, 1:] != -100
    per_token = torch.zeros(targets.shape).masked_scatter(
        targets, label_log_probs(logits[:, :-1][targets], labels[:, 1:][targets])["log_probs"])
    assert sequence_log_probs(per_token, labels, average_log_prob=average).tolist() == pytest.approx(expected, abs=1e-5)


def test_string_rows_prompt_is_a_true_prefix_and_answers_end_with_eos(tokenizer):
    row = tokenize_pair({"prompt": "Review of X:", "chosen": " Great.", "rejected": " Dull."}, tokenizer,
                        max_length=64, max_prompt_length=32, truncation_mode="keep_end")
    prompt_ids = tokenizer("Review of X:")["input_ids"]
    for name, answer in (("chosen", " Great."), ("rejected", " Dull.")):
        ids, labels = row[f"{name}_input_ids"], row[f"{name}_labels"]
        assert ids[: len(prompt_ids)] == prompt_ids and row["prompt_length"] == len(prompt_ids)
        assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
        assert tokenizer.decode(labels[len(prompt_ids):]) == answer + "<|endoftext|>"


def test_bos_is_added_once_and_kept_by_keep_end_truncation(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    bos = tokenizer.bos_token_id
    long_prompt = "Review of X: " + "The plot was dull. " * 20
    for prompt in ["Review of X:", tokenizer.bos_token + "Review of X:", long_prompt]:
        row = tokenize_pair({"prompt": prompt, "chosen": " Great.", "rejected": " Dull."}, tokenizer,
                            max_length=40, max_prompt_length=20, truncation_mode="keep_end")
        ids = row["chosen_input_ids"]
        assert ids[0] == bos and ids.count(bos) == 1, tokenizer.decode(ids)
    assert row["prompt_truncated"] and row["prompt_length"] == 20
    assert tokenizer.decode(row["chosen_input_ids"][:20]).endswith("The plot was dull. ")  # the prompt's end kept
    start = tokenize_pair({"prompt": long_prompt, "chosen": " Great.", "rejected": " Dull."}, tokenizer,
                          max_length=40, max_prompt_length=20, truncation_mode="keep_start")
    assert tokenizer.decode(start["chosen_input_ids"][:20]).startswith(tokenizer.bos_token + "Review of X:")


def test_answers_are_cut_after_the_prompt(tokenizer):
    row = tokenize_pair({"prompt": "Review of X:", "chosen": " Great." * 30, "rejected": " Dull."}, tokenizer,
                        max_length=16, max_prompt_length=8, truncation_mode="keep_end")
    assert row["answer_truncated"] and len(row["chosen_input_ids"]) == 16
    assert not row["prompt_truncated"]  # the prompt fits max_prompt_length, so only the answers are cut


def test_conversational_rows_split_at_the_generation_prompt(tokenizer):
    prompt = [{"role": "user", "content": "Review X."}]
    row = tokenize_pair({"prompt": prompt, "chosen": [{"role": "assistant", "content": "Great."}],
                         "rejected": [{"role": "assistant", "content": "Dull."}]}, tokenizer, 64, 32, "keep_end")
    n = row["prompt_length"]
    assert tokenizer.decode(row["chosen_input_ids"][:n]) == tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(row["chosen_labels"][n:]) == "Great.<|endoftext|>"  # the template's EOS, once


def test_implicit_prompts_are_the_common_prefix():
    assert split_implicit_prompt("Review of X: The plot was great.", "Review of X: The plot was dull.") == \
        ("Review of X: The plot was", " great.", " dull.")  # answers keep their leading space
    assert split_implicit_prompt("Review of X: The great plot.", "Review of X: The grand plot.") == \
        ("Review of X: The", " great plot.", " grand plot.")  # never inside a word
    user = {"role": "user", "content": "Hi"}
    good, bad = {"role": "assistant", "content": "Great."}, {"role": "assistant", "content": "Dull."}
    assert split_implicit_prompt([user, good], [user, bad]) == ([user], [good], [bad])


def test_collate_stacks_chosen_then_rejected_and_carries_reference_logps():
    rows = [{"chosen_input_ids": [1, 2, 3], "chosen_labels": [-100, 2, 3], "rejected_input_ids": [1, 4],
             "rejected_labels": [-100, 4], "reference_chosen_logps": -1.0, "reference_rejected_logps": -2.0}]
    batch = collate_pairs(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 4, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 4, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["reference_chosen_logps"].tolist() == [-1.0]


# ------------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_default_run_learns_preferences_and_writes_more_positive_reviews(tmp_path):
    run_ok("dpo.py", "--beta", 0.1, cwd=tmp_path)  # the README's quickstart command
    output_dir = tmp_path / "runs" / "dpo"
    accuracies = metric_series(output_dir, "eval_rewards/accuracies")
    assert accuracies[0] == 0.5 and accuracies[-1] >= 0.9, accuracies  # policy == reference at step 0: all ties
    keys = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected"}
    assert keys <= set(read_metrics(output_dir)[-2]) and {f"eval_{k}" for k in keys} <= set(read_metrics(output_dir)[-1])
    prompts = [json.loads(line)["prompt"] for line in (PREFERENCE / "test.jsonl").read_text().splitlines()][:64]
    before = mean_sentiment_of_samples(ASSETS / "tiny-gpt2", prompts)
    after = mean_sentiment_of_samples(output_dir, prompts)
    assert after > before + 0.3, (before, after)


@pytest.mark.slow
def test_llama_style_model_without_pad_token_conversational(llama_dir, tmp_path):
    # SFT first (the usual pipeline: a random-init model has no answers to prefer), then DPO on conversations
    run_ok("sft.py", "--model_name_or_path", llama_dir, "--output_dir", tmp_path / "sft", "--learning_rate", 3e-3,
           "--num_train_epochs", 2, "--eval_steps", 1000)
    run_ok("dpo.py", "--model_name_or_path", tmp_path / "sft", "--dataset_name", ASSETS / "data" /
           "preference_conversational", "--output_dir", tmp_path / "dpo", "--eval_steps", 1000)
    accuracies = metric_series(tmp_path / "dpo", "eval_rewards/accuracies")
    assert accuracies[-1] >= 0.9, accuracies
    conversations = [json.loads(line)["prompt"] for line in
                     (ASSETS / "data" / "preference_conversational" / "test.jsonl").read_text().splitlines()][:64]
    before = mean_sentiment_of_samples(tmp_path / "sft", conversations, chat=True)
    after = mean_sentiment_of_samples(tmp_path / "dpo", conversations, chat=True)
    assert after > before + 0.3, (before, after)


@pytest.mark.slow
def test_precomputed_reference_log_probs_give_the_same_trajectory(tmp_path):
    run_ok("dpo.py", *SHORT, "--output_dir", tmp_path / "live")
    run_ok("dpo.py", *SHORT, "--output_dir", tmp_path / "precomputed", "--precompute_ref_log_probs")
    for key in ["loss", "rewards/margins", "eval_loss", "eval_rewards/accuracies"]:
        assert metric_series(tmp_path / "precomputed", key) == pytest.approx(metric_series(tmp_path / "live", key),
                                                                            rel=1e-5, abs=1e-6), key
    live_params = read_metrics(tmp_path / "live")[0]["params_in_memory"]
    assert read_metrics(tmp_path / "precomputed")[0]["params_in_memory"] * 2 == live_params  # reference freed


@pytest.mark.slow
def test_lora_reference_is_the_policy_with_adapters_off_and_learns(tmp_path):
    run_ok("dpo.py", "--use_peft", "--learning_rate", 5e-3, "--max_steps", 200, "--eval_steps", 200,
           "--output_dir", tmp_path)
    rows = read_metrics(tmp_path)
    policy_params = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-gpt2").num_parameters()
    assert rows[0]["params_in_memory"] < 1.2 * policy_params  # the base weights and adapters, no second copy
    accuracies = metric_series(tmp_path, "eval_rewards/accuracies")
    assert accuracies[0] == 0.5 and accuracies[-1] > 0.7, accuracies  # adapters off == reference at step 0
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [["--loss_type", "hinge"], ["--loss_type", "ipo"], ["--loss_type", "kto_pair"],
                                     ["--reference_free"], ["--label_smoothing", 0.1]])
def test_every_loss_variant_trains(tmp_path, variant):
    run_ok("dpo.py", *variant, "--max_steps", 20, "--eval_steps", 20, "--learning_rate", 1e-3,
           "--output_dir", tmp_path)
    losses = metric_series(tmp_path, "eval_loss")
    margins = metric_series(tmp_path, "eval_rewards/margins")
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0], losses
    assert margins[-1] > margins[0], margins


@pytest.mark.slow
def test_two_processes_and_accumulation_match_one_process_at_the_same_global_batch(tmp_path):
    # chunks of 5 positions: the chunked log-probs' recompute under DDP too (the default is one chunk at these lengths)
    assert_same_training_however_the_global_batch_is_split("dpo.py", [*SHORT, "--chunk_size", 5], tmp_path)


@pytest.mark.slow
def test_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path):
    # the reference must still be the initial model after resuming, not the checkpoint
    assert_resumed_run_ends_where_the_uninterrupted_run_ends("dpo.py", SHORT, tmp_path)


@pytest.mark.slow
def test_generate_during_eval_writes_policy_and_reference_samples(tmp_path):
    run_ok("dpo.py", "--max_steps", 2, "--eval_steps", 2, "--generate_during_eval", "--per_device_eval_batch_size", 4,
           "--output_dir", tmp_path)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [sample["step"] for sample in samples] == [0] * 4 + [2] * 4
    assert all(sample["prompt"].startswith("Review of") and sample["policy"] and sample["reference"]
               for sample in samples)


@pytest.mark.slow
def test_bad_input_is_one_clear_line(tmp_path):
    (tmp_path / "no_chosen.jsonl").write_text(json.dumps({"prompt": "a", "rejected": "b"}) + "\n")
    result = run_script("dpo.py", "--dataset_name", tmp_path / "no_chosen.jsonl", "--dataset_test_split", "None")
    assert error_line(result) == ("dpo.py: error: expected 'chosen' and 'rejected' columns (and optionally 'prompt'); "
                                  "missing ['chosen']; found columns ['prompt', 'rejected']")
    assert "parameters in memory" not in result.stdout  # failed before the model was loaded
    assert error_line(run_script("dpo.py", "--max_length", 64, "--max_prompt_length", 64)) == (
        "dpo.py: error: --max_prompt_length must be positive and below --max_length 64 so that answers keep some "
        "tokens, got 64")
    (tmp_path / "same.jsonl").write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " b"}) + "\n")
    result = run_script("dpo.py", "--dataset_name", tmp_path / "same.jsonl", "--dataset_test_split", "None")
    assert error_line(result).endswith("every pair has identical chosen and rejected answers")
    assert "1 of 1 train pairs have identical chosen and rejected answers" in result.stdout


@pytest.mark.slow
def test_long_prompts_are_cut_and_counted(tmp_path):
    rows = [json.loads(line) for line in (PREFERENCE / "train.jsonl").read_text().splitlines()][:8]
    rows[0]["prompt"] = "Review of X: " + "The plot was dull. " * 40  # longer than max_length on its own
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run_ok("dpo.py", "--dataset_name", tmp_path / "pairs.jsonl", "--dataset_test_split", "None",
                    "--max_length", 64, "--max_prompt_length", 16, "--max_steps", 1, "--output_dir", tmp_path / "out")
    assert "1 of 8 train prompts were cut to --max_prompt_length 16 (keep_end)" in result.stdout


def test_a_negative_chunk_size_is_one_line_before_anything_loads(monkeypatch):
    assert run_main_in_process(monkeypatch, "dpo.py", "--chunk_size", -1) == (
        "dpo.py: error: --chunk_size must be >= 0 (0: the plain path, the model's logits at once), got -1")


def test_help_lists_the_arguments_as_users_type_them(monkeypatch, capsys):
    assert run_main_in_process(monkeypatch, "dpo.py", "--help") == "0"  # the script's own command line
    text = capsys.readouterr().out
    for flag in ["--beta", "--loss_type", "--precompute_ref_log_probs", "--reference_free", "cDPO"]:
        assert flag in text, flag
    args = tyro.cli(Args, args=["--loss-type", "ipo", "--no-lm_head_only_at_labels", "--no-disable-dropout"],
                    use_underscores=True)  # the dashed spellings and the --no- forms still parse
    assert (args.loss_type, args.lm_head_only_at_labels, args.disable_dropout) == ("ipo", False, False)
