"""The offline tiny world: the builder is deterministic and matches what is committed, the scorer means what it says,
and the datasets, the tiny policy and the tiny Stable Diffusion pipeline are what the other scripts rely on."""

import filecmp
import json
import subprocess
import sys

import pytest
import torch
from conftest import ASSETS, OFFLINE_ENV
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny_world import ANIMALS, make_datasets, sentiment_score


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_builder_rebuilds_the_committed_data_and_tokenizer_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(ASSETS / "tiny_world.py"), "--stage", "data", "--out", str(tmp_path)],
                   check=True, env={**OFFLINE_ENV, "PATH": "/usr/bin:/bin"}, capture_output=True)
    for sub in ["data", "tokenizer"]:
        assert_same_tree(tmp_path / sub, ASSETS / sub)


def test_make_datasets_is_deterministic():
    assert make_datasets() == make_datasets()
    assert make_datasets(seed=1) != make_datasets()


def test_sentiment_score_counts_polarity_and_negation():
    assert sentiment_score("The plot was brilliant. I loved it.") == 2 / 3
    assert sentiment_score("The plot was dull.") == -1 / 2
    assert sentiment_score("The plot was not dull.") == 1 / 2
    assert sentiment_score("Nothing to say about it") == 0.0
    assert sentiment_score("Great. Superb. Charming.") > sentiment_score("Great.") > sentiment_score("Great. Awful.")


def test_every_format_has_train_and_test_with_the_expected_columns():
    expected = {"sft_text": {"text"}, "sft_prompt_completion": {"prompt", "completion"}, "sft_messages": {"messages"},
                "preference": {"prompt", "chosen", "rejected"},
                "preference_conversational": {"prompt", "chosen", "rejected"},
                "unpaired": {"prompt", "completion", "label"}, "prompts": {"prompt"},
                "tool_calls": {"messages", "tools"}, "tool_prompts": {"prompt", "title"}}
    for name, columns in expected.items():
        for split in ["train", "test"]:
            rows = read_jsonl(ASSETS / "data" / name / f"{split}.jsonl")
            assert rows and all(set(row) == columns for row in rows), (name, split)


def test_preferences_and_labels_agree_with_the_scorer():
    for row in read_jsonl(ASSETS / "data" / "preference" / "train.jsonl"):
        assert sentiment_score(row["chosen"]) > sentiment_score(row["rejected"])
    for row in read_jsonl(ASSETS / "data" / "preference_conversational" / "test.jsonl"):
        assert sentiment_score(row["chosen"][0]["content"]) > sentiment_score(row["rejected"][0]["content"])
    labels = [row["label"] for row in read_jsonl(ASSETS / "data" / "unpaired" / "train.jsonl")]
    assert 0.3 < sum(labels) / len(labels) < 0.7


def test_tiny_policy_is_small_gpt2_style_and_writes_in_domain_reviews():
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-gpt2").eval()
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-gpt2")
    assert 0.5e6 < model.num_parameters() < 5e6
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # GPT-2 style: EOS doubles as pad
    assert tokenizer.chat_template is not None
    inputs = tokenizer(["Review of Golden Harbor:"] * 8, return_tensors="pt")
    torch.manual_seed(0)
    output = model.generate(**inputs, do_sample=True, max_new_tokens=48, pad_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    # nearly every sampled review uses the world's sentiment vocabulary
    assert sum(any(w in text for w in ["was", "felt", "seemed", "is"]) for text in texts) >= 7, texts
    assert sum(sentiment_score(text) != 0 for text in texts) >= 6, texts


def assert_same_tree(left, right):
    """Every file under left is under right with the same bytes, and the other way round."""
    comparison = filecmp.dircmp(left, right)
    pending = [comparison]
    while pending:
        current = pending.pop()
        assert not current.left_only and not current.right_only, (current.left_only, current.right_only)
        _, mismatch, errors = filecmp.cmpfiles(current.left, current.right, current.common_files, shallow=False)
        assert not mismatch and not errors, f"{current.right}: {mismatch} {errors}"
        pending.extend(current.subdirs.values())


@pytest.mark.slow
def test_builder_rebuilds_the_committed_tiny_sd_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(ASSETS / "tiny_world.py"), "--stage", "diffusion", "--out", str(tmp_path)],
                   check=True, env={**OFFLINE_ENV, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                   capture_output=True)
    assert_same_tree(tmp_path / "tiny-sd", ASSETS / "tiny-sd")


def test_tiny_sd_tokenizes_the_animal_prompts_into_few_tokens():
    from transformers import CLIPTokenizer

    for tokenizer in [CLIPTokenizer.from_pretrained(ASSETS / "tiny-sd", subfolder="tokenizer"),
                      AutoTokenizer.from_pretrained(ASSETS / "tiny-sd" / "tokenizer")]:
        batch = tokenizer(ANIMALS + [""], padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                          return_tensors="pt")
        assert batch["input_ids"].shape == (len(ANIMALS) + 1, tokenizer.model_max_length)
        # <|startoftext|> animal <|endoftext|>: every animal is one token; the empty prompt is BOS, EOS
        assert batch["attention_mask"].sum(1).tolist() == [3] * len(ANIMALS) + [2]
        assert (batch["input_ids"][:, 0] == tokenizer.bos_token_id).all()
        assert tokenizer.pad_token_id == tokenizer.eos_token_id
        assert tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == ANIMALS[0]


def test_tiny_sd_loads_and_generates_images_that_vary_with_the_noise():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ASSETS / "tiny-sd")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.steps_offset == 1
    assert pipe.safety_checker is None
    # ddpo.py's LoRA targets exist under their standard names
    names = [name for name, _ in pipe.unet.named_modules()]
    for target in ["to_q", "to_k", "to_v", "to_out.0"]:
        assert any(name.endswith(target) for name in names), target
    brightness = []
    for seed in [0, 1]:
        with torch.no_grad():
            images = pipe(prompt=["cat", "dog"], num_inference_steps=3, guidance_scale=5.0, eta=1.0, output_type="pt",
                          generator=torch.Generator().manual_seed(seed)).images
        assert images.shape == (2, 3, 32, 32)
        assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.05  # not constant
        brightness.append(images.mean(dim=(1, 2, 3)))
    assert (brightness[0] - brightness[1]).abs().min() > 1e-3, brightness


def test_the_tool_tokenizer_is_rebuilt_exactly_and_parses_what_its_template_writes(tmp_path):
    from tiny_world import build_tool_tokenizer

    build_tool_tokenizer(AutoTokenizer.from_pretrained(ASSETS / "tokenizer")).save_pretrained(tmp_path)
    for name in ["tokenizer.json", "chat_template.jinja"]:
        assert (tmp_path / name).read_bytes() == (ASSETS / "tiny-tools" / name).read_bytes(), name
    configs = [json.loads((folder / "tokenizer_config.json").read_text())
               for folder in (tmp_path, ASSETS / "tiny-tools")]
    for config in configs:
        config.pop("local_files_only")  # how it was loaded: offline here, not in the builder
    assert configs[0] == configs[1]
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-tools")
    assert tokenizer.eos_token == "<|end|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    row = read_jsonl(ASSETS / "data" / "tool_calls" / "train.jsonl")[0]
    text = tokenizer.apply_chat_template(row["messages"], tools=json.loads(row["tools"]), tokenize=False)
    call_turn = row["messages"][1]
    prefix = tokenizer.apply_chat_template(row["messages"][:1], tools=json.loads(row["tools"]), tokenize=False,
                                           add_generation_prompt=True)
    written = tokenizer.apply_chat_template(row["messages"][:2], tools=json.loads(row["tools"]), tokenize=False)
    assert text.startswith(written) and written.startswith(prefix)
    parsed = tokenizer.parse_response(written[len(prefix):], prefix=prefix)
    assert parsed == {"role": "assistant", "tool_calls": call_turn["tool_calls"]}


@pytest.mark.slow
def test_the_tool_policy_calls_sometimes_and_repeats_the_tool_when_it_does():
    """The warm start of the tool world (what GRPO needs to learn from): it calls the tool in a minority of rollouts,
    guesses otherwise, and when it calls, it copies the title and repeats the result, so calling beats guessing."""
    from conftest import tool_world_scores

    model = AutoModelForCausalLM.from_pretrained(ASSETS / "tiny-tools")
    assert 0.3e6 < model.num_parameters() < 1e6 and model.config.model_type == "llama"
    scores = tool_world_scores(ASSETS / "tiny-tools", n=256)
    assert 0.1 <= scores["calls"] <= 0.4 and scores["follows_tool"] > 0.9, scores
    assert 0.25 < scores["accuracy"] < 0.6, scores
