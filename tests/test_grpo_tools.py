"""grpo.py's multi-turn rollout, piece by piece, with a scripted policy whose turns are written in advance: the tokens
trained on are the tokens sampled (token-in/token-out), the tool turn's tokens are the template's and masked, a
completion holds an EOS per turn, the budget drops an overflowing tool result, max_tool_calling_iterations stops the
loop, failing tools are results; the template checks, the tool and environment loaders (one line each), that tool tokens
carry no gradient, and that chunked log-probs (--chunk_size) are the plain path's. Then whole runs: the tool world
learns and what it learns depends on the tool; standalone tools, an observation and get_reward reach the run. rloo.py's
copies of these functions are the same code (tests/test_rloo.py checks it)."""

import json

import pytest
import torch
from conftest import (ASSETS, TOOL_WORLD, TWO_PROCESSES, metric_series, read_metrics, run_main_in_process, run_ok,
                      tool_world_scores)
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo import (Args, Rollout, call_tools, check_tool_template, collate_rollouts, completion_log_probs,
                  environment_tools, format_query, grpo_loss, load_environment_factory, parse_turn, reset_environments,
                  roll_out, rollout_metrics, tool_schema, tool_suffix_ids)
from tiny_tools import MovieRatings

TOOLS = ASSETS / "tiny-tools"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOOLS)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class Scripted:
    """A stand-in policy: generate() appends to each row the next turn scripted for the query the row starts with,
    padded as transformers pads finished rows (with the pad id after EOS), and records each call's batch size."""

    def __init__(self, turns: dict[tuple, list[list[int]]]):
        self.turns = {query: list(queue) for query, queue in turns.items()}
        self.batch_sizes = []

    def parameters(self):
        yield torch.zeros(1)

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **_):
        new = []
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            context = tuple(token for token, keep in zip(row, mask) if keep)
            query = next(query for query in self.turns if context[: len(query)] == query)
            new.append(self.turns[query].pop(0)[:max_new_tokens])
        self.batch_sizes.append(len(new))
        width = max(len(turn) for turn in new)
        return torch.cat([input_ids, torch.tensor([turn + [pad_token_id] * (width - len(turn)) for turn in new])], 1)


def episode(tokenizer, title="Golden River", question="How was {}?", environment_class=MovieRatings):
    """(query ids, environment, its tools, the schemas) for one question of the tool world."""
    environment = environment_class()
    environment.reset(title=title)
    environment.rating = "dull"
    tools = environment_tools(environment)
    schemas = [tool_schema("--tools", "test", name, tool) for name, tool in tools.items()]
    prompt = [{"role": "user", "content": question.format(title)}]
    return ids(tokenizer, format_query(prompt, tokenizer, schemas)[0]), environment, tools, schemas


def test_a_tool_rollout_trains_on_exactly_the_sampled_tokens_and_masks_the_tool_turn(tokenizer):
    query, environment, tools, schemas = episode(tokenizer)
    call = ids(tokenizer, "<call>lookup\ntitle: Golden River</call><|end|>")
    # " dull" spelled letter by letter: decoding and encoding it again would give other ids (" dull" is one token),
    # so only token-in/token-out keeps them
    answer = tokenizer.convert_tokens_to_ids(["Ġd", "u", "l", "l"]) + [tokenizer.eos_token_id]
    assert ids(tokenizer, tokenizer.decode(answer)) != answer
    model = Scripted({tuple(query): [call, answer]})
    [rollout] = roll_out(model, tokenizer, [query], 64, seed=0, tools=[tools], tool_schemas=schemas, parse=True)

    suffix = ids(tokenizer, "<|tool|> dull<|end|><|assistant|>")  # the tool result and the next assistant header
    assert tool_suffix_ids(tokenizer, [{"role": "tool", "name": "lookup", "content": "dull"}]) == suffix
    assert rollout.completion == call + suffix + answer
    assert rollout.tool_mask == [1] * len(call) + [0] * len(suffix) + [1] * len(answer)
    assert rollout.completion.count(tokenizer.eos_token_id) == 3  # the call's, the tool turn's, the answer's
    assert rollout.messages == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "lookup", "arguments": {"title": "Golden River"}}}]},
        {"role": "tool", "name": "lookup", "content": "dull"},
        {"role": "assistant", "content": "dull"}]
    assert (rollout.calls, rollout.failures, rollout.ended) == (1, 0, True) and environment.told == "dull"
    assert model.batch_sizes == [1, 1]

    # the training tensors: the sampled ids where they were sampled; the mask is the tool mask, shifted by one (the
    # logit at t scores token t + 1), and 0 on the prompt and the padding
    other = Rollout(completion=ids(tokenizer, " great<|end|>"), tool_mask=[1, 1], messages=[], ended=True)
    batch = collate_rollouts([query, query], [rollout, other], tokenizer.pad_token_id, [True, True])
    start = len(query)
    assert batch["input_ids"][0, start:].tolist() == rollout.completion
    assert batch["completion_mask"][0, start - 1 :].tolist() == rollout.tool_mask
    assert batch["completion_mask"][1].tolist() == [0] * (start - 1) + [1, 1] + [0] * (len(rollout.completion) - 2)
    assert batch["completion_mask"][0, : start - 1].sum() == 0
    masked_out = collate_rollouts([query], [rollout], tokenizer.pad_token_id, [False])["completion_mask"]
    assert masked_out.sum() == 0


def test_without_tools_a_rollout_is_one_turn_even_when_it_writes_a_call(tokenizer):
    query, _, _, schemas = episode(tokenizer)
    call = ids(tokenizer, "<call>lookup\ntitle: Golden River</call><|end|>")
    model = Scripted({tuple(query): [call]})
    [rollout] = roll_out(model, tokenizer, [query], 64, seed=0, tool_schemas=schemas, parse=True)
    assert rollout.completion == call and rollout.tool_mask == [1] * len(call) and rollout.calls == 0
    assert rollout.messages[0]["tool_calls"][0]["function"]["name"] == "lookup" and len(rollout.messages) == 1
    [plain] = roll_out(Scripted({tuple(query): [call]}), tokenizer, [query], 64, seed=0)  # no parsing: the text
    assert plain.messages == [{"role": "assistant", "content": "lookup\ntitle: Golden River"}]


def test_the_budget_covers_tool_tokens_drops_an_overflowing_result_and_cuts_the_last_turn(tokenizer):
    query, environment, tools, schemas = episode(tokenizer)
    call = ids(tokenizer, "<call>lookup\ntitle: Golden River</call><|end|>")
    suffix = ids(tokenizer, "<|tool|> dull<|end|><|assistant|>")
    answer = ids(tokenizer, " dull<|end|>")
    # one token short of the tool turn: the result is dropped, the rollout ends with its call (counted as made)
    model = Scripted({tuple(query): [call, answer]})
    [dropped] = roll_out(model, tokenizer, [query], len(call) + len(suffix) - 1, seed=0, tools=[tools],
                         tool_schemas=schemas, parse=True)
    assert dropped.completion == call and len(dropped.messages) == 1 and dropped.calls == 1 and dropped.ended
    assert model.batch_sizes == [1]
    # room for the tool turn and one more token: the answer is cut, the rollout is truncated (no final EOS)
    model = Scripted({tuple(query): [call, answer]})
    [cut] = roll_out(model, tokenizer, [query], len(call) + len(suffix) + 1, seed=0, tools=[tools],
                     tool_schemas=schemas, parse=True)
    assert cut.completion == call + suffix + answer[:1] and not cut.ended
    assert cut.tool_mask == [1] * len(call) + [0] * len(suffix) + [1]
    # the model's own length limit drops the tool turn as well
    model = Scripted({tuple(query): [call, answer]})
    [short] = roll_out(model, tokenizer, [query], 64, seed=0, tools=[tools], tool_schemas=schemas, parse=True,
                       max_length=len(query) + len(call) + len(suffix))
    assert short.completion == call


@pytest.mark.parametrize("limit, turns", [(None, 4), (2, 3), (0, 1)])
def test_max_tool_calling_iterations_bounds_the_rounds_of_calls(tokenizer, limit, turns):
    query, environment, tools, schemas = episode(tokenizer)
    call = ids(tokenizer, "<call>lookup\ntitle: Golden River</call><|end|>")
    model = Scripted({tuple(query): [call, call, call, ids(tokenizer, " dull<|end|>")]})
    [rollout] = roll_out(model, tokenizer, [query], 200, seed=0, tools=[tools], tool_schemas=schemas, parse=True,
                         max_tool_calling_iterations=limit)
    assert len([m for m in rollout.messages if m["role"] == "assistant"]) == turns
    assert rollout.calls == environment.calls == min(turns - 1, 3)
    assert rollout.completion.count(tokenizer.eos_token_id) == 2 * turns - 1  # a turn's EOS, a tool turn's EOS


def test_rollouts_of_a_batch_share_one_generate_call_per_turn(tokenizer):
    first, env_a, tools_a, schemas = episode(tokenizer, "Golden River")
    second, env_b, tools_b, _ = episode(tokenizer, "Paper Mirror", "Is {} worth seeing?")
    call = ids(tokenizer, "<call>lookup\ntitle: Paper Mirror</call><|end|>")
    model = Scripted({tuple(first): [ids(tokenizer, " great<|end|>")],
                      tuple(second): [call, ids(tokenizer, " dull<|end|>")]})
    a, b = roll_out(model, tokenizer, [first, second], 64, seed=0, tools=[tools_a, tools_b], tool_schemas=schemas,
                    parse=True)
    assert model.batch_sizes == [2, 1]  # the second turn is sampled only for the rollout that called
    assert a.calls == 0 and a.messages == [{"role": "assistant", "content": "great"}]
    assert b.calls == 1 and env_b.told == "dull" and env_a.told is None  # each rollout calls its own environment


def test_failing_tools_become_error_results_and_are_counted():
    class Unprintable:
        def __str__(self):
            raise RuntimeError("no")

    async def later(x: int) -> int:
        return x + 1

    tools = {"boom": lambda: 1 / 0, "add": lambda a, b: a + b, "weird": lambda: Unprintable(), "later": later}
    calls = [{"type": "function", "function": {"name": name, "arguments": arguments}}
             for name, arguments in [("nope", {}), ("boom", {}), ("add", {"a": 1}), ("weird", {}), ("add", "1,2"),
                                     ("add", {"a": 1, "b": 2}), ("later", {"x": 1})]]
    messages, failures = call_tools(calls, tools)
    contents = [message["content"] for message in messages]
    assert failures == 5 and [message["name"] for message in messages] == ["nope", "boom", "add", "weird", "add",
                                                                             "add", "later"]
    assert contents[0] == "{'error': 'Tool nope not found.'}" and contents[1] == "{'error': 'division by zero'}"
    assert "missing 1 required positional argument" in contents[2] and contents[3] == "{'error': 'no'}"
    assert "expected a mapping" in contents[4] and contents[5:] == ["3", "2"]


def test_a_tool_past_the_timeout_is_an_error_result_and_the_rollout_goes_on():
    import time

    def slow(seconds: float) -> str:
        time.sleep(seconds)
        return "done"

    calls = [{"type": "function", "function": {"name": "slow", "arguments": {"seconds": seconds}}}
             for seconds in (5.0, 0.0)]
    start = time.time()
    messages, failures = call_tools(calls, {"slow": slow, "boom": lambda: 1 / 0}, timeout=0.2)
    assert time.time() - start < 2 and failures == 1
    assert [m["content"] for m in messages] == ["{'error': 'no result after 0.2 s'}", "done"]
    boom = [{"type": "function", "function": {"name": "boom", "arguments": {}}}]
    assert call_tools(boom, {"boom": lambda: 1 / 0}, timeout=1.0) == (
        [{"role": "tool", "name": "boom", "content": "{'error': 'division by zero'}"}], 1)  # raised in the thread


def test_a_turn_without_a_parsable_call_is_plain_text(tokenizer):
    prefix = ids(tokenizer, "<|user|> hi<|end|><|assistant|>")
    # no tool name after <call>: the response template finds no call, and the turn is its text
    assert parse_turn(tokenizer, ids(tokenizer, "<call></call> hi<|end|>"), prefix, None) == {
        "role": "assistant", "content": "<call></call> hi"}
    assert parse_turn(tokenizer, ids(tokenizer, " great<|end|>"), prefix, None) == {"role": "assistant",
                                                                                    "content": "great"}
    # a call the parser fails on (a JSON template given broken JSON): the decoded text, special tokens dropped
    strict = AutoTokenizer.from_pretrained(TOOLS)
    strict.response_template = {"defaults": {"role": "assistant"}, "start_anchor": "<|assistant|>", "fields": {
        "tool_calls": {"open": "<call>", "close": "</call>", "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close": "<|end|>", "content": "text"}}}
    assert parse_turn(strict, ids(tokenizer, '<call>{"name": "lookup", "argu</call><|end|>'), prefix, None) == {
        "role": "assistant", "content": '{"name": "lookup", "argu'}
    assert parse_turn(strict, ids(tokenizer, '<call>{"name": "lookup"}</call><|end|>'), prefix, None) == {
        "role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "lookup", "arguments": {}}}]}


def test_the_chat_template_checks(tokenizer, tmp_path):
    check_tool_template(tokenizer)
    plain = AutoTokenizer.from_pretrained(ASSETS / "tiny-gpt2")  # its template writes the content only
    with pytest.raises(ValueError, match="cannot render tool calls .* without tool_name_a8f3, arg_key_b9d4"):
        check_tool_template(plain)
    shifty = AutoTokenizer.from_pretrained(TOOLS)  # marks the last message: a tool turn changes what came before
    shifty.chat_template = tokenizer.chat_template.replace("{{ eos_token }}{%- else %}",
                                                           "{{ eos_token }}{% if loop.last %}!{% endif %}{%- else %}")
    with pytest.raises(ValueError, match="not prefix-preserving"):
        check_tool_template(shifty)
    unparsed = AutoTokenizer.from_pretrained(TOOLS)
    unparsed.response_template = None
    with pytest.raises(ValueError, match="need a tokenizer with a response_template"):
        check_tool_template(unparsed)


def test_tools_and_environments_are_checked_with_one_line_each(tmp_path):
    (tmp_path / "envs.py").write_text(
        "class NoReset:\n    def look(self, x: int) -> int:\n        '''Look.\n\n        Args:\n"
        "            x: a number\n        '''\n        return x\n\n"
        "class Broken:\n    def __init__(self):\n        raise OSError('no database')\n\n"
        "class Undocumented:\n    def reset(self, **row):\n        pass\n\n    def look(self, x: int) -> int:\n"
        "        return x\n")
    with pytest.raises(ValueError, match="NoReset has no reset method"):
        load_environment_factory(f"{tmp_path / 'envs.py'}:NoReset")
    with pytest.raises(ValueError, match=r"Broken\(\) raised OSError: no database"):
        load_environment_factory(f"{tmp_path / 'envs.py'}:Broken")
    with pytest.raises(ValueError, match="tool look cannot be described to the model: .*no docstring"):
        load_environment_factory(f"{tmp_path / 'envs.py'}:Undocumented")
    with pytest.raises(ValueError, match="defines no class Missing"):
        load_environment_factory(f"{tmp_path / 'envs.py'}:Missing")
    name, factory, probe = load_environment_factory(f"{ASSETS / 'tiny_tools.py'}:LyingRatings")
    assert name == type(probe).__name__ == "LyingRatings" and list(environment_tools(probe)) == ["lookup"]

    def untyped(x):
        """Untyped.

        Args:
            x: a number
        """

    def unexplained(x: int):
        """No line for x."""

    with pytest.raises(ValueError, match="tool untyped cannot be described to the model: Argument x is missing a type"):
        tool_schema("--tools", "f.py:untyped", "untyped", untyped)
    with pytest.raises(ValueError, match="tool unexplained cannot be described .* no description for the argument"):
        tool_schema("--tools", "f.py:unexplained", "unexplained", unexplained)


def test_reset_adds_a_returned_observation_to_the_prompt_and_a_failing_reset_is_one_line():
    class Greeter:
        def reset(self, name, **row):
            return f" (you are talking to {name})"

    class Failing:
        def reset(self, **row):
            raise KeyError("name")

    prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    [started] = reset_environments([Greeter()], [{"name": "Ada"}], [prompt])
    assert started[-1]["content"] == "hi (you are talking to Ada)" and prompt[-1]["content"] == "hi"
    with pytest.raises(ValueError, match=r"Failing.reset raised KeyError: 'name' \(test_grpo_tools.py, line"):
        reset_environments([Failing()], [{}], [prompt])


def test_rollout_metrics_count_sampled_tokens_calls_and_failures():
    rewards = torch.tensor([[1.0], [0.0], [1.0], [1.0]])
    metrics = rollout_metrics(rewards, torch.tensor([1.0]), ["correct"], 2,
                              [(5, True, 1, 0), (3, True, 0, 0), (7, False, 2, 1), (4, True, 1, 1)], tools=True)
    assert metrics["completions/mean_length"] == 4.75 and metrics["completions/clipped_ratio"] == 0.25
    assert metrics["tools/call_frequency"] == 1.0 and metrics["tools/failure_frequency"] == 0.5
    assert metrics["frac_reward_zero_std"] == 0.5 and "tools/call_frequency" not in rollout_metrics(
        rewards, torch.tensor([1.0]), ["correct"], 2, [(5, True, 0, 0)] * 4)


class NoAccelerator:
    """What completion_log_probs needs of an Accelerator, on one CPU process."""

    @staticmethod
    def autocast():
        return torch.autocast("cpu", enabled=False)

    @staticmethod
    def unwrap_model(module):
        return module


def test_tool_tokens_carry_no_gradient_and_changing_their_log_probs_changes_nothing(tokenizer):
    """The tool result and the header after it are in the input (the model attends to them) but not in the mask: the
    loss's gradient with respect to their log-probs is 0, and other old / reference log-probs there change nothing
    (the loss, the KL metric), while the sampled tokens' gradients are not 0."""
    model = AutoModelForCausalLM.from_pretrained(TOOLS)
    query, _, _, _ = episode(tokenizer)
    call = ids(tokenizer, "<call>lookup\ntitle: Golden River</call><|end|>")
    suffix = ids(tokenizer, "<|tool|> dull<|end|><|assistant|>")
    rollout = Rollout(call + suffix + ids(tokenizer, " dull<|end|>"), [1] * len(call) + [0] * len(suffix) + [1, 1], [])
    batch = collate_rollouts([query, query], [rollout, rollout], tokenizer.pad_token_id, [True, True])
    logps, _ = completion_log_probs(model, batch, 1.0, NoAccelerator())
    logps = logps.detach().requires_grad_()
    mask = batch["completion_mask"]
    tool_positions = torch.zeros_like(mask, dtype=torch.bool)
    tool_positions[:, len(query) - 1 + len(call) : len(query) - 1 + len(call) + len(suffix)] = True
    assert mask[tool_positions].sum() == 0 and mask.sum() == 2 * (len(call) + 2)
    old, ref = logps.detach() - 0.1, logps.detach() + 0.2
    loss, metrics = grpo_loss(logps, old, ref, torch.tensor([1.0, -1.0]), mask, Args(beta=0.1))
    loss.backward()
    assert (logps.grad[tool_positions] == 0).all() and (logps.grad[mask.bool()] != 0).all()
    noisy_old, noisy_ref = old.clone(), ref.clone()
    noisy_old[tool_positions] += 5.0
    noisy_ref[tool_positions] -= 3.0
    loss_again, metrics_again = grpo_loss(logps, noisy_old, noisy_ref, torch.tensor([1.0, -1.0]), mask, Args(beta=0.1))
    assert loss_again.item() == loss.item() and metrics_again["kl"].item() == metrics["kl"].item()


@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_chunked_completion_log_probs_equal_the_plain_path_and_skip_the_tool_tokens(tokenizer, chunk_size):
    """--chunk_size 3 (many chunks, each recomputed in the backward) and the default (one chunk) give the plain path's
    (--chunk_size 0) log-probs, entropies and gradients on a tool rollout at temperature 0.7, Llama-style untied
    output layer included; tool tokens and padding are 0 in both. One chunk is the plain computation exactly."""
    model = AutoModelForCausalLM.from_pretrained(TOOLS).eval()
    query, _, _, _ = episode(tokenizer)
    call = ids(tokenizer, "<call>lookup\ntitle: Golden River</call><|end|>")
    suffix = ids(tokenizer, "<|tool|> dull<|end|><|assistant|>")
    answer = ids(tokenizer, " dull<|end|>")
    rollouts = [Rollout(call + suffix + answer, [1] * len(call) + [0] * len(suffix) + [1] * len(answer), []),
                Rollout(answer, [1] * len(answer), [])]  # shorter: padding after it
    batch = collate_rollouts([query, query], rollouts, tokenizer.pad_token_id, [True, True])
    mask = batch["completion_mask"].bool()

    def values_and_grads(size):
        model.zero_grad()
        logps, entropies = completion_log_probs(model, batch, 0.7, NoAccelerator(), size)
        (logps * torch.linspace(-1.0, 1.0, logps.shape[1])).sum().backward()
        return logps.detach(), entropies, {name: p.grad.clone() for name, p in model.named_parameters()}

    plain_logps, plain_entropies, plain_grads = values_and_grads(0)
    logps, entropies, grads = values_and_grads(chunk_size)
    assert (logps[~mask] == 0).all() and (entropies[~mask] == 0).all() and (logps[mask] <= 0).all()
    assert not entropies.requires_grad and plain_logps[mask].min() < -1.0  # not all tokens are certain
    exact = {"rtol": 0, "atol": 0} if chunk_size == 1024 else {}
    torch.testing.assert_close(logps, plain_logps, **exact)
    torch.testing.assert_close(entropies, plain_entropies, **exact)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, **(exact or {"rtol": 1e-4, "atol": 1e-4 * grad.abs().max()}),
                                   msg=name)


def test_tools_on_the_command_line_are_checked_before_any_model_loads(tmp_path, monkeypatch, capsys):
    (tmp_path / "tools.py").write_text("def shout(text):\n    '''Shout.\n\n    Args:\n        text: what\n    '''\n"
                                       "    return text.upper()\n")
    (tmp_path / "envs.py").write_text("class Bare:\n    pass\n")
    (tmp_path / "rewards.py").write_text("def strict(prompts, completions, completion_ids, title):\n    return [0.0]\n")
    conversational = ["--dataset_name", ASSETS / "data" / "tool_prompts", "--model_name_or_path", TOOLS]
    cases = [
        (["--tools", f"{tmp_path / 'tools.py'}:shout", *conversational],
         "tool shout cannot be described to the model: Argument text is missing a type hint in function shout"),
        (["--tools", f"{tmp_path / 'tools.py'}:whisper", *conversational], "defines no function whisper"),
        (["--environment_factory", f"{tmp_path / 'envs.py'}:Bare", *conversational], "Bare has no reset method"),
        (["--environment_factory", f"{tmp_path / 'gone.py'}:Bare"], f"there is no file {tmp_path / 'gone.py'}"),
        (["--environment_factory", f"{ASSETS / 'tiny_tools.py'}:MovieRatings"],  # the tiny world's string prompts
         "tools need conversational prompts"),
        (["--environment_factory", f"{ASSETS / 'tiny_tools.py'}:MovieRatings", "--dataset_name",
          ASSETS / "data" / "tool_prompts"], "cannot render tool calls"),  # tiny-gpt2's template
        (["--environment_factory", f"{ASSETS / 'tiny_tools.py'}:MovieRatings", "--reward_funcs",
          f"{tmp_path / 'rewards.py'}:strict", *conversational], "must accept the keyword arguments prompts, "
         "completions, completion_ids, environments and the dataset's other columns (title)"),
        (["--max_tool_calling_iterations", -1], "--max_tool_calling_iterations must be None or >= 0"),
        (["--tool_timeout", 0], "--tool_timeout must be None or a positive number of seconds"),
    ]
    for args, message in cases:
        line = run_main_in_process(monkeypatch, "grpo.py", *args, "--output_dir", tmp_path / "out")
        assert line.startswith("grpo.py: error:") and message in line and "\n" not in line, line
    assert "parameters," not in capsys.readouterr().out and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_tool_world_learns_to_call_and_what_it_learns_depends_on_the_tool(tmp_path):
    """GRPO with the environment and its reward (TOOL_WORLD, 40 steps, about 40 s): calls per rollout and the reward
    rise from the warm start's (it calls about one time in five and otherwise guesses: right one time in four) to
    nearly always. The saved policy, rolled out here independently of the run: nearly always right with the real tool;
    with a tool that knows nothing, right only by chance; with a lying tool, it repeats the lie."""
    output_dir = tmp_path / "out"
    run_ok("grpo.py", *TOOL_WORLD, "--learning_rate", 2e-4, "--output_dir", output_dir)
    calls, reward = (metric_series(output_dir, key) for key in ("tools/call_frequency", "reward"))
    assert sum(calls[:5]) / 5 < 0.5 and sum(calls[-5:]) / 5 > 0.85, calls
    assert sum(reward[:5]) / 5 < 0.6 and sum(reward[-5:]) / 5 > 0.85, reward
    row = read_metrics(output_dir)[-1]
    assert row["tools/failure_frequency"] < 0.2 and row["completions/mean_length"] > 15  # call + answer tokens
    samples = (output_dir / "samples.jsonl").read_text()
    assert "<call>lookup" in samples and "<|tool|>" in samples  # the completions as the model saw them

    before, real = tool_world_scores(TOOLS), tool_world_scores(output_dir)
    assert before["calls"] < 0.5 and real["calls"] > 0.9 and real["accuracy"] > before["accuracy"] + 0.4, (before,
                                                                                                          real)
    unknown = tool_world_scores(output_dir, "UnknownRatings")
    assert unknown["accuracy"] < 0.45, unknown  # chance is 0.25
    lying = tool_world_scores(output_dir, "LyingRatings")
    assert lying["accuracy"] < 0.15 and lying["follows_tool"] > 0.85, lying


@pytest.mark.slow
def test_standalone_tools_an_observation_and_get_reward_reach_the_run(tmp_path):
    """--tools and --environment_factory together, as TRL combines them: the standalone tool and the environment's
    method are both shown and callable; reset's string is appended to the prompt; get_reward is a reward column named
    after the class, next to a reward function that receives environments= and message-list completions."""
    (tmp_path / "world.py").write_text('''
def shout(text: str) -> str:
    """Repeat a text in capitals.

    Args:
        text: what to repeat
    """
    return text.upper()


class Counter:
    def __init__(self):
        self.title = None

    def reset(self, title, **row):
        self.title = title
        return " (be brief)"

    def lookup(self, title: str) -> str:
        """Look a film up.

        Args:
            title: the film
        """
        return "great"

    def get_reward(self):
        return float(self.title is not None)


def shape(prompts, completions, completion_ids, environments, **columns):
    assert all(p[-1]["content"].endswith(" (be brief)") for p in prompts), prompts[0]
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in completions)
    assert all(type(e).__name__ == "Counter" and e.title for e in environments)
    return [float(len(ids)) for ids in completion_ids]
''')
    output_dir = tmp_path / "out"
    run_ok("grpo.py", "--model_name_or_path", TOOLS, "--dataset_name", ASSETS / "data" / "tool_prompts", "--tools",
           f"{tmp_path / 'world.py'}:shout", "--environment_factory", f"{tmp_path / 'world.py'}:Counter",
           "--reward_funcs", f"{tmp_path / 'world.py'}:shape", "--max_steps", 2, "--per_device_train_batch_size", 16,
           "--max_completion_length", 48, "--output_dir", output_dir)
    row = read_metrics(output_dir)[-1]
    assert row["rewards/Counter/mean"] == 1.0 and row["rewards/shape/mean"] > 1 and "tools/call_frequency" in row
    sample = json.loads((output_dir / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"][-1]["content"].endswith(" (be brief)") and "reward/Counter" in sample


@pytest.mark.slow
def test_two_processes_roll_out_with_their_own_environments_and_report_every_rollout(tmp_path):
    """Each process resets and calls its own environments; the rollouts' metrics and samples cover both processes'
    completions (gathered), and no collective waits on a process that has none to run."""
    output_dir = tmp_path / "out"
    run_ok("grpo.py", *TOOL_WORLD, "--max_steps", 2, "--per_device_train_batch_size", 16, "--output_dir", output_dir,
           launcher=TWO_PROCESSES)
    rows = read_metrics(output_dir)
    assert len(rows) == 2 and all(0 < row["tools/call_frequency"] and row["completions/mean_length"] > 0
                                  for row in rows), rows
    samples = [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 32 and sum("<call>lookup" in sample["completion"] for sample in samples) > 0
