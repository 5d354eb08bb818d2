"""Never lose a run (issue 24): SIGTERM / SIGINT end a run with a checkpoint of the step in progress, checkpoints
appear only when complete, `--resume_from_checkpoint latest` takes the newest complete one (or starts fresh), a fresh
run never writes over a previous one, bad inputs are one line before any model loads, checkpoints load with
weights_only=True, and metrics.jsonl stays strict JSON."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import OFFLINE_ENV, REPO, TWO_PROCESSES, read_metrics, run_main_in_process, run_ok
from safetensors.torch import load_file



def signal_at_step(script: str, args: list, output_dir: Path, step: int, signum=signal.SIGTERM,
                   launcher: list | None = None) -> subprocess.CompletedProcess:
    """Start `script args --output_dir output_dir`, wait until metrics.jsonl logs `step` (args must log every
    step), send signum to the process (the launcher, with several processes) and return the finished process."""
    command = (launcher or [sys.executable]) + [str(REPO / script), *map(str, args), "--output_dir", str(output_dir)]
    # the environment's thread count, as run_ok uses: a float sum over 1 thread and over 2 differs in the last bit, and
    # these tests compare the resumed weights with an uninterrupted run's bit for bit
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **OFFLINE_ENV}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    metrics, deadline = output_dir / "metrics.jsonl", time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step for line in
                                    metrics.read_text().splitlines() if line.strip()):
            break
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before the signal: make it longer"
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def same_weights(a: Path, b: Path) -> bool:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file()}


SFT_ARGS = ["--max_steps", 30, "--logging_steps", 1, "--save_steps", 20, "--eval_steps", 1000]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_step_in_progress_and_latest_resumes_to_the_uninterrupted_weights(tmp_path, signum):
    interrupted = signal_at_step("sft.py", SFT_ARGS, tmp_path / "run", step=6, signum=signum)
    assert interrupted.returncode == 128 + signum, interrupted.stderr[-2000:]
    line = [line for line in interrupted.stdout.splitlines() if line.startswith("stopped by")]
    assert len(line) == 1 and f"stopped by {signal.Signals(signum).name}: saved " in line[0], interrupted.stdout[-2000:]
    assert line[0].endswith("--resume_from_checkpoint latest") and "--output_dir" in line[0]
    saved = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert len(saved) == 1 and int(saved[0].name.split("-")[1]) >= 6  # the step in progress, before checkpoint-20
    # the same command again, with latest (what a requeued job runs), ends where the uninterrupted run ends
    resumed = run_ok("sft.py", *SFT_ARGS, "--output_dir", tmp_path / "run", "--resume_from_checkpoint", "latest")
    assert f"resuming from the latest checkpoint, {saved[0]}" in resumed.stdout
    run_ok("sft.py", *SFT_ARGS, "--output_dir", tmp_path / "whole")
    assert same_weights(tmp_path / "run", tmp_path / "whole")
    assert [row["step"] for row in read_metrics(tmp_path / "run")] == [row["step"] for row in
                                                                        read_metrics(tmp_path / "whole")]
    # once finished, the same command has nothing to do
    again = run_ok("sft.py", *SFT_ARGS, "--output_dir", tmp_path / "run", "--resume_from_checkpoint", "latest")
    assert "holds a finished run: nothing to resume" in again.stdout


@pytest.mark.slow
def test_two_processes_agree_on_the_step_and_save_one_checkpoint_together(tmp_path):
    args = [*SFT_ARGS, "--per_device_train_batch_size", 4]
    interrupted = signal_at_step("sft.py", args, tmp_path / "run", step=5, launcher=TWO_PROCESSES)
    assert interrupted.returncode != 0
    assert interrupted.stdout.count("stopped by SIGTERM: saved ") == 1, interrupted.stdout[-3000:]
    (checkpoint,) = (tmp_path / "run").glob("checkpoint-*")
    assert {path.name for path in checkpoint.glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}
    assert not list((tmp_path / "run").glob("*.incomplete"))
    run_ok("sft.py", *args, "--output_dir", tmp_path / "run", "--resume_from_checkpoint", "latest",
           launcher=TWO_PROCESSES)
    run_ok("sft.py", *args, "--output_dir", tmp_path / "whole", launcher=TWO_PROCESSES)
    assert same_weights(tmp_path / "run", tmp_path / "whole")


@pytest.mark.slow
def test_checkpoints_are_whole_limited_and_load_without_pickled_code(tmp_path):
    run_ok("sft.py", "--max_steps", 12, "--save_steps", 3, "--save_total_limit", 2, "--output_dir", tmp_path)
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-9"]
    for path in (tmp_path / "checkpoint-9").glob("*.pt"):  # training state and RNG states: no pickled objects
        torch.load(path, weights_only=True)
    # a checkpoint interrupted mid-write (never renamed into place), and one without its training state
    partial = tmp_path / "checkpoint-12.incomplete"
    partial.mkdir()
    (partial / "training_state.pt").write_bytes(b"truncat")
    (tmp_path / "checkpoint-11").mkdir()
    (tmp_path / "checkpoint-11" / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").unlink()  # as if the run had not finished
    import sft

    args = sft.Args(output_dir=str(tmp_path), resume_from_checkpoint="latest")
    sft.check_run(args, ["model_name_or_path"])
    assert args.resume_from_checkpoint == str(tmp_path / "checkpoint-9")
    empty = sft.Args(output_dir=str(tmp_path / "new"), resume_from_checkpoint="latest")
    sft.check_run(empty, ["model_name_or_path"])
    assert empty.resume_from_checkpoint is None  # nothing to resume: a fresh start


WIRED = ["sft.py", "reward.py", "dpo.py", "kto.py", "orpo.py", "cpo.py", "grpo.py", "rloo.py", "distill.py"]


@pytest.mark.parametrize("script", WIRED + ["ppo.py", "iterative_sft.py"])
def test_a_fresh_run_into_a_named_output_dir_that_holds_a_run_is_refused(monkeypatch, tmp_path, script):
    previous = tmp_path / "out"
    (previous / "checkpoint-4").mkdir(parents=True)
    (previous / "metrics.jsonl").write_text('{"step": 4}\n')
    (previous / "samples.jsonl").write_text('{"step": 4, "reward": 1.0}\n')
    before = snapshot(previous)
    line = run_main_in_process(monkeypatch, script, "--output_dir", previous)
    assert line == (f"{script}: error: --output_dir {previous} holds a previous run (checkpoint-4, metrics.jsonl, "
                    "samples.jsonl); pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to "
                    "replace it, or another --output_dir")
    assert snapshot(previous) == before


@pytest.mark.slow
def test_a_repeated_quickstart_keeps_the_first_run_and_overwrite_replaces_it(tmp_path):
    """`python sft.py` twice, from the same directory: the second run moves the first beside it, byte for byte."""
    args = ["--max_steps", 2]
    run_ok("sft.py", *args, cwd=tmp_path)
    first = snapshot(tmp_path / "runs" / "sft")
    second = run_ok("sft.py", *args, cwd=tmp_path)
    (kept,) = [path for path in (tmp_path / "runs").iterdir() if path.name.startswith("sft-")]
    assert f"held a previous run: kept as {Path('runs') / kept.name}" in second.stdout
    assert snapshot(kept) == first and (tmp_path / "runs" / "sft" / "model.safetensors").exists()
    run_ok("sft.py", *args, "--output_dir", kept, "--overwrite_output_dir", cwd=tmp_path)
    assert len(list((tmp_path / "runs").iterdir())) == 2 and snapshot(kept) != first


@pytest.mark.parametrize("script", WIRED + ["ppo.py", "iterative_sft.py"])
def test_bad_inputs_are_one_line_before_any_model_loads_and_leave_the_previous_run(monkeypatch, tmp_path, capsys,
                                                                                   script):
    model = "--model_name" if script == "ppo.py" else "--model_name_or_path"  # ppo.py keeps the seed's PPOConfig name
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(previous)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    cases = [(["--learning_rate", -1e-5], "--learning_rate must be positive, got -1e-05"),
             (["--learning_rate", 0], "--learning_rate must be positive, got 0"),
             ([model, tmp_path / "missing"], f"{model} {tmp_path / 'missing'} does not exist: expected a model "
                                             "directory or a Hub id"),
             (["--output_dir", a_file], f"--output_dir {a_file} is a file"),
             (["--output_dir", previous, "--resume_from_checkpoint", tmp_path],
              f"--resume_from_checkpoint {tmp_path} is not a checkpoint directory")]
    for args, message in cases:
        output = ["--output_dir", tmp_path / "out"] if "--output_dir" not in args else []
        line = run_main_in_process(monkeypatch, script, *args, *output)
        assert line.startswith(f"{script}: error: {message}") and "\n" not in line, line
    assert not (tmp_path / "out").exists() and snapshot(previous) == before
    assert "parameters" not in capsys.readouterr().out  # no model was loaded (each script prints its size)


def test_metrics_are_strict_json(tmp_path):
    import sft

    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    log = sft.open_logs(sft.Args(output_dir=str(tmp_path)), accelerator, 0)
    log({"step": 1, "loss": float("nan"), "reward": float("inf"), "lr": 0.5})
    (row,) = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
              for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row == {"step": 1, "loss": None, "reward": None, "lr": 0.5}


def test_latest_on_a_run_that_never_reached_a_checkpoint_starts_fresh_and_keeps_it(tmp_path, capsys):
    """A requeued job killed before its first checkpoint: the same command (with latest) starts fresh instead of being
    refused, and the partial run is moved beside the output_dir, not deleted."""
    import sft

    output_dir = tmp_path / "job"
    output_dir.mkdir()
    (output_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    before = snapshot(output_dir)
    args = sft.Args(output_dir=str(output_dir), resume_from_checkpoint="latest")
    sft.check_run(args, ["model_name_or_path"])
    assert args.resume_from_checkpoint is None and "starting fresh" in capsys.readouterr().out
    sft.open_logs(args, SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None), 0)
    (kept,) = [path for path in tmp_path.iterdir() if path.name.startswith("job-")]
    assert snapshot(kept) == before and (output_dir / "args.json").exists()
