"""best_of_n.py: the seed's BestOfNSampler API, batching that changes nothing but speed, checked scores, the
command line's comparison of n = 1 ... sample_size whose chosen completions sft.py trains on, and a previous run that
is never overwritten (issue 24)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (ASSETS, TWO_PROCESSES, assert_each_fails_with_one_line, error_line, read_metrics,
                      run_main_in_process, run_ok, run_script)
from test_runs import snapshot
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from best_of_n import Args, BestOfNSampler, LengthSampler, as_query_list, load_reward_function, main

TINY = ASSETS / "tiny-gpt2"


@pytest.fixture(scope="module")
def tiny():
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(TINY).eval(), tokenizer


def queries_of(tokenizer, texts):
    return [torch.tensor(tokenizer(text)["input_ids"]) for text in texts]


PROMPTS = ["Review of Broken Letter:", "Review of Paper Orchard: The plot", "Review of X:", "Review of Quiet Road: I"]


def great_count(texts):
    """A deterministic scorer: how often a text says 'great', with the length as a tie-breaker."""
    return [text.count("great") + len(text) / 1000 for text in texts]


class Recorder:
    """A scorer that remembers every batch of texts it was asked to score."""

    def __init__(self, score=great_count):
        self.calls, self.score = [], score

    def __call__(self, texts):
        self.calls.append(list(texts))
        return self.score(texts)


def test_returns_the_n_candidates_best_of_each_querys_samples_best_first(tiny):
    model, tokenizer = tiny
    scorer = Recorder()
    sampler = BestOfNSampler(model, tokenizer, scorer, length_sampler=LengthSampler(6, 12), sample_size=6, seed=0,
                             n_candidates=2)
    result = sampler.generate(queries_of(tokenizer, PROMPTS))
    assert len(scorer.calls) == 1 and len(scorer.calls[0]) == 6 * len(PROMPTS)  # one batched scoring call
    assert [len(texts) for texts in result] == [2] * len(PROMPTS)
    for i, (prompt, texts) in enumerate(zip(PROMPTS, result)):
        samples = scorer.calls[0][6 * i : 6 * (i + 1)]  # each query's samples are contiguous
        assert all(sample.startswith(prompt) for sample in samples)  # texts are query + response, as the seed's
        assert texts == sorted(samples, key=lambda t: -great_count([t])[0])[:2]
        assert great_count(texts)[0] >= great_count(texts)[1]


def test_the_same_seed_gives_the_same_texts_and_another_seed_others(tiny):
    model, tokenizer = tiny
    queries = queries_of(tokenizer, PROMPTS)

    def run(seed):
        return BestOfNSampler(model, tokenizer, great_count, LengthSampler(8, 16), sample_size=4, seed=seed,
                              n_candidates=4).generate(queries)

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_every_query_form_of_the_seed_is_accepted(tiny):
    model, tokenizer = tiny
    ids = [tokenizer(text)["input_ids"] for text in ["Review of Broken Letter:", "Review of Paper Letter:"]]
    assert len(ids[0]) == len(ids[1])

    def run(query):
        return BestOfNSampler(model, tokenizer, great_count, LengthSampler(6, 10), sample_size=3, seed=1,
                              n_candidates=3).generate(query)

    both = run([torch.tensor(q) for q in ids])
    assert run(ids) == both  # a list of lists of ints
    assert run(torch.tensor(ids)) == both  # a 2-D tensor, one query per row
    assert run([torch.tensor(q)[None] for q in ids]) == both  # (1, L) tensors, as the seed reshapes them
    single = run(torch.tensor(ids[0]))
    assert run(ids[0]) == single and len(single) == 1  # one query: a 1-D tensor or a list of ints


def seed_loop(model, tokenizer, queries, scorer, length_sampler, sample_size, n_candidates, **generation_kwargs):
    """The seed's generate loop (TRL 0.8.6 BestOfNSampler.generate), query by query, rewritten for the test."""
    result = []
    for query in queries:
        repeated = query.reshape(1, -1).repeat((sample_size, 1))
        output = model.generate(repeated, attention_mask=torch.ones_like(repeated),
                                max_new_tokens=length_sampler(), **generation_kwargs).squeeze()
        texts = tokenizer.batch_decode(output, skip_special_tokens=True)
        scores = torch.tensor(scorer(texts))
        result.append([texts[i] for i in scores.topk(n_candidates).indices])
    return result


def test_batch_size_1_is_the_seeds_loop_and_batching_changes_nothing_greedy(tiny):
    """Sampling draws the same noise as the seed's per-query loop when the sampler also goes query by query; batched
    across queries the draws differ, so the same texts are checked under greedy decoding, where padding alone could
    change them (queries of different lengths, left-padded, with per-query token budgets)."""
    model, tokenizer = tiny
    queries = queries_of(tokenizer, PROMPTS)
    kwargs = {"do_sample": True, "top_k": 0, "top_p": 1.0, "pad_token_id": tokenizer.eos_token_id}
    np.random.seed(0), torch.manual_seed(0)
    expected = seed_loop(model, tokenizer, queries, great_count, LengthSampler(6, 14), 4, 1, **kwargs)
    np.random.seed(0), torch.manual_seed(0)
    ours = BestOfNSampler(model, tokenizer, great_count, LengthSampler(6, 14), sample_size=4,
                          batch_size=1).generate(queries, **kwargs)
    assert ours == expected

    greedy = {"do_sample": False}
    np.random.seed(5)
    one_by_one = BestOfNSampler(model, tokenizer, great_count, LengthSampler(3, 20), sample_size=2,
                                batch_size=1).generate(queries, **greedy)
    np.random.seed(5)
    batched = BestOfNSampler(model, tokenizer, great_count, LengthSampler(3, 20), sample_size=2,
                             batch_size=16).generate(queries, **greedy)
    assert batched == one_by_one
    np.random.seed(5)
    lengths = [LengthSampler(3, 20)() for _ in queries]
    for query, length, texts in zip(queries, lengths, batched):  # each query kept its own budget
        generated = model.generate(query[None], attention_mask=torch.ones_like(query[None]), max_new_tokens=length,
                                   do_sample=False,
                                   pad_token_id=tokenizer.eos_token_id)
        assert texts[0] == tokenizer.decode(generated[0], skip_special_tokens=True)


def test_generation_config_is_used_unless_generate_overrides_it(tiny):
    model, tokenizer = tiny
    queries = queries_of(tokenizer, PROMPTS[:2])
    scorer = Recorder()
    greedy = GenerationConfig(do_sample=False, max_new_tokens=7, pad_token_id=tokenizer.eos_token_id)
    sampler = BestOfNSampler(model, tokenizer, scorer, sample_size=3, seed=0, generation_config=greedy)
    sampler.generate(queries)  # greedy: the three samples of a query are one text, 7 new tokens long
    for i, query in enumerate(queries):
        samples = scorer.calls[-1][3 * i : 3 * i + 3]
        assert len(set(samples)) == 1
        assert len(tokenizer(samples[0])["input_ids"]) <= len(query) + 7
    sampler.generate(queries, do_sample=True, top_k=0)  # overridden: sampling
    assert all(len(set(scorer.calls[-1][3 * i : 3 * i + 3])) > 1 for i in range(len(queries)))
    with pytest.raises(ValueError, match="no response length"):
        BestOfNSampler(model, tokenizer, great_count).generate(queries)


def test_a_value_head_model_samples_too(tiny):
    from ppo import AutoModelForCausalLMWithValueHead

    _, tokenizer = tiny
    model = AutoModelForCausalLMWithValueHead.from_pretrained(TINY)
    result = BestOfNSampler(model, tokenizer, great_count, LengthSampler(4, 8), sample_size=2,
                            seed=0).generate(queries_of(tokenizer, PROMPTS))
    assert len(result) == len(PROMPTS) and all(len(texts) == 1 for texts in result)


def test_bad_input_to_the_api_gives_a_clear_error(tiny):
    model, tokenizer = tiny
    queries = queries_of(tokenizer, PROMPTS[:2])
    with pytest.raises(ValueError, match=r"n_candidates \(5\) cannot exceed sample_size \(4\)"):
        BestOfNSampler(model, tokenizer, great_count, sample_size=4, n_candidates=5)
    with pytest.raises(ValueError, match="must have a transformers-style generate"):
        BestOfNSampler(object(), tokenizer, great_count)
    cases = [(lambda texts: [1.0] * (len(texts) - 1), "returned 7 scores .* for 8 texts"),
             (lambda texts: [float("nan")] + [0.0] * (len(texts) - 1), "non-finite scores"),
             (lambda texts: "high", "one number per text")]
    for scorer, message in cases:
        with pytest.raises(ValueError, match=message):
            BestOfNSampler(model, tokenizer, scorer, LengthSampler(2, 4), sample_size=4).generate(queries)
    sampler = BestOfNSampler(model, tokenizer, great_count, LengthSampler(2, 4))
    with pytest.raises(ValueError, match=r"queries \[1\] have no tokens"):
        sampler.generate([queries[0], torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match="non-empty list"):
        sampler.generate([])
    with pytest.raises(ValueError, match="must be 1-D"):
        as_query_list(torch.zeros(1, 2, 3, dtype=torch.long))


@pytest.mark.slow
def test_command_line_best_of_8_beats_best_of_1_and_its_completions_train_with_sft(tmp_path):
    out = tmp_path / "bon"
    result = run_ok("best_of_n.py", "--output_dir", out, "--num_prompts", 48)
    results = json.loads((out / "results.json").read_text())
    rows = {row["n"]: row for row in results["rows"]}
    assert sorted(rows) == [1, 2, 4, 8] and results["num_prompts"] == 48
    assert "mean reward" in result.stdout and "s / query" in result.stdout
    assert "run: 1 process(es) x 16 prompts per generate call x 8 samples" in result.stdout  # the run's shape
    standard_error = rows[1]["std_reward"] / math.sqrt(48)
    assert rows[8]["mean_reward"] > rows[1]["mean_reward"] + 4 * standard_error, rows  # about -2 -> 10
    assert rows[8]["mean_reward"] > rows[4]["mean_reward"] > rows[1]["mean_reward"]
    assert (out / "best_of_n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [row["n"] for row in read_metrics(out)] == [1, 2, 4, 8]

    # the samples' rewards are the reward rule's scores of prompt + response
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    best = [s for s in samples if s["n"] == 8][:6]
    reward_fn = load_reward_function(str(ASSETS / "tiny-reward"), "cpu")
    assert reward_fn([s["prompt"] for s in best], [s["response"] for s in best]) == pytest.approx(
        [s["reward"] for s in best], abs=1e-4)

    # the chosen completions are a prompt/completion dataset that sft.py trains on as it is
    train = [json.loads(line) for line in (out / "completions" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (out / "completions" / "test.jsonl").read_text().splitlines()]
    assert (len(train), len(test)) == (44, 4) and set(train[0]) == {"prompt", "completion", "score"}
    assert sum(row["score"] for row in train) / len(train) == pytest.approx(
        sum(row["reward"] for row in samples if row["n"] == 8) / 48, abs=2.0)
    run_ok("sft.py", "--dataset_name", out / "completions", "--output_dir", tmp_path / "sft", "--max_steps", 5,
           "--per_device_train_batch_size", 8, "--eval_steps", 5)
    eval_losses = [row["eval_loss"] for row in read_metrics(tmp_path / "sft") if "eval_loss" in row]
    assert eval_losses[-1] < eval_losses[0], eval_losses


@pytest.mark.slow
def test_two_processes_share_the_prompts_and_gather_every_result(tmp_path):
    out = tmp_path / "bon"
    result = run_ok("best_of_n.py", "--output_dir", out, "--num_prompts", 10, "--sample_size", 4,
                    launcher=TWO_PROCESSES)
    assert "run: 2 process(es)" in result.stdout
    prompts = [json.loads(line)["prompt"] for line in (ASSETS / "data" / "prompts" / "test.jsonl").read_text()
               .splitlines()[:10]]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples if s["n"] == 4] == prompts  # each prompt once, in order
    assert [row["n"] for row in json.loads((out / "results.json").read_text())["rows"]] == [1, 2, 4]
    train = (out / "completions" / "train.jsonl").read_text().splitlines()
    test = (out / "completions" / "test.jsonl").read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in train + test] == prompts


@pytest.mark.slow
def test_command_line_bad_input_gives_one_clear_line(tmp_path, monkeypatch):
    (tmp_path / "no_prompt.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "empty_prompt.jsonl").write_text('{"prompt": "Review of X:"}\n{"prompt": "  "}\n')
    cases = [
        (["--sample_size", 2, "--n_candidates", 3], "--n_candidates 3 cannot exceed --sample_size 2"),
        (["--dataset_name", tmp_path / "no_prompt.jsonl", "--dataset_split", "train"],
         "expected a 'prompt' or 'query' column"),
        (["--dataset_name", tmp_path / "empty_prompt.jsonl", "--dataset_split", "train"],
         "prompt 1 of split 'train' is empty"),
        (["--reward_model", tmp_path / "missing"], "does not exist"),
    ]
    assert_each_fails_with_one_line(monkeypatch, "best_of_n.py", cases, tmp_path / "out")
    # and as a user sees it: a non-zero exit whose last line is the message
    line = error_line(run_script("best_of_n.py", "--sample_size", 2, "--n_candidates", 3))
    assert line == "best_of_n.py: error: --n_candidates 3 cannot exceed --sample_size 2 (the best 3 of 2 samples do " \
                   "not exist)"


def test_help_shows_the_flags_as_users_type_them_and_both_spellings_parse(monkeypatch, capsys, tmp_path):
    assert run_main_in_process(monkeypatch, "best_of_n.py", "--help") == "0"
    text = capsys.readouterr().out
    for flag in ["--sample_size", "--n_candidates", "--output_min_length", "--output_max_length", "--reward_model",
                 "--dataset_name", "--model_name_or_path", "--output_dir"]:
        assert flag in text, flag
    assert "--sample-size" not in text
    line = run_main_in_process(monkeypatch, "best_of_n.py", "--sample-size", 2, "--n_candidates", 3)
    assert "--n_candidates 3 cannot exceed --sample_size 2" in line, line


def test_a_named_output_dir_with_a_previous_run_and_bad_inputs_are_one_line_that_leaves_it(monkeypatch, tmp_path):
    """Before any model loads: a named output_dir that holds a run, a missing model, an output_dir that is a file;
    each one line, nothing written, every file of the previous run as it was."""
    previous = tmp_path / "out"
    (previous / "completions").mkdir(parents=True)
    (previous / "completions" / "train.jsonl").write_text('{"prompt": "a", "completion": "b", "score": 1.0}\n')
    (previous / "metrics.jsonl").write_text('{"step": 1, "n": 1}\n')
    (previous / "results.json").write_text("{}")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    before = snapshot(tmp_path)
    line = run_main_in_process(monkeypatch, "best_of_n.py", "--output_dir", previous)
    assert line == (f"best_of_n.py: error: --output_dir {previous} holds a previous run (completions, metrics.jsonl, "
                    "results.json); pass --overwrite_output_dir to replace it, or another --output_dir"), line
    new = tmp_path / "new"
    for args, message in [(["--model_name_or_path", tmp_path / "missing", "--output_dir", new],
                           f"--model_name_or_path {tmp_path / 'missing'} does not exist: expected a model directory "
                           "or a Hub id"),
                          (["--output_dir", a_file], f"--output_dir {a_file} is a file; expected a directory")]:
        line = run_main_in_process(monkeypatch, "best_of_n.py", *args)
        assert line.startswith(f"best_of_n.py: error: {message}") and "\n" not in line, line
    assert not new.exists() and snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_repeated_default_run_keeps_the_first_run_and_overwrite_replaces_it(monkeypatch, tmp_path, capsys):
    """`python best_of_n.py` twice from one directory: the second run moves the first beside it, byte for byte;
    --overwrite_output_dir replaces a named run. metrics.jsonl is strict JSON."""
    monkeypatch.chdir(tmp_path)
    small = {"num_prompts": 4, "sample_size": 2, "output_max_length": 10}
    main(Args(**small))
    first = snapshot(tmp_path / "runs" / "best_of_n")
    assert {"metrics.jsonl", "samples.jsonl", "results.json", "best_of_n.png", "completions/train.jsonl"} <= set(first)
    for line in first["metrics.jsonl"].decode().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
    capsys.readouterr()
    main(Args(**small, seed=7))
    (kept,) = [path for path in (tmp_path / "runs").iterdir() if path.name.startswith("best_of_n-")]
    assert f"held a previous run: kept as {Path('runs') / kept.name}" in capsys.readouterr().out
    assert snapshot(kept) == first and snapshot(tmp_path / "runs" / "best_of_n") != first
    main(Args(**small, seed=7, output_dir=str(kept), overwrite_output_dir=True))
    assert f"--overwrite_output_dir: removed the previous run in {kept}" in capsys.readouterr().out
    assert json.loads((kept / "args.json").read_text())["seed"] == 7 and len(list((tmp_path / "runs").iterdir())) == 2
