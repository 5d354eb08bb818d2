"""GRPO (Group Relative Policy Optimization; DeepSeekMath, https://arxiv.org/abs/2402.03300, and DeepSeek-R1) with
TRL 1.16's loss variants: DAPO (https://arxiv.org/abs/2503.14476, the default), Dr. GRPO
(https://arxiv.org/abs/2503.20783), BNPO, GSPO's sequence-level importance sampling (https://arxiv.org/abs/2507.18071),
CISPO (MiniMax-M1, https://arxiv.org/abs/2506.13585) and SAPO (https://arxiv.org/abs/2511.20347). Each prompt gets
num_generations completions; a completion's advantage is its reward relative to the others of its group, so no value
model is needed; the policy is trained with a clipped importance-sampled surrogate on those advantages, optionally
with a KL penalty to a frozen reference.

WORK IN PROGRESS (issue 16, branch grpo16): this file holds the pure functions (advantages, loss) with their unit
tests; the training loop, data, rewards and generation are still to come.
"""

import torch

# ----------------------------------------------------------------------------------------------------------------------
# Advantages and loss: pure functions, importable (`from grpo import grpo_advantages, grpo_loss`)
# ----------------------------------------------------------------------------------------------------------------------
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo")


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


def grpo_advantages(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, num_generations: int,
                    scale_rewards: str = "group", multi_objective_aggregation: str = "sum_then_normalize"
                    ) -> torch.Tensor:
    """Group-relative advantages, (N,), as TRL 1.16's GRPOTrainer computes them.

    rewards_per_func: (N, F) rewards of F reward functions for N completions, the num_generations completions of each
    prompt contiguous (all processes' completions: a group may span processes); NaN where a function returned None.
    reward_weights: (F,).

    sum_then_normalize (default): r = sum_f w_f r_f (NaN skipped), then A = (r - mean of the group) / (std + 1e-4),
    std taken over the group ("group"), over the whole batch ("batch"), or not dividing ("none"; Dr. GRPO).
    normalize_then_sum: each function normalised within the group, (r_f - mean_f) / (std_f + 1e-4), weighted and
    summed, then the sum normalised over the batch (scale_rewards is not used). Standard deviations use Bessel's
    correction. A completion that no function scored gets advantage 0, and is left out of its group's statistics."""
    if rewards_per_func.dim() != 2 or rewards_per_func.shape[0] % num_generations:
        raise ValueError(f"rewards_per_func must be (N, F) with N a multiple of num_generations {num_generations}, "
                         f"got shape {tuple(rewards_per_func.shape)}")
    weights = reward_weights.to(rewards_per_func).unsqueeze(0)  # (1, F)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)  # (N,)
    if multi_objective_aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[unscorable] = float("nan")
        grouped = rewards.view(-1, num_generations)  # (prompts, G)
        mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
        if scale_rewards in ("group", "none"):
            std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
        elif scale_rewards == "batch":
            std = nanstd(rewards).expand_as(rewards)
        else:
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
        advantages = rewards - mean
        if scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
    elif multi_objective_aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])  # (prompts, G, F)
        normalized = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (
            nanstd(grouped, dim=1, keepdim=True) + 1e-4)
        rewards = (normalized.view(-1, rewards_per_func.shape[1]) * weights).nansum(dim=1)
        rewards[unscorable] = float("nan")
        advantages = (rewards - torch.nanmean(rewards)) / (nanstd(rewards) + 1e-4)
    else:
        raise ValueError(f"multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum', got "
                         f"{multi_objective_aggregation!r}")
    return torch.nan_to_num(advantages, nan=0.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the mask's tokens; x of shape (B, 1) (one value per sequence) is averaged over sequences."""
    if x.shape[1] == 1:
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_loss(per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor | None,
              ref_per_token_logps: torch.Tensor | None, advantages: torch.Tensor, completion_mask: torch.Tensor,
              loss_type: str = "dapo", epsilon: float = 0.2, epsilon_high: float | None = None,
              delta: float | None = None, beta: float = 0.0, importance_sampling_level: str = "token",
              max_completion_length: int | None = None, num_items_in_batch: torch.Tensor | float | None = None,
              entropies: torch.Tensor | None = None, top_entropy_quantile: float = 1.0,
              sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO-family loss of one micro-batch, as TRL 1.16's GRPOTrainer._compute_loss, and its metrics.

    per_token_logps, old_per_token_logps, ref_per_token_logps, completion_mask, entropies: (B, T) over the completion
    tokens (mask 1 on tokens that count). old_per_token_logps None: the samples come from the current policy (one
    pass per generation), so the ratio is 1 with the right gradient (per_token_logps.detach()). advantages: (B,).

    ratio r = exp(logp - old) per token ("token"), or exp(mean over the sequence of logp - old) ("sequence": GSPO).
    - grpo, bnpo, dr_grpo, dapo: -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A); with delta, r is first capped
      at delta (two-sided clipping).
    - cispo: -detach(min(r, epsilon_high)) A logp: the clipped weight carries no gradient, the log-prob does.
    - sapo: -(4 / tau) sigmoid(tau (r - 1)) A, tau = sapo_temperature_pos for A > 0, else sapo_temperature_neg.
    With beta, beta (exp(ref - logp) - (ref - logp) - 1) is added per token. With top_entropy_quantile < 1, only the
    tokens whose entropy is in that top fraction (of this batch's completion tokens) keep their policy loss.

    Aggregation (what the losses divide by):
    - grpo, sapo: each sequence's token mean, then the mean over sequences;
    - bnpo: the mean over all completion tokens of the batch;
    - dr_grpo: the token sum / (B * max_completion_length) (default T);
    - dapo, cispo: the token sum / num_items_in_batch, the completion tokens of the whole generation batch as the
      caller counts them (default: this batch's).
    Gradient accumulation scaling is the caller's. Returns (loss, metrics): metrics holds kl (with beta), entropy
    (with entropies), clip_ratio/low_mean|high_mean|region_mean (or cispo_clip_ratio), means over this batch."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    mask = completion_mask.to(per_token_logps.dtype)
    epsilon_low, epsilon_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B, 1)

    # 1. Importance weights: per token (B, T), or one per sequence (B, 1), the mean log-ratio over its tokens.
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)

    # 2. The per-token policy loss of the variant.
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(ratio, max=epsilon_high).detach() * advantages * per_token_logps
    elif loss_type == "sapo":
        temperature = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token_loss = -torch.sigmoid(temperature * (ratio - 1)) * 4 / temperature * advantages
    else:
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        capped = ratio if delta is None else torch.clamp(ratio, max=delta)
        per_token_loss = -torch.min(capped * advantages, clipped * advantages)

    # 3. Only the high-entropy tokens (the "80/20" rule of https://arxiv.org/abs/2506.01939) learn, when asked.
    if top_entropy_quantile < 1.0:
        if entropies is None:
            raise ValueError("top_entropy_quantile < 1 needs the per-token entropies")
        scored = entropies[completion_mask.bool()].float()
        if scored.numel() == 0:
            entropy_mask = torch.zeros_like(mask)
        else:
            threshold = torch.quantile(scored, 1 - top_entropy_quantile)
            entropy_mask = ((entropies * mask >= threshold) & completion_mask.bool()).to(mask.dtype)
        per_token_loss = per_token_loss * entropy_mask

    # 4. The KL penalty to the reference, k3 estimator per token (always >= 0).
    metrics = {}
    if beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("beta != 0 needs the reference model's per-token log-probs")
        per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = masked_mean(per_token_kl.detach(), mask)

    # 5. Aggregate as the variant prescribes.
    if loss_type in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.shape[0] * (max_completion_length or mask.shape[1]))
    else:  # dapo, cispo
        normalizer = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch).to(mask)
        loss = (per_token_loss * mask).sum() / normalizer.clamp(min=1.0)

    # 6. Metrics: entropy, and how often the ratio left the trust region (where that moved the loss).
    if entropies is not None:
        metrics["entropy"] = masked_mean(entropies.detach(), mask)
    ratio = ratio.detach()
    if loss_type == "cispo":
        metrics["cispo_clip_ratio"] = masked_mean(((ratio > epsilon_high) & (advantages > 0)).float(), mask)
    elif loss_type != "sapo":
        low = (ratio < 1 - epsilon_low) & (advantages < 0)
        high = (ratio > 1 + epsilon_high) & (advantages > 0)
        metrics["clip_ratio/low_mean"] = masked_mean(low.float(), mask)
        metrics["clip_ratio/high_mean"] = masked_mean(high.float(), mask)
        metrics["clip_ratio/region_mean"] = masked_mean((low | high).float(), mask)
    return loss, metrics
