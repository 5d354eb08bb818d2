"""The chunked log-prob path (chunked_log_probs, the same block in every script that trains a language model): the
same text everywhere; equal to the textbook computation on the model's own logits (log-probs, entropies, mean logits
and every gradient: output layer, tied embeddings, LoRA on the output layer, soft-capped and scaled logits, a
temperature); no (tokens x vocabulary) tensor kept for the backward; the head in the autocast dtype under bf16."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import ASSETS, REPO
from transformers import (AutoModelForCausalLM, CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM,
                          GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM)

SCRIPTS = ["sft", "iterative_sft", "dpo", "kto", "orpo", "cpo", "ppo", "grpo", "rloo"]
BLOCK_START = "# Token log-probs without ever holding the (tokens x vocabulary) logits"
dpo = importlib.import_module("dpo")  # the block is the same text in every script (the first test): test one copy


def block_text(script: str) -> str:
    source = (REPO / f"{script}.py").read_text()
    start = source.index(BLOCK_START)
    return source[start : source.index("\n\n\n", source.index("def chunked_log_probs(", start))]


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "dpo"])
def test_the_block_is_the_same_text_in_every_script(script):
    assert block_text(script) == block_text("dpo")


def small_config(kind: str, vocab: int = 97):
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama-untied":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    if kind == "gemma2-softcap":  # final_logit_softcapping small enough to bend the logits
        return Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, final_logit_softcapping=0.5,
                                              attn_implementation="eager"))
    if kind == "cohere-scaled":
        return CohereForCausalLM(CohereConfig(**common, logit_scale=0.3))
    if kind == "granite-scaled":
        return GraniteForCausalLM(GraniteConfig(**common, logits_scaling=4.0))
    raise ValueError(kind)


@pytest.fixture(params=["tiny-gpt2", "llama-untied", "gemma2-softcap", "cohere-scaled", "granite-scaled", "lora-head"])
def model(request):
    torch.manual_seed(0)
    if request.param == "tiny-gpt2":  # tied embeddings
        return AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-gpt2").eval()
    if request.param == "lora-head":  # LoRA on the output layer too, initialised away from zero
        from peft import LoraConfig, get_peft_model

        return get_peft_model(small_config("llama-untied"), LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)).eval()
    return small_config(request.param).eval()


def a_batch(vocab: int):
    """Three rows, labels -100 on a prompt and on some padding: 22 scored positions."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (3, 13), generator=generator)
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[1, 9:] = -100
    return input_ids, labels


def loss_of(token_log_probs: torch.Tensor) -> torch.Tensor:
    """A loss that is not linear in the log-probs, as DPO's is: each token's gradient weight differs."""
    sums = token_log_probs.sum(-1)
    return -F.logsigmoid(sums[0] - sums[1]) + 1e-3 * sums[2] ** 2 + token_log_probs[:, 5].pow(2).sum()


def textbook(model, input_ids, labels, temperature: float):
    """log_softmax over the model's own (B, T, V) logits."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float() / temperature
    log_softmax = logits.log_softmax(-1)
    targets = labels[:, 1:] != -100
    values = {"log_probs": log_softmax.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1),
              "entropy": -(log_softmax.exp() * log_softmax).sum(-1).detach(), "mean_logits": logits.mean(-1).detach()}
    return {name: value * targets for name, value in values.items()}


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, tolerance: float, what) -> None:
    """Equal to float precision relative to the tensor's largest entry (a gradient's small entries are sums of
    cancelling terms, which the order of a chunked sum perturbs by the rounding of the large ones)."""
    assert (got - want).abs().max() <= tolerance * want.abs().max().clamp(min=1e-12), what


def gradients(model) -> dict:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_the_textbook_log_softmax_with_every_gradient(model, temperature):
    input_ids, labels = a_batch(model.config.vocab_size)
    want = textbook(model, input_ids, labels, temperature)
    loss_of(want["log_probs"]).backward()
    want_grads = gradients(model)
    assert want_grads  # the output layer (or its adapter) among them
    assert any(key in name for name in want_grads for key in ["lm_head", "wte", "embed_tokens"])
    for chunk_size in [0, 1, 3, 7, 1024]:  # 0 and 1024: one chunk; 1, 3, 7: checkpointed chunks, a ragged last one
        with dpo.chunked_log_probs(model, labels, chunk_size, temperature, extras=("entropy", "mean_logits")):
            got = model(input_ids=input_ids, use_cache=False)
        assert isinstance(got, dpo.TokenLogProbs) and got.log_probs.shape == labels[:, 1:].shape
        for name in ["log_probs", "entropy", "mean_logits"]:
            torch.testing.assert_close(getattr(got, name), want[name], rtol=1e-5, atol=1e-5, msg=(chunk_size, name))
        assert not got.entropy.requires_grad and not got.mean_logits.requires_grad
        loss_of(got.log_probs).backward()
        for name, grad in gradients(model).items():
            assert_close_to_scale(grad, want_grads[name], 1e-5, (chunk_size, name))
    # the hooks are gone after the block: the model returns logits again
    assert model(input_ids=input_ids, use_cache=False).logits.shape == (*input_ids.shape, model.config.vocab_size)


def saved_for_backward(model, fn) -> list[torch.Size]:
    """The shapes of the activations autograd saves for the backward while fn runs (the weights it saves are not
    activations; checkpointed regions save nothing here)."""
    shapes, weights = [], {p.data_ptr() for p in model.parameters()}

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            shapes.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return shapes


def test_no_tokens_by_vocabulary_tensor_is_kept_for_the_backward():
    torch.manual_seed(0)
    model = small_config("llama-untied", vocab=997)  # a vocabulary wider than any other dimension here
    input_ids, labels = a_batch(997)
    n = int((labels[:, 1:] != -100).sum())

    def forward(chunk_size):
        def run():
            with dpo.chunked_log_probs(model, labels, chunk_size, extras=("entropy",)):
                loss_of(model(input_ids=input_ids, use_cache=False).log_probs).backward()
        return [shape for shape in saved_for_backward(model, run) if 997 in shape]

    assert (n, 997) in forward(0)  # the plain path keeps the (N, V) logits for the backward
    assert forward(4) == []  # chunked: no tensor of vocabulary width at all (each chunk is recomputed in the backward)


def test_the_output_layer_runs_in_the_autocast_dtype_under_bf16():
    torch.manual_seed(0)
    model = small_config("llama-untied")
    input_ids, labels = a_batch(model.config.vocab_size)
    dtypes = []

    class RecordingLinear(torch.nn.Linear):  # what the output layer's own forward computes in
        def forward(self, hidden):
            logits = super().forward(hidden)
            dtypes.append(logits.dtype)
            return logits

    model.lm_head.__class__ = RecordingLinear
    results = {}
    for chunk_size in [0, 5]:
        with torch.autocast("cpu", dtype=torch.bfloat16), dpo.chunked_log_probs(model, labels, chunk_size):
            out = model(input_ids=input_ids, use_cache=False)
        loss_of(out.log_probs).backward()
        results[chunk_size] = (out.log_probs.detach(), gradients(model))
    assert set(dtypes) == {torch.bfloat16} and out.log_probs.dtype == torch.float32
    torch.testing.assert_close(results[5][0], results[0][0], rtol=1e-2, atol=1e-2)
    for name, grad in results[0][1].items():
        assert_close_to_scale(results[5][1][name], grad, 2e-2, name)


def test_an_empty_selection_and_hidden_states_pass_through():
    model = small_config("llama-untied")
    input_ids, labels = a_batch(model.config.vocab_size)
    with dpo.chunked_log_probs(model, torch.full_like(labels, -100), 3):
        out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True)
    assert out.log_probs.abs().sum() == 0 and out.hidden_states[-1].shape == (*input_ids.shape, 32)
    with pytest.raises(RuntimeError, match="inside"):
        with dpo.chunked_log_probs(model, labels, 3):
            raise RuntimeError("inside")
    assert not model._forward_hooks and not model.lm_head._forward_hooks and "forward" not in vars(model.lm_head)
    model.lm_head.forward = patched = lambda hidden: torch.nn.Linear.forward(model.lm_head, hidden) * 2  # set before
    with dpo.chunked_log_probs(model, labels, 3):
        doubled = model(input_ids=input_ids, use_cache=False).log_probs
    assert vars(model.lm_head)["forward"] is patched  # put back after the block, and the chunks projected with it:
    del model.lm_head.forward
    with dpo.chunked_log_probs(model, labels, 3, temperature=0.5):  # doubled logits are halved temperature's
        assert torch.allclose(doubled, model(input_ids=input_ids, use_cache=False).log_probs, atol=1e-5)
