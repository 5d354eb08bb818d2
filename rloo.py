"""RLOO (REINFORCE Leave-One-Out; Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740, after Kool et al. 2019)
with TRL 1.16's RLOOTrainer semantics. Each prompt gets num_generations completions; a completion's advantage is its
reward (minus beta times its KL to the reference, summed over its tokens) minus the mean reward of the other
completions of the same prompt; the policy is trained with a PPO-style clipped ratio of whole-sequence probabilities.

WORK IN PROGRESS (issue 16, branch grpo16): this file holds the pure functions (advantages, loss) with their unit
tests; the training loop, data, rewards and generation are still to come.
"""

import torch

# ----------------------------------------------------------------------------------------------------------------------
# Advantages and loss: pure functions, importable (`from rloo import rloo_advantages, rloo_loss`)
# ----------------------------------------------------------------------------------------------------------------------
def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Standard deviation over the non-NaN entries, with Bessel's correction (n - 1), as TRL's nanstd: NaN where
    fewer than two entries are left."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    variance = variance * torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = variance.sqrt()
    if keepdim:
        return std
    return std.squeeze() if dim is None else std.squeeze(dim)


def rloo_advantages(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, num_generations: int,
                    beta: float = 0.0, kl: torch.Tensor | None = None, normalize_advantages: bool = False,
                    reward_clip_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Leave-one-out advantages, (N,), as TRL 1.16's RLOOTrainer computes them.

    rewards_per_func: (N, F), the num_generations completions of each prompt contiguous (all processes'
    completions), NaN where a function returned None; reward_weights: (F,). kl: (N,), each completion's summed
    old-minus-reference log-probs over its tokens (the first-order estimate, which can be negative), needed when
    beta != 0.

    r = sum_f w_f r_f (None skipped; a completion no function scored is left out), clipped to reward_clip_range,
    minus beta * kl. The baseline of a completion is the mean r of the OTHER scorable completions of its prompt, so
    A = r - (sum of the group - r) / (scorable in the group - 1). With normalize_advantages, A is standardised over
    the batch ((A - mean) / (std + 1e-4), Bessel's correction). A completion without a score, or alone in its group
    with one, gets advantage 0."""
    if rewards_per_func.dim() != 2 or rewards_per_func.shape[0] % num_generations:
        raise ValueError(f"rewards_per_func must be (N, F) with N a multiple of num_generations {num_generations}, "
                         f"got shape {tuple(rewards_per_func.shape)}")
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * reward_weights.to(rewards_per_func).unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = float("nan")
    if reward_clip_range is not None:
        rewards = rewards.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    if beta != 0.0:
        if kl is None:
            raise ValueError("beta != 0 needs kl, the summed old-minus-reference log-probs of each completion")
        rewards = rewards - beta * kl.to(rewards)
    grouped = rewards.view(-1, num_generations)  # (prompts, G)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    baselines = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)
    advantages = rewards - baselines.view(-1)
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def rloo_loss(per_token_logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
              completion_mask: torch.Tensor, epsilon: float = 0.2, epsilon_high: float | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The RLOO loss of one micro-batch, as TRL 1.16's RLOOTrainer._compute_loss, and its clipping metrics.

    per_token_logps, completion_mask: (B, T); old_logps, advantages: (B,). The ratio is of whole sequences,
    r = exp(sum of logp - old_logps) with old_logps the sums under the sampling policy, and the loss
    -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) is averaged over sequences (gradient accumulation scaling is
    the caller's). Returns (loss, metrics): clip_ratio/low_mean|high_mean|region_mean over the sequences."""
    epsilon_low, epsilon_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    logps = (per_token_logps * completion_mask).sum(dim=1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages).mean()
    ratio = ratio.detach()
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    metrics = {"clip_ratio/low_mean": low.float().mean(), "clip_ratio/high_mean": high.float().mean(),
               "clip_ratio/region_mean": (low | high).float().mean()}
    return loss, metrics
