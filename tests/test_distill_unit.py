"""distill.py's pure functions: the generalized JSD against hand computations, F.kl_div and frozen outputs of TRL 1.16;
the policy-gradient form; the chunked loss against the plain one on real models (loss and gradients); the logits the
chunked path rebuilds; the on/off-policy schedule; row formats; the flags --help shows."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import tyro
from conftest import ASSETS
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill import (Args, chunked_distillation_at, collate_completions, completion_source, detect_format,
                     generalized_jsd, generalized_jsd_loss, lm_head_only_at, output_logits_match, sample_completions,
                     teacher_hidden_at, tokenize_row, token_losses, unpack_distillation)

BETAS = [0.0, 0.3, 0.5, 0.9, 1.0]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_the_divergence_family_by_hand():
    """Student p = (1/2, 1/2), teacher q = (3/4, 1/4): beta 0 is KL(q || p), beta 1 is KL(p || q), and in between
    beta KL(q || m) + (1 - beta) KL(p || m) with m = (1 - beta) p + beta q; temperature 2 on logits 2z is
    temperature 1 on z."""
    student, teacher = torch.tensor([0.0, 0.0]), torch.tensor([math.log(3.0), 0.0])
    p, q = [0.5, 0.5], [0.75, 0.25]
    assert generalized_jsd(student, teacher, beta=0.0).item() == pytest.approx(kl(q, p), rel=1e-6)
    assert generalized_jsd(student, teacher, beta=1.0).item() == pytest.approx(kl(p, q), rel=1e-6)
    for beta in [0.3, 0.5, 0.9]:
        m = [(1 - beta) * a + beta * b for a, b in zip(p, q)]
        expected = beta * kl(q, m) + (1 - beta) * kl(p, m)
        assert generalized_jsd(student, teacher, beta=beta).item() == pytest.approx(expected, rel=1e-5), beta
        assert generalized_jsd(2 * student, 2 * teacher, beta, temperature=2.0).item() == pytest.approx(expected,
                                                                                                      rel=1e-5)


def test_beta_0_and_1_are_forward_and_reverse_kl_and_the_mean_runs_over_the_mask():
    torch.manual_seed(0)
    student, teacher = 3 * torch.randn(2, 5, 40), 3 * torch.randn(2, 5, 40)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    s, t = F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1)
    forward = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)[mask].mean()  # KL(teacher || student)
    reverse = F.kl_div(t, s, reduction="none", log_target=True).sum(-1)[mask].mean()  # KL(student || teacher)
    assert generalized_jsd_loss(student, teacher, mask, beta=0.0, temperature=2.0) == pytest.approx(forward.item())
    assert generalized_jsd_loss(student, teacher, mask, beta=1.0, temperature=2.0) == pytest.approx(reverse.item())
    assert forward.item() != pytest.approx(reverse.item(), rel=1e-2)  # the two sides really differ here


def test_beta_one_half_is_symmetric_and_identical_logits_give_zero_and_no_gradient():
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 30), torch.randn(6, 30)
    assert generalized_jsd_loss(student, teacher, beta=0.5) == pytest.approx(
        generalized_jsd_loss(teacher, student, beta=0.5).item(), rel=1e-6)
    for beta in BETAS:
        logits = student.clone().requires_grad_()
        loss = generalized_jsd_loss(logits, student, beta=beta, temperature=1.5)
        (grad,) = torch.autograd.grad(loss, logits)
        assert abs(loss.item()) < 1e-6 and grad.abs().max() < 1e-6, beta
        assert generalized_jsd_loss(student, teacher, beta=beta) > 0


def small_fixed_input() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As benchmarks/vs_trl_distill_loss.py builds it: (1, 3, 5) logits from sines, mask 1 1 0."""
    position = torch.arange(15, dtype=torch.float32).view(1, 3, 5)
    return 2 * torch.sin(1.3 * position), 1.5 * torch.cos(0.7 * position + 0.5), torch.tensor([[True, True, False]])


# TRL 1.16's GKDTrainer.generalized_jsd_loss on small_fixed_input(), printed by benchmarks/vs_trl_distill_loss.py in
# TRL's virtualenv (TRL 1.16.0, torch 2.13.0). That script also checks, on a 32k vocabulary, the loss and gradients
# against both of TRL's implementations (GKD's and DistillationTrainer's chunked kernel) to 1e-5.
TRL_1_16 = {(0.0, 1.0): 1.289211630821228, (0.0, 2.0): 0.35076555609703064, (0.3, 1.0): 0.2112981528043747,
            (0.3, 2.0): 0.06861661374568939, (0.5, 1.0): 0.23834829032421112, (0.5, 2.0): 0.07981833070516586,
            (0.9, 1.0): 0.08720271289348602, (0.9, 2.0): 0.028652550652623177, (1.0, 1.0): 1.0082226991653442,
            (1.0, 2.0): 0.3212360739707947}


@pytest.mark.parametrize("beta, temperature", list(TRL_1_16))
def test_equal_to_trl_1_16_on_frozen_outputs(beta, temperature):
    student, teacher, mask = small_fixed_input()
    loss = generalized_jsd_loss(student, teacher, mask, beta=beta, temperature=temperature)
    assert loss.item() == pytest.approx(TRL_1_16[(beta, temperature)], rel=1e-6, abs=1e-7)


def test_the_policy_gradient_form_has_the_sampled_reverse_kl_as_value_and_minus_advantage_times_score_as_gradient():
    torch.manual_seed(2)
    student, teacher, labels = torch.randn(4, 9, requires_grad=True), torch.randn(4, 9), torch.tensor([0, 3, 8, 3])
    loss, entropy = token_losses(student, teacher, labels, "reverse_kl_reward", beta=1.0, temperature=2.0)
    logp_student = F.log_softmax(student / 2, -1).gather(1, labels[:, None]).squeeze(1)
    logp_teacher = F.log_softmax(teacher / 2, -1).gather(1, labels[:, None]).squeeze(1)
    assert torch.allclose(loss, logp_student - logp_teacher, atol=1e-6)  # a one-sample reverse-KL estimate
    (grad,) = torch.autograd.grad(loss.sum(), student)
    advantage = -(logp_student - logp_teacher).detach()
    (expected,) = torch.autograd.grad((-advantage * logp_student).sum(), student)
    assert torch.allclose(grad, expected, atol=1e-6)
    probs = F.softmax(student / 2, -1)
    assert torch.allclose(entropy, -(probs * probs.log()).sum(-1), atol=1e-6)


@pytest.fixture(scope="module")
def models():
    """The tiny world's student (tied output layer) and a teacher of another width (untied, with a bias), same
    vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    student = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-gpt2")
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=student.config.vocab_size, hidden_size=48, intermediate_size=96,
                                           num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=False))
    teacher.lm_head.bias = torch.nn.Parameter(torch.randn(student.config.vocab_size))
    return student, teacher.eval().requires_grad_(False)


def plain_and_chunked(student, teacher, token_loss, chunk_sizes, copy_weights=False):
    """The plain path (both models' full logits at the completion positions, as --chunk_size 0) and the training
    path (the teacher's hidden states kept in its output layer's call, the student's chunked loss computed inside its
    own), each as (loss sum, per-token losses, entropies, every trainable student weight's gradient)."""
    batch = collate_completions([[5, 6, 7], [8, 9]], [[10, 11, 12, 0], [13, 14]], pad_token_id=0)
    positions = F.pad(batch["completion_mask"], (0, 1), value=False)
    labels = batch["input_ids"][:, 1:][batch["completion_mask"]]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    trainable = [p for p in student.parameters() if p.requires_grad]
    with lm_head_only_at(student, positions):
        student_logits = student(**inputs).logits
    with torch.no_grad(), lm_head_only_at(teacher, positions):
        teacher_logits = teacher(**inputs).logits
    assert student_logits.shape == (6, student.config.vocab_size)  # only the 6 completion positions were projected
    loss, entropy = token_loss(student_logits, teacher_logits, labels)
    plain = (loss.sum(), loss.detach(), entropy, torch.autograd.grad(loss.sum(), trainable))
    chunked = {}
    for chunk_size in chunk_sizes:
        kept = {}
        with torch.no_grad(), teacher_hidden_at(teacher, positions, kept, copy_weights):
            assert teacher(**inputs).shape == (6, teacher.config.hidden_size)  # the output layer projected nothing
        with chunked_distillation_at(student, positions, labels, token_loss, chunk_size, kept["hidden"],
                                     kept["logits"]):
            total, per_token, entropies = unpack_distillation(student(**inputs))
        chunked[chunk_size] = (total, per_token, entropies, torch.autograd.grad(total, trainable))
    assert student.get_output_embeddings().forward.__func__ is type(student.get_output_embeddings()).forward
    return plain, chunked


def assert_same(plain, chunked, names, what):
    loss, per_token, entropy, expected = plain
    total, got_per_token, got_entropy, grads = chunked
    assert total.item() == pytest.approx(loss.item(), rel=1e-5), what
    assert torch.allclose(got_per_token, per_token, atol=1e-6), what
    assert torch.allclose(got_entropy, entropy, atol=1e-5), what
    for name, got, want in zip(names, grads, expected):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (what, name)


@pytest.mark.parametrize("loss_type, beta", [("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0), ("reverse_kl_reward", 1.0)])
def test_chunked_and_unchunked_give_the_same_loss_and_gradients(models, loss_type, beta):
    """The training path (the loss computed chunk by chunk inside the student's output-layer call, gradient taken in
    the forward) against both models' full logits at those positions: the same loss and the same gradient of every
    student weight, for chunks of 1, 7 and more than all the tokens; the teacher's chunks through its output layer or
    through a copy of its weights (as under FSDP and ZeRO-3)."""
    student, teacher = models
    token_loss = lambda s, t, y: token_losses(s, t, y, loss_type, beta, temperature=1.5)  # noqa: E731
    names = [name for name, _ in student.named_parameters()]
    for copy_weights in [False, True]:
        plain, chunked = plain_and_chunked(student, teacher, token_loss, [1, 7, 100], copy_weights)
        for chunk_size, values in chunked.items():
            assert_same(plain, values, names, (chunk_size, copy_weights))


@pytest.mark.parametrize("lora", [False, True])
def test_the_in_forward_chunked_loss_is_the_plain_one_for_the_tiny_student_and_teacher(lora):
    """The tiny world's student and teacher (both with tied output layers; the teacher in float32 and bfloat16 as
    stored), chunks of 1 and 7: the same loss, per-token losses, entropies and every student gradient as --chunk_size
    0's path; with LoRA on every linear layer and the output layer, the adapters' gradients, the output layer's
    included (ChunkedDistillationLoss's head parameters)."""
    student = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-gpt2")
    teacher = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-teacher", dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        student = get_peft_model(student, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "lm_head"],
                                                     init_lora_weights=False))
        assert any("lm_head" in name and p.requires_grad for name, p in student.named_parameters())
    names = [name for name, p in student.named_parameters() if p.requires_grad]
    token_loss = lambda s, t, y: token_losses(s, t, y, "jsd", 0.5, temperature=1.0)  # noqa: E731
    for copy_weights in [False, True]:
        plain, chunked = plain_and_chunked(student, teacher, token_loss, [1, 7], copy_weights)
        for chunk_size, values in chunked.items():
            assert_same(plain, values, names, (chunk_size, copy_weights))


def test_the_chunked_path_checks_that_it_rebuilds_each_models_logits():
    """It knows GPT-2's plain output layer and Gemma 2's soft-capping; Granite divides its logits by logits_scaling,
    which it does not know, and says so rather than train on the wrong distribution."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM

    assert output_logits_match(AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-gpt2"))
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8)
    torch.manual_seed(0)
    assert output_logits_match(Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=0.5)))
    assert not output_logits_match(GraniteForCausalLM(GraniteConfig(**small, logits_scaling=4.0)))


@pytest.mark.parametrize("warping", [{}, {"temperature": 1.5, "top_k": 50, "top_p": 0.9}])
def test_sampling_draws_from_the_softmax_of_the_warped_logits(warping):
    """The Gumbel-max sampler inside generate against the exact next-token distribution (the model's logits, warped
    as generate warps them for sampling): 3000 draws of the first token of one prompt, and the seed reproduces them."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    model = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-gpt2").eval()
    query = AutoTokenizer.from_pretrained(ASSETS / "tiny-gpt2")("Review of Golden Harbor: The plot")["input_ids"]
    draws = [ids[0] for ids in sample_completions(model, [query] * 3000, 1, 0, 0, seed=3, **warping)]
    assert draws[:100] == [ids[0] for ids in sample_completions(model, [query] * 100, 1, 0, 0, seed=3, **warping)]
    with torch.no_grad():
        scores = model(torch.tensor([query])).logits[:, -1].float()
    for warper in [TemperatureLogitsWarper(warping.get("temperature", 1.0)),
                   TopKLogitsWarper(warping.get("top_k", 602)), TopPLogitsWarper(warping.get("top_p", 1.0))]:
        scores = warper(None, scores)
    expected = torch.softmax(scores, -1)[0]
    observed = torch.bincount(torch.tensor(draws), minlength=len(expected)).float() / len(draws)
    assert 0.5 * (observed - expected).abs().sum() < 0.04, 0.5 * (observed - expected).abs().sum()
    assert observed[expected == 0].sum() == 0  # nothing outside top-k / top-p


def test_the_schedule_is_the_fraction_lmbda_on_policy_and_the_same_for_every_caller():
    sources = [completion_source(step, seed=3, lmbda=0.3, seq_kd=False) for step in range(2000)]
    assert set(sources) == {"student", "dataset"} and 0.27 < sources.count("student") / 2000 < 0.33
    assert sources == [completion_source(step, seed=3, lmbda=0.3, seq_kd=False) for step in range(2000)]
    assert {completion_source(step, 3, 0.3, seq_kd=True) for step in range(50)} == {"student", "teacher"}
    assert {completion_source(step, 3, 1.0, seq_kd=True) for step in range(50)} == {"student"}
    assert {completion_source(step, 3, 0.0, seq_kd=False) for step in range(50)} == {"dataset"}


def test_rows_become_prompts_and_completions_in_every_format():
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-gpt2")
    eos = tokenizer.eos_token_id
    prompt_ids, completion_ids, prompt = tokenize_row({"prompt": "Review of Wild River:", "completion": " Great."},
                                                      tokenizer, 32)
    assert tokenizer.decode(prompt_ids) == "Review of Wild River:" and prompt == "Review of Wild River:"
    assert tokenizer.decode(completion_ids) == " Great.<|endoftext|>" and completion_ids[-1] == eos
    assert tokenize_row({"prompt": "Review of Wild River:"}, tokenizer, 32)[1] is None
    assert len(tokenize_row({"prompt": "a", "completion": " b" * 40}, tokenizer, 5)[1]) == 5  # cut, no EOS
    user = [{"role": "user", "content": "Write a review of Wild River."}]
    answer = [{"role": "assistant", "content": "Great."}]
    prompt_ids, completion_ids, prompt = tokenize_row({"messages": user + answer}, tokenizer, 32)
    assert tokenizer.decode(prompt_ids) == "<|user|>\nWrite a review of Wild River.<|endoftext|><|assistant|>\n"
    assert tokenizer.decode(completion_ids) == "Great.<|endoftext|>" and prompt == user
    assert tokenize_row({"prompt": user, "completion": answer}, tokenizer, 32)[:2] == (prompt_ids, completion_ids)
    with pytest.raises(ValueError, match="the last turn of a 'messages' row must be the assistant's"):
        tokenize_row({"messages": user}, tokenizer, 32)
    with pytest.raises(ValueError, match="a conversational completion needs a conversational prompt"):
        tokenize_row({"prompt": "Review of Wild River:", "completion": answer}, tokenizer, 32)
    assert detect_format(["prompt"]) == "prompt" and detect_format(["prompt", "completion"]) == "prompt-completion"
    assert detect_format(["messages", "x"]) == "messages"
    with pytest.raises(ValueError, match="expected a 'prompt' column .* found columns \\['text'\\]"):
        detect_format(["text"])


def test_collate_marks_the_positions_that_predict_completion_tokens():
    batch = collate_completions([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["completion_mask"].int().tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]


def test_help_shows_the_distillation_flags_with_underscores(capsys):
    """The layout and the shared blocks are tests/test_layout.py's (distill.py is in its ALL_SCRIPTS)."""
    with pytest.raises(SystemExit):
        tyro.cli(Args, args=["--help"], use_underscores=True)  # as main's __main__ guard parses
    shown = capsys.readouterr().out
    for flag in ["--teacher_model_name_or_path", "--lmbda", "--seq_kd", "--beta", "--chunk_size", "--loss_type",
                 "--max_completion_length", "--per_device_train_batch_size", "--no_seq_kd"]:
        assert flag in shown, flag


def test_the_tiny_teacher_is_larger_shares_the_vocabulary_and_writes_positive_reviews():
    """assets/tiny-teacher (assets/tiny_world.py --stage teacher): the student's tokenizer and vocabulary, about twice
    its parameters, stored small (bfloat16), and samples that score high on the ground truth where the student's do
    not."""
    from tiny_world import sentiment_score

    student = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-gpt2")
    teacher = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-teacher", dtype=torch.float32).eval()
    assert teacher.config.vocab_size == student.config.vocab_size
    assert json.loads((ASSETS / "tiny-teacher" / "config.json").read_text())["dtype"] == "bfloat16"
    assert 1.5 < teacher.num_parameters() / student.num_parameters() < 3
    assert (ASSETS / "tiny-teacher" / "model.safetensors").stat().st_size < 5e6
    tokenizer_file = (ASSETS / "tiny-teacher" / "tokenizer.json").read_bytes()
    assert tokenizer_file == (ASSETS / "tokenizer" / "tokenizer.json").read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-teacher")
    inputs = tokenizer(["Review of Golden Harbor:"] * 16, return_tensors="pt")
    torch.manual_seed(0)
    output = teacher.generate(**inputs, do_sample=True, max_new_tokens=32, pad_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert sum(sentiment_score(text) for text in texts) / len(texts) > 0.5, texts
