"""ppo.py: the PPO math against hand computations, the seed's numbers (real TRL 0.8.6 outputs), the value-head
weight layout, the seed's quickstart, learning on the tiny world, resume, LoRA, seq2seq, two processes, bad input."""

import json
import shutil
import warnings

import pytest
import torch
from conftest import (ASSETS, REPO, TWO_PROCESSES, assert_help_lists, error_line, mean_sentiment_of_samples,
                      metric_series, read_metrics, run_ok, run_script)

from ppo import (AdaptiveKLController, AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead,
                 PPOConfig, PPOTrainer, compute_gae, compute_rewards, create_reference_model, kl_estimate,
                 masked_whiten, ppo_losses)

TINY = ASSETS / "tiny-gpt2"


def tiny_trainer(sgd: bool = False, **overrides) -> PPOTrainer:
    """A trainer on the tiny policy; sgd=True uses plain SGD, whose update is linear in the gradient (Adam turns float
    noise in near-zero gradients, e.g. of unused vocabulary rows, into lr-sized steps)."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(TINY, summary_dropout_prob=0.0)
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    config = PPOConfig(**{"batch_size": 4, "mini_batch_size": 4, **overrides})
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate) if sgd else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PPOTrainer(config, model, None, tokenizer, optimizer=optimizer)


def rollouts(lengths=(3, 5, 4, 6), query_length=4):
    """Fixed queries and responses (token ids of the tiny vocabulary) and scores."""
    g = torch.Generator().manual_seed(1)
    queries = [torch.randint(1, 600, (query_length + i % 2,), generator=g) for i in range(len(lengths))]
    responses = [torch.randint(1, 600, (n,), generator=g) for n in lengths]
    scores = [torch.tensor(s) for s in [1.0, -0.5, 2.0, 0.0, 0.5, -1.5, 1.5, -2.0][: len(lengths)]]
    return queries, responses, scores


# ----------------------------------------------------------------------------------------------------------------------
# The math, against hand computations
# ----------------------------------------------------------------------------------------------------------------------
def test_kl_penalties_by_hand():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    assert kl_estimate(logp, ref, "kl").tolist() == [[0.5, -1.0]]
    assert kl_estimate(logp, ref, "abs").tolist() == [[0.5, 1.0]]
    assert kl_estimate(logp, ref, "mse").tolist() == [[0.125, 0.5]]
    # full: KL(p || q) of two known distributions, p = (1/2, 1/4, 1/4), q = (1/4, 1/2, 1/4)
    p, q = torch.tensor([[[0.5, 0.25, 0.25]]]), torch.tensor([[[0.25, 0.5, 0.25]]])
    expected = 0.5 * torch.log(torch.tensor(2.0)) + 0.25 * torch.log(torch.tensor(0.5))
    assert kl_estimate(p.log(), q.log(), "full").item() == pytest.approx(expected.item(), abs=1e-6)
    assert kl_estimate(p.log(), p.log(), "full").item() == pytest.approx(0.0, abs=1e-7)


def test_gae_against_a_plain_loop():
    torch.manual_seed(0)
    values, rewards, gamma, lam = torch.randn(3, 7), torch.randn(3, 7), 0.9, 0.8
    advantages = compute_gae(values, rewards, gamma, lam)
    for b in range(3):
        running = 0.0
        for t in reversed(range(7)):
            next_value = values[b, t + 1].item() if t < 6 else 0.0
            running = rewards[b, t].item() + gamma * next_value - values[b, t].item() + gamma * lam * running
            assert advantages[b, t].item() == pytest.approx(running, abs=1e-5)


def test_masked_whiten():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    kept = values[mask.bool()]
    whitened = masked_whiten(values, mask)[mask.bool()]
    assert whitened.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert whitened.var().item() == pytest.approx(1.0, abs=1e-5)  # unbiased, as the seed
    scaled = masked_whiten(values, mask, shift_mean=False)[mask.bool()]
    assert scaled.mean().item() == pytest.approx(kept.mean().item(), abs=1e-5)


def test_loss_unchanged_when_masked_positions_are_removed():
    torch.manual_seed(0)
    tensors = [torch.randn(2, 5) for _ in range(6)]  # old_logprobs, values, logprobs, vpreds, advantages, returns
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0, 0.0]])
    full = ppo_losses(*tensors[:4], mask, *tensors[4:], cliprange=0.2, cliprange_value=0.2)
    garbage = [t.clone() for t in tensors]
    for t in garbage:
        t[mask == 0] = 1e3  # whatever sits at masked positions does not matter
    again = ppo_losses(*garbage[:4], mask, *garbage[4:], cliprange=0.2, cliprange_value=0.2)
    trimmed = ppo_losses(*[t[:, 1:4] for t in tensors[:4]], mask[:, 1:4], *[t[:, 1:4] for t in tensors[4:]],
                         cliprange=0.2, cliprange_value=0.2)
    for key in ("pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac"):
        assert again[key].item() == pytest.approx(full[key].item(), rel=1e-6)
        assert trimmed[key].item() == pytest.approx(full[key].item(), rel=1e-6)


def test_adaptive_kl_controller():
    controller = AdaptiveKLController(0.2, target=6, horizon=10000)
    controller.update(current=9.0, n_steps=256)  # error 0.5 clipped to 0.2
    assert controller.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    controller.update(current=5.4, n_steps=100)  # error -0.1
    assert controller.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000) * (1 - 0.1 * 100 / 10000))


def test_rewards_by_hand_and_the_controller_is_fed_the_kl_they_used(monkeypatch):
    import ppo

    # compute_rewards: -beta * KL at every response token, the score added on the last one
    logp, ref = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]]), torch.tensor([[-1.5, -1.0, -0.5]] * 2)
    masks = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kls = compute_rewards(torch.tensor([2.0, -1.0]), logp, ref, masks, 0.1)
    assert kls.tolist() == [[0.5, -1.0, 0.0], [0.5, 0.0, -2.5]]
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.05, -1.0, 0.25]]))
    # a fork that clips the KL inside compute_rewards: the controller, and the logged KL, see the clipped one
    unclipped = ppo.compute_rewards

    def clipped(*args, **kwargs):
        rewards, kls = unclipped(*args, **kwargs)
        return rewards, kls.clamp(-0.01, 0.01)

    monkeypatch.setattr(ppo, "compute_rewards", clipped)
    trainer = tiny_trainer()
    fed = []
    trainer.kl_ctl.update = lambda current, n_steps: fed.append((current, n_steps))
    stats = trainer.step(*rollouts())
    assert len(fed) == 1 and fed[0][1] == 4 and abs(fed[0][0]) <= 0.01 * 6
    assert fed[0][0] == pytest.approx(stats["objective/kl"], abs=1e-7)


def test_one_step_by_hand():
    """One step (one epoch, one mini-batch = the batch, seed defaults otherwise) computed here with plain torch: the
    policy's and reference's log-probs and values, the KL-shaped rewards, GAE, whitening, the losses at ratio 1,
    their gradient, and Adam's first update."""
    trainer = tiny_trainer(ppo_epochs=1, learning_rate=1e-3)
    model = trainer.model
    queries, responses, scores = rollouts()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    reference = AutoModelForCausalLMWithValueHead.from_pretrained(TINY).eval()

    # by hand: each rollout on its own (no padding), positions of the response tokens only
    per_rollout = []
    for q, r, s in zip(queries, responses, scores):
        ids = torch.cat([q, r]).unsqueeze(0)
        logits, _, values = model(input_ids=ids)
        ref_logits, _, _ = reference(input_ids=ids)
        span = slice(len(q) - 1, len(q) - 1 + len(r))  # the positions that predict the response tokens
        logp = torch.log_softmax(logits[0, :-1], -1)[torch.arange(len(ids[0]) - 1), ids[0, 1:]][span]
        ref_logp = torch.log_softmax(ref_logits[0, :-1], -1)[torch.arange(len(ids[0]) - 1), ids[0, 1:]][span]
        rewards = -0.2 * (logp - ref_logp).detach()
        rewards[-1] += s
        per_rollout.append((logp, values[0, :-1][span], rewards))
    advantages, returns = [], []
    for logp, values, rewards in per_rollout:
        running, adv = 0.0, []
        v = values.detach()
        for t in reversed(range(len(rewards))):
            next_value = v[t + 1] if t < len(rewards) - 1 else 0.0
            running = rewards[t] + next_value - v[t] + 0.95 * running
            adv.insert(0, running)
        advantages.append(torch.stack(adv))
        returns.append(torch.stack(adv) + v)
    flat = torch.cat(advantages)
    whitened = (flat - flat.mean()) / torch.sqrt(flat.var() + 1e-8)
    values_all = torch.cat([values for _, values, _ in per_rollout])
    logps = torch.cat([logp for logp, _, _ in per_rollout])
    ratio = torch.exp(logps - logps.detach())  # 1 at the first mini-batch, where neither clip is active
    pg_loss = (-whitened * ratio).mean()
    vf_loss = 0.5 * ((values_all - torch.cat(returns)) ** 2).mean()
    loss = pg_loss + 0.1 * vf_loss
    model.zero_grad()
    loss.backward()
    expected = {name: initial[name] - 1e-3 * p.grad / (p.grad.abs() + 1e-8)  # Adam's first step: lr * g / |g|
                for name, p in model.named_parameters() if p.grad is not None}
    clear = {name: p.grad.abs() > 1e-6 for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    stats = trainer.step(queries, responses, scores)
    assert stats["ppo/loss/total"] == pytest.approx(loss.item(), rel=1e-4)
    assert stats["ppo/loss/value"] == pytest.approx(vf_loss.item(), rel=1e-4)  # reported without vf_coef
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert stats["ppo/mean_scores"] == pytest.approx(0.625)
    moved = 0
    for name, p in model.named_parameters():
        if name in expected:
            big = clear[name]  # coordinates whose gradient sign is not float noise
            assert torch.allclose(p.detach()[big], expected[name][big], atol=2e-5), name
            moved += int(big.sum())
    assert moved > 1000


# ----------------------------------------------------------------------------------------------------------------------
# The seed's numbers: outputs of the real TRL 0.8.6 PPOTrainer.step, stored in tests/data
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, chunk_size", [("A", None), ("B", None), ("C", None), ("D", None), ("A", 2), ("D", 0)])
def test_step_matches_the_seed(name, chunk_size):
    """A: the seed's defaults (batch 8, mini-batch 4); B: kl_penalty full, accumulation, reward whitening, score
    scaling + norm + clip, max_grad_norm (clipped once, as the seed); C: abs, fixed KL, early stopping; D: mse, two
    epochs, gamma / lam. Two consecutive steps each: every stat, the KL coefficient and each tensor's update. With our
    default chunk_size (None: one chunk here), 2 (the chunked path's many chunks, recomputed in the backward) and 0
    (the plain path)."""
    from transformers import AutoTokenizer

    case = json.loads((REPO / "tests" / "data" / "seed_ppo_steps.json").read_text())["configs"][name]
    model = AutoModelForCausalLMWithValueHead.from_pretrained(TINY, summary_dropout_prob=0.0)
    model.v_head.summary.weight.data = torch.tensor(case["v_head_init"]["weight"]).reshape(1, -1)
    model.v_head.summary.bias.data = torch.tensor(case["v_head_init"]["bias"]).reshape(1)
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = PPOConfig(**case["config"], **({} if chunk_size is None else {"chunk_size": chunk_size}))
        trainer = PPOTrainer(config, model, None, AutoTokenizer.from_pretrained(TINY))
        queries = [torch.tensor(ids) for ids in case["query_ids"]]
        responses = [torch.tensor(ids) for ids in case["response_ids"]]
        for expected in case["steps"]:
            stats = trainer.step(queries, responses, [torch.tensor(s) for s in case["scores"]])
            for key, value in expected["stats"].items():
                assert stats[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
            assert trainer.kl_ctl.value == pytest.approx(expected["kl_ctl_value"], rel=1e-9)
            state = model.state_dict()
            for key, norm in expected["param_delta_norms"].items():
                # attention biases hold the key bias, whose true gradient is zero: Adam turns float noise into
                # lr-sized steps there, so those tensors agree less closely
                tolerance = 3e-2 if key.endswith("attn.c_attn.bias") else 3e-3
                assert (state[key] - initial[key]).double().norm().item() == pytest.approx(norm, rel=tolerance), key


# ----------------------------------------------------------------------------------------------------------------------
# The trainer's pieces
# ----------------------------------------------------------------------------------------------------------------------
def test_batched_forward_pass_is_the_same_across_mini_batch_sizes_and_padding():
    queries, responses, _ = rollouts()
    results = []
    for mini_batch_size in (1, 2, 4):
        trainer = tiny_trainer(mini_batch_size=mini_batch_size)
        inputs = trainer.prepare_model_inputs(queries, responses)
        with torch.no_grad():
            results.append(trainer.batched_forward_pass(trainer.model, queries, responses, inputs))
    # extra padding columns on the right change nothing but the shape
    trainer = tiny_trainer(mini_batch_size=4)
    inputs = trainer.prepare_model_inputs(queries, responses)
    padded = {key: torch.nn.functional.pad(value, (0, 3), value=0) for key, value in inputs.items()}
    with torch.no_grad():
        wide = trainer.batched_forward_pass(trainer.model, queries, responses, padded)
    length = results[0][0].shape[1]
    results.append(tuple(None if t is None else t[:, :length] for t in wide))
    assert wide[3][:, length:].sum() == 0
    for logprobs, _, values, masks in results[1:]:
        assert torch.allclose(logprobs * masks, results[0][0] * results[0][3], atol=1e-5)
        assert torch.allclose(values * masks, results[0][2] * results[0][3], atol=1e-5)
        assert torch.equal(masks, results[0][3])
    # the mask covers exactly the response tokens
    assert results[0][3].sum(1).tolist() == [len(r) for r in responses]


def test_mini_batch_2_equals_mini_batch_1_with_accumulation_2():
    queries, responses, scores = rollouts(lengths=(4, 4, 4, 4), query_length=4)
    queries = [q[:4] for q in queries]  # equal lengths: the seed's per-mini-batch token means then weigh alike
    weights, stats = [], []
    for overrides in ({"mini_batch_size": 2}, {"mini_batch_size": 1, "gradient_accumulation_steps": 2}):
        trainer = tiny_trainer(sgd=True, learning_rate=0.01, **overrides)  # ratios stay below ratio_threshold
        stats.append(trainer.step(queries, responses, scores))
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    initial = AutoModelForCausalLMWithValueHead.from_pretrained(TINY).state_dict()
    apart = sum((weights[0][k] - weights[1][k]).norm() ** 2 for k in initial) ** 0.5
    moved = sum((weights[0][k] - initial[k]).norm() ** 2 for k in initial) ** 0.5
    assert apart / moved < 1e-4, (apart, moved)
    assert moved > 1e-2  # training really moved the weights, so the comparison above is not trivially true
    # the losses are reported per mini-batch: a 2-row mean equals the mean of its two 1-row losses
    assert stats[1]["ppo/loss/total"] == pytest.approx(stats[0]["ppo/loss/total"], rel=1e-3)


def test_dropout_off_and_policy_in_train_mode():
    """The seed runs every forward pass in eval mode, so the value head's dropout (0.1 by default) never acts; here
    dropout is zeroed and the policy stays in train mode, where gradient checkpointing works."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLMWithValueHead.from_pretrained(TINY)  # the seed's default value-head dropout 0.1
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2), model, None, AutoTokenizer.from_pretrained(TINY))
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.training and model.pretrained_model.transformer.gradient_checkpointing
    queries, responses, scores = rollouts()
    inputs = trainer.prepare_model_inputs(queries, responses)
    with torch.no_grad():
        first, second = (trainer.batched_forward_pass(model, queries, responses, inputs) for _ in range(2))
    assert torch.equal(first[2], second[2]) and torch.equal(first[0], second[0])
    trainer.generate(queries[:2], batch_size=2, max_new_tokens=3)
    assert model.training  # generate switched to eval and back
    trainer.step(queries, responses, scores)


def test_ratio_threshold_and_early_stopping():
    queries, responses, scores = rollouts()
    trainer = tiny_trainer(mini_batch_size=2, ratio_threshold=0.0, learning_rate=1e-3)
    with pytest.warns(UserWarning, match="exceeds threshold"):
        stats = trainer.step(queries, responses, scores)
    assert stats["ppo/loss/total"] == 0.0 and stats["ppo/loss/policy"] == 0.0
    # early stopping: after the first epoch the policy KL exceeds 1.5 x a tiny target, so one epoch runs
    calls = []
    for early_stopping in (False, True):
        trainer = tiny_trainer(mini_batch_size=2, early_stopping=early_stopping, target_kl=1e-12,
                               learning_rate=1e-2)
        original = trainer.optimizer.step
        count = []
        trainer.optimizer.step = lambda *a, count=count, original=original: count.append(1) or original(*a)
        trainer.step(queries, responses, scores)
        calls.append(len(count))
    assert calls == [8, 2]  # optimizer steps: 4 epochs x 2 mini-batches, or 1 epoch


def test_step_rejects_bad_input():
    trainer = tiny_trainer()
    queries, responses, scores = rollouts()
    with pytest.raises(ValueError, match="expects config.batch_size = 4 responses, got 3"):
        trainer.step(queries, responses[:3], scores)
    with pytest.raises(ValueError, match="got 5"):
        trainer.step(queries + queries[:1], responses + responses[:1], scores + scores[:1])
    with pytest.raises(ValueError, match=r"responses must not be empty; responses \[2\]"):
        trainer.step(queries, responses[:2] + [torch.tensor([], dtype=torch.long)] + responses[3:], scores)
    with pytest.raises(ValueError, match="scores must be finite; got \\[nan\\]"):
        trainer.step(queries, responses, scores[:3] + [torch.tensor(float("nan"))])
    with pytest.raises(ValueError, match="multiple of mini_batch_size"):
        PPOConfig(batch_size=6, mini_batch_size=4)
    with pytest.raises(ValueError, match="mini_batch_size \\(2\\) x gradient_accumulation_steps \\(2\\)"):
        PPOConfig(batch_size=6, mini_batch_size=2, gradient_accumulation_steps=2)


def test_generate_batched_left_padded_cut_after_eos():
    trainer = tiny_trainer()
    queries = [torch.tensor(trainer.tokenizer(text)["input_ids"]) for text in
               ["Review of Golden Harbor:", "Review of The Last Letter, a film:", "Review of X:"]]
    torch.manual_seed(0)
    responses = trainer.generate(queries, batch_size=3, return_prompt=False, do_sample=True, top_k=0,
                                 max_new_tokens=40)
    torch.manual_seed(0)
    full = trainer.generate(queries, batch_size=3, do_sample=True, top_k=0, max_new_tokens=40)
    eos = trainer.tokenizer.eos_token_id
    for q, r, f in zip(queries, responses, full):
        assert torch.equal(f, torch.cat([q, r]))  # the prompt, unpadded, then the response
        assert (r == eos).sum() <= 1 and (eos not in r[:-1].tolist())  # cut after the first EOS, kept
    single = trainer.generate(queries[0], return_prompt=False, do_sample=False, max_new_tokens=5)
    assert single.shape == (1, 5)
    # the reference's responses too: greedy, and the policy is still the reference, so both agree
    policy, reference = trainer.generate(queries, batch_size=2, return_prompt=False, generate_ref_response=True,
                                         do_sample=False, max_new_tokens=6)
    assert len(policy) == len(reference) == 3
    assert all(torch.equal(p, r) for p, r in zip(policy, reference))


def test_gumbel_max_sampling_draws_what_generate_draws():
    """generate's sampling, drawn by GumbelMaxSampling: the first token's frequencies over many draws match softmax of
    the model's logits (as torch.multinomial's do), the warpers still apply (top_k), and greedy is untouched."""
    trainer = tiny_trainer(batch_size=1, mini_batch_size=1)
    query = torch.tensor(trainer.tokenizer("Review of Golden Harbor:")["input_ids"])
    with torch.no_grad():
        probs = torch.softmax(trainer.model(query[None])[0][0, -1], -1)
    torch.manual_seed(0)
    first = torch.stack([r[0] for r in trainer.generate([query] * 4000, batch_size=4000, return_prompt=False,
                                                        do_sample=True, top_k=0, top_p=1.0, max_new_tokens=1)])
    frequencies = torch.bincount(first, minlength=len(probs)).float() / len(first)
    top = probs.argsort(descending=True)[:5]  # the likeliest tokens: within 4 binomial standard deviations
    assert ((frequencies[top] - probs[top]).abs() <= 4 * (probs[top] * (1 - probs[top]) / len(first)).sqrt()).all()
    assert (frequencies - probs).abs().sum() < 0.15  # and the whole distribution (total variation x 2)
    top_2 = trainer.generate([query] * 200, batch_size=200, return_prompt=False, do_sample=True, top_k=2,
                             max_new_tokens=1)
    assert set(torch.stack([r[0] for r in top_2]).tolist()) <= set(top[:2].tolist())
    greedy = trainer.generate([query] * 3, batch_size=3, return_prompt=False, do_sample=False, max_new_tokens=1)
    assert all(r[0] == top[0] for r in greedy)


# ----------------------------------------------------------------------------------------------------------------------
# Models: weight layout, reference sharing, seq2seq
# ----------------------------------------------------------------------------------------------------------------------
def test_value_head_save_load_round_trips(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(TINY, v_head_init_strategy="normal").eval()
    keys = set(model.state_dict())
    assert "transformer.h.0.attn.c_attn.weight" in keys and {"v_head.summary.weight", "v_head.summary.bias"} <= keys
    model.save_pretrained(tmp_path / "ours")
    assert {"v_head.summary.weight", "v_head.summary.bias"} <= set(load_file(tmp_path / "ours" / "model.safetensors"))
    # ours -> plain transformers: the same language model
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(plain(ids).logits, model(input_ids=ids)[0], atol=1e-5)
    # ours -> ours: the same value head, not a new one
    again = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "ours").eval()  # the value head's dropout
    assert torch.equal(again.v_head.summary.weight, model.v_head.summary.weight)
    assert torch.allclose(again(input_ids=ids)[2], model(input_ids=ids)[2])
    # a state dict in the seed's layout (the wrapped model's keys + v_head.summary.*, as TRL 0.8.6 writes it)
    seed_dir = tmp_path / "seed"
    shutil.copytree(TINY, seed_dir)
    state = load_file(TINY / "model.safetensors")
    state["v_head.summary.weight"] = torch.full((1, 128), 0.25)
    state["v_head.summary.bias"] = torch.tensor([-3.0])
    save_file(state, seed_dir / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(seed_dir)
    assert torch.equal(loaded.v_head.summary.weight, state["v_head.summary.weight"])
    assert loaded.v_head.summary.bias.item() == -3.0
    # shape (B, T) values and float32 logits
    logits, loss, value = loaded(input_ids=ids)
    assert logits.dtype == torch.float32 and value.shape == (1, 4) and loss is None


def test_create_reference_model_shares_the_first_layers():
    model = AutoModelForCausalLMWithValueHead.from_pretrained(TINY)
    reference = create_reference_model(model, num_shared_layers=2)
    params = dict(model.named_parameters())
    ref_params = dict(reference.named_parameters())
    for name in ("pretrained_model.transformer.wte.weight", "pretrained_model.transformer.h.0.attn.c_attn.weight",
                 "pretrained_model.transformer.h.1.mlp.c_fc.weight"):
        assert ref_params[name].data_ptr() == params[name].data_ptr(), name  # one tensor in memory
        assert not params[name].requires_grad
    for name in ("pretrained_model.transformer.h.2.attn.c_attn.weight", "v_head.summary.weight"):
        assert ref_params[name].data_ptr() != params[name].data_ptr(), name
        assert params[name].requires_grad and not ref_params[name].requires_grad
    assert not reference.training
    with pytest.raises(ValueError, match="layer pattern"):
        create_reference_model(model, num_shared_layers=1, pattern="decoder.block.{layer}")


def test_seq2seq_step_learns_a_toy_reward():
    """A tiny T5 built from config: reward = how many of the response's tokens have an id below 60 (a tenth of the
    vocabulary)."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                      decoder_start_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                      eos_token_id=tokenizer.eos_token_id, dropout_rate=0.0)
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(T5ForConditionalGeneration(config))
    trainer = PPOTrainer(PPOConfig(batch_size=16, mini_batch_size=8, learning_rate=3e-2, init_kl_coef=0.01), model,
                         None, tokenizer)
    queries = [torch.randint(1, 600, (5,)) for _ in range(16)]
    means = []
    for _ in range(10):
        responses = trainer.generate(queries, batch_size=16, do_sample=True, top_k=0, max_new_tokens=6,
                                     min_new_tokens=6)
        scores = [torch.tensor(float((r[1:] < 60).sum())) for r in responses]
        stats = trainer.step(queries, responses, scores)
        means.append(stats["ppo/mean_scores"])
    assert responses[0][0].item() == tokenizer.eos_token_id  # the decoder's start token leads the response
    assert min(means[-3:]) > means[0] + 1.5, means  # about 0.6 -> 4 of 6 tokens


def test_the_seeds_quickstart_runs_with_only_its_import_changed(tmp_path, monkeypatch):
    """../shared/seeds' quickstart, verbatim but for `from ppo import ...` and the tiny policy for "gpt2"."""
    quickstart = f'''
import torch
from transformers import GPT2Tokenizer
from ppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
model = AutoModelForCausalLMWithValueHead.from_pretrained("{TINY}")
ref_model = AutoModelForCausalLMWithValueHead.from_pretrained("{TINY}")
tokenizer = GPT2Tokenizer.from_pretrained("{TINY}")
tokenizer.pad_token = tokenizer.eos_token
ppo_config = {{"mini_batch_size": 1, "batch_size": 1}}
config = PPOConfig(**ppo_config)
ppo_trainer = PPOTrainer(config, model, ref_model, tokenizer)
query_txt = "This morning I went to the "
query_tensor = tokenizer.encode(query_txt, return_tensors="pt").to(model.pretrained_model.device)
generation_kwargs = {{
"min_length": -1,
"top_k": 0.0,
"top_p": 1.0,
"do_sample": True,
"pad_token_id": tokenizer.eos_token_id,
"max_new_tokens": 20,
}}
response_tensor = ppo_trainer.generate([item for item in query_tensor], return_prompt=False, **generation_kwargs)
response_txt = tokenizer.decode(response_tensor[0])
reward = [torch.tensor(1.0, device=model.pretrained_model.device)]
train_stats = ppo_trainer.step([query_tensor[0]], [response_tensor[0]], reward)
model.save_pretrained("my-fine-tuned-model-ppo")
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("my-fine-tuned-model-ppo")
'''
    monkeypatch.chdir(tmp_path)
    namespace = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(quickstart, namespace)
    assert namespace["train_stats"]["ppo/mean_scores"] == 1.0
    assert isinstance(namespace["response_txt"], str)
    assert (tmp_path / "my-fine-tuned-model-ppo" / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------------------------------------
# The script: learning, resume, LoRA, two processes, bad input
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ppo_learns_on_the_tiny_world(tmp_path):
    """`python ppo.py` (the defaults): the tiny reward model's mean score rises clearly, the KL to the reference
    stays bounded, and the saved policy (loaded with plain transformers) writes more positive reviews than the
    initial policy by the ground-truth scorer, which PPO never saw."""
    run_ok("ppo.py", "--output_dir", tmp_path)
    rewards = metric_series(tmp_path, "env/reward_mean")
    assert len(rewards) == 20
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 5, rewards
    assert max(metric_series(tmp_path, "objective/kl")) < 40
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {"step", "query", "response", "reward"} <= set(samples[0])
    prompts = [json.loads(line)["prompt"] for line in
               (ASSETS / "data" / "prompts" / "test.jsonl").read_text().splitlines()][:64]
    before = mean_sentiment_of_samples(TINY, prompts, n_tokens=24)
    after = mean_sentiment_of_samples(tmp_path, prompts, n_tokens=24)
    assert after > before + 0.15, (before, after)  # 0.09 -> 0.32 / 0.44 / 0.36 with seeds 0 / 1 / 2


@pytest.mark.slow
def test_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path):
    from safetensors.torch import load_file

    args = ["--steps", 4, "--batch_size", 8, "--mini_batch_size", 4, "--save_steps", 2]
    run_ok("ppo.py", *args, "--output_dir", tmp_path / "full")
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "checkpoint-2")
    run_ok("ppo.py", *args, "--output_dir", tmp_path / "resumed", "--resume_from_checkpoint", tmp_path / "checkpoint-2")
    full, resumed = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "resumed"))
    assert full.keys() == resumed.keys() and "v_head.summary.weight" in full
    for key in full:
        assert torch.allclose(full[key], resumed[key], atol=1e-6), key
    after = [row for row in read_metrics(tmp_path / "full") if row["step"] > 2]
    logged = read_metrics(tmp_path / "resumed")
    assert [row["step"] for row in logged] == [3, 4]
    for expected, got in zip(after, logged):
        for key in ("env/reward_mean", "objective/kl", "objective/kl_coef", "ppo/loss/total"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_lora_policy_with_adapters_off_reference(tmp_path):
    from transformers import AutoModelForCausalLM

    result = run_ok("ppo.py", "--use_peft", "--steps", 3, "--batch_size", 8, "--mini_batch_size", 8,
                    "--learning_rate", 1e-3, "--output_dir", tmp_path)
    assert "(policy)" in result.stdout  # no second copy of the weights for the reference
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "pytorch_model.bin").exists()  # the value head, as the seed saves it
    merged = AutoModelForCausalLM.from_pretrained(tmp_path)
    initial = AutoModelForCausalLM.from_pretrained(TINY)
    assert any(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), initial.state_dict().values()))
    with_head = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "adapter")
    assert with_head.is_peft_model and with_head.v_head.summary.weight.abs().sum() > 0
    assert metric_series(tmp_path, "objective/kl")[0] == pytest.approx(0.0, abs=1e-4)


TWO_PROCESS_STEP = '''
import sys, torch, warnings
sys.path.insert(0, sys.argv[2])
warnings.simplefilter("ignore")
from transformers import AutoTokenizer
from ppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
torch.manual_seed(0)
model = AutoModelForCausalLMWithValueHead.from_pretrained(sys.argv[3], summary_dropout_prob=0.0)
per_process = int(sys.argv[4])
config = PPOConfig(batch_size=per_process, mini_batch_size=per_process, ppo_epochs=2, learning_rate=0.01,
                   whiten_rewards=True)
optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)  # an update linear in the gradient
trainer = PPOTrainer(config, model, None, AutoTokenizer.from_pretrained(sys.argv[3]), optimizer=optimizer)
g = torch.Generator().manual_seed(1)
queries = [torch.randint(1, 600, (5,), generator=g) for _ in range(8)]
responses = [torch.randint(1, 600, (6,), generator=g) for _ in range(8)]
scores = [torch.tensor(float(i % 3) - 1) for i in range(8)]
mine = slice(trainer.accelerator.process_index * per_process, (trainer.accelerator.process_index + 1) * per_process)
stats = trainer.step(queries[mine], responses[mine], scores[mine])
if trainer.accelerator.is_main_process:
    trainer._save_pretrained(sys.argv[1])
    import json; open(sys.argv[1] + "/stats.json", "w").write(json.dumps({k: v for k, v in stats.items()
                                                                            if isinstance(v, float)}))
accelerator = trainer.accelerator
del trainer, model  # the DDP-wrapped policy goes before its process group does (else an exit-time abort)
accelerator.end_training()
'''


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    """8 rollouts: one process x 8, and `accelerate launch` with 2 processes x 4 (gloo on CPU). Whitening, the KL
    statistics and the KL controller use global values and gradients are averaged: the same update."""
    from safetensors.torch import load_file

    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_STEP)
    for name, per_process, launcher in (("one", 8, None), ("two", 4, TWO_PROCESSES)):
        (tmp_path / name).mkdir()
        result = run_script(str(script), tmp_path / name, REPO, TINY, per_process, launcher=launcher)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    initial = load_file(TINY / "model.safetensors")
    apart = sum((one[k] - two[k]).norm() ** 2 for k in initial) ** 0.5
    moved = sum((one[k] - initial[k]).norm() ** 2 for k in initial) ** 0.5
    assert apart / moved < 1e-4 and moved > 1e-2, (apart, moved)
    assert torch.allclose(one["v_head.summary.weight"], two["v_head.summary.weight"], atol=1e-5)
    stats = [json.loads((tmp_path / d / "stats.json").read_text()) for d in ("one", "two")]
    for key in ("objective/kl", "ppo/mean_scores", "ppo/loss/total", "ppo/returns/mean", "objective/kl_coef"):
        assert stats[1][key] == pytest.approx(stats[0][key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_bad_input_gives_one_clear_line(tmp_path):
    (tmp_path / "no_prompt.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    cases = [
        (["--batch_size", 6, "--mini_batch_size", 4], "batch_size (6) must be a multiple of mini_batch_size (4)"),
        (["--chunk_size", -1], "chunk_size must be >= 0 (0: the plain path), got -1"),
        (["--reward_model", "no-such-task:some/model"], "'no-such-task' is not a transformers pipeline task"),
        (["--reward_model", tmp_path / "missing"], "does not exist"),
        (["--query_dataset", tmp_path / "no_prompt.jsonl"], "expected a 'prompt' or 'query' column"),
        (["--query_dataset", tmp_path / "empty.jsonl"], "could not load dataset"),
    ]
    for args, message in cases:
        line = error_line(run_script("ppo.py", *args, "--output_dir", tmp_path / "out"))
        assert line.startswith("ppo.py: error:") and message in line, line


def test_help(capsys):
    assert_help_lists(PPOConfig, capsys, ["--init-kl-coef", "--kl-penalty", "--mini-batch-size", "--reward-model",
                                          "--fix-seed-bugs"])


def test_reward_rule_model_and_pipeline():
    """A sequence-classification model scores prompt + response as reward.py does (EOS appended, the score where
    plain transformers reads it); a 'task:model' spec goes through a transformers pipeline (raw score, last label)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ppo import load_reward_function

    prompts, responses = ["Review of Golden Harbor:", "Review of X:"], [" The plot was superb.", " Dull. Awful."]
    by_model = load_reward_function(str(ASSETS / "tiny-reward"), "cpu")(prompts, responses)
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-reward")
    model = AutoModelForSequenceClassification.from_pretrained(ASSETS / "tiny-reward").eval()
    for prompt, response, score in zip(prompts, responses, by_model):
        ids = tokenizer(prompt + response)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            assert model(torch.tensor([ids])).logits[0, 0].item() == pytest.approx(score, abs=1e-4)
    assert by_model[0] > by_model[1]
    by_pipeline = load_reward_function(f"sentiment-analysis:{ASSETS / 'tiny-reward'}", "cpu")(prompts, responses)
    assert by_pipeline[0] > by_pipeline[1]


def test_reward_adapter_shares_the_base_weights(tmp_path):
    """The seed's reward adapter: a LoRA reward model trained on the policy's base, loaded next to the policy's
    adapter; compute_reward_score switches to it for one forward and back."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    reward_base = AutoModelForSequenceClassification.from_pretrained(TINY, num_labels=1)
    reward = get_peft_model(reward_base, LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["score"],
                                                    task_type="SEQ_CLS"))
    with torch.no_grad():
        reward.base_model.model.score.modules_to_save["default"].weight.normal_()
    reward.save_pretrained(tmp_path / "reward_adapter")
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(
        TINY, peft_config=LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM"),
        reward_adapter=str(tmp_path / "reward_adapter"))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    scores = policy.compute_reward_score(ids)
    assert scores.shape == (1, 5, 1)
    expected = reward.eval()(input_ids=ids).logits[0, 0].item()  # a sequence classifier reads the last position
    assert scores[0, -1, 0].item() == pytest.approx(expected, abs=1e-4)
    assert policy.pretrained_model.active_adapter == "default"  # the policy's adapter is active again


@pytest.mark.slow
def test_stop_token_penalty_temperature_and_a_pipeline_reward_from_the_command_line(tmp_path):
    result = run_ok("ppo.py", "--steps", 2, "--batch_size", 8, "--mini_batch_size", 8, "--stop_token", ".",
                    "--missing_eos_penalty", 100, "--temperature", 0.7,
                    "--reward_model", f"sentiment-analysis:{ASSETS / 'tiny-reward'}", "--output_dir", tmp_path)
    assert "saved to" in result.stdout
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    for sample in samples:  # cut after the first '.', and a response without one lost 100
        assert sample["response"].count(".") <= 1
        assert (sample["reward"] < -50) == ("." not in sample["response"]), sample


@pytest.mark.slow
def test_two_process_command_line_run(tmp_path):
    """`accelerate launch` with 2 processes (gloo on CPU): each process rolls out its own batch_size queries; the
    logs hold both processes' samples."""
    run_ok("ppo.py", "--steps", 2, "--batch_size", 4, "--mini_batch_size", 4, "--output_dir", tmp_path,
           launcher=TWO_PROCESSES)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1] * 8 + [2] * 8
    assert len({s["query"] for s in samples if s["step"] == 1}) == 8  # eight different prompts, four per process
    assert (tmp_path / "model.safetensors").exists()


def test_a_non_finite_loss_never_reaches_the_optimizer():
    trainer = tiny_trainer(learning_rate=1e-3)
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        model.v_head.summary.bias.fill_(float("nan"))  # NaN values -> NaN advantages and value loss
    before = {name: p.detach().clone() for name, p in model.pretrained_model.named_parameters()}
    with pytest.raises(FloatingPointError, match="the optimizer was not stepped"):
        trainer.step(*rollouts())
    for name, p in model.pretrained_model.named_parameters():
        assert torch.equal(p, before[name]), name


# ----------------------------------------------------------------------------------------------------------------------
# Never lose a run (issue 24): a signal ends a PPO step with a checkpoint, latest resumes it exactly, a previous run is
# never overwritten, bad inputs are one line before any model loads, checkpoints hold no pickled code
# ----------------------------------------------------------------------------------------------------------------------
# score scaling and the adaptive KL controller on, so the running score statistics and beta must resume exactly too
SIGNAL_ARGS = ["--steps", 6, "--batch_size", 8, "--mini_batch_size", 4, "--use_score_scaling", "--use_score_norm"]


@pytest.mark.slow
def test_sigterm_saves_the_ppo_step_and_latest_resumes_to_the_uninterrupted_weights(tmp_path):
    from test_runs import same_weights, signal_at_step

    run = tmp_path / "run"
    interrupted = signal_at_step("ppo.py", SIGNAL_ARGS, run, step=2)
    assert interrupted.returncode == 128 + 15, interrupted.stderr[-2000:]
    lines = [line for line in interrupted.stdout.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGTERM: saved "), interrupted.stdout[-2000:]
    assert lines[0].endswith(f"--output_dir {run} --resume_from_checkpoint latest")
    (checkpoint,) = run.glob("checkpoint-*")  # the PPO step in progress, whole: nothing left as .incomplete
    assert int(checkpoint.name.split("-")[1]) >= 2 and f"saved {checkpoint};" in lines[0]
    for path in checkpoint.glob("*.pt"):  # training state (optimizer, beta, score statistics) and RNG: no pickles
        torch.load(path, weights_only=True)
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    assert isinstance(state["kl_coef"], float) and state["kl_coef"] != 0.2  # the adaptive beta has moved
    # a later checkpoint killed mid-write is never taken by latest
    (run / "checkpoint-5.incomplete").mkdir()
    (run / "checkpoint-5.incomplete" / "training_state.pt").write_bytes(b"truncat")
    resumed = run_ok("ppo.py", *SIGNAL_ARGS, "--output_dir", run, "--resume_from_checkpoint", "latest")
    assert f"resuming from the latest checkpoint, {checkpoint}" in resumed.stdout
    run_ok("ppo.py", *SIGNAL_ARGS, "--output_dir", tmp_path / "whole")
    assert same_weights(run, tmp_path / "whole")  # the value head included
    assert "v_head.summary.weight" in load_file_keys(run)
    logged, whole = read_metrics(run), read_metrics(tmp_path / "whole")
    assert [row["step"] for row in logged] == [row["step"] for row in whole] == [1, 2, 3, 4, 5, 6]
    for expected, got in zip(whole, logged):
        for key in ("env/reward_mean", "objective/kl_coef", "ppo/loss/total"):
            assert got[key] == expected[key], (expected["step"], key)


def load_file_keys(directory) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def test_running_score_statistics_round_trip_through_a_weights_only_checkpoint(tmp_path):
    """RunningMoments' state (floats before the first update, tensors after) loads with weights_only=True and
    continues exactly, also for a long run's count of scores, which float32 no longer holds exactly."""
    from types import SimpleNamespace

    from ppo import RunningMoments

    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    fresh, long = RunningMoments(accelerator), RunningMoments(accelerator)
    long.update(torch.tensor([1.0, 2.0, 4.0]))
    long.count += 2**24  # as after 16.8M scores
    for running in (fresh, long):
        torch.save({"running": running.state_dict()}, tmp_path / "state.pt")
        restored = RunningMoments(accelerator)
        restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["running"])
        scores = torch.tensor([0.5, -3.0, 8.0, 1.0])
        assert restored.update(scores) == running.update(scores)
        for key in ("mean", "std", "var", "count"):
            assert float(getattr(restored, key)) == float(getattr(running, key)), key


def test_no_checkpoint_is_loaded_with_pickled_code():
    assert "weights_only=False" not in (REPO / "ppo.py").read_text()
