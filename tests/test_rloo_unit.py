"""rloo.py's pure functions against hand computations: the leave-one-out baseline (with None rewards, weights,
clipping, the KL penalty and normalisation) and the sequence-level clipped loss."""

import math

import pytest
import torch
from rloo import Args, rloo_advantages, rloo_loss

NAN = float("nan")


def close(tensor, expected, tol=1e-5):
    assert torch.allclose(torch.as_tensor(tensor, dtype=torch.float32), torch.tensor(expected, dtype=torch.float32),
                          atol=tol, rtol=0), (tensor, expected)


# two prompts x three completions: groups [1, 0, 3] (sum 4) and [2, 2, 4] (sum 8)
REWARDS = torch.tensor([[1.0], [0.0], [3.0], [2.0], [2.0], [4.0]])
# A = r - (group sum - r) / 2: 1 - 1.5, 0 - 2, 3 - 0.5; 2 - 3, 2 - 3, 4 - 2
LEAVE_ONE_OUT = [-0.5, -2.0, 2.5, -1.0, -1.0, 2.0]


def test_the_baseline_is_the_mean_of_the_other_completions_of_the_prompt():
    close(rloo_advantages(REWARDS, torch.tensor([1.0]), 3), LEAVE_ONE_OUT)


def test_none_rewards_leave_the_baseline_and_a_lone_scorable_completion_gets_zero():
    # group [1, None, 3]: two scorable, baselines 3 and 1; group [None, 2, None]: one scorable -> 0 / 0 -> 0
    rewards = torch.tensor([[1.0], [NAN], [3.0], [NAN], [2.0], [NAN]])
    close(rloo_advantages(rewards, torch.tensor([1.0]), 3), [-2.0, 0.0, 2.0, 0.0, 0.0, 0.0])


def test_weights_clipping_and_the_kl_penalty_act_on_the_reward_before_the_baseline():
    # weights (1, 0.5), None skipped: rewards 1 + 1 = 2 and 0 -> A = 2, -2
    close(rloo_advantages(torch.tensor([[1.0, 2.0], [0.0, NAN]]), torch.tensor([1.0, 0.5]), 2), [2.0, -2.0])
    # clipped to [-1, 1]: 1 and -1 -> A = 2, -2
    close(rloo_advantages(torch.tensor([[5.0], [-5.0]]), torch.tensor([1.0]), 2, reward_clip_range=(-1.0, 1.0)),
          [2.0, -2.0])
    # beta 0.5, summed KL (2, -1): rewards 1 - 1 = 0 and 0 + 0.5 = 0.5 -> A = -0.5, 0.5
    close(rloo_advantages(torch.tensor([[1.0], [0.0]]), torch.tensor([1.0]), 2, beta=0.5,
                          kl=torch.tensor([2.0, -1.0])), [-0.5, 0.5])
    with pytest.raises(ValueError, match="needs kl"):
        rloo_advantages(REWARDS, torch.tensor([1.0]), 3, beta=0.5)


def test_normalized_advantages_are_standardised_over_the_batch():
    std = math.sqrt(sum(a * a for a in LEAVE_ONE_OUT) / 5)  # the mean is 0
    close(rloo_advantages(REWARDS, torch.tensor([1.0]), 3, normalize_advantages=True),
          [a / (std + 1e-4) for a in LEAVE_ONE_OUT])


LOGP = [[-1.0, -2.0, -3.0], [-0.5, -1.5, 0.0]]
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # sums -6 and -2
OLD = torch.tensor([-6.1, -1.5])  # ratios exp(0.1) = 1.105 and exp(-0.5) = 0.607
ADV = torch.tensor([1.0, -2.0])


def test_the_loss_clips_the_ratio_of_whole_sequences_and_averages_over_them():
    logps = torch.tensor(LOGP, requires_grad=True)
    loss, metrics = rloo_loss(logps, OLD, ADV, MASK, Args())
    # row 0: -r A = -1.105; row 1: r = 0.607 clipped to 0.8, -(0.8 x -2) = 1.6
    close(loss, (-math.exp(0.1) + 1.6) / 2)
    loss.backward()
    close(logps.grad, [[-math.exp(0.1) / 2] * 3, [0.0, 0.0, 0.0]])  # the clipped row gets no gradient
    close([metrics["clip_ratio/low_mean"], metrics["clip_ratio/high_mean"], metrics["clip_ratio/region_mean"]],
          [0.5, 0.0, 0.5])
    # epsilon_high 0.05: row 0's 1.105 is clipped to 1.05
    loss, metrics = rloo_loss(torch.tensor(LOGP), OLD, ADV, MASK, Args(epsilon_high=0.05))
    close(loss, (-1.05 + 1.6) / 2)
    close(metrics["clip_ratio/high_mean"], 0.5)
