"""orpo.py: the odds-ratio loss by hand (also at log-prob 0), the NLL's targets (never padding), then learning,
several processes, resume and bad input. (cpo.py's tests hold the LoRA run for both reference-free scripts.)"""

import json
import math

import pytest
import torch
import tyro
from conftest import (ASSETS, assert_prefers_chosen_and_writes_more_positive_reviews,
                      assert_resumed_run_ends_where_the_uninterrupted_run_ends,
                      assert_same_training_however_the_global_batch_is_split, error_line, read_metrics,
                      run_main_in_process, run_ok, run_script)
from transformers import AutoModelForCausalLM, AutoTokenizer

from orpo import (Args, chosen_nll_labels, chosen_nll_sum, collate_pairs, odds_ratio_loss, token_log_probs,
                  tokenize_pair)

PREFERENCE = ASSETS / "data" / "preference"
SHORT = ["--max_steps", 12, "--eval_steps", 6, "--logging_steps", 2]
KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"}


def log_sigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------------------- unit tests
def test_odds_ratio_loss_by_hand():
    chosen, rejected = [-0.5, -2.0], [-1.5, -0.3]  # per-token averaged log-probs
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = odds_ratio_loss(
        torch.tensor(chosen), torch.tensor(rejected), beta=0.25)
    # log odds(y) = log(p / (1 - p)) with p = e^logp, written out from the definition
    log_odds = [math.log(math.exp(c) / (1 - math.exp(c))) - math.log(math.exp(r) / (1 - math.exp(r)))
                for c, r in zip(chosen, rejected)]
    assert losses.tolist() == pytest.approx([0.25 * log_sigmoid(x) for x in log_odds], abs=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([0.25 * c for c in chosen], abs=1e-6)
    assert rejected_rewards.tolist() == pytest.approx([0.25 * r for r in rejected], abs=1e-6)
    assert log_odds_ratio.item() == pytest.approx(sum(log_sigmoid(x) for x in log_odds) / 2, abs=1e-6)
    assert log_odds_chosen.item() == pytest.approx(sum(log_odds) / 2, abs=1e-6)


@pytest.mark.parametrize("logp", [0.0, -1e-9, -1e-5])
def test_odds_ratio_loss_is_finite_with_a_finite_gradient_at_and_near_log_prob_zero(logp):
    chosen = torch.tensor([logp, -1.0], requires_grad=True)
    rejected = torch.tensor([-1.0, logp], requires_grad=True)
    losses, *_ = odds_ratio_loss(chosen, rejected, beta=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    if logp == -1e-5:  # above the clamp: the exact value, log(1 - e^x) computed as log(-expm1(x))
        log_odds = (logp + 1.0) - (math.log(-math.expm1(logp)) - math.log(-math.expm1(-1.0)))
        assert losses[0].item() == pytest.approx(0.1 * log_sigmoid(log_odds), rel=1e-5)
    if logp > -1e-7:  # where the seed's log1p(-exp(x)) is -inf in float32
        assert torch.log1p(-torch.exp(torch.tensor(logp))).isinf()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


def test_padding_never_enters_the_nll_and_the_prompt_only_when_asked(tokenizer):
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-gpt2").eval()
    pair = tokenize_pair({"prompt": "Review of X:", "chosen": " Great fun.", "rejected": " Dull."}, tokenizer,
                         max_length=128, max_prompt_length=64, truncation_mode="keep_end")
    longer = tokenize_pair({"prompt": "Review of Y:", "chosen": " Fine." * 30, "rejected": " Bad." * 30},
                           tokenizer, max_length=128, max_prompt_length=64, truncation_mode="keep_end")
    alone = collate_pairs([pair], tokenizer.pad_token_id)
    padded = collate_pairs([pair, longer], tokenizer.pad_token_id)  # the pair is right-padded by ~60 tokens
    assert padded["input_ids"].shape[1] > alone["input_ids"].shape[1] + 50
    answer_tokens = len(pair["chosen_input_ids"]) - pair["prompt_length"]  # " Great fun." and EOS
    for include_prompt, expected_count in [(False, answer_tokens), (True, len(pair["chosen_input_ids"]) - 1)]:
        results = []
        for batch in (alone, padded):
            labels = chosen_nll_labels(batch, include_prompt)
            chosen = {"input_ids": batch["input_ids"][:1], "attention_mask": batch["attention_mask"][:1],
                      "labels": labels[:1]}  # the pair's chosen sequence
            with torch.no_grad():
                token_logps = token_log_probs(model, model, chosen, chunk_size=3).log_probs  # several chunks
            results.append(chosen_nll_sum(token_logps, labels[:1]))
        (alone_sum, alone_count), (padded_sum, padded_count) = results
        assert alone_count.item() == padded_count.item() == expected_count, include_prompt
        assert padded_sum.item() == pytest.approx(alone_sum.item(), rel=1e-5), include_prompt
    # the seed's labels (the input ids) would have made every pad token of the padded row a target
    assert (padded["input_ids"][0, 1:] != -100).sum().item() > expected_count + 50


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_scoring_the_prompts_too_leaves_the_answers_log_probs_and_gradients_as_they_were(tokenizer, chunk_size):
    # --nll_include_prompt: the forward scores the chosen prompts too (the NLL's targets); the odds ratio keeps the
    # answers' positions only and must see what a forward over the answers alone gives, values and gradients
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-gpt2").eval()
    rows = [{"prompt": "Review of X:", "chosen": " Great fun.", "rejected": " Dull."},
            {"prompt": "Review of a longer title:", "chosen": " Fine." * 5, "rejected": " Bad." * 3}]
    batch = collate_pairs([tokenize_pair(row, tokenizer, max_length=128, max_prompt_length=64,
                                         truncation_mode="keep_end") for row in rows], tokenizer.pad_token_id)
    union = {**batch, "labels": torch.cat((chosen_nll_labels(batch, include_prompt=True), batch["labels"][2:]))}
    target = batch["labels"][:, 1:] != -100
    results = []
    for inputs in (batch, union):
        model.zero_grad()
        token_logps = token_log_probs(model, model, inputs, chunk_size, extras=("mean_logits",))
        answers = token_logps.log_probs.masked_fill(~target, 0)
        answers.sum().backward()
        results.append((answers.detach(), token_logps.mean_logits.masked_fill(~target, 0),
                        {name: p.grad.clone() for name, p in model.named_parameters()}))
    (answers, mean_logits, grads), (union_answers, union_mean_logits, union_grads) = results
    assert (union["labels"][:2, 1:] != -100).sum() > target[:2].sum()  # the prompts were scored too
    torch.testing.assert_close(union_answers, answers, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(union_mean_logits, mean_logits, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(union_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python orpo.py` as the README has it: its output_dir."""
    cwd = tmp_path_factory.mktemp("orpo-default")
    run_ok("orpo.py", cwd=cwd)
    return cwd / "runs" / "orpo"


@pytest.mark.slow
def test_default_run_prefers_chosen_on_held_out_pairs_and_writes_more_positive_reviews(default_run):
    output_dir = default_run
    assert_prefers_chosen_and_writes_more_positive_reviews(output_dir)


@pytest.mark.slow
def test_default_run_logs_the_seed_metrics(default_run):
    output_dir = default_run
    rows = read_metrics(output_dir)
    assert rows[0] == {"step": 0, "epoch": 0.0, "params_in_memory": rows[0]["params_in_memory"]}
    assert rows[0]["params_in_memory"] == AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-gpt2").num_parameters()
    train, evaluation = rows[-2], rows[-1]
    assert KEYS | {"grad_norm", "learning_rate", "num_tokens", "samples_per_second", "tokens_per_second",
                   "peak_memory_mb"} <= set(train)
    assert {f"eval_{key}" for key in KEYS} <= set(evaluation)
    # the logged loss is the NLL minus the mean odds-ratio term, log_odds_ratio = mean log sigmoid(log odds)
    assert evaluation["eval_loss"] == pytest.approx(evaluation["eval_nll_loss"] - evaluation["eval_log_odds_ratio"],
                                                    rel=1e-5)
    evaluations = [row for row in rows if "eval_loss" in row]
    assert evaluations[-1]["eval_log_odds_chosen"] > evaluations[0]["eval_log_odds_chosen"] + 0.2


@pytest.mark.slow
def test_two_processes_and_accumulation_match_one_process_at_the_same_global_batch(tmp_path):
    assert_same_training_however_the_global_batch_is_split("orpo.py", SHORT, tmp_path)


@pytest.mark.slow
def test_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path):
    # with the seed's prompt-in-NLL option, so that the forward over the prompts' and the answers' targets is
    # exercised too
    assert_resumed_run_ends_where_the_uninterrupted_run_ends("orpo.py", SHORT + ["--nll_include_prompt"], tmp_path)
    prompt_nll = read_metrics(tmp_path / "full")[-1]["eval_nll_loss"]
    assert math.isfinite(prompt_nll) and prompt_nll > 0


@pytest.mark.slow
def test_bad_input_is_one_clear_line(tmp_path, monkeypatch):
    (tmp_path / "no_chosen.jsonl").write_text(json.dumps({"prompt": "a", "rejected": "b"}) + "\n")
    result = run_script("orpo.py", "--dataset_name", tmp_path / "no_chosen.jsonl", "--dataset_test_split", "None")
    assert error_line(result) == ("orpo.py: error: expected 'chosen' and 'rejected' columns (and optionally "
                                  "'prompt'); missing ['chosen']; found columns ['prompt', 'rejected']")
    assert "parameters in memory" not in result.stdout  # failed before the model was loaded
    assert run_main_in_process(monkeypatch, "orpo.py", "--chunk_size", -1) == (
        "orpo.py: error: --chunk_size must be >= 0 (0: the plain path, the model's logits at once), got -1")
    # (bad hyper-parameters: see test_cpo.py; the two scripts validate alike, and each run costs seconds)


def test_help_lists_the_arguments_as_users_type_them(monkeypatch, capsys):
    assert run_main_in_process(monkeypatch, "orpo.py", "--help") == "0"  # the script's own command line
    text = capsys.readouterr().out
    for flag in ["--beta", "--nll_include_prompt", "--generate_during_eval", "odds-ratio"]:
        assert flag in text, flag
    assert "--reference_free" not in text and "--precompute_ref_log_probs" not in text
    args = tyro.cli(Args, args=["--nll-include-prompt", "--no-lm_head_only_at_labels"], use_underscores=True)
    assert (args.nll_include_prompt, args.lm_head_only_at_labels) == (True, False)  # dashes and --no- forms parse
