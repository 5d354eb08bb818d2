"""distill.py end to end on the tiny world: the default run brings the student toward the teacher (its reverse KL to
the teacher on held-out prompts falls, computed here independently of the script, and its samples' ground-truth
sentiment rises toward the teacher's); two processes against one at the same global batch; SIGTERM, then
`--resume_from_checkpoint latest` ending on the uninterrupted run's weights, with GKD's mix, whose off-policy steps
train on the dataset's completions; sequence-level KD on the teacher's samples of conversations; LoRA with the
policy-gradient form; and command lines that fail in one line before training (a teacher with another vocabulary
among them)."""

import json
import signal

import pytest
import torch
from conftest import (ASSETS, TWO_PROCESSES, assert_each_fails_with_one_line, mean_sentiment_of_samples, metric_series,
                      read_metrics, run_main_in_process, run_ok)
from safetensors.torch import load_file
from test_runs import same_weights, signal_at_step
from transformers import AutoModelForCausalLM, AutoTokenizer

STUDENT, TEACHER = ASSETS / "tiny-gpt2", ASSETS / "tiny-teacher"
SMALL = ["--per_device_train_batch_size", 8, "--max_completion_length", 12, "--dataset_test_split", "None"]


def held_out_prompts(n: int = 64) -> list[str]:
    return [json.loads(line)["prompt"] for line in
            (ASSETS / "data" / "prompts" / "test.jsonl").read_text().splitlines()][:n]


@torch.no_grad()
def reverse_kl_to_the_teacher(model_dir, prompts: list[str], n_tokens: int = 32) -> float:
    """KL(student || teacher) per completion token, exact over the vocabulary, on the student's own samples (one per
    prompt, seeded), both models at temperature 1: computed with plain transformers, independently of distill.py."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    student = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    output = student.generate(**batch, do_sample=True, top_k=0, max_new_tokens=n_tokens,
                              pad_token_id=tokenizer.eos_token_id)
    width = batch["input_ids"].shape[1]
    completion = output[:, width:]
    ended = (completion == tokenizer.eos_token_id).int().cumsum(1)  # keep tokens up to the first EOS, included
    completion_mask = (ended == 0) | ((ended == 1) & (completion == tokenizer.eos_token_id))
    attention_mask = torch.cat([batch["attention_mask"], completion_mask.long()], dim=1)
    scored = slice(width - 1, output.shape[1] - 1)  # the positions that predict the completion tokens
    student_logp = torch.log_softmax(student(output, attention_mask=attention_mask).logits[:, scored], -1)
    teacher_logp = torch.log_softmax(teacher(output, attention_mask=attention_mask).logits[:, scored], -1)
    per_token = (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    return (per_token[completion_mask].sum() / completion_mask.sum()).item()


@pytest.mark.slow
def test_default_run_brings_the_student_toward_the_teacher(tmp_path):
    output_dir = tmp_path / "out"
    run_ok("distill.py", "--output_dir", output_dir)
    prompts = held_out_prompts()
    before, after = reverse_kl_to_the_teacher(STUDENT, prompts), reverse_kl_to_the_teacher(output_dir, prompts)
    assert after < 0.5 * before, (before, after)
    eval_loss = metric_series(output_dir, "eval_loss")  # the script's own measure: the same divergence (beta 1)
    assert len(eval_loss) == 3 and eval_loss[-1] < 0.5 * eval_loss[0], eval_loss
    sentiment = {name: mean_sentiment_of_samples(path, prompts, n_tokens=32)
                 for name, path in [("student", STUDENT), ("distilled", output_dir), ("teacher", TEACHER)]}
    assert sentiment["distilled"] > sentiment["student"] + 0.15, sentiment
    assert abs(sentiment["teacher"] - sentiment["distilled"]) < abs(sentiment["teacher"] - sentiment["student"]) / 2
    row = read_metrics(output_dir)[-2]
    for key in ("loss", "entropy", "grad_norm", "learning_rate", "num_tokens", "completions/mean_length",
                "completions/clipped_ratio", "completions/mean_terminated_length", "samples_per_second",
                "peak_memory_mb", "on_policy"):
        assert key in row, key
    samples = [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 40 * 32 and {"step", "prompt", "completion", "source", "loss"} <= set(samples[0])


@pytest.mark.slow
def test_two_processes_make_the_update_of_one_process_at_the_same_global_batch(tmp_path):
    """1 process x 2 accumulated micro-batches of 8 and 2 processes x 8, 2 steps: the same samples (each micro-batch
    is seeded by its place in the global batch), the same normalisation, so the same metrics and weights."""
    run_ok("distill.py", *SMALL, "--max_steps", 2, "--gradient_accumulation_steps", 2, "--output_dir", tmp_path / "one")
    run_ok("distill.py", *SMALL, "--max_steps", 2, "--output_dir", tmp_path / "two", launcher=TWO_PROCESSES)
    for key in ["loss", "entropy", "grad_norm", "completions/mean_length", "num_tokens"]:
        expected = metric_series(tmp_path / "one", key)
        assert metric_series(tmp_path / "two", key) == pytest.approx(expected, rel=1e-4, abs=1e-6), key
    one, two = (load_file(tmp_path / run / "model.safetensors") for run in ("one", "two"))
    assert all(torch.allclose(one[name], two[name], atol=1e-5) for name in one)
    assert max((one[name] - load_file(STUDENT / "model.safetensors")[name]).abs().max() for name in one) > 1e-4


@pytest.mark.slow
def test_sigterm_then_latest_ends_where_the_uninterrupted_run_ends_and_off_policy_steps_train_on_the_data(tmp_path):
    """What Slurm and Kubernetes do (SIGTERM mid-run, then the same command with --resume_from_checkpoint latest),
    with GKD's mix (lmbda 0.5): the step's source resumes too, and a dataset step trains on the rows' own completions
    (cut to 12 tokens)."""
    data = ASSETS / "data" / "sft_prompt_completion"
    args = [*SMALL, "--dataset_name", data, "--lmbda", 0.5, "--max_steps", 8]
    interrupted = signal_at_step("distill.py", args, tmp_path / "run", step=2)
    assert interrupted.returncode == 128 + signal.SIGTERM, interrupted.stderr[-2000:]
    (checkpoint,) = (tmp_path / "run").glob("checkpoint-*")
    assert f"stopped by SIGTERM: saved {checkpoint}; resume with: python " in interrupted.stdout
    resumed = run_ok("distill.py", *args, "--output_dir", tmp_path / "run", "--resume_from_checkpoint", "latest")
    assert f"resuming from the latest checkpoint, {checkpoint}" in resumed.stdout
    run_ok("distill.py", *args, "--output_dir", tmp_path / "whole")
    assert same_weights(tmp_path / "run", tmp_path / "whole")
    for key in ["step", "loss", "entropy", "on_policy", "grad_norm"]:
        assert metric_series(tmp_path / "run", key) == pytest.approx(metric_series(tmp_path / "whole", key)), key
    samples = [json.loads(line) for line in (tmp_path / "whole" / "samples.jsonl").read_text().splitlines()]
    sources = [sample["source"] for sample in samples[::8]]
    assert set(sources) == {"student", "dataset"} and metric_series(tmp_path / "whole", "on_policy") == [
        float(source == "student") for source in sources]
    completions = [json.loads(line)["completion"] for line in (data / "train.jsonl").read_text().splitlines()]
    assert all(any(completion.startswith(sample["completion"]) for completion in completions)
               for sample in samples if sample["source"] == "dataset")


@pytest.mark.slow
def test_sequence_level_kd_trains_the_off_policy_steps_on_the_teachers_samples_of_conversations(tmp_path):
    """--seq_kd with conversational prompts (chat template), the symmetric JSD and the plain (unchunked) loss."""
    run_ok("distill.py", *SMALL, "--dataset_name", ASSETS / "data" / "sft_messages", "--lmbda", 0.5, "--seq_kd",
           "--beta", 0.5, "--chunk_size", 0, "--max_steps", 4, "--output_dir", tmp_path / "out")
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [sample["source"] for sample in samples[::8]] == ["teacher", "teacher", "teacher", "student"]
    assert samples[0]["prompt"][0]["role"] == "user"  # the conversation, rendered with the chat template
    assert all(value > 0 for value in metric_series(tmp_path / "out", "loss"))


@pytest.mark.slow
def test_lora_with_the_policy_gradient_form_saves_a_model_plain_transformers_loads(tmp_path):
    run_ok("distill.py", *SMALL, "--use_peft", "--loss_type", "reverse_kl_reward", "--max_steps", 2,
           "--learning_rate", 1e-2, "--output_dir", tmp_path / "out")
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    before = AutoModelForCausalLM.from_pretrained(STUDENT)
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), before.parameters()))
    assert moved > 1e-5 and all(torch.isfinite(torch.tensor(metric_series(tmp_path / "out", "loss"))))


def test_bad_command_lines_fail_with_one_clear_line_before_training(tmp_path, monkeypatch, capsys):
    from transformers import GPT2Config

    GPT2Config(vocab_size=700, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0).save_pretrained(
        tmp_path / "other_vocabulary")
    (tmp_path / "no_prompt.jsonl").write_text('{"text": "hello"}\n')
    prompts = ASSETS / "data" / "prompts"
    cases = [
        (["--teacher_model_name_or_path", tmp_path / "other_vocabulary"],
         f"the student {STUDENT} has a vocabulary of 602 tokens but the teacher {tmp_path / 'other_vocabulary'} "
         "has 700"),
        (["--teacher_model_name_or_path", tmp_path / "missing"],
         f"--teacher_model_name_or_path {tmp_path / 'missing'} does not exist"),
        (["--beta", 1.5], "--beta must be in [0, 1], got 1.5"),
        (["--learning_rate", -1e-5], "--learning_rate must be positive, got -1e-05"),
        (["--lmbda", -0.1], "--lmbda must be in [0, 1], got -0.1"),
        (["--temperature", 0], "--temperature must be positive"),
        (["--chunk_size", -1], "--chunk_size and --save_steps must be >= 0"),
        (["--max_completion_length", 0], "--max_completion_length must be a positive integer"),
        (["--loss_type", "reverse_kl_reward", "--lmbda", 0.5], "it needs --lmbda 1, got 0.5"),
        (["--dataset_name", prompts, "--lmbda", 0.5], "has prompts only (expected a 'completion' or a 'messages' "
                                                       "column); pass --seq_kd"),
        (["--dataset_name", tmp_path / "no_prompt.jsonl"], "expected a 'prompt' column (and optionally 'completion') "
                                                           "or a 'messages' column; found columns ['text']"),
        (["--per_device_train_batch_size", 600], "the training set has 500 prompts but one optimizer step needs 600"),
        (["--resume_from_checkpoint", tmp_path], "is not a checkpoint directory of this script"),
    ]
    assert_each_fails_with_one_line(monkeypatch, "distill.py", cases, tmp_path / "out")
    assert "parameters" not in capsys.readouterr().out  # no model was loaded


def test_an_unknown_loss_type_names_the_choices(monkeypatch, capsys):
    assert run_main_in_process(monkeypatch, "distill.py", "--loss_type", "kl") == "2"  # tyro's usage error
    assert "invalid choice 'kl' for argument '--loss_type'" in " ".join(capsys.readouterr().err.split())



def test_fsdp_without_a_gpu_is_one_line(monkeypatch, tmp_path):
    """As tests/test_scaling.py checks for the other scripts."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    line = run_main_in_process(monkeypatch, "distill.py", "--output_dir", tmp_path / "out")
    assert line.startswith("distill.py: error: FSDP was requested") and "no GPU" in line, line
    assert not (tmp_path / "out").exists()
