"""Scaling out (docs/scaling.md): the accelerate configs, the one line when FSDP or DeepSpeed is asked for without a
GPU, and the blocks every script shares for sharded training, run under torch's FSDP2 on two CPU processes."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, OFFLINE_ENV, run_main_in_process

ALL_SCRIPTS = ["sft.py", "reward.py", "dpo.py", "kto.py", "orpo.py", "cpo.py", "ppo.py", "iterative_sft.py",
               "best_of_n.py", "ddpo.py", "grpo.py", "rloo.py", "distill.py"]
CONFIGS = REPO / "accelerate_configs"


@pytest.mark.parametrize("script", ALL_SCRIPTS)
@pytest.mark.parametrize("variable, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_fsdp_or_deepspeed_without_a_gpu_is_one_line(monkeypatch, tmp_path, script, variable, name):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(variable, "true")
    out = tmp_path / "out"
    line = run_main_in_process(monkeypatch, script, "--output_dir", out)
    assert line.startswith(f"{script}: error: {name} was requested") and "no GPU" in line and "\n" not in line, line
    assert "accelerate launch --multi_gpu --num_processes N" in line
    assert not out.exists()


def test_deepspeed_that_is_not_installed_is_one_line(monkeypatch, tmp_path):
    import importlib.util

    import torch

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the GPU check: the package is missing
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    line = run_main_in_process(monkeypatch, "sft.py", "--output_dir", tmp_path / "out")
    assert line == ("sft.py: error: DeepSpeed was requested (accelerate config or --use_deepspeed) but it is not "
                    "installed: `pip install deepspeed` (an optional dependency of these scripts)")


@pytest.mark.parametrize("script, message", [
    ("ppo.py", "ppo.py does not run under DeepSpeed ZeRO-3"),
    ("iterative_sft.py", "iterative_sft.py does not run under DeepSpeed ZeRO-3"),
    ("best_of_n.py", "best_of_n.py does not run under DeepSpeed ZeRO-3"),
    ("grpo.py", "grpo.py does not run under DeepSpeed ZeRO-3"),
    ("rloo.py", "rloo.py does not run under DeepSpeed ZeRO-3"),
])
def test_what_a_script_does_not_run_under_is_one_line(monkeypatch, tmp_path, script, message):
    import importlib.util

    import torch

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else
                        find_spec(name, *a))  # as if installed: the refusal comes before anything uses it
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    line = run_main_in_process(monkeypatch, script, "--output_dir", tmp_path / "out")
    assert line.startswith(f"{script}: error: {message}") and "\n" not in line, line


def test_ppo_with_lora_under_sharding_and_ddpo_under_sharding_are_one_line(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    line = run_main_in_process(monkeypatch, "ppo.py", "--use_peft", "--output_dir", tmp_path / "out")
    assert line.startswith("ppo.py: error: --use_peft is not supported under FSDP or DeepSpeed"), line
    line = run_main_in_process(monkeypatch, "ddpo.py", "--output_dir", tmp_path / "out")
    assert line.startswith("ddpo.py: error: ddpo.py does not shard its UNet with FSDP"), line


def test_the_configs_parse_with_accelerate_and_say_what_they_are():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {path.stem: load_config_from_file(str(path)) for path in CONFIGS.glob("*.yaml")}
    assert set(configs) == {"multi_gpu", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}
    assert configs["multi_gpu"].distributed_type == "MULTI_GPU"
    fsdp = configs["fsdp"]
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp.fsdp_config["fsdp_reshard_after_forward"] is True  # what gathered_for_generation restores
    for stage in (2, 3):
        config = configs[f"deepspeed_zero{stage}"]
        assert config.distributed_type == "DEEPSPEED" and config.deepspeed_config["zero_stage"] == stage
    assert configs["deepspeed_zero3"].deepspeed_config["zero3_save_16bit_model"] is True  # full weights on save


@pytest.mark.slow
def test_the_fsdp_blocks_save_resume_generate_and_reference_on_two_sharded_cpu_processes(tmp_path):
    """tests/fsdp_blocks_worker.py on 2 gloo processes: checkpoint and final weights gathered from FSDP2 shards
    reload in plain transformers with the trained outputs; the gathered optimizer state resumes to the same next step;
    generation with gathered weights matches the unsharded model even when the processes decode different lengths;
    a frozen reference is sharded, in eval mode, and computes the same outputs; a LoRA adapter saved from gathered
    weights reproduces the model. ppo.py's value-head model included."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "fsdp_blocks_worker.py"), str(tmp_path), "sft", "dpo", "ppo"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert [line for line in result.stdout.splitlines() if line.endswith(": ok")] == ["sft: ok", "dpo: ok", "ppo: ok"]


@pytest.mark.slow
def test_the_fsdp_config_on_a_cpu_machine_stops_with_the_line_and_multi_gpu_trains(tmp_path):
    """What a user runs: `accelerate launch --config_file accelerate_configs/<config>.yaml sft.py` on this CPU
    machine. FSDP stops with the one line (it used to train plain DDP without a word); multi_gpu.yaml trains two
    gloo processes."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--mixed_precision", "no",
              "--main_process_port", "0"]
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launch, "--config_file", str(CONFIGS / "fsdp.yaml"), str(REPO / "sft.py"),
                             "--output_dir", str(tmp_path / "fsdp")], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode != 0
    line = "sft.py: error: FSDP was requested (accelerate config or --use_fsdp / --use_deepspeed) but this machine " \
           "has no GPU"
    assert result.stderr.count(line) == 1, result.stderr[-3000:]  # once, not once per process
    assert not (tmp_path / "fsdp").exists()
    result = subprocess.run([*launch, "--config_file", str(CONFIGS / "multi_gpu.yaml"), str(REPO / "sft.py"),
                             "--max_steps", "2", "--output_dir", str(tmp_path / "ddp")], cwd=REPO,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ddp" / "model.safetensors").exists()
