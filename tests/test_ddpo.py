"""ddpo.py: the DDIM step's log-probability against diffusers and a hand-written Gaussian, the clipped loss and the
per-prompt statistics by hand, ratio 1 on the first pass, bad input, and DDPO learning on the tiny pipeline."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import (ASSETS, assert_each_fails_with_one_line, assert_help_lists, error_line, read_metrics, run_ok,
                      run_script)
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
