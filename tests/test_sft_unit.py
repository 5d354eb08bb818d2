"""Unit tests of sft.py's pure functions: formatting, masking, packing, batching, log-probs, loss, NEFTune."""

import math

import pytest
import torch
from conftest import ASSETS
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft import (add_neftune_noise, check_packing_isolation, collate, detect_format, load_any_dataset,
                 pack_examples, selective_log_probs, sft_loss, step_indices, token_log_probs, tokenize_example)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


def targets(tokenizer, row: dict) -> str:
    """The text of the tokens that carry loss."""
    return tokenizer.decode([label for label in row["labels"] if label != -100])


def test_text_rows_learn_everything_and_end_with_eos(tokenizer):
    row = tokenize_example({"text": "The plot was dull."}, tokenizer, max_length=64, completion_only_loss=True)
    assert row["input_ids"] == tokenizer("The plot was dull.")["input_ids"] + [tokenizer.eos_token_id]
    assert row["labels"] == row["input_ids"]
    # pad == eos here, and the EOS is still a target: masking is by position, never by token id
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and row["labels"][-1] == tokenizer.eos_token_id


def test_prompt_completion_masks_the_prompt(tokenizer):
    example = {"prompt": "Review of Wild River:", "completion": " The music was superb."}
    row = tokenize_example(example, tokenizer, max_length=64, completion_only_loss=True)
    assert targets(tokenizer, row) == " The music was superb.<|endoftext|>"
    assert tokenizer.decode(row["input_ids"]) == "Review of Wild River: The music was superb.<|endoftext|>"
    full = tokenize_example(example, tokenizer, max_length=64, completion_only_loss=False)
    assert full["labels"] == full["input_ids"]


def test_messages_learn_only_assistant_turns_with_their_end_token(tokenizer):
    messages = [{"role": "user", "content": "Write a review of X."}, {"role": "assistant", "content": "Great."},
                {"role": "user", "content": "Another."}, {"role": "assistant", "content": "Dull."}]
    row = tokenize_example({"messages": messages}, tokenizer, max_length=128, completion_only_loss=True)
    assert targets(tokenizer, row) == "Great.<|endoftext|>Dull.<|endoftext|>"
    # the template already ends every turn with EOS: nothing is appended
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_conversational_prompt_completion_learns_only_the_completion(tokenizer):
    example = {"prompt": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                          {"role": "user", "content": "Review X."}],
               "completion": [{"role": "assistant", "content": "Superb."}]}
    row = tokenize_example(example, tokenizer, max_length=128, completion_only_loss=True)
    assert targets(tokenizer, row) == "Superb.<|endoftext|>"


def test_bos_tokenizer_gets_exactly_one_bos(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    bos = tokenizer.bos_token_id
    text_row = tokenize_example({"prompt": "Review of X:", "completion": " Fine."}, tokenizer, 64, True)
    chat_row = tokenize_example({"messages": [{"role": "user", "content": "Hi."},
                                              {"role": "assistant", "content": "Fine."}]}, tokenizer, 64, True)
    for row in (text_row, chat_row):
        assert row["input_ids"][0] == bos and row["input_ids"].count(bos) == 1
        assert row["labels"][-1] == tokenizer.eos_token_id
    assert targets(tokenizer, text_row) == " Fine.<|endoftext|>"
    assert targets(tokenizer, chat_row) == "Fine.<|endoftext|>"


def test_truncation_keeps_the_start(tokenizer):
    row = tokenize_example({"text": "one two three four five six"}, tokenizer, max_length=3, completion_only_loss=True)
    assert row["input_ids"] == tokenizer("one two three")["input_ids"][:3] and len(row["labels"]) == 3


def test_detect_format_names_what_it_found():
    assert detect_format(["messages"]) == "messages"
    assert detect_format(["prompt", "completion", "extra"]) == "prompt-completion"
    assert detect_format(["text"]) == "text"
    with pytest.raises(ValueError, match=r"expected a 'text' column.*found columns \['prompt', 'answer'\]"):
        detect_format(["prompt", "answer"])


def test_unknown_file_type_is_rejected(tmp_path):
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"unknown dataset file type '.txt'"):
        load_any_dataset(str(tmp_path / "data.txt"))


def test_packing_keeps_documents_whole_and_restarts_positions():
    lengths = [5, 3, 7, 2, 6, 4, 1]
    examples = [{"input_ids": [100 * d + t for t in range(n)], "labels": [100 * d + t for t in range(n)]}
                for d, n in enumerate(lengths)]
    blocks = pack_examples(examples, max_length=8)
    seen = []
    for block in blocks:
        assert len(block["input_ids"]) <= 8
        starts = [t for t, p in enumerate(block["position_ids"]) if p == 0]
        for start, end in zip(starts, starts[1:] + [len(block["input_ids"])]):
            document = block["input_ids"][start:end]
            assert document == examples[document[0] // 100]["input_ids"]  # whole, in order
            assert block["position_ids"][start:end] == list(range(end - start))
            assert block["labels"][start] == -100 and block["labels"][start + 1 : end] == document[1:]
            seen.append(document[0] // 100)
    assert sorted(seen) == list(range(len(lengths)))
    assert len(blocks) == math.ceil(sum(lengths) / 8)  # best fit packs these 28 tokens into 4 blocks


def test_collate_pads_right_with_masked_labels_and_fresh_positions():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [-100]}],
                    pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]


def test_step_indices_cover_each_epoch_once_and_depend_only_on_the_step():
    epoch0 = [i for step in range(3) for i in step_indices(step, num_rows=10, global_batch_size=3, seed=1)]
    assert len(set(epoch0)) == 9  # 3 steps of 3 rows, no repeats; the incomplete tail is dropped
    assert step_indices(4, 10, 3, 1) == step_indices(4, 10, 3, 1)
    assert step_indices(3, 10, 3, 1) != step_indices(0, 10, 3, 1)  # epoch 1 is a new permutation


def test_selective_log_probs_matches_naive_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 3, 4, -100, 1], [2, 2, 10, 0, -100]])
    log_probs, mask = selective_log_probs(logits, labels)
    naive = torch.log_softmax(logits[:, :-1], dim=-1)
    for b in range(2):
        for t in range(4):
            label = labels[b, t + 1].item()
            expected = naive[b, t, label].item() if label != -100 else 0.0
            assert mask[b, t].item() == (label != -100)
            assert log_probs[b, t].item() == pytest.approx(expected, abs=1e-5)


def test_sft_loss_is_summed_nll_over_the_steps_target_tokens():
    # Vocabulary of 2, uniform logits except one position: hand-computed NLL.
    logits = torch.zeros(1, 3, 2)
    logits[0, 1] = torch.tensor([math.log(3.0), 0.0])  # p(token 0) = 3/4 at position 1
    labels = torch.tensor([[-100, 1, 0]])  # targets: token 1 at position 0 (p=1/2), token 0 at position 1 (p=3/4)
    expected_sum = -(math.log(0.5) + math.log(0.75))
    log_probs, _ = selective_log_probs(logits, labels)
    assert sft_loss(log_probs, num_items_in_batch=2).item() == pytest.approx(expected_sum / 2, abs=1e-6)
    # normalised by the tokens of the whole step (e.g. 4 over two micro-batches), not of this micro-batch
    assert sft_loss(log_probs, num_items_in_batch=4).item() == pytest.approx(expected_sum / 4, abs=1e-6)


def test_loss_is_invariant_to_how_a_step_is_split():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 7)
    labels = torch.randint(0, 7, (4, 6))
    labels[0, 3:] = -100
    labels[2, :5] = -100
    n = int((labels[:, 1:] != -100).sum())
    log_probs, _ = selective_log_probs(logits, labels)
    whole = sft_loss(log_probs, n)
    split = sft_loss(log_probs[:1], n) + sft_loss(log_probs[1:], n)
    assert whole.item() == pytest.approx(split.item(), abs=1e-6)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("model_kind", ["tiny-gpt2", "llama"])
def test_chunked_log_probs_give_the_plain_loss_and_gradients(tokenizer, model_kind, packing):
    """--chunk_size 3 (many chunks, each recomputed in the backward) and the default (one chunk here) against the
    plain path (--chunk_size 0: the model's logits at the targets): the same per-token log-probs, loss and gradient of
    every parameter, on the tied GPT-2 and on a Llama-style model with its own output layer, rows padded (attention
    mask) or packed (position ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if model_kind == "tiny-gpt2":
        model = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-gpt2").eval()
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=False))
    rows = [{"prompt": f"Review of Film {i}:", "completion": " The plot was dull." * (i + 1)} for i in range(5)]
    examples = [tokenize_example(row, tokenizer, 64, completion_only_loss=True) for row in rows]
    batch = collate(pack_examples(examples, 48) if packing else examples, tokenizer.eos_token_id)
    n = int((batch["labels"][:, 1:] != -100).sum())

    def loss_and_grads(chunk_size: int):
        model.zero_grad(set_to_none=True)
        log_probs = token_log_probs(model, model, batch, chunk_size, packing=packing)
        sft_loss(log_probs, n).backward()
        return log_probs.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    plain, plain_grads = loss_and_grads(0)
    assert plain.shape == (batch["labels"].shape[0], batch["labels"].shape[1] - 1)
    assert (plain[batch["labels"][:, 1:] == -100] == 0).all()
    for chunk_size in (3, 1024):
        chunked, grads = loss_and_grads(chunk_size)
        torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert not model.get_output_embeddings()._forward_pre_hooks and not model._forward_hooks  # hooks removed


def test_neftune_noise_is_bounded_by_alpha_over_sqrt_length_times_dim():
    torch.manual_seed(0)
    embeddings = torch.zeros(2, 10, 40)
    noisy = add_neftune_noise(embeddings, alpha=5.0)
    bound = 5.0 / math.sqrt(10 * 40)
    assert noisy.abs().max() <= bound and noisy.abs().max() > 0.9 * bound


def test_packing_isolation_check_accepts_gpt2_and_rejects_a_leaky_model():
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-gpt2")
    check_packing_isolation(model, torch.device("cpu"))

    class Leaky(torch.nn.Module):  # ignores position ids: the packed row's second document sees the first
        training = False

        def forward(self, input_ids, position_ids=None, use_cache=False):
            class Out:
                logits = model(input_ids=input_ids, use_cache=False).logits
            return Out()

    with pytest.raises(ValueError, match="lets packed documents attend to each other"):
        check_packing_isolation(Leaky(), torch.device("cpu"))


def tool_conversation(title="Golden River", rating="dull"):
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"title": title}}}
    return [{"role": "user", "content": f"How was {title}?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "lookup", "content": rating}, {"role": "assistant", "content": rating}]


def test_tool_conversations_learn_the_calls_and_answers_but_not_the_tool_results():
    """TRL's tool format: assistant turns with tool_calls, 'tool' messages, the schemas in a 'tools' column (a list,
    or that list as a JSON string). The template renders the tools; the calls and the answer (each with its end of
    turn) are targets, the tool's result and the headers are not."""
    import json

    from sft import renders_tool_calls
    from tiny_world import tool_schemas

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-tools")
    schemas = tool_schemas()
    row = tokenize_example({"messages": tool_conversation(), "tools": json.dumps(schemas)}, tokenizer, 256, True)
    assert targets(tokenizer, row) == "<call>lookup\ntitle: Golden River</call><|end|> dull<|end|>"
    assert tokenizer.decode(row["input_ids"]).startswith("<|system|> tools: lookup<|end|><|user|> How was")
    assert tokenize_example({"messages": tool_conversation(), "tools": schemas}, tokenizer, 256, True) == row
    assert "<|system|>" not in tokenizer.decode(tokenize_example({"messages": tool_conversation()}, tokenizer, 256,
                                                                 True)["input_ids"])  # no tools column: none shown
    with pytest.raises(ValueError, match="'tools' column holds a string that is not JSON"):
        tokenize_example({"messages": tool_conversation(), "tools": "[{"}, tokenizer, 256, True)
    with pytest.raises(ValueError, match="'tools' column must hold a list of tool schemas"):
        tokenize_example({"messages": tool_conversation(), "tools": {"name": "lookup"}}, tokenizer, 256, True)
    assert renders_tool_calls(tokenizer) and not renders_tool_calls(AutoTokenizer.from_pretrained(ASSETS / "tokenizer"))
