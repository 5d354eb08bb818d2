"""grpo.py's pure functions against hand computations: grpo_advantages for each scale_rewards and aggregation (None
rewards included), grpo_loss for every loss_type, both importance-sampling levels, two-sided clipping, the KL term and
the high-entropy token mask. The numbers are worked out in the comments; math here, torch in grpo.py."""

import math

import pytest
import torch
from grpo import Args, grpo_advantages, grpo_loss, nanstd

NAN = float("nan")


def close(tensor, expected, tol=1e-5):
    assert torch.allclose(torch.as_tensor(tensor, dtype=torch.float32), torch.tensor(expected, dtype=torch.float32),
                          atol=tol, rtol=0), (tensor, expected)


def test_nanstd_is_bessel_corrected_skips_nan_and_is_nan_below_two_values():
    mean = 7 / 3
    close(nanstd(torch.tensor([1.0, 2.0, 4.0])), math.sqrt(((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2) / 2))
    close(nanstd(torch.tensor([[1.0, NAN, 3.0], [5.0, 5.0, NAN]]), dim=1), [math.sqrt(2.0), 0.0])
    assert torch.isnan(nanstd(torch.tensor([2.0, NAN])))


# rewards of two prompts x two completions, one function: groups [1, 0] and [2, 2]
ONE_FUNCTION = torch.tensor([[1.0], [0.0], [2.0], [2.0]])
GROUP_STD = math.sqrt((0.5**2 + 0.5**2) / 1)  # std of [1, 0] with Bessel's correction: 0.7071


@pytest.mark.parametrize("scale_rewards, expected", [
    # group: (r - group mean) / (group std + 1e-4); the [2, 2] group has std 0 and advantage 0
    ("group", [0.5 / (GROUP_STD + 1e-4), -0.5 / (GROUP_STD + 1e-4), 0.0, 0.0]),
    # batch: the same centring, divided by the std of all four rewards: mean 1.25, squares 2.75, / 3
    ("batch", [x / (math.sqrt(2.75 / 3) + 1e-4) for x in (0.5, -0.5, 0.0, 0.0)]),
    # none (Dr. GRPO): centred only
    ("none", [0.5, -0.5, 0.0, 0.0]),
])
def test_advantages_for_each_scaling(scale_rewards, expected):
    close(grpo_advantages(ONE_FUNCTION, torch.tensor([1.0]), 2, scale_rewards=scale_rewards), expected)


def test_advantages_weigh_functions_skip_none_and_give_unscorable_completions_zero():
    # weights (1, 2). Row 0: 1 (the second function said None); row 1: 0 + 2 * 1 = 2; row 2: no function applies;
    # row 3: 1 + 0 = 1. Group [1, 2]: mean 1.5, std 0.7071. Group [None, 1]: one scorable value, std NaN -> 0.
    rewards = torch.tensor([[1.0, NAN], [0.0, 1.0], [NAN, NAN], [1.0, 0.0]])
    close(grpo_advantages(rewards, torch.tensor([1.0, 2.0]), 2),
          [-0.5 / (GROUP_STD + 1e-4), 0.5 / (GROUP_STD + 1e-4), 0.0, 0.0])


def test_normalize_then_sum_normalises_each_function_in_its_group_then_the_sum_over_the_batch():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [1.0, 1.0]])
    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # function 0, group [1, 0]
    b = 1.0 / (math.sqrt(2.0) + 1e-4)  # function 1, group [0, 2]; function 0, group [3, 1]
    sums = [a - b, -a + b, b + 0.0, -b + 0.0]  # function 1's group [1, 1] has std 0: (1 - 1) / 1e-4 = 0
    mean = sum(sums) / 4
    std = math.sqrt(sum((s - mean) ** 2 for s in sums) / 3)
    close(grpo_advantages(rewards, torch.tensor([1.0, 1.0]), 2, multi_objective_aggregation="normalize_then_sum"),
          [(s - mean) / (std + 1e-4) for s in sums])


def test_advantages_reject_what_they_cannot_compute():
    with pytest.raises(ValueError, match="multiple of num_generations 3"):
        grpo_advantages(ONE_FUNCTION, torch.tensor([1.0]), 3)
    with pytest.raises(ValueError, match="scale_rewards must be"):
        grpo_advantages(ONE_FUNCTION, torch.tensor([1.0]), 2, scale_rewards="global")


# Two completions of three tokens; the second has two real tokens. Advantages +1 and -2.
LOGP = [[-1.0, -2.0, -3.0], [-0.5, -1.5, 0.0]]
OLD = torch.tensor([[-1.1, -2.0, -2.5], [-0.5, -1.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ADV = torch.tensor([1.0, -2.0])
R = [[math.exp(0.1), 1.0, math.exp(-0.5)], [1.0, math.exp(-0.5), 1.0]]  # token ratios exp(logp - old)
# -min(r A, clip(r, 0.8, 1.2) A): row 0 (A = 1) keeps r everywhere (1.105 < 1.2; 0.607 < 0.8 but min picks r);
# row 1 (A = -2): r = 1 -> 2; r = 0.607 -> clipped to 0.8 -> 1.6
TOKEN_LOSS = [[-R[0][0], -1.0, -R[0][2]], [2.0, 1.6]]
TOKEN_SUM = sum(TOKEN_LOSS[0]) + sum(TOKEN_LOSS[1])  # 0.8883


def logp():
    return torch.tensor(LOGP, requires_grad=True)


@pytest.mark.parametrize("loss_type, kwargs, expected", [
    ("dapo", {}, TOKEN_SUM / 5),  # over the batch's 5 completion tokens
    ("dapo", {"num_items_in_batch": 10}, TOKEN_SUM / 10),  # over the generation batch's tokens
    ("bnpo", {}, TOKEN_SUM / 5),
    ("grpo", {}, (sum(TOKEN_LOSS[0]) / 3 + sum(TOKEN_LOSS[1]) / 2) / 2),  # each sequence's mean, then the mean
    ("dr_grpo", {}, TOKEN_SUM / (2 * 24)),  # rows x max_completion_length (Args' default, 24)
    ("dr_grpo", {"max_completion_length": 4}, TOKEN_SUM / (2 * 4)),  # rows x max_completion_length
])
def test_clipped_losses_aggregate_as_each_variant_prescribes(loss_type, kwargs, expected):
    settings = {key: value for key, value in kwargs.items() if key != "num_items_in_batch"}
    loss, metrics = grpo_loss(logp(), OLD, None, ADV, MASK, Args(loss_type=loss_type, **settings),
                              num_items_in_batch=kwargs.get("num_items_in_batch"))
    close(loss, expected)
    # clipping: only row 1's second token (r = 0.607 < 0.8 with A < 0); 1 of 5 tokens
    close(metrics["clip_ratio/low_mean"], 0.2)
    close(metrics["clip_ratio/high_mean"], 0.0)
    close(metrics["clip_ratio/region_mean"], 0.2)


def test_dapo_gradient_flows_through_unclipped_tokens_only():
    logps = logp()
    grpo_loss(logps, OLD, None, ADV, MASK, Args())[0].backward()
    # d(-r A)/d logp = -r A; clipped and masked tokens get none; dapo divides by 5
    close(logps.grad, [[-R[0][0] / 5, -1.0 / 5, -R[0][2] / 5], [2.0 / 5, 0.0, 0.0]])


def test_without_old_log_probs_the_ratio_is_one_and_the_gradient_is_the_policy_gradient():
    logps = logp()
    loss, _ = grpo_loss(logps, None, None, ADV, MASK, Args(loss_type="bnpo"))
    close(loss, (-1.0 * 3 + 2.0 * 2) / 5)  # -A per token
    loss.backward()
    close(logps.grad, [[-0.2, -0.2, -0.2], [0.4, 0.4, 0.0]])


def test_sequence_level_importance_sampling_uses_the_mean_log_ratio_of_each_sequence():
    r0, r1 = math.exp((0.1 + 0.0 - 0.5) / 3), math.exp((0.0 - 0.5) / 2)  # 0.875, 0.779
    # row 0 (A = 1): -r0 on each of 3 tokens; row 1 (A = -2): r1 clipped to 0.8 -> 1.6 on each of 2 tokens
    assert r1 < 0.8  # below 1 - epsilon with a negative advantage: the clipped term wins
    loss, metrics = grpo_loss(logp(), OLD, None, ADV, MASK, Args(importance_sampling_level="sequence"))
    close(loss, (-r0 * 3 + 1.6 * 2) / 5)
    close(metrics["clip_ratio/low_mean"], 0.5)  # per sequence: row 1 of 2


def test_two_sided_clipping_caps_the_ratio_at_delta():
    # delta 1.05: row 0's first token, r = 1.105 with A > 0, counts as 1.05
    loss, _ = grpo_loss(logp(), OLD, None, ADV, MASK, Args(delta=1.05))
    close(loss, (TOKEN_SUM + R[0][0] - 1.05) / 5)


def test_cispo_weights_log_probs_by_the_detached_capped_ratio():
    logps = logp()
    loss, metrics = grpo_loss(logps, OLD, None, ADV, MASK, Args(loss_type="cispo", epsilon_high=1.05))
    w = [[1.05, 1.0, R[0][2]], [1.0, R[1][1]]]  # min(r, 1.05)
    per_token = [-w[0][t] * 1.0 * LOGP[0][t] for t in range(3)] + [-w[1][t] * -2.0 * LOGP[1][t] for t in range(2)]
    close(loss, sum(per_token) / 5)
    loss.backward()
    close(logps.grad, [[-1.05 / 5, -1.0 / 5, -R[0][2] / 5], [2.0 / 5, 2.0 * R[1][1] / 5, 0.0]])
    close(metrics["cispo_clip_ratio"], 0.2)  # r = 1.105 > 1.05 with A > 0


def test_sapo_uses_a_soft_gate_with_a_temperature_per_sign():
    def gate(r, a, tau):
        return -4 / tau / (1 + math.exp(-tau * (r - 1))) * a
    rows = [[gate(R[0][t], 1.0, 1.0) for t in range(3)], [gate(R[1][t], -2.0, 1.05) for t in range(2)]]
    loss, metrics = grpo_loss(logp(), OLD, None, ADV, MASK, Args(loss_type="sapo"))
    close(loss, (sum(rows[0]) / 3 + sum(rows[1]) / 2) / 2)
    assert "clip_ratio/low_mean" not in metrics


def test_kl_term_is_k3_per_token_times_beta():
    ref = torch.tensor([[-1.0, -1.0, -3.0], [-1.0, -1.5, 0.0]])
    # exp(ref - logp) - (ref - logp) - 1: row 0 differs at token 1 by +1 -> e - 2; row 1 at token 0 by -0.5
    kl = [math.e - 2, math.exp(-0.5) + 0.5 - 1]
    loss, metrics = grpo_loss(logp(), OLD, ref, ADV, MASK, Args(beta=0.1))
    close(loss, (TOKEN_SUM + 0.1 * sum(kl)) / 5)
    close(metrics["kl"], sum(kl) / 5)
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(logp(), OLD, None, ADV, MASK, Args(beta=0.1))


def test_top_entropy_quantile_keeps_the_policy_loss_of_high_entropy_tokens_only():
    entropies = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.7, 5.0]])  # the 5.0 is padding and must not count
    # the 0.6 quantile of [0.1, 0.3, 0.5, 0.7, 0.9] (linear interpolation): 0.5 + 0.4 * 0.2 = 0.58 -> 0.9 and 0.7 stay
    loss, metrics = grpo_loss(logp(), OLD, None, ADV, MASK, Args(top_entropy_quantile=0.4), entropies=entropies)
    close(loss, (TOKEN_LOSS[0][2] + TOKEN_LOSS[1][1]) / 5)
    close(metrics["entropy"], (0.1 + 0.5 + 0.9 + 0.3 + 0.7) / 5)


def test_unknown_loss_type_and_level_are_rejected():
    with pytest.raises(ValueError, match="loss_type must be one of dapo"):
        grpo_loss(logp(), OLD, None, ADV, MASK, Args(loss_type="ppo"))
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(logp(), OLD, None, ADV, MASK, Args(importance_sampling_level="batch"))
