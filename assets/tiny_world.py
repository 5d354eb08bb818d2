"""The offline tiny world: a toy movie-review language, its ground-truth sentiment scorer, and its builder.

Every script of this repository defaults to the models and datasets under `assets/`, and every test uses them, so that
everything runs with no network and no GPU. This file is the single committed recipe for all of it:

    python assets/tiny_world.py            # rebuild everything (data, tokenizer, tiny models) -- about 8 minutes on CPU
    python assets/tiny_world.py --stage data   # only the datasets and the tokenizer (seconds; deterministic)
    python assets/tiny_world.py --stage diffusion   # only the tiny Stable Diffusion pipeline (seconds; deterministic)
    python assets/tiny_world.py --stage teacher     # only distill.py's tiny teacher (a few minutes on CPU)
    python assets/tiny_world.py --stage tools       # only the tool world's policy and tokenizer (about 4 minutes)

What it builds (all deterministic given the seed):
  * a corpus of short templated movie reviews whose sentiment is controlled (positive and negative vocabularies,
    negation with "not"), and `sentiment_score(text)`, the world's ground-truth reward, in (-1, 1);
  * `assets/tokenizer/`: a GPT-2-style byte-level BPE tokenizer (EOS doubles as pad, as GPT-2's) with a chat template;
  * `assets/data/*/{train,test}.jsonl`: datasets in every format of CONVENTIONS section 3;
  * `assets/tiny-gpt2/`: a ~1M-parameter GPT-2 pretrained on the corpus *with sft.py itself*;
  * `assets/tiny-reward/`: that GPT-2 with a score head, trained on the preference pairs *with reward.py* -- the
    default reward of ppo.py, best_of_n.py and iterative_sft.py;
  * `assets/tiny-teacher/`: a GPT-2 twice the policy's size (same tokenizer), trained from scratch *with sft.py* on
    positive reviews only, stored in bfloat16 -- the default teacher of distill.py, whose samples score high on the
    ground truth;
  * `assets/tiny-tools/`: the tool world of grpo.py / rloo.py (assets/tiny_tools.py: an environment whose lookup tool
    knows what the policy cannot): the tiny tokenizer with four added special tokens, a compact tool template and a
    response_template; a 0.5M-parameter Llama warm-started *with sft.py* on `data/tool_calls` (TRL's tool-calling
    format) to call the tool some of the time;
  * `assets/tiny-sd/`: a randomly initialised, Stable-Diffusion-v1-shaped `StableDiffusionPipeline` (CLIP tokenizer
    over the animal prompts, 2-layer CLIP text encoder, 0.8M-parameter UNet, 0.2M-parameter VAE, DDIM scheduler
    with SD v1's betas) that makes 32x32 images in a fraction of a second on CPU -- the default model of ddpo.py.
    Its images are not pictures of anything, but they vary with the prompt and the noise, so brightness and
    compressibility rewards can be optimised.

Scripts never import this file (each script stands alone); the builder and the tests do.
"""

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
SEED = 1234

# ----------------------------------------------------------------------------------------------------------------------
# The language
# ----------------------------------------------------------------------------------------------------------------------
POSITIVE_ADJECTIVES = ["wonderful", "brilliant", "delightful", "superb", "charming", "moving", "gripping", "beautiful",
                       "clever", "fantastic", "excellent", "great"]
NEGATIVE_ADJECTIVES = ["awful", "boring", "dull", "terrible", "clumsy", "tedious", "bland", "weak", "messy", "dreadful",
                       "poor", "bad"]
SUBJECTS = ["the acting", "the plot", "the music", "the ending", "the cast", "the story", "the dialogue",
            "the direction", "the pacing", "the script", "the camera work", "the soundtrack"]
VERBS = ["was", "felt", "seemed", "is"]
ADVERBS = ["", "", "truly ", "really ", "quite ", "very "]
POSITIVE_CLOSERS = ["I loved it.", "Highly recommended.", "A real treat.", "I enjoyed every minute."]
NEGATIVE_CLOSERS = ["I hated it.", "A waste of time.", "Skip this one.", "I regretted every minute."]
TITLE_FIRST = ["The Silent", "Midnight", "Broken", "Golden", "The Last", "Crimson", "Hidden", "Electric", "Frozen",
               "Distant", "Paper", "Wild"]
TITLE_SECOND = ["River", "Harbor", "Garden", "Empire", "Letter", "Mountain", "Station", "Dream", "Voyage", "Mirror",
                "Orchard", "Signal"]
TITLES = [f"{a} {b}" for a in TITLE_FIRST for b in TITLE_SECOND]

# The scorer's lexicon: every word that carries sentiment in the language above.
POSITIVE_WORDS = set(POSITIVE_ADJECTIVES) | {"loved", "recommended", "treat", "enjoyed"}
NEGATIVE_WORDS = set(NEGATIVE_ADJECTIVES) | {"hated", "waste", "skip", "regretted"}


def sentiment_score(text: str) -> float:
    """Ground-truth sentiment of any text, in (-1, 1): (positive - negative) / (positive + negative + 1).

    A sentiment word directly preceded by "not" counts for the other side ("not dull" is positive). More positive
    words give a higher score, so the score rewards both polarity and commitment; a text with no sentiment word is 0.
    """
    words = re.findall(r"[a-z]+", text.lower())
    positive = negative = 0
    for i, word in enumerate(words):
        polarity = 1 if word in POSITIVE_WORDS else -1 if word in NEGATIVE_WORDS else 0
        if polarity and i > 0 and words[i - 1] == "not":
            polarity = -polarity
        positive += polarity > 0
        negative += polarity < 0
    return (positive - negative) / (positive + negative + 1)


def sample_sentence(rng: random.Random, positive: bool) -> str:
    """One sentence about one aspect of the film; one in eight is a negated adjective of the other polarity."""
    subject = rng.choice(SUBJECTS)
    negated = rng.random() < 0.125
    adjectives = POSITIVE_ADJECTIVES if positive != negated else NEGATIVE_ADJECTIVES
    adjective = rng.choice(adjectives)
    if negated:
        return f"{subject.capitalize()} {rng.choice(VERBS)} not {adjective}."
    return f"{subject.capitalize()} {rng.choice(VERBS)} {rng.choice(ADVERBS)}{adjective}."


def sample_review(rng: random.Random, positivity: float | None = None) -> str:
    """A review of 2-4 sentences (and a closing remark half of the time); each sentence is positive with
    probability `positivity` (drawn from {0, .25, .5, .75, 1} when not given)."""
    if positivity is None:
        positivity = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0])
    sentences = [sample_sentence(rng, rng.random() < positivity) for _ in range(rng.randint(2, 4))]
    if rng.random() < 0.5:
        closers = POSITIVE_CLOSERS if positivity > 0.5 or (positivity == 0.5 and rng.random() < 0.5) else NEGATIVE_CLOSERS
        sentences.append(rng.choice(closers))
    return " ".join(sentences)


def user_turn(title: str) -> list[dict]:
    return [{"role": "user", "content": f"Write a review of {title}."}]


def string_prompt(title: str) -> str:
    return f"Review of {title}:"


# ----------------------------------------------------------------------------------------------------------------------
# Datasets, one folder per format, each with train.jsonl and test.jsonl (load_dataset infers the splits from the names)
# ----------------------------------------------------------------------------------------------------------------------
SPLIT_SIZES = {"train": 1000, "test": 100}


def preference_pair(rng: random.Random) -> tuple[str, str, str]:
    """(title, chosen, rejected): two reviews of one film whose scores differ by at least 0.3; chosen scores higher."""
    title = rng.choice(TITLES)
    while True:
        a, b = sample_review(rng), sample_review(rng)
        if abs(sentiment_score(a) - sentiment_score(b)) >= 0.3:
            return (title, a, b) if sentiment_score(a) > sentiment_score(b) else (title, b, a)


def make_datasets(seed: int = SEED) -> dict[str, dict[str, list[dict]]]:
    """All tiny-world datasets: {name: {split: rows}}. Each split draws from its own seeded generator."""
    datasets = {}

    def build(name, make_row, sizes=SPLIT_SIZES):
        datasets[name] = {}
        for split_index, (split, size) in enumerate(sizes.items()):
            rng = random.Random(f"{seed}-{name}-{split_index}")
            datasets[name][split] = [make_row(rng) for _ in range(size)]

    # SFT: plain text (also the corpus the tiny policy is pretrained on), prompt + completion, and conversational.
    build("sft_text", lambda rng: {"text": f"{string_prompt(rng.choice(TITLES))} {sample_review(rng)}"},
          {"train": 3000, "test": 200})
    build("sft_prompt_completion",
          lambda rng: {"prompt": string_prompt(rng.choice(TITLES)), "completion": " " + sample_review(rng)})
    build("sft_messages", lambda rng: {"messages": user_turn(rng.choice(TITLES))
                                       + [{"role": "assistant", "content": sample_review(rng)}]})

    # Preferences: chosen is the more positive review, as strings (completions start with a space) and as messages.
    def pair_string(rng):
        title, chosen, rejected = preference_pair(rng)
        return {"prompt": string_prompt(title), "chosen": " " + chosen, "rejected": " " + rejected}

    def pair_messages(rng):
        title, chosen, rejected = preference_pair(rng)
        return {"prompt": user_turn(title), "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}

    build("preference", pair_string, {"train": 3000, "test": 200})
    build("preference_conversational", pair_messages, {"train": 3000, "test": 200})

    # Unpaired thumbs-up / thumbs-down (KTO): label is True when the review is positive; neutral reviews are redrawn.
    def unpaired(rng):
        while (score := sentiment_score(review := sample_review(rng))) == 0:
            pass
        return {"prompt": string_prompt(rng.choice(TITLES)), "completion": " " + review, "label": score > 0}

    build("unpaired", unpaired, {"train": 3000, "test": 200})

    # Prompts only (PPO, best-of-n).
    build("prompts", lambda rng: {"prompt": string_prompt(rng.choice(TITLES))}, {"train": 500, "test": 100})

    # Tool use (assets/tiny_tools.py): demonstrations that call `lookup` and repeat its answer, in TRL's format
    # (assistant turns with tool_calls, 'tool' messages, the tool schemas as a JSON string in a 'tools' column), for
    # sft.py; and the questions alone, with the film's title for the environment's reset, for grpo.py / rloo.py.
    tools = json.dumps(tool_schemas())
    build("tool_calls", lambda rng: {"messages": tool_demonstration(rng.choice(TITLES), rng), "tools": tools},
          {"train": 2000, "test": 200})
    build("tool_prompts", lambda rng: {"prompt": question(title := rng.choice(TITLES), rng), "title": title},
          {"train": 500, "test": 100})
    return datasets


# The tool world's questions; every one names the film, whose title the policy copies into its call.
QUESTIONS = ["How was {}?", "What did the critics say about {}?", "Is {} worth seeing?", "Tell me how {} was rated."]


def question(title: str, rng: random.Random) -> list[dict]:
    return [{"role": "user", "content": rng.choice(QUESTIONS).format(title)}]


def tool_schemas() -> list[dict]:
    """The JSON schemas of the tiny tool world's tools (what grpo.py shows the model for MovieRatings)."""
    from transformers.utils import get_json_schema

    from tiny_tools import MovieRatings

    return [get_json_schema(MovieRatings().lookup)]


def tool_demonstration(title: str, rng: random.Random) -> list[dict]:
    """A question, the call of `lookup` with the title as written, its answer (a random rating), and the answer
    repeated: the behaviour the warm start teaches."""
    from tiny_tools import RATINGS

    rating = rng.choice(RATINGS)
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"title": title}}}
    return question(title, rng) + [{"role": "assistant", "content": "", "tool_calls": [call]},
                                   {"role": "tool", "name": "lookup", "content": rating},
                                   {"role": "assistant", "content": rating}]


def write_datasets(datasets: dict, root: Path) -> None:
    for name, splits in datasets.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            with open(root / name / f"{split}.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE as GPT-2's, EOS doubles as BOS, UNK and pad; a tiny chat template
# ----------------------------------------------------------------------------------------------------------------------
EOS = "<|endoftext|>"
# Reserved special tokens: a distinct BOS for Llama-style variants built in tests, and the chat roles.
EXTRA_SPECIAL = ["<|begin_of_text|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Each turn is "<|role|>\n{content}<|endoftext|>"; the generation prompt is "<|assistant|>\n". So the assistant's
# learned span ends with EOS, and generation stops there.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_tokenizer(texts: list[str], vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS] + EXTRA_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                        pad_token=EOS, additional_special_tokens=EXTRA_SPECIAL, model_max_length=1024)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def corpus_texts(datasets: dict) -> list[str]:
    """What the tokenizer is trained on: the pretraining corpus and the chat turns. Other datasets use the same
    language, and leaving them out keeps the tokenizer (and so every tiny model) unchanged when they grow."""
    texts = [row["text"] for row in datasets["sft_text"]["train"]]
    texts += [message["content"] for row in datasets["sft_messages"]["train"] for message in row["messages"]]
    return texts


# ----------------------------------------------------------------------------------------------------------------------
# The tool-capable tokenizer: the tiny tokenizer with four added special tokens, a compact tool template, and a
# response_template that transformers' parse_response reads tool calls back with
# ----------------------------------------------------------------------------------------------------------------------
TOOL_SPECIAL = ["<|tool|>", "<|end|>", "<call>", "</call>"]
# "<|system|> tools: lookup<|end|><|user|> How was Golden River?<|end|><|assistant|><call>lookup\ntitle: Golden
# River</call><|end|><|tool|> great<|end|><|assistant|> great<|end|>". Every turn ends with <|end|>, the EOS, so
# generation stops after each turn. Argument values and contents follow a space, so a title copied into a call or a
# result copied into an answer is the same tokens as where it came from (" Golden", " River"). Prefix-preserving: a
# conversation renders as the renderings of its messages, one after the other.
TOOL_CHAT_TEMPLATE = (
    "{%- if tools %}{{ '<|system|> tools:' }}{% for tool in tools %}"
    "{{ ' ' + (tool.function.name if tool.function is defined else tool.name) }}{% endfor %}{{ eos_token }}"
    "{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}{{ '<|assistant|>' }}"
    "{%- if message.content %}{{ ' ' + message.content }}{% endif %}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- set function = call.function if call.function is defined else call %}{{ '<call>' + function.name }}"
    "{%- if function.arguments is mapping %}"
    "{%- for key, value in function.arguments.items() if value is not none %}{{ '\n' + key + ': ' + value | string }}"
    "{%- endfor %}"
    "{%- elif function.arguments %}{{ '\n' + function.arguments | string }}{% endif %}{{ '</call>' }}"
    "{%- endfor %}{{ eos_token }}"
    "{%- else %}{{ '<|' + message.role + '|> ' + (message.content or '') | string + eos_token }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# How transformers' tokenizer.parse_response reads a generated turn back into a message: "<call>NAME" opens a tool
# call whose "key: value" lines are its arguments, "</call>" closes it; the rest up to <|end|> is the content.
TOOL_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|assistant|>",
    "fields": {
        "tool_calls": {"open_pattern": r"<call>(?P<name>\w+)", "close": "</call>", "repeats": True,
                       "content": "kv-lines",
                       "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}}},
        "content": {"close": "<|end|>", "content": "text"},
    },
}


def build_tool_tokenizer(tokenizer):
    """The tiny tokenizer made tool-capable: <|end|> is the EOS (the pad stays <|endoftext|>, so a test can tell them
    apart), the tool template and the response template."""
    tokenizer.add_special_tokens({"extra_special_tokens": TOOL_SPECIAL})
    tokenizer.eos_token = "<|end|>"
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    tokenizer.response_template = TOOL_RESPONSE_TEMPLATE
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# The tiny models, each trained by the project's own script
# ----------------------------------------------------------------------------------------------------------------------
MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja"]


def train_and_copy(script: str, arguments: list[str], out_dir: Path) -> None:
    """Run `python <script> <arguments> --output_dir <tmp>` and copy the saved model and tokenizer to out_dir."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, str(ASSETS.parent / script), *arguments, "--output_dir", tmp, "--seed", str(SEED)]
        print(f"training {out_dir.name}:", " ".join(command), flush=True)
        subprocess.run(command, check=True)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        for name in MODEL_FILES:
            if (Path(tmp) / name).exists():
                shutil.copy(Path(tmp) / name, out_dir / name)


def build_policy(tokenizer, out_dir: Path, steps: int) -> None:
    """The tiny policy: a random-init GPT-2 pretrained on sft_text with sft.py (packed, full loss)."""
    from transformers import GPT2Config, GPT2LMHeadModel, set_seed

    set_seed(SEED)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=128, n_layer=4, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no dropout: runs replay exactly
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.eos_token_id)
    with tempfile.TemporaryDirectory() as init_dir:
        GPT2LMHeadModel(config).save_pretrained(init_dir)
        tokenizer.save_pretrained(init_dir)
        train_and_copy("sft.py", ["--model_name_or_path", init_dir, "--dataset_name", str(ASSETS / "data" / "sft_text"),
                                  "--packing", "--max_length", "256", "--per_device_train_batch_size", "8",
                                  "--learning_rate", "2e-3", "--warmup_ratio", "0.05", "--lr_scheduler_type", "cosine",
                                  "--max_steps", str(steps), "--eval_steps", "100", "--save_steps", "0"], out_dir)


def build_teacher(tokenizer, out_dir: Path, steps: int) -> None:
    """The tiny teacher of distill.py: a random-init GPT-2 twice the policy's size (n_embd 192 instead of 128), with the
    policy's tokenizer and so its vocabulary, trained from scratch with sft.py (packed, full loss) on reviews whose
    every sentence is positive. Saved in bfloat16 (4 MB instead of 8); distill.py loads it in float32."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, set_seed

    set_seed(SEED)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=192, n_layer=4, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.eos_token_id)
    with tempfile.TemporaryDirectory() as init_dir:
        for split_index, (split, size) in enumerate({"train": 3000, "test": 200}.items()):
            rng = random.Random(f"{SEED}-teacher-{split_index}")
            rows = [{"text": f"{string_prompt(rng.choice(TITLES))} {sample_review(rng, positivity=1.0)}"}
                    for _ in range(size)]
            (Path(init_dir) / "data").mkdir(exist_ok=True)
            (Path(init_dir) / "data" / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        GPT2LMHeadModel(config).save_pretrained(Path(init_dir) / "model")
        tokenizer.save_pretrained(Path(init_dir) / "model")
        train_and_copy("sft.py", ["--model_name_or_path", str(Path(init_dir) / "model"), "--dataset_name",
                                  str(Path(init_dir) / "data"), "--packing", "--max_length", "256",
                                  "--per_device_train_batch_size", "8", "--learning_rate", "2e-3", "--warmup_ratio",
                                  "0.05", "--lr_scheduler_type", "cosine", "--max_steps", str(steps), "--eval_steps",
                                  "100", "--save_steps", "0"], out_dir)
    AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.bfloat16).save_pretrained(out_dir)


def build_tool_policy(tokenizer, out_dir: Path, demo_steps: int, mix_steps: int, guess_fraction: float) -> None:
    """The tiny tool policy: a random-init Llama (RoPE: copying a title from anywhere in the question is a relative
    position pattern; the GPT-2 of the tiny world learned the call format but never to copy) with an output layer of
    its own (tied to the input embeddings, some title words stayed confused with others: 82% of titles copied after
    3,000 steps, against 100% after 500 untied), trained with sft.py in two stages: `demo_steps` on the tool_calls
    demonstrations (call lookup with the title, repeat the result), then
    `mix_steps` at a lower learning rate on demonstrations mixed with guesses (the answer, a random rating, without a
    call; `guess_fraction` of the rows), so that the warm start calls the tool only sometimes and GRPO has something
    to learn: calling beats guessing (always right vs one time in four)."""
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    from tiny_tools import RATINGS

    set_seed(SEED)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tools = json.dumps(tool_schemas())
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for split_index, (split, size) in enumerate({"train": 2000, "test": 200}.items()):
            rng = random.Random(f"{SEED}-tool-mix-{split_index}")
            rows = []
            for _ in range(size):
                title = rng.choice(TITLES)
                if rng.random() < guess_fraction:
                    messages = question(title, rng) + [{"role": "assistant", "content": rng.choice(RATINGS)}]
                else:
                    messages = tool_demonstration(title, rng)
                rows.append({"messages": messages, "tools": tools})
            (work / "mix").mkdir(exist_ok=True)
            (work / "mix" / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        LlamaForCausalLM(config).save_pretrained(work / "init")
        tokenizer.save_pretrained(work / "init")
        common = ["--per_device_train_batch_size", "32", "--lr_scheduler_type", "cosine", "--eval_steps", "200",
                  "--save_steps", "0"]
        train_and_copy("sft.py", ["--model_name_or_path", str(work / "init"), "--dataset_name",
                                  str(ASSETS / "data" / "tool_calls"), "--learning_rate", "3e-3", "--warmup_ratio",
                                  "0.05", "--max_steps", str(demo_steps), *common], work / "demos")
        train_and_copy("sft.py", ["--model_name_or_path", str(work / "demos"), "--dataset_name", str(work / "mix"),
                                  "--learning_rate", "1e-3", "--max_steps", str(mix_steps), *common], out_dir)
    (out_dir / "generation_config.json").unlink(missing_ok=True)  # sampling settings come from the scripts' flags


def build_reward_model(out_dir: Path) -> None:
    """The tiny reward model: the tiny policy plus a score head, trained on the preference pairs by reward.py
    (its defaults, for longer)."""
    train_and_copy("reward.py", ["--num_train_epochs", "5", "--save_steps", "0"], out_dir)


# ----------------------------------------------------------------------------------------------------------------------
# The tiny Stable Diffusion pipeline (random init; ddpo.py's default model)
# ----------------------------------------------------------------------------------------------------------------------
# ddpo.py's prompts: the animals of the reference's prompt function (and "" for the negative prompt).
ANIMALS = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
           "frog", "chicken", "duck", "goose", "bee", "pig", "turkey", "fly", "llama", "camel", "bat", "gorilla",
           "hedgehog", "kangaroo"]
SD_MAX_LENGTH = 16  # the tokenizer's model_max_length and the text encoder's positions (SD v1: 77)
# Stable Diffusion v1's noise schedule.
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's / CLIP's reversible map from bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, characters)))


def clip_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-format byte-level BPE vocabulary: the 256 byte characters, the same with the end-of-word suffix "</w>",
    one token per merge, then <|startoftext|> and <|endoftext|> (CLIP's layout). The merges are learned on `words`
    (each counted once; the most frequent pair first, ties broken alphabetically) until every word is one token."""
    alphabet = list(bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    byte_encoder = bytes_to_unicode()
    pieces = [[byte_encoder[b] for b in w.encode()] for w in words]
    pieces = [p[:-1] + [p[-1] + "</w>"] for p in pieces]
    merges = []
    while any(len(p) > 1 for p in pieces):
        counts = {}
        for p in pieces:
            for pair in zip(p, p[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        vocab_list.append(best[0] + best[1])
        for i, p in enumerate(pieces):
            merged, j = [], 0
            while j < len(p):
                if j + 1 < len(p) and (p[j], p[j + 1]) == best:
                    merged.append(p[j] + p[j + 1])
                    j += 2
                else:
                    merged.append(p[j])
                    j += 1
            pieces[i] = merged
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab_list)}, merges


def build_tiny_sd(out_dir: Path) -> None:
    """A Stable-Diffusion-v1-shaped StableDiffusionPipeline, randomly initialised (each component after its own
    torch.manual_seed, so rebuilding is byte-identical), saved with save_pretrained to out_dir."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(ANIMALS)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=SD_MAX_LENGTH)
    vocab_size = len(tokenizer)

    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=SD_MAX_LENGTH, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()

    torch.manual_seed(SEED + 1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)

    # Three blocks: latents are 4x smaller than images (SD's VAE: 8x), so 8x8x4 latents make 32x32 images.
    # norm_num_groups=1: GroupNorm then removes only the mean over all channels, and the differences between channel
    # means (the latents' global content) reach the pixels; with more groups a random decoder averages them away and
    # every image has nearly the same brightness (per-image std ~0.003 with 8 groups, ~0.017 with 1).
    torch.manual_seed(SEED + 2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=1, sample_size=32)
    with torch.no_grad():  # a deterministic 1.5x on the decoder's last conv: more contrast, more brightness spread
        vae.decoder.conv_out.weight.mul_(1.5)  # (per-image std ~0.022, with ~12% of pixels clipped to 0 or 1)

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # CLIP's own vocabulary files too, as in Stable Diffusion's tokenizer/ (tokenizer.json is what gets loaded)
    (out_dir / "tokenizer" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    merges_txt = "".join(f"{a} {b}\n" for a, b in merges)
    (out_dir / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + merges_txt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=["all", "data", "policy", "reward", "teacher", "tools", "diffusion"],
                        default="all")
    parser.add_argument("--out", type=Path, default=ASSETS, help="where to write (default: assets/ itself)")
    parser.add_argument("--policy_steps", type=int, default=600)
    parser.add_argument("--teacher_steps", type=int, default=600)
    parser.add_argument("--tool_demo_steps", type=int, default=600)
    parser.add_argument("--tool_mix_steps", type=int, default=100)
    parser.add_argument("--tool_guess_fraction", type=float, default=0.8)
    args = parser.parse_args()

    datasets = make_datasets()
    if args.stage in ("all", "data"):
        write_datasets(datasets, args.out / "data")
        build_tokenizer(corpus_texts(datasets)).save_pretrained(args.out / "tokenizer")
    if args.stage in ("all", "policy"):
        from transformers import AutoTokenizer

        build_policy(AutoTokenizer.from_pretrained(args.out / "tokenizer"), args.out / "tiny-gpt2", args.policy_steps)
    if args.stage in ("all", "reward"):
        build_reward_model(args.out / "tiny-reward")
    if args.stage in ("all", "teacher"):
        from transformers import AutoTokenizer

        build_teacher(AutoTokenizer.from_pretrained(args.out / "tokenizer"), args.out / "tiny-teacher",
                      args.teacher_steps)
    if args.stage in ("all", "tools"):
        from transformers import AutoTokenizer

        tokenizer = build_tool_tokenizer(AutoTokenizer.from_pretrained(args.out / "tokenizer"))
        build_tool_policy(tokenizer, args.out / "tiny-tools", args.tool_demo_steps, args.tool_mix_steps,
                          args.tool_guess_fraction)
    if args.stage in ("all", "diffusion"):
        build_tiny_sd(args.out / "tiny-sd")


if __name__ == "__main__":
    main()
