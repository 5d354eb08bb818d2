"""sft.py end to end, run as a user runs it: learning, packing, resuming, several processes, LoRA, NaN, bad input."""

import json
import math

import pytest
import torch
from conftest import (ASSETS, assert_resumed_run_ends_where_the_uninterrupted_run_ends,
                      assert_same_training_however_the_global_batch_is_split, metric_series, read_metrics, run_ok,
                      error_line, run_script)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft import collate, pack_examples, selective_log_probs, tokenize_example

PROMPT_COMPLETION = ASSETS / "data" / "sft_prompt_completion"
SHORT = ["--dataset_name", PROMPT_COMPLETION, "--max_steps", 12, "--eval_steps", 6, "--logging_steps", 2]


def final_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol), f"{name} differs by {(a[name] - b[name]).abs().max()}"


@pytest.mark.slow
def test_default_run_learns_offline(tmp_path):
    run_ok("sft.py", cwd=tmp_path)  # no arguments at all: the tiny world is the default
    output_dir = tmp_path / "runs" / "sft"
    eval_losses = metric_series(output_dir, "eval_loss")
    assert eval_losses[-1] < eval_losses[0] - 0.5, eval_losses
    train_rows = [row for row in read_metrics(output_dir) if "loss" in row]
    assert all(row["tokens_per_second"] > 0 and row["peak_memory_mb"] > 0 for row in train_rows)
    # the output is a plain transformers model + tokenizer that answers in the chat format it was taught
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Write a review of Wild River."}],
                                           tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)
    output = model.generate(**inputs, max_new_tokens=60, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:])
    assert answer.endswith(tokenizer.eos_token) and "." in answer, answer
    assert json.loads((output_dir / "args.json").read_text())["learning_rate"] == 5e-4


@pytest.mark.slow
def test_llama_style_model_without_pad_token_learns_completions_and_eos(llama_dir, tmp_path):
    run_ok("sft.py", "--model_name_or_path", llama_dir, "--dataset_name", PROMPT_COMPLETION, "--output_dir", tmp_path,
           "--learning_rate", 3e-3, "--num_train_epochs", 2, "--eval_steps", 50)
    eval_losses = metric_series(tmp_path, "eval_loss")
    assert eval_losses[-1] < eval_losses[0] - 3, eval_losses
    # p(EOS) right after each held-out completion: learned although the tokenizer had no pad token at all
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    rows = [json.loads(line) for line in (PROMPT_COMPLETION / "test.jsonl").read_text().splitlines()][:50]
    p_eos = []
    with torch.no_grad():
        for row in rows:
            ids = tokenizer(row["prompt"] + row["completion"], return_tensors="pt")["input_ids"]
            assert ids[0, 0] == tokenizer.bos_token_id and (ids == tokenizer.bos_token_id).sum() == 1
            p_eos.append(model(ids).logits[0, -1].softmax(-1)[tokenizer.eos_token_id].item())
    assert sum(p_eos) / len(p_eos) > 0.5, p_eos


@pytest.mark.parametrize("model_kind", ["gpt2", "llama"])
def test_packed_and_unpacked_give_the_same_per_token_loss(model_kind, llama_dir):
    path = ASSETS / "tiny-gpt2" if model_kind == "gpt2" else llama_dir
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in (PROMPT_COMPLETION / "test.jsonl").read_text().splitlines()][:12]
    examples = [tokenize_example(row, tokenizer, 512, completion_only_loss=False) for row in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        # unpacked: one document per row, padding masked by the attention mask
        batch = collate(examples, pad)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        log_probs, mask = selective_log_probs(logits, batch["labels"])
        unpacked = {tuple(example["input_ids"]): log_probs[i][mask[i]] for i, example in enumerate(examples)}
        # packed: several documents per row, no attention mask, position ids restarting per document
        blocks = pack_examples(examples, max_length=160)
        assert len(blocks) < len(examples)
        batch = collate(blocks, pad)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        log_probs, mask = selective_log_probs(logits, batch["labels"])
    compared = 0
    for b, block in enumerate(blocks):
        starts = [t for t, p in enumerate(block["position_ids"]) if p == 0] + [len(block["input_ids"])]
        for start, end in zip(starts, starts[1:]):
            # targets of this document: positions start..end-2 predict tokens start+1..end-1
            packed = log_probs[b, start : end - 1][mask[b, start : end - 1]]
            expected = unpacked[tuple(block["input_ids"][start:end])]
            assert torch.allclose(packed, expected, atol=1e-4), (packed - expected).abs().max()
            compared += 1
    assert compared == len(examples)


@pytest.mark.slow
def test_packed_run_sees_the_same_eval_tokens_and_learns(tmp_path):
    chat = ["--dataset_name", ASSETS / "data" / "sft_messages", "--eval_steps", 30]
    run_ok("sft.py", *chat, "--output_dir", tmp_path / "plain", "--max_steps", 1)
    run_ok("sft.py", *chat, "--output_dir", tmp_path / "packed", "--packing", "--max_length", 256,
           "--per_device_train_batch_size", 2, "--max_steps", 30, "--learning_rate", 1e-3)
    plain, packed = metric_series(tmp_path / "plain", "eval_loss"), metric_series(tmp_path / "packed", "eval_loss")
    assert packed[0] == pytest.approx(plain[0], abs=1e-5)  # same documents, same targets, same loss before training
    assert packed[-1] < packed[0] - 0.5, packed


@pytest.mark.slow
@pytest.mark.parametrize("use_peft", [False, True])
def test_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path, use_peft):
    extra = ["--gradient_accumulation_steps", 2, "--per_device_train_batch_size", 4]
    if use_peft:
        extra += ["--use_peft", "--learning_rate", 5e-3]
    assert_resumed_run_ends_where_the_uninterrupted_run_ends("sft.py", [*SHORT, *extra], tmp_path)


@pytest.mark.slow
def test_two_processes_and_accumulation_match_one_process_at_the_same_global_batch(tmp_path):
    assert_same_training_however_the_global_batch_is_split("sft.py", [*SHORT, "--learning_rate", 1e-3], tmp_path)


@pytest.mark.slow
def test_lora_learns_and_saves_a_merged_model_and_the_adapter(tmp_path):
    run_ok("sft.py", "--dataset_name", ASSETS / "data" / "sft_messages", "--use_peft", "--learning_rate", 5e-3,
           "--max_steps", 40, "--eval_steps", 40, "--output_dir", tmp_path)
    eval_losses = metric_series(tmp_path, "eval_loss")
    assert eval_losses[-1] < eval_losses[0] - 0.5, eval_losses
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    merged = final_weights(tmp_path)
    initial = load_file(ASSETS / "tiny-gpt2" / "model.safetensors")
    assert merged.keys() == initial.keys()  # plain weights, no lora_ names
    assert any(not torch.equal(merged[k], initial[k]) for k in merged)
    AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.slow
def test_neftune_noises_training_only_and_gradient_checkpointing_changes_nothing(tmp_path):
    base = [*SHORT, "--max_steps", 4, "--eval_steps", 4, "--logging_steps", 1]
    run_ok("sft.py", *base, "--output_dir", tmp_path / "plain")
    run_ok("sft.py", *base, "--output_dir", tmp_path / "checkpointed", "--gradient_checkpointing")
    run_ok("sft.py", *base, "--output_dir", tmp_path / "neftune", "--neftune_noise_alpha", 50)
    plain = metric_series(tmp_path / "plain", "loss")
    assert metric_series(tmp_path / "checkpointed", "loss") == pytest.approx(plain, abs=1e-5)
    noisy = metric_series(tmp_path / "neftune", "loss")
    assert noisy[0] != pytest.approx(plain[0], abs=1e-4)  # training forward passes see noise...
    plain_eval = metric_series(tmp_path / "plain", "eval_loss")
    noisy_eval = metric_series(tmp_path / "neftune", "eval_loss")
    assert noisy_eval[0] == pytest.approx(plain_eval[0], abs=1e-6)  # ...evaluation does not


@pytest.mark.slow
def test_bf16_mixed_precision_and_disabled_wandb_tracking_run(tmp_path):
    run_ok("sft.py", *SHORT, "--max_steps", 3, "--bf16", "--track", "--output_dir", tmp_path)  # WANDB_MODE=disabled
    losses = metric_series(tmp_path, "loss")
    assert losses and all(math.isfinite(loss) for loss in losses)


@pytest.mark.slow
def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path):
    result = run_script("sft.py", *SHORT, "--learning_rate", 1e30, "--save_steps", 1, "--output_dir", tmp_path)
    assert result.returncode != 0
    assert "error: loss is nan" in result.stderr and "the last checkpoint is" in result.stderr, result.stderr[-2000:]
    assert (tmp_path / "checkpoint-1" / "training_state.pt").exists()
    assert not (tmp_path / "model.safetensors").exists()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("case", ["columns", "empty", "file_type", "batch_size", "chunk_size", "split", "no_eos",
                                  "tools"])
def test_bad_input_fails_with_one_clear_line_before_the_model_loads(tmp_path, case):
    args = ["--output_dir", tmp_path / "out"]
    if case == "columns":
        args += ["--dataset_name", write_jsonl(tmp_path / "qa.jsonl", [{"question": "a", "answer": "b"}]),
                 "--dataset_test_split", "None"]
        expected = "expected a 'text' column, a 'messages' column, or 'prompt' and 'completion' columns; " \
                   "found columns ['question', 'answer']"
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "train.csv").write_text("text\nsome review\n")
        (tmp_path / "empty" / "test.csv").write_text("text\n")  # a header and no rows
        args += ["--dataset_name", tmp_path / "empty"]
        expected = "corresponds to no data! (is a data file empty? every split needs at least one row)"
    elif case == "file_type":
        (tmp_path / "data.txt").write_text("hello")
        args += ["--dataset_name", tmp_path / "data.txt"]
        expected = "unknown dataset file type '.txt'"
    elif case == "batch_size":
        args += ["--per_device_train_batch_size", 0]
        expected = "--per_device_train_batch_size must be a positive integer, got 0"
    elif case == "chunk_size":
        args += ["--chunk_size", -1]
        expected = "--chunk_size must be 0 (the plain path) or a positive number of positions, got -1"
    elif case == "split":
        args += ["--dataset_name", write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}]), "--dataset_test_split", "test"]
        expected = "has no split 'test'; found splits ['train']"  # named, so it must exist (by default: no evaluation)
    elif case == "tools":  # the tiny world's tool conversations with tiny-gpt2, whose template drops tool calls
        args += ["--dataset_name", ASSETS / "data" / "tool_calls"]
        expected = "the rows call tools but the chat template of"
    else:
        tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-gpt2")
        tokenizer.eos_token = None
        tokenizer.pad_token = None
        tokenizer.save_pretrained(tmp_path / "no-eos")
        args += ["--model_name_or_path", tmp_path / "no-eos"]
        expected = "has no EOS token"
    result = run_script("sft.py", *args)
    last_line = error_line(result)
    assert last_line.startswith("sft.py: error: ") and expected in last_line, result.stderr[-2000:]
    assert "parameters," not in result.stdout  # failed before the model was loaded


@pytest.mark.slow
def test_tool_use_conversations_train_a_fresh_model(tmp_path):
    """TRL's tool-calling format (assets/data/tool_calls: calls, tool results, a tools column) trains a random-init
    Llama with the tiny tool tokenizer: the held-out loss on the calls and answers falls from ln(vocabulary) to a
    fraction of it in 60 steps (the tiny tool world's warm start is this run, longer: assets/tiny_world.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-tools")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "init")
    tokenizer.save_pretrained(tmp_path / "init")
    run_ok("sft.py", "--model_name_or_path", tmp_path / "init", "--dataset_name", ASSETS / "data" / "tool_calls",
           "--max_steps", 60, "--per_device_train_batch_size", 16, "--learning_rate", 3e-3, "--eval_steps", 60,
           "--output_dir", tmp_path / "out")
    losses = metric_series(tmp_path / "out", "eval_loss")
    assert losses[0] > 5.5 and losses[-1] < 1.5, losses


@pytest.mark.slow
def test_help_lists_the_arguments_with_their_docs():
    result = run_ok("sft.py", "--help")
    for text in ["--learning_rate", "--packing", "--neftune_noise_alpha", "pack whole examples into blocks",
                 "--chunk_size"]:
        assert text in result.stdout
