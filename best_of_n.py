"""Best-of-n sampling: draw n responses per prompt, keep the one a reward model likes best. Better outputs, no training.

Best-of-n (rejection sampling; Nakano et al. 2021, WebGPT, https://arxiv.org/abs/2112.09332; Stiennon et al. 2020,
https://arxiv.org/abs/2009.01325) is the baseline every RLHF method is compared against: its expected reward rises with
n at the cost of n times the sampling, and its KL to the policy is at most log n - (n - 1) / n. This file reproduces
the seed's `BestOfNSampler` ("the seed" throughout: TRL v0.8.6, `trl.extras`, and its documented behaviour) with
the same constructor and `generate`, but samples every
query's n responses -- and many queries -- in one batched `generate` call, scores them in batches, and checks what the
scorer returns. Its command line compares plain sampling (n = 1) with best-of-n for n = 2, 4, ... under a reward and
saves the chosen completions as a dataset that sft.py trains on (rejection-sampling fine-tuning). See docs/best_of_n.md.

    # offline quickstart: the tiny world (assets/), CPU, about 20 s: best-of-1 ... best-of-8 under the tiny reward model
    python best_of_n.py
    # a real policy and the seed's sentiment reward
    python best_of_n.py --model_name_or_path lvwerra/gpt2-imdb --dataset_name stanfordnlp/imdb --query_column text \
        --dataset_split test --max_prompt_length 8 --reward_model sentiment-analysis:lvwerra/distilbert-imdb \
        --sample_size 16 --output_min_length 4 --output_max_length 16
    # several GPUs: each process samples its share of the prompts
    accelerate launch --multi_gpu --num_processes 8 best_of_n.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/ultrafeedback-prompt --dataset_split train \
        --reward_model Skywork/Skywork-Reward-V2-Qwen3-0.6B \
        --sample_size 16 --output_max_length 256 --dtype bfloat16

From Python, as in the seed: `from best_of_n import BestOfNSampler, LengthSampler`; `main(Args())` runs the comparison.
"""

import importlib.util
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ClassVar, Literal, NoReturn

import numpy as np
import torch
import tyro
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from datasets import DatasetDict, load_dataset, load_from_disk
from tqdm.auto import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                          AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase)

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (used in the wandb run name)"""
    seed: int = 42
    """seed of the experiment: the sampling noise (each n starts from the same seed)"""
    output_dir: str = "runs/best_of_n"
    """where results.json, the plot, metrics.jsonl, samples.jsonl, completions/ go (a previous run there is kept)"""
    overwrite_output_dir: bool = False
    """replace a previous run in output_dir (by default it is kept: a named output_dir is refused)"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project_name: str = "post-training"
    """the wandb project"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    push_to_hub: bool = False
    """push the chosen completions as a dataset to the Hub under the name of output_dir"""

    # --- model ---
    model_name_or_path: str = str(ASSETS / "tiny-gpt2")
    """the policy that samples: a Hub id or a local directory (default: the tiny world's pretrained GPT-2)"""
    revision: str | None = None
    """the Hub revision (branch, tag or commit) of the model"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """dtype the weights are loaded in"""
    attn_implementation: str | None = None
    """attention kernel, e.g. "sdpa", "eager" or "flash_attention_2" (default: transformers' choice)"""

    # --- data ---
    dataset_name: str = str(ASSETS / "data" / "prompts")
    """prompts: a Hub id, a local .json/.jsonl/.csv/.parquet file, a save_to_disk directory or a directory of splits"""
    dataset_config: str | None = None
    """the dataset configuration (subset) name"""
    dataset_split: str = "test"
    """the split whose prompts are sampled"""
    query_column: str | None = None
    """the column holding the prompts (default: 'prompt', else 'query'); strings or message lists"""
    num_prompts: int = 64
    """how many prompts (the first ones of the split) to sample for; -1: all"""
    max_prompt_length: int | None = None
    """cut every prompt to its first this many tokens (the seed's IMDB example uses 2 to 8)"""

    # --- best-of-n ---
    reward_model: str = str(ASSETS / "tiny-reward")
    """a sequence-classification model (path or Hub id) or 'task:model', a transformers pipeline (docs/best_of_n.md)"""
    sample_size: int = 8
    """the largest n: responses sampled per prompt; n = 1, 2, 4, ... up to sample_size are compared"""
    n_candidates: int = 1
    """how many of the best responses per prompt are kept (saved as completions; n_candidates <= sample_size)"""
    output_min_length: int = 8
    """lower end of each prompt's random response budget in tokens, drawn in [min, max) (the seed's LengthSampler)"""
    output_max_length: int = 24
    """upper end (exclusive) of the token budget of responses"""
    temperature: float = 1.0
    """sampling temperature (pure sampling otherwise: top_k 0, top_p 1, as the seed's examples)"""
    batch_size: int = 16
    """prompts per generate call (each contributes n rows for best-of-n, at most sample_size)"""

    # read by the shared plumbing below the banner: sampling runs in --dtype (no autocast), and a run is never resumed
    # (nothing is trained, so there is no checkpoint: a run stopped by a signal is simply run again)
    bf16: ClassVar[bool] = False
    resume_from_checkpoint: ClassVar[str | None] = None


# ----------------------------------------------------------------------------------------------------------------------
# The algorithm: prompts -> queries -> n samples each, in one generate call per batch -> scored -> the best kept
# ----------------------------------------------------------------------------------------------------------------------
def format_query(prompt, tokenizer) -> tuple[str, bool]:
    """THE place to change how a prompt becomes text: a message list is rendered with the chat template and the
    generation prompt (then the text holds its own special tokens: templated=True); a string is used as it is."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), True
    return prompt, False


@torch.no_grad()
def sample_responses(model, queries: list[torch.Tensor], num_samples: int, max_new_tokens: list[int],
                     pad_token_id: int, eos_token_ids: list[int], **generation_kwargs) -> list[list[torch.Tensor]]:
    """num_samples responses to each of the (1-D token-id) queries, all in ONE `generate` call with the KV cache.

    Queries are left-padded (decoder-only) and each row repeated num_samples times, contiguously, as the seed's
    `query.repeat` (so the same samples are drawn; `num_return_sequences` refuses greedy decoding). Query i's
    responses are cut to max_new_tokens[i] tokens and after their first EOS (kept). Returns per query a list of
    num_samples 1-D response tensors (on the CPU, padding stripped, at least one token each)."""
    device = next(model.parameters()).device
    is_encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    side = "right" if is_encoder_decoder else "left"  # the encoder reads the attention mask either way
    queries = [query.cpu() for query in queries]
    input_ids = torch.nn.utils.rnn.pad_sequence(queries, batch_first=True, padding_value=pad_token_id,
                                                padding_side=side).repeat_interleave(num_samples, dim=0)
    attention_mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(query) for query in queries], batch_first=True,
                                                     padding_side=side).repeat_interleave(num_samples, dim=0)
    generations = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 max_new_tokens=max(max_new_tokens), pad_token_id=pad_token_id,
                                 **generation_kwargs).cpu()
    # (queries * num_samples, tokens): decoder-only outputs repeat the padded queries; an encoder-decoder's output is
    # the decoder's sequence, which starts with its start token
    responses = generations[:, 1:] if is_encoder_decoder else generations[:, input_ids.shape[1]:]
    eos = torch.tensor(eos_token_ids)
    samples = []
    for i in range(len(queries)):
        mine = []
        for response in responses[i * num_samples : (i + 1) * num_samples]:
            response = response[: max_new_tokens[i]]
            ended = torch.isin(response, eos).nonzero()
            mine.append(response[: int(ended[0, 0]) + 1] if len(ended) else response)
        samples.append(mine)
    return samples


def as_query_list(tokenized_query) -> list[torch.Tensor]:
    """The seed's accepted query forms -> a list of 1-D LongTensors: one query as a 1-D tensor or a list of ints; a
    batch as a 2-D tensor (one unpadded query per row), a list of tensors, or a list of lists of ints."""
    if isinstance(tokenized_query, torch.Tensor) and tokenized_query.dim() in (1, 2):
        queries = [tokenized_query] if tokenized_query.dim() == 1 else list(tokenized_query)
    elif isinstance(tokenized_query, torch.Tensor):
        raise ValueError(f"tokenized_query as a tensor must be 1-D (one query) or 2-D (one query per row), got "
                         f"shape {tuple(tokenized_query.shape)}")
    elif not isinstance(tokenized_query, (list, tuple)) or len(tokenized_query) == 0:
        raise ValueError(f"tokenized_query must be a tensor or a non-empty list of token ids, tensors or lists, got "
                         f"{type(tokenized_query).__name__}{' (empty)' if isinstance(tokenized_query, list) else ''}")
    elif all(isinstance(token, (int, np.integer)) for token in tokenized_query):
        queries = [torch.tensor(tokenized_query)]
    elif all(isinstance(query, torch.Tensor) for query in tokenized_query):
        queries = [query.reshape(-1) for query in tokenized_query]  # (L,) or (1, L)
    elif all(isinstance(query, (list, tuple)) for query in tokenized_query):
        queries = [torch.tensor(query, dtype=torch.long) for query in tokenized_query]
    else:
        raise ValueError(f"tokenized_query must be a list of ints, a list of tensors or a list of lists of ints; got "
                         f"a list of {sorted({type(query).__name__ for query in tokenized_query})}")
    if empty := [i for i, query in enumerate(queries) if query.numel() == 0]:
        raise ValueError(f"queries must not be empty; queries {empty[:10]} have no tokens")
    return [query.long() for query in queries]


class BestOfNSampler:
    """The seed's best-of-n sampler: `generate` samples `sample_size` responses per query and returns, per query, the
    `n_candidates` texts (query + response, decoded) that `queries_to_scores` (texts -> as many finite scores) scores
    highest, best first. model: anything with a transformers-style `generate`. length_sampler: each query's token
    budget (None: max_new_tokens of generate's keywords or of the config). seed: seeds python, numpy and torch once,
    at construction. generation_config: used by every call; generate's keywords override it (with neither it nor
    do_sample, it samples). batch_size: queries per generate call (new; 1 is the seed's loop). See docs/best_of_n.md.
    """

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, queries_to_scores: Callable[[list[str]], list[float]],
                 length_sampler: Callable[[], int] | None = None, sample_size: int = 4, seed: int | None = None,
                 n_candidates: int = 1, generation_config: GenerationConfig | None = None, batch_size: int = 16):
        for name, value in (("sample_size", sample_size), ("n_candidates", n_candidates), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for ok, message in [
            (isinstance(tokenizer, PreTrainedTokenizerBase),
             f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}"),
            (callable(getattr(model, "generate", None)),
             f"model must have a transformers-style generate method; {type(model).__name__} has none"),
            (callable(queries_to_scores), f"queries_to_scores must be a callable from a list of texts to a list of "
                                          f"scores, got {type(queries_to_scores).__name__}"),
            (length_sampler is None or callable(length_sampler), f"length_sampler must be a callable returning a "
             f"token budget (e.g. LengthSampler(4, 16)), got {type(length_sampler).__name__}"),
            (n_candidates <= sample_size, f"n_candidates ({n_candidates}) cannot exceed sample_size ({sample_size}): "
                                          f"the best {n_candidates} of {sample_size} samples do not exist")]:
            if not ok:
                raise ValueError(message)
        if seed is not None:
            set_seed(seed)
        self.model, self.tokenizer, self.queries_to_scores = model, tokenizer, queries_to_scores
        self.length_sampler, self.gen_config = length_sampler, generation_config
        self.sample_size, self.n_candidates, self.batch_size = sample_size, n_candidates, batch_size

    def _score(self, texts: list[str]) -> torch.Tensor:
        """queries_to_scores(texts), checked: one finite number per text -> (len(texts),) float tensor."""
        scores = self.queries_to_scores(texts)
        try:
            scores = torch.as_tensor(scores if isinstance(scores, torch.Tensor) else list(scores), dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"queries_to_scores must return one number per text; got {type(scores).__name__} "
                             f"({error})") from None
        if scores.dim() != 1 or len(scores) != len(texts):
            raise ValueError(f"queries_to_scores returned {scores.numel()} scores (shape {tuple(scores.shape)}) for "
                             f"{len(texts)} texts; expected one score per text")
        if not torch.isfinite(scores).all():
            bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
            raise ValueError(f"queries_to_scores returned non-finite scores {scores[bad[:10]].tolist()} for texts "
                             f"{bad[:10]}: {texts[bad[0]]!r}")
        return scores

    @torch.no_grad()
    def generate(self, tokenized_query, skip_special_tokens: bool = True, device=None,
                 **generation_kwargs) -> list[list[str]]:
        """Per query (any form as_query_list accepts) its n_candidates best decoded texts, best first. device: only
        for the seed's signature (the queries go where the model is); generation_kwargs override the config."""
        queries = as_query_list(tokenized_query)
        if "num_return_sequences" in generation_kwargs:
            raise ValueError("num_return_sequences is set by sample_size; do not pass it to generate")
        config = self.gen_config or getattr(self.model, "generation_config", None) or GenerationConfig()
        if self.gen_config is not None:  # its fields as keywords (transformers deprecates a config plus keywords)
            fields = {k: v for k, v in self.gen_config.to_diff_dict().items() if k != "transformers_version"}
            generation_kwargs = {**fields, **generation_kwargs}
        elif "do_sample" not in generation_kwargs:
            generation_kwargs["do_sample"] = True
        fixed_length = generation_kwargs.pop("max_new_tokens", None) or config.max_new_tokens
        if self.length_sampler is None and fixed_length is None:
            raise ValueError("no response length: give the sampler a length_sampler, or max_new_tokens to generate "
                             "or in the generation config")
        pad = generation_kwargs.pop("pad_token_id", None)
        pad = next(p for p in (pad, config.pad_token_id, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
                   if p is not None)
        eos = next((e for e in (generation_kwargs.get("eos_token_id"), config.eos_token_id,
                                self.tokenizer.eos_token_id) if e is not None), [])
        eos = [eos] if isinstance(eos, int) else list(eos)  # where responses are cut
        is_encoder_decoder = getattr(getattr(self.model, "config", None), "is_encoder_decoder", False)

        best = []
        for start in range(0, len(queries), self.batch_size):
            chunk = queries[start : start + self.batch_size]
            # each query draws its own budget, in query order, as the seed's loop does
            lengths = [self.length_sampler() if self.length_sampler is not None else fixed_length for _ in chunk]
            samples = sample_responses(self.model, chunk, self.sample_size, lengths, pad, eos, **generation_kwargs)
            # the texts the scorer sees are query + response (an encoder-decoder's: the response), as in the seed
            texts = self.tokenizer.batch_decode(
                [response if is_encoder_decoder else torch.cat([query, response])
                 for query, responses in zip(chunk, samples) for response in responses],
                skip_special_tokens=skip_special_tokens)
            scores = self._score(texts).view(len(chunk), self.sample_size)
            order = scores.sort(dim=1, descending=True, stable=True).indices  # ties: the earlier sample first
            best += [[texts[i * self.sample_size + j] for j in order[i, : self.n_candidates].tolist()]
                     for i in range(len(chunk))]
        return best


def main(args: Args) -> None:
    # 0. Check what can be checked before anything is loaded.
    for bad, message in [
        *[(getattr(args, name) <= 0, f"--{name} must be a positive integer, got {getattr(args, name)}")
          for name in ["sample_size", "n_candidates", "output_min_length", "batch_size"]],
        (args.n_candidates > args.sample_size, f"--n_candidates {args.n_candidates} cannot exceed --sample_size "
         f"{args.sample_size} (the best {args.n_candidates} of {args.sample_size} samples do not exist)"),
        (args.output_max_length <= args.output_min_length, f"--output_max_length must be above --output_min_length "
         f"{args.output_min_length} (the range is [min, max)), got {args.output_max_length}"),
        (args.num_prompts == 0 or args.num_prompts < -1,
         f"--num_prompts must be a positive integer or -1 (all), got {args.num_prompts}"),
        (args.max_prompt_length is not None and args.max_prompt_length <= 0,
         f"--max_prompt_length must be a positive integer, got {args.max_prompt_length}"),
        (args.temperature <= 0, f"--temperature must be positive, got {args.temperature}")]:
        if bad:
            fail(message, once=True)
    try:
        parse_reward_spec(args.reward_model)
    except ValueError as error:
        fail(str(error), once=True)
    check_sampling_run(args)  # the model path, output_dir, and a previous run there
    n_values = sorted({2**k for k in range(int(math.log2(args.sample_size)) + 1)} | {args.sample_size})  # 1, 2, 4, ..
    output_dir = Path(args.output_dir)

    # 1. Accelerator: each process samples every N-th prompt with a whole copy of the model. Nothing is trained, so
    #    FSDP and ZeRO-1/2 have nothing to shard (the model stays whole, and a line says so); ZeRO-3 is refused.
    accelerator = make_accelerator(args, "its models would be loaded partitioned and used outside an engine")
    world_size = accelerator.num_processes
    accelerator.print(f"run: {world_size} process(es) x {args.batch_size} prompts per generate call x "
                      f"{args.sample_size} samples (the largest n) = {world_size * args.batch_size * args.sample_size} "
                      "completions per round of calls")
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        sharding = "FSDP" if accelerator.distributed_type == DistributedType.FSDP else "DeepSpeed"
        accelerator.print(f"{Path(__file__).name}: {sharding} shards training state, and there is none here: each "
                          "process samples its share of the prompts with a whole copy of the model")

    # 2. Prompts, loaded and checked before any model loads: strings or message lists, none empty.
    prompt_split, query_column = load_prompts(args.dataset_name, args.dataset_config, args.dataset_split,
                                              args.query_column)
    prompts = prompt_split[query_column][: args.num_prompts if args.num_prompts > 0 else None]
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, (str, list)):
            fail(f"prompts must be strings or message lists; column '{query_column}' holds {type(prompt).__name__}")
        if not (prompt.strip() if isinstance(prompt, str) else prompt):
            fail(f"prompt {i} of split '{args.dataset_split}' is empty; expected text (or messages) to respond to")

    # 3. Tokenizer and queries: each prompt as the policy reads it (chat template for conversations), cut to
    #    --max_prompt_length tokens; a cut prompt is shown to the reward as its decoded tokens.
    tokenizer = load_tokenizer(args, "to end responses")
    if isinstance(prompts[0], list) and tokenizer.chat_template is None:
        fail(f"the prompts are conversations but the tokenizer of {args.model_name_or_path} has no chat template")
    queries, reward_prompts = [], []  # token ids, and what the reward function sees as the prompt
    for prompt in prompts:
        text, templated = format_query(prompt, tokenizer)
        ids = list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
        cut = args.max_prompt_length is not None and len(ids) > args.max_prompt_length
        ids = ids[: args.max_prompt_length]
        queries.append(torch.tensor(ids))
        reward_prompts.append(tokenizer.decode(ids, skip_special_tokens=True) if cut else prompt)
    decoded_prompts = tokenizer.batch_decode(queries, skip_special_tokens=True)  # how each sample's text begins

    # 4. The policy (causal or seq2seq), in eval mode (dropout off), whole on this process's device.
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    is_encoder_decoder = AutoConfig.from_pretrained(args.model_name_or_path, revision=args.revision).is_encoder_decoder
    model = (AutoModelForSeq2SeqLM if is_encoder_decoder else AutoModelForCausalLM).from_pretrained(
        args.model_name_or_path, revision=args.revision, dtype=dtype, attn_implementation=args.attn_implementation)
    model = model.eval().requires_grad_(False).to(accelerator.device)

    # 5. The reward, and the sampler's scorer. The sampler hands over whole texts (query + response, as the seed's
    #    API does); the reward rule scores a prompt and a response, so each text is split at the decoded prompt it
    #    starts with (the longest one; a text that starts with none is scored whole).
    try:
        reward_fn = load_reward_function(args.reward_model, accelerator.device)
    except (OSError, ValueError) as error:
        fail(f"could not load reward model {args.reward_model}: {' '.join(str(error).split())[:500]}")
    prompt_of_text = {text: i for i, text in enumerate(decoded_prompts)}
    prompt_lengths = sorted({len(text) for text in decoded_prompts}, reverse=True)

    def queries_to_scores(texts: list[str]) -> list[float]:
        owners = [next((prompt_of_text[text[:k]] for k in prompt_lengths if text[:k] in prompt_of_text), None)
                  for text in texts]
        return reward_fn([reward_prompts[i] if i is not None else "" for i in owners],
                         [text[len(decoded_prompts[i]):] if i is not None else text for i, text in zip(owners, texts)])

    def response_of(i: int, text: str) -> str:  # a chosen text of prompt i, without the prompt
        return text[len(decoded_prompts[i]):] if text.startswith(decoded_prompts[i]) else text

    # 6. Best-of-n for each n: sample n responses per prompt (one generate call per batch_size prompts), keep the
    #    best, score what was kept. Every n starts from the same seed and draws the same response budgets.
    log = open_logs(args, accelerator, 0, files=("metrics.jsonl", "samples.jsonl"))
    generation_config = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=args.temperature,
                                         pad_token_id=tokenizer.pad_token_id)
    mine = list(range(accelerator.process_index, len(queries), world_size))
    rows, chosen = [], {}
    for n in tqdm(n_values, desc="best-of-n", disable=not accelerator.is_local_main_process):
        kept = min(args.n_candidates, n)
        sampler = BestOfNSampler(model, tokenizer, queries_to_scores,
                                 length_sampler=LengthSampler(args.output_min_length, args.output_max_length),
                                 sample_size=n, seed=args.seed + accelerator.process_index, n_candidates=kept,
                                 generation_config=generation_config, batch_size=args.batch_size)
        accelerator.wait_for_everyone()
        start = time.time()
        try:
            best = sampler.generate([queries[i] for i in mine]) if mine else []
        except ValueError as error:  # e.g. a reward that is not finite
            fail(f"best-of-{n}: {error}")
        seconds = max(gather_object([time.time() - start]))  # the slowest process
        scores = queries_to_scores([text for texts in best for text in texts]) if best else []
        chosen[n] = sorted(gather_object([(i, texts, scores[j * kept : (j + 1) * kept])
                                          for j, (i, texts) in enumerate(zip(mine, best))]))  # in prompt order
        top = torch.tensor([text_scores[0] for _, _, text_scores in chosen[n]])
        rows.append({"n": n, "mean_reward": top.mean().item(), "std_reward": top.std().item() if len(top) > 1 else 0.0,
                     "seconds_per_query": seconds / len(queries), "samples_per_second": n * len(queries) / seconds})
        log({"step": len(rows), "n": n, "reward/mean": rows[-1]["mean_reward"], "reward/std": rows[-1]["std_reward"],
             **rows[-1]})
        if accelerator.is_main_process:
            with open(output_dir / "samples.jsonl", "a") as f:
                f.writelines(json.dumps({"n": n, "prompt": decoded_prompts[i], "response": response_of(i, texts[0]),
                                         "reward": text_scores[0]}) + "\n" for i, texts, text_scores in chosen[n])

    # 7. Results: the table, results.json, a plot of mean reward against n, and the chosen completions of the largest
    #    n as a prompt/completion dataset (train.jsonl, and test.jsonl with a tenth of the prompts) for sft.py.
    if accelerator.is_main_process:
        print("\n".join([f"{'n':>4}  {'mean reward':>11}  {'std':>7}  {'s / query':>9}"] + [
            f"{row['n']:>4}  {row['mean_reward']:>11.4f}  {row['std_reward']:>7.4f}  {row['seconds_per_query']:>9.4f}"
            for row in rows]))
        (output_dir / "results.json").write_text(json.dumps(
            {"model": args.model_name_or_path, "reward_model": args.reward_model, "dataset": args.dataset_name,
             "num_prompts": len(queries), "output_length": [args.output_min_length, args.output_max_length],
             "temperature": args.temperature, "rows": rows}, indent=2))

        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(5, 3.5))
        axis.errorbar([row["n"] for row in rows], [row["mean_reward"] for row in rows], marker="o", capsize=3,
                      yerr=[row["std_reward"] / math.sqrt(len(queries)) for row in rows])
        axis.set_xscale("log", base=2)
        axis.set_xticks(n_values, [str(n) for n in n_values])
        axis.set(xlabel="n (samples per prompt)", ylabel="mean reward of the best sample")
        axis.set_title(f"best-of-n on {len(queries)} prompts (± standard error)", fontsize=10)
        figure.tight_layout()
        figure.savefig(output_dir / "best_of_n.png", dpi=120)

        completions, num_test = output_dir / "completions", len(queries) // 10
        completions.mkdir(exist_ok=True)
        for split, results in [("train", chosen[args.sample_size][: len(queries) - num_test]),
                               ("test", chosen[args.sample_size][len(queries) - num_test :])]:
            lines = []
            for i, texts, text_scores in results:
                for text, score in zip(texts, text_scores):
                    prompt, response = reward_prompts[i], response_of(i, text)
                    completion = [{"role": "assistant", "content": response}] if isinstance(prompt, list) else response
                    lines.append(json.dumps({"prompt": prompt, "completion": completion, "score": score}) + "\n")
            (completions / f"{split}.jsonl").unlink(missing_ok=True)
            if lines:
                (completions / f"{split}.jsonl").write_text("".join(lines))
        if args.push_to_hub:
            load_any_dataset(str(completions)).push_to_hub(output_dir.name)
        if args.track:
            import wandb

            wandb.log({"samples": wandb.Table(columns=["prompt", "best-of-1", f"best-of-{args.sample_size}"], data=[
                [decoded_prompts[a[0]], a[1][0], b[1][0]] for a, b in zip(chosen[1][:16], chosen[args.sample_size])]),
                "best_of_n": wandb.Image(str(output_dir / "best_of_n.png"))})
            wandb.finish()
        print(f"wrote {output_dir}/results.json, best_of_n.png and completions/ (train with: python sft.py "
              f"--dataset_name {completions})")
    accelerator.wait_for_everyone()
    accelerator.end_training()


# ======================================================================================================================
# The plumbing: launch checks, runs and checkpoints, data and model loading, sharded saving, logging. Apart from
# check_sampling_run (best_of_n.py's own), each function is byte-identical in every script that has it
# (tests/test_layout.py).
# ======================================================================================================================
def fail(message: str, once: bool = False) -> NoReturn:
    """Stop with one line, `<script>: error: <message>`, exit status 1. once: every process meets the same error, so
    only the first one prints it; the others wait for it to exit (the launcher then stops them), because a launcher
    that sees any process fail kills the rest, and the first one could be killed before it printed."""
    if once and int(os.environ.get("RANK", "0")) > 0:
        time.sleep(60)
        sys.exit(1)
    sys.exit(f"{Path(__file__).name}: error: {message}")


def check_sampling_run(args) -> None:
    """check_run's checks that apply to a script that trains nothing (no learning rate, no checkpoint to resume): before
    anything loads, --model_name_or_path and --output_dir are checked (one line each), and a named output_dir that
    holds a previous run is refused unless --overwrite_output_dir (the default output_dir's previous run is kept beside
    it by open_logs)."""
    path = args.model_name_or_path
    if path and not Path(path).expanduser().exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        fail(f"--model_name_or_path {path} does not exist: expected a model directory or a Hub id", once=True)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        fail(f"--output_dir {output_dir} is a file; expected a directory (or a path that does not exist yet)",
             once=True)
    held = sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []
    named = args.output_dir != type(args).__dataclass_fields__["output_dir"].default
    if held and named and not args.overwrite_output_dir:
        fail(f"--output_dir {output_dir} holds a previous run ({', '.join(held[:4])}{', ...' * (len(held) > 4)}); "
             "pass --overwrite_output_dir to replace it, or another --output_dir", once=True)


def make_accelerator(args, zero3_refusal: str | None = None) -> Accelerator:
    """The Accelerator, every RNG seeded. FSDP / DeepSpeed asked for without a GPU (or not installed) is one line, not a
    silent fall-back to data parallelism; several processes without a GPU become one gloo group on CPU."""
    requested = [name for variable, name in [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")]
                 if os.environ.get(variable, "false").lower() == "true"]
    if requested and not torch.cuda.is_available():
        fail(f"{requested[0]} was requested (accelerate config or --use_fsdp / --use_deepspeed) but this machine has "
             "no GPU, and FSDP and DeepSpeed shard over GPUs; for several CPU processes (gloo data parallelism) use "
             "`accelerate launch --multi_gpu --num_processes N`", once=True)
    if requested == ["DeepSpeed"] and importlib.util.find_spec("deepspeed") is None:
        fail("DeepSpeed was requested (accelerate config or --use_deepspeed) but it is not installed: "
             "`pip install deepspeed` (an optional dependency of these scripts)", once=True)
    if zero3_refusal and requested == ["DeepSpeed"] and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        fail(f"{Path(__file__).name} does not run under DeepSpeed ZeRO-3 ({zero3_refusal}); use "
             "accelerate_configs/fsdp.yaml, or deepspeed_zero2.yaml", once=True)
    multi_process_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(cpu=multi_process_cpu, mixed_precision="bf16" if args.bf16 else None)
    set_seed(args.seed)
    return accelerator


def load_any_dataset(name: str, config: str | None = None) -> DatasetDict:
    """Load a Hub dataset, a local data file, a `save_to_disk` directory or a directory of split files."""
    path = Path(name)
    if path.is_file():
        builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
        if path.suffix not in builders:
            raise ValueError(f"unknown dataset file type '{path.suffix}' of {name}: expected one of {sorted(builders)}")
        return load_dataset(builders[path.suffix], data_files=str(path))
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        loaded = load_from_disk(str(path))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)
    return load_dataset(name, config)  # a Hub id, or a directory of train/test files (splits inferred from names)


def load_dataset_or_fail(name: str, config: str | None = None) -> DatasetDict:
    """load_any_dataset, with any failure (not found, unreadable, unknown type, empty, network) as one line that names
    the dataset and the reason, not a traceback."""
    try:
        return load_any_dataset(name, config)
    except Exception as error:
        message = str(error) or type(error).__name__  # an empty JSON file raises a bare StopIteration
        cause = error.__cause__  # datasets wraps the real reason, e.g. split files whose columns differ
        if cause is not None and str(cause):
            message += f" ({type(cause).__name__}: {' '.join(str(cause).split())})"
        elif isinstance(error, StopIteration) or "corresponds to no data" in message or "generating the dataset" in \
                message:  # how datasets says "empty"
            message += " (is a data file empty? every split needs at least one row)"
        fail(f"could not load dataset {name}: {message}")


def load_tokenizer(args, eos_purpose: str):
    """The tokenizer of --model_name_or_path; it needs an EOS token. Without a pad token EOS pads: padding is masked by
    position (attention mask, labels -100), never by token id, so a real EOS is still learned."""
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, revision=args.revision)
    if tokenizer.eos_token_id is None:
        fail(f"the tokenizer of {args.model_name_or_path} has no EOS token; expected one {eos_purpose}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def open_logs(args, accelerator, start_step: int, files: tuple[str, ...] = ("metrics.jsonl",)):
    """output_dir with args.json, fresh log files (resuming: the rows up to start_step kept), wandb under --track. A
    previous run in output_dir (the run checks let it through) is moved to <output_dir>-<its time>, or deleted under
    --overwrite_output_dir. Returns log(metrics): a console line, a strict-JSON metrics.jsonl row, a wandb point."""
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        if not args.resume_from_checkpoint and output_dir.is_dir() and any(output_dir.iterdir()):
            if args.overwrite_output_dir:
                shutil.rmtree(output_dir)
                print(f"--overwrite_output_dir: removed the previous run in {output_dir}")
            else:
                stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(output_dir.stat().st_mtime))
                kept = next(path for n in range(1000) if not (path := output_dir.with_name(
                    f"{output_dir.name}-{stamp}" + (f"-{n}" if n else ""))).exists())
                output_dir.rename(kept)
                print(f"{output_dir} held a previous run: kept as {kept} (--overwrite_output_dir replaces it)")
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
        for file in (output_dir / name for name in files):
            if not args.resume_from_checkpoint:  # a fresh run starts a fresh log
                file.unlink(missing_ok=True)
            elif file.exists():  # a resumed one keeps what was logged up to its checkpoint, and appends
                logged = [line for line in file.read_text().splitlines() if json.loads(line)["step"] <= start_step]
                file.write_text("".join(line + "\n" for line in logged))
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args),
                       name=f"{args.exp_name}__{args.seed}__{int(time.time())}")

    def log(metrics: dict) -> None:
        if accelerator.is_main_process:
            tqdm.write(" ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                                for key, value in metrics.items()))
            with open(output_dir / "metrics.jsonl", "a") as f:  # NaN and infinity are not JSON: null
                f.write(json.dumps({key: None if isinstance(value, float) and not math.isfinite(value) else value
                                    for key, value in metrics.items()}) + "\n")
            if args.track:
                import wandb

                wandb.log(metrics, step=metrics["step"])
    accelerator.wait_for_everyone()  # no process writes into output_dir before it is ready
    return log


def find_query_column(column_names: list[str], query_column: str | None = None) -> str:
    """The column holding the prompts: --query_column, else 'prompt', else 'query'."""
    candidates = [query_column] if query_column else ["prompt", "query"]
    for column in candidates:
        if column in column_names:
            return column
    expected = f"a '{query_column}' column" if query_column else "a 'prompt' or 'query' column"
    raise ValueError(f"expected {expected} (strings or message lists); found columns {column_names}")


def load_prompts(name: str, config: str | None, split: str, query_column: str | None) -> tuple:
    """The prompts of one split, loaded and checked before any model is (one line per failure): the split must exist
    and hold rows; the prompt column is --query_column, else 'prompt' or 'query'. Returns (the split, the column)."""
    raw = load_dataset_or_fail(name, config)
    try:
        if split not in raw:
            raise ValueError(f"dataset {name} has no split '{split}'; found splits {list(raw)}")
        if len(raw[split]) == 0:
            raise ValueError(f"split '{split}' of dataset {name} is empty; expected at least one prompt")
        return raw[split], find_query_column(raw[split].column_names, query_column)
    except ValueError as error:
        fail(str(error))


def parse_reward_spec(spec: str) -> tuple[str | None, str]:
    """'task:model' for a transformers pipeline (task one of the pipeline tasks, e.g. sentiment-analysis), else
    (None, spec): a sequence-classification model path or Hub id. Raises ValueError for a spec that cannot work."""
    from transformers.pipelines import SUPPORTED_TASKS, TASK_ALIASES

    task, sep, model = spec.partition(":")
    if sep and not Path(spec).exists() and (task in SUPPORTED_TASKS or task in TASK_ALIASES):
        if not model:
            raise ValueError(f"reward pipeline spec '{spec}' names no model; expected 'task:model'")
        return task, model
    if sep and not Path(spec).exists():
        raise ValueError(f"unknown reward spec '{spec}': '{task}' is not a transformers pipeline task (expected "
                         f"'task:model' with a task such as sentiment-analysis, or a sequence-classification model)")
    if Path(spec).exists() and not (Path(spec) / "config.json").exists():
        raise ValueError(f"reward model '{spec}' is not a model directory (no config.json in it)")
    if not Path(spec).exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise ValueError(f"reward model '{spec}' does not exist: expected a model directory, a Hub id or 'task:model'")
    return None, spec


def load_reward_function(spec: str, device, max_length: int = 1024) -> Callable[[list, list], list[float]]:
    """A callable (prompts, responses) -> list of float scores, from a reward spec (see parse_reward_spec).

    A sequence-classification model scores prompt + response the way reward.py trained it: message-list prompts
    rendered with the chat template and the response as the assistant turn, string prompts concatenated; EOS
    appended, the start kept when too long, right padding; the score read where plain transformers reads it. A
    pipeline (such as sentiment-analysis:lvwerra/distilbert-imdb, TRL's PPO example) scores prompt + response,
    and the reward is the raw score (logit) of the pipeline's last label, e.g. POSITIVE for a sentiment classifier.
    """
    task, name = parse_reward_spec(spec)
    if task is not None:
        from transformers import pipeline

        pipe = pipeline(task, model=name, device=device)

        def score_with_pipeline(prompts: list, responses: list[str]) -> list[float]:
            texts = [(format_query(p, pipe.tokenizer)[0] if isinstance(p, list) else p) + r
                     for p, r in zip(prompts, responses)]
            outputs = pipe(texts, top_k=None, function_to_apply="none", batch_size=16, truncation=True)
            last = pipe.model.config.num_labels - 1
            label = pipe.model.config.id2label[last]
            return [next(o["score"] for o in output if o["label"] == label) for output in outputs]

        return score_with_pipeline
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForSequenceClassification.from_pretrained(name).eval().requires_grad_(False).to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # transformers finds the last real token through config.pad_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
    max_length = min(max_length, tokenizer.model_max_length)

    @torch.no_grad()
    def score_with_model(prompts: list, responses: list[str]) -> list[float]:
        sequences = []
        for prompt, response in zip(prompts, responses):
            if isinstance(prompt, list):
                text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}],
                                                     tokenize=False)
                ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            else:
                ids = list(tokenizer(prompt + response)["input_ids"])
            if not ids or ids[-1] != tokenizer.eos_token_id:
                ids.append(tokenizer.eos_token_id)
            sequences.append(ids[:max_length])
        scores = []
        for start in range(0, len(sequences), 64):
            chunk = sequences[start : start + 64]
            longest = max(len(ids) for ids in chunk)
            input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (longest - len(ids)) for ids in chunk])
            attention_mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in chunk])
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            scores += logits[:, 0].float().tolist()
        return scores

    return score_with_model


class LengthSampler:
    """TRL's LengthSampler (trl.core): a uniformly random integer in [min_value, max_value), from numpy's global RNG."""

    def __init__(self, min_value: int, max_value: int):
        self.values = list(range(min_value, max_value))

    def __call__(self) -> int:
        return int(np.random.choice(self.values))


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
