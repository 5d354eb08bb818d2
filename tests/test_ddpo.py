"""ddpo.py: the DDIM step's log-probability against diffusers and a hand-written Gaussian, the clipped loss and the
per-prompt statistics by hand, ratio 1 on the first pass, bad input, DDPO learning on the tiny pipeline, and never
losing a run (issue 24): SIGTERM then --resume_from latest, atomic checkpoints, weights_only loading, no overwrite."""

import json
import math
import random
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (ASSETS, REPO, TWO_PROCESSES, assert_each_fails_with_one_line, error_line, read_metrics,
                      run_main_in_process, run_ok, run_script)
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file
from test_runs import signal_at_step, snapshot

from ddpo import (DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline, PerPromptStatTracker, animal_prompt,
                  brightness, check_ddpo_run, complete_ddpo_checkpoints, ddim_step_with_logprob, ddpo_loss,
                  fixed_prompt, jpeg_compressibility, jpeg_sizes_kb, open_ddpo_logs, resolve_checkpoint,
                  save_ddpo_checkpoint)

TINY_SD = ASSETS / "tiny-sd"


def sd_scheduler(steps: int = 10) -> DDIMScheduler:
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_log_prob_is_the_gaussian_density_of_diffusers_ddim_step(eta):
    """diffusers' own DDIM step with given noise z gives x_{t-1} = mu + sigma z; ours must recompute mu and sigma
    (from that x_{t-1}) and report the mean over dimensions of the Normal(mu, sigma) log-density."""
    torch.manual_seed(0)
    scheduler = sd_scheduler()
    sample, eps, noise = (torch.randn(3, 4, 8, 8) for _ in range(3))
    for t in scheduler.timesteps[[0, 4, -1]]:  # the last step (t = 1) reaches below timestep 0: the final alpha
        expected_prev = torch.stack([scheduler.step(eps[i : i + 1], t, sample[i : i + 1], eta=eta,
                                                    variance_noise=noise[i : i + 1]).prev_sample[0]
                                     for i in range(3)])
        prev_t = t - 1000 // 10
        alpha, alpha_prev = scheduler.alphas_cumprod[t], (scheduler.alphas_cumprod[prev_t] if prev_t >= 0
                                                          else scheduler.final_alpha_cumprod)
        sigma = eta * math.sqrt((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev))
        mu = expected_prev - sigma * noise
        by_hand = torch.distributions.Normal(mu, sigma).log_prob(expected_prev).mean(dim=(1, 2, 3))
        prev, log_prob = ddim_step_with_logprob(scheduler, eps, torch.full((3,), int(t)), sample, eta,
                                                prev_sample=expected_prev)
        assert torch.equal(prev, expected_prev)
        assert torch.allclose(log_prob, by_hand, atol=1e-4), (t, log_prob, by_hand)
        # sampling (no prev_sample) draws mu + sigma z with the generator's z
        drawn, drawn_log_prob = ddim_step_with_logprob(scheduler, eps, t, sample, eta,
                                                       generator=torch.Generator().manual_seed(1))
        z = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(drawn, mu + sigma * z, atol=1e-5)
        assert torch.allclose(drawn_log_prob, torch.distributions.Normal(mu, sigma).log_prob(drawn).mean((1, 2, 3)),
                              atol=1e-4)


def test_clipped_loss_by_hand():
    advantages = torch.tensor([2.0, -1.0, 0.5, -3.0])
    ratio = torch.tensor([1.3, 1.3, 0.6, 0.9])
    clip = 0.2
    # per sample: max(-A r, -A clip(r)) = -2.4 (clipped at 1.2), 1.3, -0.3 (unclipped 0.6 < 0.8), 2.7
    expected = (-2.4 + 1.3 - 0.3 + 2.7) / 4
    assert ddpo_loss(advantages, clip, ratio).item() == pytest.approx(expected)
    ratio.requires_grad_(True)
    ddpo_loss(advantages, clip, ratio).backward()
    # gradient only where the unclipped term is the max: samples 1 (-A = 1 -> 1/4), 2 (-0.5/4) and 3 (3/4)
    assert ratio.grad.tolist() == pytest.approx([0.0, 0.25, -0.125, 0.75])


def test_per_prompt_stat_tracker_by_hand():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
    rewards = np.array([1.0, 3.0, 10.0])
    first = tracker.update(["cat", "cat", "dog"], rewards)
    # cat has 2 rewards (>= min_count): its own mean 2, std 1; dog has 1: the batch's mean 14/3 and std
    batch_mean, batch_std = rewards.mean(), rewards.std()
    assert first.tolist() == pytest.approx([-1 / (1 + 1e-6), 1 / (1 + 1e-6), (10 - batch_mean) / (batch_std + 1e-6)])
    second = tracker.update(["cat", "dog"], np.array([5.0, 12.0]))
    cat_buffer, dog_buffer = [1.0, 3.0, 5.0], [10.0, 12.0]  # the buffer keeps the last 3
    assert second.tolist() == pytest.approx([(5 - np.mean(cat_buffer)) / (np.std(cat_buffer) + 1e-6),
                                             (12 - np.mean(dog_buffer)) / (np.std(dog_buffer) + 1e-6)])
    tracker.update(["cat"], np.array([7.0]))
    assert list(tracker.stats["cat"]) == [3.0, 5.0, 7.0]
    restored = PerPromptStatTracker(3, 2)
    restored.load_state_dict(tracker.state_dict())
    assert {k: list(v) for k, v in restored.stats.items()} == {k: list(v) for k, v in tracker.stats.items()}


def test_rewards():
    dark, light = torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64)
    noisy = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([dark, light, noisy])
    assert brightness()(images, [], [])[0].tolist() == pytest.approx([0.0, 1.0, noisy.mean().item()])
    sizes = jpeg_sizes_kb(images)
    assert sizes[2] > 3 * sizes[0]  # noise does not compress
    assert jpeg_compressibility()(images, [], [])[0].tolist() == pytest.approx((-sizes).tolist())


def test_an_adapter_with_alpha_not_equal_to_rank_reloads_exactly_in_plain_diffusers(tmp_path):
    """save_pretrained stores the adapter's config with its weights: plain diffusers' load_lora_weights then scales
    by lora_alpha / lora_r as training did (without the metadata it assumes alpha = rank: half the effect here)."""
    pipeline = DefaultDDPOStableDiffusionPipeline(str(TINY_SD), lora_r=4, lora_alpha=8)
    pipeline.get_trainable_layers()
    torch.manual_seed(0)
    for name, weight in pipeline.unet.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapter an effect to reproduce
            weight.data.normal_(0, 0.1)
    pipeline.save_pretrained(tmp_path / "adapter")
    plain = StableDiffusionPipeline.from_pretrained(TINY_SD, safety_checker=None, requires_safety_checker=False)
    plain.load_lora_weights(str(tmp_path / "adapter"))
    latents, timesteps, embeds = torch.randn(2, 4, 8, 8), torch.tensor([501, 251]), torch.randn(2, 16, 32)
    with torch.no_grad():
        trained = pipeline.unet(latents, timesteps, embeds).sample
        reloaded = plain.unet(latents, timesteps, embeds).sample
        pipeline.unet.disable_adapters()
        untrained = pipeline.unet(latents, timesteps, embeds).sample
    assert (trained - untrained).abs().max() > 0.1  # the adapter does something
    assert torch.allclose(reloaded, trained, atol=1e-6), (reloaded - trained).abs().max()


def small_config(tmp_path, **overrides) -> DDPOConfig:
    settings = {"output_dir": str(tmp_path / "run"), "sample_num_steps": 4, "sample_batch_size": 4,
                "sample_num_batches_per_epoch": 1, "train_batch_size": 4, "num_epochs": 1, **overrides}
    return DDPOConfig(**settings)


@pytest.fixture
def trainer(tmp_path):
    return DDPOTrainer(small_config(tmp_path), brightness(), fixed_prompt("cat"),
                       DefaultDDPOStableDiffusionPipeline(str(TINY_SD)))


def test_the_stored_log_probs_are_recomputed_exactly_before_any_update(trainer):
    """Ratio 1 at the first step of the first inner epoch: training recomputes every stored step's log-prob (guided,
    train mode, LoRA on) and gets what sampling stored; the trajectories chain (next_latents[t] = latents[t + 1])."""
    samples, data = trainer._generate_samples(1, 4)
    sample = samples[0]
    assert sample["latents"].shape == (4, 4, 4, 8, 8) and sample["log_probs"].shape == (4, 4)
    assert torch.equal(sample["next_latents"][:, :-1], sample["latents"][:, 1:])
    assert sample["timesteps"][0].tolist() == [751, 501, 251, 1]
    assert data[0][0].shape == (4, 3, 32, 32)
    embeds = torch.cat([trainer.neg_prompt_embed.expand(4, -1, -1), sample["prompt_embeds"]])
    trainer.unet.train()
    for j in range(4):
        with torch.no_grad():
            _, approx_kl, clipfrac = trainer.calculate_loss(sample["latents"][:, j], sample["timesteps"][:, j],
                                                            sample["next_latents"][:, j], sample["log_probs"][:, j],
                                                            torch.ones(4), embeds)
        assert approx_kl < 1e-10 and clipfrac == 0, (j, approx_kl, clipfrac)


def test_rewards_are_checked_and_can_be_computed_in_a_thread_pool(trainer, tmp_path):
    images = torch.rand(4, 3, 32, 32)
    data = [[images, ["cat"] * 4, [{}] * 4]]
    rewards, _ = trainer.compute_rewards([list(d) for d in data])
    assert rewards[0].tolist() == pytest.approx(images.mean(dim=(1, 2, 3)).tolist())
    for bad, message in [(lambda i, p, m: (torch.zeros(3), {}), "returned 3 rewards .* for 4 images"),
                         (lambda i, p, m: (torch.tensor([0.0, float("nan"), 0.0, 0.0]), {}), "non-finite rewards"),
                         (lambda i, p, m: torch.zeros(4), r"must return \(rewards, metadata\)")]:
        trainer.reward_fn = bad
        with pytest.raises(ValueError, match=message):
            trainer.compute_rewards([list(d) for d in data])
    pooled = DDPOTrainer(small_config(tmp_path, async_reward_computation=True, output_dir=str(tmp_path / "pool")),
                         brightness(), fixed_prompt("cat"), DefaultDDPOStableDiffusionPipeline(str(TINY_SD)))
    torch.manual_seed(3)
    _, data = pooled._generate_samples(2, 4)
    assert all(isinstance(d[3], __import__("concurrent.futures").futures.Future) for d in data)
    rewards, _ = pooled.compute_rewards(data)
    assert [r.tolist() for r in rewards] == [d[0].mean(dim=(1, 2, 3)).tolist() for d in data]


def mean_brightness(pipe, noise_seed: int) -> float:
    """The mean pixel value of 32 images drawn by plain diffusers (8 animal prompts x 4, 10 DDIM steps, eta 1,
    guidance 5), with the sampling noise of noise_seed: a scorer independent of ddpo.py's own reward."""
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird"] * 4
    images = pipe(prompt=prompts, num_inference_steps=10, guidance_scale=5.0, eta=1.0, output_type="pt",
                  generator=torch.Generator().manual_seed(noise_seed)).images
    return images.mean().item()


@pytest.mark.slow
def test_ddpo_brightens_the_images_on_every_seed_and_the_saved_adapter_loads_in_plain_diffusers(tmp_path):
    """The defaults on three seeds (benchmarks/ddpo_seeds.py measures six): each saved adapter, loaded with plain
    diffusers' load_lora_weights, draws brighter images than the untrained pipeline on the same prompts and noise, by
    a margin well above the difference between two sets of sampling noise on the untrained pipeline."""
    base = StableDiffusionPipeline.from_pretrained(TINY_SD, safety_checker=None, requires_safety_checker=False)
    before = mean_brightness(base, noise_seed=1234)
    noise = abs(mean_brightness(base, noise_seed=4321) - before)  # about 0.01
    gains = []
    for seed in (0, 1, 2):
        out = tmp_path / f"seed{seed}"
        run_ok("ddpo.py", "--seed", seed, "--output_dir", out)
        rows = read_metrics(out)
        rewards = [row["reward_mean"] for row in rows]
        assert [row["epoch"] for row in rows] == list(range(16))
        assert np.mean(rewards[-3:]) > rewards[0] + 2 * rows[0]["reward_std"], (seed, rewards)  # its own reward rose
        pipe = StableDiffusionPipeline.from_pretrained(TINY_SD, safety_checker=None, requires_safety_checker=False)
        pipe.load_lora_weights(str(out))
        gains.append(mean_brightness(pipe, noise_seed=1234) - before)
    assert min(gains) > max(0.03, 3 * noise), (gains, noise)  # measured: 0.085, 0.061, 0.075
    assert all(key in rows[0] for key in ("loss", "approx_kl", "clipfrac", "images_per_second", "peak_memory_mb"))
    assert len(list((out / "images").glob("step_*.png"))) == 16  # the image hook's grid, every epoch
    assert (out / "checkpoints" / "checkpoint_12").exists() and (out / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.slow
def test_resumed_run_ends_where_the_uninterrupted_run_ends_and_a_full_unet_saves_a_pipeline(tmp_path):
    args = ["--no-use_lora", "--train_learning_rate", "1e-4", "--num_epochs", 3, "--save_freq", 1,
            "--num_checkpoint_limit", 1, "--sample_num_steps", 4, "--sample_batch_size", 4, "--train_batch_size", 2,
            "--sample_num_batches_per_epoch", 1, "--per_prompt_stat_tracking", "--per_prompt_stat_tracking_min_count",
            2]
    run_ok("ddpo.py", *args, "--output_dir", tmp_path / "full")
    assert [p.name for p in (tmp_path / "full" / "checkpoints").iterdir()] == ["checkpoint_2"]  # the limit
    shutil.copytree(tmp_path / "full" / "checkpoints", tmp_path / "resumed" / "checkpoints")
    run_ok("ddpo.py", *args, "--output_dir", tmp_path / "resumed",
           "--resume_from", tmp_path / "resumed" / "checkpoints")
    full = StableDiffusionPipeline.from_pretrained(tmp_path / "full").unet.state_dict()
    resumed = StableDiffusionPipeline.from_pretrained(tmp_path / "resumed").unet.state_dict()
    initial = StableDiffusionPipeline.from_pretrained(TINY_SD).unet.state_dict()
    assert any(not torch.equal(full[k], initial[k]) for k in full)  # it trained
    assert all(torch.allclose(full[k], resumed[k], atol=1e-6) for k in full)
    logged = read_metrics(tmp_path / "resumed")
    assert [row["epoch"] for row in logged] == [2]
    for key in ("step", "reward_mean", "reward_std", "loss", "approx_kl", "clipfrac"):
        assert logged[0][key] == pytest.approx(read_metrics(tmp_path / "full")[2][key], rel=1e-5, abs=1e-9), key


@pytest.mark.slow
def test_two_processes_sample_their_own_images_and_normalise_over_all(tmp_path):
    out = tmp_path / "ddpo"
    result = run_ok("ddpo.py", "--output_dir", out, "--num_epochs", 2, "--sample_batch_size", 4,
                    "--per_prompt_stat_tracking", "--per_prompt_stat_tracking_min_count", 2, launcher=TWO_PROCESSES)
    assert "run: 2 process(es) x 4 per device x 1 accumulation = 8 samples" in result.stdout
    rows = read_metrics(out)
    assert [row["images"] for row in rows] == [16, 16]  # 2 processes x 2 batches x 4 images, logged once
    assert [row["step"] for row in rows] == [2, 4]  # 8 samples per process / train_batch_size 4 per epoch
    assert (out / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.slow
def test_bad_command_lines_fail_with_one_clear_line(tmp_path, monkeypatch):
    previous = tmp_path / "out" / "checkpoints" / "checkpoint_4"
    previous.mkdir(parents=True)
    (previous / "training_state.pt").write_bytes(b"a previous run")
    cases = [
        (["--sample_batch_size", 6, "--train_batch_size", 4], "sample_batch_size (6) must be a multiple of"),
        (["--train_timestep_fraction", 0], "train_timestep_fraction must be in (0, 1], got 0"),
        (["--train_timestep_fraction", 1.5], "train_timestep_fraction must be in (0, 1], got 1.5"),
        (["--sample_num_batches_per_epoch", 1, "--train_batch_size", 4, "--train_gradient_accumulation_steps", 4],
         "must be a multiple of train_batch_size x train_gradient_accumulation_steps = 16"),
        (["--pretrained_model", tmp_path / "missing"], "does not exist"),
        (["--pretrained_model", tmp_path], "is not a diffusers pipeline directory"),
    ]
    assert_each_fails_with_one_line(monkeypatch, "ddpo.py", cases, tmp_path / "elsewhere")
    # a fresh run into a directory that holds a previous run's checkpoints refuses, and leaves them as they were
    line = error_line(run_script("ddpo.py", "--output_dir", tmp_path / "out"))
    assert line.startswith(f"ddpo.py: error: --output_dir {tmp_path / 'out'} holds a previous run (checkpoints)"), line
    assert (previous / "training_state.pt").read_bytes() == b"a previous run"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["checkpoints"]


def test_help_shows_the_flags_as_users_type_them_and_both_spellings_parse(monkeypatch, capsys):
    assert run_main_in_process(monkeypatch, "ddpo.py", "--help") == "0"
    text = capsys.readouterr().out
    for flag in ["--sample_num_steps", "--sample_eta", "--sample_guidance_scale", "--train_clip_range",
                 "--train_timestep_fraction", "--per_prompt_stat_tracking", "--async_reward_computation",
                 "--pretrained_model", "--use_lora", "--no_use_lora", "--reward"]:
        assert flag in text, flag
    assert "--sample-num-steps" not in text
    line = run_main_in_process(monkeypatch, "ddpo.py", "--sample-batch-size", 6, "--train_batch_size", 4)
    assert line == "ddpo.py: error: sample_batch_size (6) must be a multiple of train_batch_size (4)", line


# ----------------------------------------------------------------------------------------------------------------------
# Never lose a run (issue 24)
# ----------------------------------------------------------------------------------------------------------------------
DDPO_RUN = ["--num_epochs", 8, "--save_freq", 100, "--sample_num_steps", 4, "--sample_batch_size", 4,
            "--train_batch_size", 4, "--sample_num_batches_per_epoch", 1, "--per_prompt_stat_tracking",
            "--per_prompt_stat_tracking_min_count", 2]  # one optimizer step per epoch; no periodic checkpoint


@pytest.mark.slow
def test_sigterm_saves_the_epoch_in_progress_and_latest_resumes_to_the_uninterrupted_adapter(tmp_path, monkeypatch,
                                                                                           capsys):
    """SIGTERM after the first epoch: the run finishes the epoch in progress, writes its checkpoint, says so in one
    line and exits 143; the same command with --resume_from latest ends on the uninterrupted run's adapter, bit for
    bit, with the same metrics; once finished, latest has nothing to do."""
    run = tmp_path / "run"
    interrupted = signal_at_step("ddpo.py", DDPO_RUN, run, step=1)
    assert interrupted.returncode == 128 + signal.SIGTERM, interrupted.stderr[-2000:]
    lines = [line for line in interrupted.stdout.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGTERM: saved "), interrupted.stdout[-2000:]
    assert lines[0].endswith(" --resume_from latest") and "--output_dir" in lines[0]
    (checkpoint,) = complete_ddpo_checkpoints(run / "checkpoints")
    assert 1 <= int(checkpoint.name.split("_")[1]) < 8 and not list((run / "checkpoints").glob("*.incomplete"))
    assert f"saved {checkpoint};" in lines[0]
    resumed = run_ok("ddpo.py", *DDPO_RUN, "--output_dir", run, "--resume_from", "latest")
    assert f"resuming from the latest checkpoint, {checkpoint}" in resumed.stdout
    run_ok("ddpo.py", *DDPO_RUN, "--output_dir", tmp_path / "whole")
    ours, theirs = (load_file(path / "pytorch_lora_weights.safetensors") for path in (run, tmp_path / "whole"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)
    keys = ("epoch", "step", "reward_mean", "reward_std", "loss", "approx_kl", "clipfrac")
    assert [[row[key] for key in keys] for row in read_metrics(run)] == \
           [[row[key] for key in keys] for row in read_metrics(tmp_path / "whole")]
    capsys.readouterr()
    assert run_main_in_process(monkeypatch, "ddpo.py", *DDPO_RUN, "--output_dir", run, "--resume_from", "latest") == "0"
    assert f"{run} holds a finished run: nothing to resume" in capsys.readouterr().out


class Killed(BaseException):
    """What a kill between two files of a checkpoint looks like to the code that writes it."""


def test_a_checkpoint_interrupted_mid_write_is_never_taken_by_latest(trainer, monkeypatch):
    logdir = trainer.logdir
    first = save_ddpo_checkpoint(trainer, 1, 2)
    save = torch.save

    def killed_before_the_rng_state(obj, file, *args, **kwargs):
        if "rng_state" in str(file):
            raise Killed
        return save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", killed_before_the_rng_state)
    with pytest.raises(Killed):
        save_ddpo_checkpoint(trainer, 2, 4)
    monkeypatch.setattr(torch, "save", save)
    # the weights and training_state.pt of checkpoint 2 exist, but only under the temporary name
    assert (logdir / "checkpoint_2.incomplete" / "training_state.pt").exists()
    assert not (logdir / "checkpoint_2").exists()
    (logdir / "checkpoint_3").mkdir()  # and a directory that never got its training state
    assert complete_ddpo_checkpoints(logdir) == [first]
    assert resolve_checkpoint(str(logdir)) == first
    config = DDPOConfig(output_dir=trainer.config.output_dir, resume_from="latest")
    check_ddpo_run(config)
    assert config.resume_from == str(first)
    with pytest.raises(ValueError, match="neither a complete checkpoint_<epoch> directory"):
        resolve_checkpoint(str(logdir / "checkpoint_2.incomplete"))
    # the next save of that epoch replaces the partial one; num_checkpoint_limit keeps the newest complete ones
    trainer.config.num_checkpoint_limit = 1
    assert save_ddpo_checkpoint(trainer, 2, 4) == logdir / "checkpoint_2"
    assert complete_ddpo_checkpoints(logdir) == [logdir / "checkpoint_2"]
    assert not list(logdir.glob("*.incomplete"))


def test_checkpoints_load_with_weights_only_and_restore_the_whole_state(tmp_path):
    """Prompt statistics (numpy strings and floats while training), Adam's state and every RNG go into files that
    torch.load(weights_only=True) reads, and a new trainer resumed from them holds exactly that state."""
    settings = {"per_prompt_stat_tracking": True, "per_prompt_stat_tracking_min_count": 2}
    trainer = DDPOTrainer(small_config(tmp_path, **settings), brightness(), animal_prompt,
                          DefaultDDPOStableDiffusionPipeline(str(TINY_SD)))
    trainer.train()
    assert trainer.stat_tracker.stats and trainer.optimizer.state_dict()["state"]
    path = save_ddpo_checkpoint(trainer, 1, trainer.global_step)
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    for file in ["training_state.pt", "rng_state_0.pt"]:
        torch.load(path / file, weights_only=True)
    resumed = DDPOTrainer(small_config(tmp_path, **settings, output_dir=str(tmp_path / "resumed"),
                                       resume_from=str(path)),
                          brightness(), animal_prompt, DefaultDDPOStableDiffusionPipeline(str(TINY_SD)))
    assert (resumed.first_epoch, resumed.global_step) == (1, trainer.global_step)
    assert random.getstate() == rng[0] and torch.equal(torch.get_rng_state(), rng[2])
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), rng[1]))
    assert {k: list(v) for k, v in resumed.stat_tracker.stats.items()} == \
           {k: list(v) for k, v in trainer.stat_tracker.stats.items()}
    ours, theirs = resumed.optimizer.state_dict()["state"], trainer.optimizer.state_dict()["state"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[i][key], theirs[i][key])
                                                for i in ours for key in ours[i])
    assert all(torch.equal(a, b) for a, b in zip(resumed.trainable_layers, trainer.trainable_layers))
    assert "weights_only=False" not in (REPO / "ddpo.py").read_text()


def test_a_fresh_run_never_writes_over_a_previous_one_and_bad_inputs_leave_it(monkeypatch, tmp_path):
    """Before anything loads: a named output_dir holding a run, a --logdir holding checkpoints, a bad learning rate,
    pipeline, output_dir, logdir or checkpoint are each one line, and every file of the previous run stays as it
    was; --resume_from latest on a finished run has nothing to do."""
    previous = tmp_path / "out"
    (previous / "images").mkdir(parents=True)
    (previous / "images" / "step_2.png").write_bytes(b"an image")
    (previous / "metrics.jsonl").write_text('{"epoch": 0, "step": 2}\n')
    (previous / "pytorch_lora_weights.safetensors").write_bytes(b"trained weights")
    logdir = tmp_path / "elsewhere" / "checkpoints"
    (logdir / "checkpoint_4").mkdir(parents=True)
    (logdir / "checkpoint_4" / "training_state.pt").write_bytes(b"a previous run")
    stopped = tmp_path / "stopped"  # a run stopped before its first checkpoint
    (stopped / "checkpoints" / "checkpoint_1.incomplete").mkdir(parents=True)
    (stopped / "metrics.jsonl").write_text('{"epoch": 0, "step": 2}\n')
    before = snapshot(tmp_path)
    line = run_main_in_process(monkeypatch, "ddpo.py", "--output_dir", previous)
    assert line == (f"ddpo.py: error: --output_dir {previous} holds a previous run (images, metrics.jsonl, "
                    "pytorch_lora_weights.safetensors); pass --resume_from latest to continue it, "
                    "--overwrite_output_dir to replace it, or another --output_dir"), line
    assert run_main_in_process(monkeypatch, "ddpo.py", "--output_dir", previous, "--resume_from", "latest") == "0"
    new, a_file = tmp_path / "new", tmp_path / "a_file"
    a_file.write_text("not a directory")
    before[a_file.name] = a_file.read_bytes()
    cases = [(["--logdir", logdir], f"--logdir {logdir} holds checkpoints of a previous run; pass --resume_from latest "
                                    "to continue it, --overwrite_output_dir to replace them, or another --logdir"),
             (["--output_dir", stopped, "--resume_from", "latest"],
              f"--output_dir {stopped} holds a previous run (checkpoints, metrics.jsonl); it has no complete "
              "checkpoint to continue from: pass --overwrite_output_dir to replace it, or another --output_dir"),
             (["--train_learning_rate", -1e-5], "--train_learning_rate must be positive, got -1e-05"),
             (["--pretrained_model", tmp_path / "missing"], f"--pretrained_model {tmp_path / 'missing'} does not "
                                                            "exist: expected a pipeline directory or a Hub id"),
             (["--output_dir", a_file], f"--output_dir {a_file} is a file; expected a directory"),
             (["--logdir", a_file], f"--logdir {a_file} is a file; expected a directory"),
             (["--resume_from", previous], f"resume_from {previous} is neither a complete checkpoint_<epoch> "
                                           "directory of this script nor a directory holding one")]
    for args, message in cases:
        output = ["--output_dir", new] if "--output_dir" not in args else []
        line = run_main_in_process(monkeypatch, "ddpo.py", *args, *output)
        assert line.startswith(f"ddpo.py: error: {message}") and "\n" not in line, line
    assert not new.exists() and snapshot(tmp_path) == before


def test_the_default_output_dirs_previous_run_is_kept_beside_it_and_overwrite_replaces_a_run(monkeypatch, tmp_path,
                                                                                             capsys):
    monkeypatch.chdir(tmp_path)
    previous = tmp_path / "runs" / "ddpo"
    (previous / "checkpoints" / "checkpoint_4").mkdir(parents=True)
    (previous / "checkpoints" / "checkpoint_4" / "training_state.pt").write_bytes(b"a previous run")
    (previous / "metrics.jsonl").write_text('{"epoch": 0, "step": 2}\n')
    first = snapshot(previous)
    settings = {"sample_num_steps": 4, "sample_batch_size": 4, "sample_num_batches_per_epoch": 1,
                "train_batch_size": 4, "num_epochs": 1}
    DDPOTrainer(DDPOConfig(**settings), brightness(), fixed_prompt("cat"),
                DefaultDDPOStableDiffusionPipeline(str(TINY_SD)))
    (kept,) = [path for path in (tmp_path / "runs").iterdir() if path.name.startswith("ddpo-")]
    assert f"held a previous run: kept as {Path('runs') / kept.name}" in capsys.readouterr().out
    assert snapshot(kept) == first and sorted(p.name for p in previous.iterdir()) == ["config.json"]
    # a named output_dir: refused from Python too, replaced (with a --logdir's checkpoints) when asked
    logdir = tmp_path / "elsewhere"
    (logdir / "checkpoint_2").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds a previous run"):
        DDPOTrainer(DDPOConfig(**settings, output_dir=str(kept), logdir=str(logdir)), brightness(),
                    fixed_prompt("cat"), DefaultDDPOStableDiffusionPipeline(str(TINY_SD)))
    assert snapshot(kept) == first
    DDPOTrainer(DDPOConfig(**settings, output_dir=str(kept), logdir=str(logdir), overwrite_output_dir=True),
                brightness(), fixed_prompt("cat"), DefaultDDPOStableDiffusionPipeline(str(TINY_SD)))
    assert sorted(p.name for p in kept.iterdir()) == ["config.json"] and not list(logdir.iterdir())


def test_metrics_are_strict_json(tmp_path):
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    log, _ = open_ddpo_logs(DDPOConfig(output_dir=str(tmp_path)), accelerator, 0, resumed=False)
    log({"epoch": 0, "step": 1, "loss": float("nan"), "approx_kl": float("inf"), "reward_mean": 0.5}, np.zeros(2))
    (row,) = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
              for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row == {"epoch": 0, "step": 1, "loss": None, "approx_kl": None, "reward_mean": 0.5}
