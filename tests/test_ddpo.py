"""ddpo.py: the DDIM step's log-probability against diffusers and a hand-written Gaussian, the clipped loss and the
per-prompt statistics by hand, ratio 1 on the first pass, bad input, and DDPO learning on the tiny pipeline."""

import math
import shutil

import numpy as np
import pytest
import torch
from conftest import (ASSETS, TWO_PROCESSES, assert_each_fails_with_one_line, error_line, read_metrics,
                      run_main_in_process, run_ok, run_script)
from diffusers import DDIMScheduler, StableDiffusionPipeline

from ddpo import (DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline, PerPromptStatTracker, brightness,
                  ddim_step_with_logprob, ddpo_loss, fixed_prompt, jpeg_compressibility, jpeg_sizes_kb)

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
    assert line.startswith("ddpo.py: error:") and "already holds checkpoints of a previous run" in line, line
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
