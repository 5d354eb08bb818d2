"""The fast paths compute what the plain ones compute: the chunked log-probs (--chunk_size), the output layer applied
only at scored positions (--lm_head_only_at_labels) and fused Adam(W) (--optim), in every script that has them."""

import importlib

import pytest
import torch
from conftest import ASSETS, metric_series, run_ok
from transformers import AutoModelForCausalLM

PREFERENCE_SCRIPTS = ["dpo", "kto", "orpo", "cpo"]


def batch_with_prompts_and_padding(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three right-padded rows of different lengths; labels -100 on each row's prompt and padding."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    for row, (prompt, length) in enumerate([(3, 12), (5, 9), (2, 6)]):
        attention_mask[row, length:] = 0
        labels[row, :prompt] = -100
        labels[row, length:] = -100
    return input_ids, attention_mask, labels


@pytest.fixture(params=["tiny-gpt2", "llama"])
def model(request, llama_dir):
    """The tiny policy (GPT-2, tied head) and a Llama-style model, dropout off."""
    path = ASSETS / "tiny-gpt2" if request.param == "tiny-gpt2" else llama_dir
    return AutoModelForCausalLM.from_pretrained(path).eval()


def log_probs_and_grads(model, module, input_ids, attention_mask, labels, chunk_size: int, only_at_labels: bool):
    """(B,) summed log-probs through the script's token_log_probs and the gradient of a loss that is not linear in
    them (as DPO's is not) w.r.t. every parameter."""
    model.zero_grad()
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    out = module.token_log_probs(model, model, batch, chunk_size, only_at_labels)
    log_probs = (out.log_probs if hasattr(out, "log_probs") else out).sum(-1)
    (log_probs.sum() + torch.nn.functional.logsigmoid(log_probs[0] - log_probs[1])).backward()
    return log_probs.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("script", ["sft", *PREFERENCE_SCRIPTS])
def test_output_layer_at_scored_positions_and_chunks_give_the_same_log_probs_and_gradients(script, model):
    """The seed's full logits, the plain path's output layer at the scored positions only, and the chunked path
    (chunks of 3 positions, recomputed in the backward): the same log-probs and gradients."""
    module = importlib.import_module(script)
    batch = batch_with_prompts_and_padding(model.config.vocab_size)
    full, full_grads = log_probs_and_grads(model, module, *batch, chunk_size=0, only_at_labels=False)
    for chunk_size, only_at_labels in [(0, True), (3, True)]:
        got, got_grads = log_probs_and_grads(model, module, *batch, chunk_size=chunk_size,
                                             only_at_labels=only_at_labels)
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
        assert full_grads.keys() == got_grads.keys()
        for name, grad in full_grads.items():  # to float precision, relative to the tensor's largest entry
            assert (got_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), (chunk_size, name)
    # the hooks are gone after the block: full logits again
    assert model(input_ids=batch[0], use_cache=False).logits.shape == (*batch[0].shape, model.config.vocab_size)


def test_the_hook_is_removed_when_the_block_raises():
    module = importlib.import_module("dpo")
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-gpt2")
    input_ids, _, labels = batch_with_prompts_and_padding(model.config.vocab_size)
    with pytest.raises(RuntimeError, match="inside"):
        with module.lm_head_only_at(model, module.scored_positions(labels)):
            raise RuntimeError("inside")
    assert not model.get_output_embeddings()._forward_pre_hooks


@pytest.mark.slow
@pytest.mark.parametrize("script", ["sft", "dpo"])
def test_fast_and_plain_paths_train_the_same(script, tmp_path):
    """The same short run with the fast paths (the defaults) and with the seed's (full logits at every position,
    per-tensor AdamW)."""
    common = ["--max_steps", 6, "--logging_steps", 2, "--eval_steps", 3, "--save_steps", 0]
    run_ok(f"{script}.py", *common, "--output_dir", tmp_path / "fast")
    run_ok(f"{script}.py", *common, "--output_dir", tmp_path / "plain", "--chunk_size", 0,
           "--no-lm_head_only_at_labels", "--optim", "adamw_torch")
    keys = ["loss", "eval_loss"] + (["rewards/margins", "logits/chosen", "eval_rewards/accuracies"]
                                    if script == "dpo" else [])
    for key in keys:
        fast, plain = metric_series(tmp_path / "fast", key), metric_series(tmp_path / "plain", key)
        assert len(fast) >= 2 and fast == pytest.approx(plain, rel=1e-4, abs=1e-5), key


def test_ppo_step_is_the_same_with_the_output_layer_at_the_responses_only(llama_dir):
    """Two PPO steps on a Llama-style policy (untied output layer): the chunked log-probs (chunks of 2 response
    positions), the plain path with the output layer at the responses only, and the seed's full logits, the seed's
    per-tensor Adam in each: the same stats and the same weights."""
    import warnings

    from ppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
    from transformers import AutoTokenizer

    generator = torch.Generator().manual_seed(0)
    queries = [torch.randint(0, 500, (n,), generator=generator) for n in (3, 7, 5, 4)]
    responses = [torch.randint(0, 500, (n,), generator=generator) for n in (6, 2, 9, 5)]
    scores = [torch.tensor(s) for s in (1.0, -0.5, 2.0, 0.0)]
    runs = []
    for chunk_size, only_at_responses in ((2, True), (0, True), (0, False)):
        model = AutoModelForCausalLMWithValueHead.from_pretrained(llama_dir, summary_dropout_prob=0.0)
        torch.manual_seed(0)
        model.v_head.summary.reset_parameters()
        config = PPOConfig(batch_size=4, mini_batch_size=2, seed=0, learning_rate=1e-3, optim="adam_torch",
                           chunk_size=chunk_size, lm_head_only_at_responses=only_at_responses)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = PPOTrainer(config, model, None, AutoTokenizer.from_pretrained(llama_dir))
            stats = [trainer.step(queries, responses, scores) for _ in range(2)]
        runs.append((stats, {key: value.clone() for key, value in model.state_dict().items()}))
    plain_stats, plain_state = runs[-1]
    # the chunked sums differ from one big matmul's by float rounding, which Adam turns into steps of up to lr
    # (1e-3) on the coordinates whose gradient is nothing but rounding: 1e-4 there, 2.3e-5 measured
    for (fast_stats, fast_state), atol in zip(runs[:-1], (1e-4, 1e-6)):
        for fast, plain in zip(fast_stats, plain_stats):
            for key, value in plain.items():
                if isinstance(value, float) and not key.startswith("time/"):
                    assert fast[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        for key, value in plain_state.items():
            torch.testing.assert_close(fast_state[key], value, rtol=1e-4, atol=atol, msg=key)
