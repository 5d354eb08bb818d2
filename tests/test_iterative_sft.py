"""iterative_sft.py: the trainer's step against hand computations, the seed's four bugs (each test fails on the
seed's behaviour), accumulation, bad input, and the expert-iteration script learning on the tiny world."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import (ASSETS, REPO, TWO_PROCESSES, assert_each_fails_with_one_line, assert_help_lists, error_line,
                      mean_sentiment_of_samples, metric_series, read_metrics, run_ok, run_script)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from iterative_sft import Args, IterativeSFTTrainer, keep_best

TINY = ASSETS / "tiny-gpt2"


def tiny_trainer(sgd: bool = False, lr: float = 1e-3, **kwargs) -> IterativeSFTTrainer:
    """A trainer on the tiny GPT-2 (no dropout); sgd=True uses plain SGD, whose update is linear in the gradient
    (Adam turns float noise in near-zero gradients into lr-sized steps)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(TINY)
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    optimizers = (torch.optim.SGD(model.parameters(), lr=lr), None) if sgd else (None, None)
    return IterativeSFTTrainer(model, tokenizer, optimizers=optimizers, learning_rate=lr, **kwargs)


def weights(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}


@torch.no_grad()
def hand_loss(trainer, input_ids: list[torch.Tensor], labels: list[torch.Tensor]) -> tuple[float, int]:
    """Plain torch: each example alone, cross-entropy of logits[t] against labels[t + 1] where the label is not -100;
    the sum over every example divided by the number of such tokens. Returns (loss, number of target tokens)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    total, count = 0.0, 0
    for ids, target in zip(input_ids, labels):
        logits = model(input_ids=ids[None]).logits[0, :-1]
        target = target[1:]
        keep = target != -100
        total += F.cross_entropy(logits[keep], target[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / count, count


def prompt_and_response(tokenizer, prompt: str, response: str) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids = prompt + response + EOS; labels -100 on the prompt."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(prompt_ids + response_ids), torch.tensor([-100] * len(prompt_ids) + response_ids)


EXAMPLES = [("Review of Wild River:", " The plot was superb. I loved it."),
            ("Review of Paper Letter:", " Dull."),
            ("Review of The Last Dream:", " The music felt truly moving."),
            ("Review of Golden Harbor:", " The cast was weak. The ending was bad. Skip this one.")]


# ----------------------------------------------------------------------------------------------------------------------
# The seed's bugs, one test each
# ----------------------------------------------------------------------------------------------------------------------
def test_bug1_caller_labels_are_honoured_and_the_loss_matches_a_hand_computation():
    """The seed rebuilt a decoder-only model's labels from input_ids, so the prompt was learned too."""
    trainer = tiny_trainer()
    pairs = [prompt_and_response(trainer.tokenizer, p, r) for p, r in EXAMPLES]
    input_ids, labels = [ids for ids, _ in pairs], [lab for _, lab in pairs]
    expected, count = hand_loss(trainer, input_ids, labels)
    whole_text, _ = hand_loss(trainer, input_ids, input_ids)  # what the seed trained on
    assert abs(expected - whole_text) > 0.1
    stats = trainer.step(input_ids=input_ids, labels=labels)
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)
    assert stats["num_tokens"] == count == sum(len(trainer.tokenizer(r)["input_ids"]) + 1 for _, r in EXAMPLES)
    assert stats["optimizer_steps"] == 1 and stats["samples"] == 4 and stats["learning_rate"] == 1e-3
    assert stats["grad_norm"] > 0


def test_bug2_texts_labels_are_the_completion_or_the_decoder_targets():
    """The seed tokenised texts_labels from texts. Decoder-only: texts_labels[i] ends texts[i] and only its tokens
    carry the loss; the same examples as tensors give the same loss and the same update."""
    texts = [p + r for p, r in EXAMPLES]
    suffixes = [r for _, r in EXAMPLES]
    by_text, by_tensor = tiny_trainer(), tiny_trainer()
    tokenizer = by_text.tokenizer
    examples = by_text._examples(None, None, None, texts, suffixes)
    for example, (prompt, response) in zip(examples, EXAMPLES):
        prompt_ids = tokenizer(prompt)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        assert example["input_ids"].tolist() == prompt_ids + response_ids
        assert example["labels"].tolist() == [-100] * len(prompt_ids) + response_ids
    expected, count = hand_loss(by_text, [e["input_ids"] for e in examples], [e["labels"] for e in examples])
    stats = by_text.step(texts=texts, texts_labels=suffixes)
    assert stats["loss"] == pytest.approx(expected, rel=1e-5) and stats["num_tokens"] == count
    tensor_stats = by_tensor.step(input_ids=[e["input_ids"] for e in examples],
                                  labels=[e["labels"] for e in examples])
    assert tensor_stats["loss"] == pytest.approx(stats["loss"], rel=1e-6)
    for name, value in weights(by_text).items():
        assert torch.allclose(value, weights(by_tensor)[name], atol=1e-7), name
    # texts alone: the whole text is learned (the seed's default); a label that is not the text's end is an error
    assert by_text.step(texts=texts)["num_tokens"] == sum(len(tokenizer(t)["input_ids"]) - 1 for t in texts)
    with pytest.raises(ValueError, match="must be the end of texts"):
        by_text.step(texts=texts, texts_labels=["not the end"] * 4)


def test_bug2_encoder_decoder_texts_labels_are_the_decoder_targets():
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(TINY)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                      decoder_start_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                      eos_token_id=tokenizer.eos_token_id, dropout_rate=0.0)
    model = T5ForConditionalGeneration(config)
    trainer = IterativeSFTTrainer(model, tokenizer, learning_rate=1e-2)
    prompts, targets = [p for p, _ in EXAMPLES], [r for _, r in EXAMPLES]
    with torch.no_grad():  # transformers' own loss: the mean cross-entropy over every decoder target
        losses = [model(input_ids=torch.tensor([tokenizer(p)["input_ids"]]),
                        labels=torch.tensor([tokenizer(t)["input_ids"]])).loss.item() for p, t in zip(prompts, targets)]
    counts = [len(tokenizer(t)["input_ids"]) for t in targets]
    expected = sum(loss * n for loss, n in zip(losses, counts)) / sum(counts)
    stats = trainer.step(texts=prompts, texts_labels=targets)
    assert stats["loss"] == pytest.approx(expected, rel=1e-5) and stats["num_tokens"] == sum(counts)
    for _ in range(20):
        last = trainer.step(texts=prompts, texts_labels=targets)["loss"]
    assert last < stats["loss"] - 1.0  # it learns the targets
    with pytest.raises(ValueError, match="encoder-decoder model needs its decoder targets"):
        trainer.step(texts=prompts)


def test_chunked_log_probs_take_the_plain_paths_step():
    """chunk_size 3 (many chunks, each recomputed in the backward) and the default (one chunk here) take the step the
    plain path takes (chunk_size 0: the model's whole logits): the same loss, gradient norm and weights."""
    trainers = {chunk_size: tiny_trainer(sgd=True, lr=0.1, chunk_size=chunk_size) for chunk_size in (0, 3, 1024)}
    pairs = [prompt_and_response(trainers[0].tokenizer, p, r) for p, r in EXAMPLES]
    stats = {chunk_size: trainer.step(input_ids=[ids for ids, _ in pairs], labels=[lab for _, lab in pairs])
             for chunk_size, trainer in trainers.items()}
    plain = weights(trainers[0])
    for chunk_size in (3, 1024):
        assert stats[chunk_size]["loss"] == pytest.approx(stats[0]["loss"], rel=1e-5)
        assert stats[chunk_size]["grad_norm"] == pytest.approx(stats[0]["grad_norm"], rel=1e-4)
        for name, value in weights(trainers[chunk_size]).items():
            torch.testing.assert_close(value, plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bug3_max_length_truncates_each_sequence_not_the_batch():
    """The seed sliced (B, T) tensors as v[-max_length:], keeping the last max_length *examples* whole."""
    ids = [torch.arange(10, 20) + 10 * i for i in range(3)]
    labels = [torch.cat([torch.full((3,), -100), x[3:]]) for x in ids]
    keep_end = tiny_trainer(max_length=4)
    for example, x in zip(keep_end._examples(ids, None, labels, None, None), ids):
        assert example["input_ids"].tolist() == x[-4:].tolist() == example["labels"].tolist()
        assert example["attention_mask"].tolist() == [1, 1, 1, 1]
    keep_start = tiny_trainer(max_length=4, truncation_mode="keep_start")
    for example, x in zip(keep_start._examples(ids, None, labels, None, None), ids):
        assert example["input_ids"].tolist() == x[:4].tolist()
        assert example["labels"].tolist() == [-100, -100, -100, x[3].item()]
    stats = keep_end.step(input_ids=ids, labels=labels)
    assert stats["samples"] == 3 and stats["num_tokens"] == 3 * 3  # every example, 3 predicted tokens of 4 each
    assert keep_start.step(input_ids=ids, labels=labels)["num_tokens"] == 3


def test_bug4_eos_is_learned_when_the_pad_token_is_eos():
    """The seed's collator set every label equal to the pad id to -100: with GPT-2's pad == EOS the EOS was never a
    target. Here the EOS of every example is a target and padding (the same id) is not."""
    trainer = tiny_trainer(lr=3e-3)
    tokenizer = trainer.tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    pairs = [prompt_and_response(tokenizer, p, r) for p, r in EXAMPLES]
    input_ids = [ids for ids, _ in pairs]  # each ends with EOS; different lengths, so the batch is padded with EOS
    expected, count = hand_loss(trainer, input_ids, input_ids)
    stats = trainer.step(input_ids=input_ids)
    assert stats["num_tokens"] == count == sum(len(ids) - 1 for ids in input_ids)
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)

    def p_eos() -> float:  # mean probability of EOS right after each full text
        model = trainer.accelerator.unwrap_model(trainer.model)
        with torch.no_grad():
            return sum(model(input_ids=ids[None, :-1]).logits[0, -1].softmax(-1)[tokenizer.eos_token_id].item()
                       for ids in input_ids) / len(input_ids)

    before = p_eos()
    for _ in range(15):
        trainer.step(input_ids=input_ids, labels=[lab for _, lab in pairs])
    assert p_eos() > before + 0.2, (before, p_eos())


# ----------------------------------------------------------------------------------------------------------------------
# Accumulation, shuffling, partial groups, non-finite losses, bad input
# ----------------------------------------------------------------------------------------------------------------------
def test_batch_4_equals_batch_2_with_accumulation_2_and_batch_1_with_accumulation_4():
    """The loss of an optimizer step is its summed token NLL over its target tokens, however it is split (with SGD,
    whose update is linear in the gradient, the weights must agree)."""
    pairs = [prompt_and_response(AutoTokenizer.from_pretrained(TINY), p, r) for p, r in EXAMPLES]
    results = []
    for batch, accumulation in [(4, 1), (2, 2), (1, 4)]:
        trainer = tiny_trainer(sgd=True, lr=0.5, per_device_train_batch_size=batch,
                               gradient_accumulation_steps=accumulation, max_grad_norm=None)
        initial = weights(trainer)
        stats = trainer.step(input_ids=[ids for ids, _ in pairs], labels=[lab for _, lab in pairs])
        assert stats["optimizer_steps"] == 1
        results.append((stats, weights(trainer)))
    (stats, reference) = results[0]
    moved = max((reference[name] - initial[name]).abs().max().item() for name in initial)
    assert moved > 1e-3
    for other_stats, other in results[1:]:
        for key in ("loss", "grad_norm", "num_tokens"):
            assert other_stats[key] == pytest.approx(stats[key], rel=1e-5), key
        for name in reference:
            assert torch.allclose(other[name], reference[name], atol=1e-6), name


TWO_PROCESS_STEP = """
import json, sys
import torch
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from safetensors.torch import save_file
from test_iterative_sft import EXAMPLES, prompt_and_response, tiny_trainer, weights

trainer = tiny_trainer(sgd=True, lr=0.5, per_device_train_batch_size=2, max_grad_norm=None)
rank = trainer.accelerator.process_index
pairs = [prompt_and_response(trainer.tokenizer, p, r) for p, r in EXAMPLES][rank::2]  # this process's share
stats = trainer.step(input_ids=[ids for ids, _ in pairs], labels=[lab for _, lab in pairs])
if trainer.accelerator.is_main_process:
    save_file(weights(trainer), {out!r} + "/weights.safetensors")
    open({out!r} + "/stats.json", "w").write(json.dumps(stats))
trainer.accelerator.end_training()
"""


@pytest.mark.slow
def test_two_processes_match_one_process_at_the_same_global_batch(tmp_path):
    """`accelerate launch` with 2 processes (gloo on CPU), each stepping on 2 of the 4 examples, makes the same update
    as one process on all 4: the loss is normalised by the target tokens of both processes."""
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_STEP.format(repo=str(REPO), tests=str(REPO / "tests"), out=str(tmp_path)))
    run_ok(script, launcher=TWO_PROCESSES)
    trainer = tiny_trainer(sgd=True, lr=0.5, per_device_train_batch_size=4, max_grad_norm=None)
    pairs = [prompt_and_response(trainer.tokenizer, p, r) for p, r in EXAMPLES]
    stats = trainer.step(input_ids=[ids for ids, _ in pairs], labels=[lab for _, lab in pairs])
    two = json.loads((tmp_path / "stats.json").read_text())
    assert two["samples"] == 4 and two["num_tokens"] == stats["num_tokens"]
    for key in ("loss", "grad_norm"):
        assert two[key] == pytest.approx(stats[key], rel=1e-5), key
    two_weights, one_weights = load_file(tmp_path / "weights.safetensors"), weights(trainer)
    for name in one_weights:
        assert torch.allclose(two_weights[name], one_weights[name], atol=1e-6), name


def test_partial_last_group_steps_and_the_shuffle_repeats():
    pairs = [prompt_and_response(AutoTokenizer.from_pretrained(TINY), p, r) for p, r in EXAMPLES + EXAMPLES[:1]]
    runs = []
    for seed in (0, 0, 1):
        trainer = tiny_trainer(per_device_train_batch_size=2, gradient_accumulation_steps=2, seed=seed)
        stats = [trainer.step(input_ids=[ids for ids, _ in pairs], labels=[lab for _, lab in pairs])
                 for _ in range(2)]
        assert [s["optimizer_steps"] for s in stats] == [2, 2]  # 5 examples: micro-batches 2 + 2, then 1
        assert trainer.optimizer_steps == 4 and stats[0]["samples"] == 5
        runs.append(weights(trainer))
    assert all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])  # seeded shuffle: the same run
    assert any(not torch.equal(runs[0][name], runs[2][name]) for name in runs[0])  # another order, another run


def test_a_non_finite_loss_raises_before_the_optimizer_steps():
    trainer = tiny_trainer()
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(float("nan"))
    before = weights(trainer)
    ids, labels = prompt_and_response(trainer.tokenizer, *EXAMPLES[0])
    with pytest.raises(FloatingPointError, match="the optimizer was not stepped"):
        trainer.step(input_ids=[ids], labels=[labels])
    for name, value in weights(trainer).items():
        assert torch.equal(value, before[name]) or name == "transformer.ln_f.weight", name
    assert trainer.optimizer_steps == 0


def test_bad_input_raises_clear_value_errors():
    trainer = tiny_trainer()
    tokenizer, model = trainer.tokenizer, trainer.accelerator.unwrap_model(trainer.model)
    ids = torch.tensor([5, 6, 7])
    step_cases = [
        ({}, "needs input_ids"),
        ({"input_ids": [ids], "texts": ["a"]}, "not both"),
        ({"input_ids": []}, "input_ids is empty"),
        ({"texts": []}, "texts is empty"),
        ({"input_ids": ids}, "must be a list of 1-D tensors"),
        ({"input_ids": [ids, [1, 2]]}, "element 1 is a list"),
        ({"input_ids": [ids, torch.tensor([], dtype=torch.long)]}, "must not be empty"),
        ({"input_ids": [ids[None]]}, "has shape"),
        ({"input_ids": [ids, ids], "labels": [ids]}, "labels has 1 elements but input_ids has 2"),
        ({"input_ids": [ids], "labels": [ids[:2]]}, "must have the length of input_ids"),
        ({"input_ids": [ids], "attention_mask": [ids[:2]]}, "must have the length of input_ids"),
        ({"texts": ["a", "b"], "texts_labels": ["a"]}, "texts_labels has 1 elements but texts has 2"),
        ({"texts": ["a", 3]}, "must be strings"),
        ({"texts": [""]}, "must not be empty"),
        ({"input_ids": [ids], "texts_labels": ["a"]}, "texts_labels go with texts"),
        ({"texts": ["a"], "labels": [ids]}, "go with input_ids"),
    ]
    for kwargs, message in step_cases:
        with pytest.raises(ValueError, match=message):
            trainer.step(**kwargs)
    assert trainer.calls == 0  # nothing was trained
    init_cases = [
        ({"model": model, "tokenizer": None}, "tokenizer must be a transformers tokenizer"),
        ({"model": None, "tokenizer": tokenizer}, "model must be a torch module"),
        ({"model": model, "tokenizer": tokenizer, "truncation_mode": "middle"}, "truncation_mode must be"),
        ({"model": model, "tokenizer": tokenizer, "per_device_train_batch_size": 0}, "positive integer"),
        ({"model": model, "tokenizer": tokenizer, "max_length": 0}, "max_length must be a positive integer"),
        ({"model": model, "tokenizer": tokenizer, "chunk_size": -1}, "chunk_size must be 0 \\(the plain path\\) or a"),
    ]
    for kwargs, message in init_cases:
        with pytest.raises(ValueError, match=message):
            IterativeSFTTrainer(**kwargs)


def test_keep_best_takes_each_prompts_top_samples():
    rewards = [0.1, 0.9, 0.5, 0.9, -1.0, -3.0, -2.0, -0.5]  # two prompts of four samples
    assert keep_best(rewards, 4, 2) == [1, 3, 4, 7]
    assert keep_best(rewards, 4, 4) == list(range(8))


# ----------------------------------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_run_raises_the_reward_and_the_ground_truth(tmp_path):
    """`python iterative_sft.py` with no arguments (the tiny world): the fresh samples' reward rises from the initial
    policy to the final one, and the saved model (plain transformers) writes more positive reviews than the initial
    policy by the ground-truth scorer, which training never saw."""
    run_ok("iterative_sft.py", cwd=tmp_path)
    output_dir = tmp_path / "runs" / "iterative_sft"
    rewards = metric_series(output_dir, "reward/mean")
    assert len(rewards) == 9  # before training and after each of the 8 iterations
    assert rewards[-1] > rewards[0] + 8, rewards  # about -2.6 -> 14
    rows = read_metrics(output_dir)
    assert [row["step"] for row in rows] == list(range(9))
    assert all(row["reward/kept_mean"] >= row["reward/mean"] and row["peak_memory_mb"] > 0 for row in rows)
    assert all("loss" in row for row in rows[:-1]) and "loss" not in rows[-1]
    samples = [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 9 * 32 * 8 and {"step", "prompt", "response", "reward", "kept"} <= set(samples[0])
    assert sum(s["kept"] for s in samples if s["step"] == 0) == 32 * 2
    assert json.loads((output_dir / "args.json").read_text())["keep_fraction"] == 0.25
    prompts = [json.loads(line)["prompt"] for line in
               (ASSETS / "data" / "prompts" / "test.jsonl").read_text().splitlines()][:64]
    before = mean_sentiment_of_samples(TINY, prompts, n_tokens=24)
    after = mean_sentiment_of_samples(output_dir, prompts, n_tokens=24)  # loads with AutoModelForCausalLM
    assert after > before + 0.3, (before, after)  # 0.09 -> 0.60 measured


@pytest.mark.slow
def test_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path):
    args = ["--num_iterations", 3, "--prompts_per_iteration", 8, "--samples_per_prompt", 4,
            "--per_device_train_batch_size", 4, "--save_steps", 1]
    run_ok("iterative_sft.py", *args, "--output_dir", tmp_path / "full")
    assert (tmp_path / "full" / "checkpoint-2" / "training_state.pt").exists()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "checkpoint-2")
    run_ok("iterative_sft.py", *args, "--output_dir", tmp_path / "resumed",
           "--resume_from_checkpoint", tmp_path / "checkpoint-2")
    full, resumed = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "resumed"))
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.allclose(full[name], resumed[name], atol=1e-6), name
    after = [row for row in read_metrics(tmp_path / "full") if row["step"] >= 2]
    logged = read_metrics(tmp_path / "resumed")
    assert [row["step"] for row in logged] == [2, 3]
    for expected, got in zip(after, logged):
        for key in ("reward/mean", "reward/std", "reward/kept_mean", "response_length/mean", "loss"):
            if key in expected:
                assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (expected["step"], key)


@pytest.mark.slow
def test_bad_command_lines_fail_with_one_clear_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    (tmp_path / "no_prompt.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "empty_prompts.jsonl").write_text('{"prompt": ""}\n' * 40)
    (tmp_path / "empty_split").mkdir()
    (tmp_path / "empty_split" / "train.csv").write_text("prompt\n")  # a header and no rows
    cases = [
        (["--keep_fraction", 0], "--keep_fraction must be in (0, 1]"),
        (["--keep_fraction", 1.5], "--keep_fraction must be in (0, 1]"),
        (["--samples_per_prompt", 0], "--samples_per_prompt must be a positive integer, got 0"),
        (["--chunk_size", -1], "--chunk_size must be 0 (the plain path) or a positive number of positions, got -1"),
        (["--dataset_name", tmp_path / "no_prompt.jsonl"], "expected a 'prompt' or 'query' column"),
        (["--dataset_name", tmp_path / "empty_prompts.jsonl"], "has 0 non-empty prompts but one iteration needs 32"),
        (["--dataset_name", tmp_path / "empty_split"], "(is a data file empty? every split needs at least one row)"),
        (["--dataset_train_split", "validation"], "has no split 'validation'"),
        (["--reward_model", "no-such-task:some/model"], "'no-such-task' is not a transformers pipeline task"),
        (["--output_min_length", 8, "--output_max_length", 8], "--output_max_length must be above"),
    ]
    assert_each_fails_with_one_line(monkeypatch, "iterative_sft.py", cases, tmp_path / "out")
    assert "parameters," not in capsys.readouterr().out  # no model was loaded
    # and as a user sees it: a non-zero exit whose last line is the message
    line = error_line(run_script("iterative_sft.py", "--keep_fraction", 1.5, "--output_dir", tmp_path / "out"))
    assert line == "iterative_sft.py: error: --keep_fraction must be in (0, 1] (the fraction of each prompt's " \
                   "samples trained on), got 1.5"


def test_help(capsys):
    assert_help_lists(Args, capsys, ["--keep-fraction", "--samples-per-prompt", "--num-iterations", "--sft-epochs",
                                     "--reward-model", "--truncation-mode", "--output-min-length",
                                     "--resume-from-checkpoint"])


# ----------------------------------------------------------------------------------------------------------------------
# Never lose a run (issue 24): a signal ends an iteration (sample, score, fine-tune) with a checkpoint, latest resumes
# it exactly, a previous run is never overwritten, bad inputs are one line before any model loads
# ----------------------------------------------------------------------------------------------------------------------
SIGNAL_ARGS = ["--num_iterations", 5, "--prompts_per_iteration", 8, "--samples_per_prompt", 4,
               "--per_device_train_batch_size", 4, "--save_steps", 1, "--save_total_limit", 2]


@pytest.mark.slow
def test_sigint_saves_the_iteration_and_latest_resumes_to_the_uninterrupted_weights(tmp_path):
    import signal

    from test_runs import same_weights, signal_at_step

    run = tmp_path / "run"
    interrupted = signal_at_step("iterative_sft.py", SIGNAL_ARGS, run, step=1, signum=signal.SIGINT)
    assert interrupted.returncode == 128 + signal.SIGINT, interrupted.stderr[-2000:]
    lines = [line for line in interrupted.stdout.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGINT: saved "), interrupted.stdout[-2000:]
    # --save_total_limit 2: the newest two of the checkpoints after each iteration, the last one the signal's
    checkpoints = sorted(run.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert len(checkpoints) == 2 and f"saved {checkpoints[-1]};" in lines[0], [path.name for path in checkpoints]
    stopped_after = int(checkpoints[-1].name.split("-")[1])
    assert 2 <= stopped_after <= 5  # after the iteration logged as step 1; 5: before the last, sampling-only round
    for path in checkpoints[-1].glob("*.pt"):  # optimizer, schedule, counters and RNG: no pickled objects
        torch.load(path, weights_only=True)
    resumed = run_ok("iterative_sft.py", *SIGNAL_ARGS, "--output_dir", run, "--resume_from_checkpoint", "latest")
    assert f"resuming from the latest checkpoint, {checkpoints[-1]}" in resumed.stdout
    run_ok("iterative_sft.py", *SIGNAL_ARGS, "--output_dir", tmp_path / "whole")
    assert same_weights(run, tmp_path / "whole")
    logged, whole = read_metrics(run), read_metrics(tmp_path / "whole")
    assert [row["step"] for row in logged] == [row["step"] for row in whole] == [0, 1, 2, 3, 4, 5]
    for expected, got in zip(whole, logged):
        assert got["reward/mean"] == expected["reward/mean"], expected["step"]
    samples = [json.loads(line)["step"] for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples == [step for step in range(6) for _ in range(8 * 4)]  # each round's samples once
    # the requeued command once more: the run is finished, nothing to do
    again = run_ok("iterative_sft.py", *SIGNAL_ARGS, "--output_dir", run, "--resume_from_checkpoint", "latest")
    assert "holds a finished run: nothing to resume" in again.stdout


def test_no_checkpoint_is_loaded_with_pickled_code():
    assert "weights_only=False" not in (REPO / "iterative_sft.py").read_text()
