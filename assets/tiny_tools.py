"""The tiny tool world: an environment with one lookup tool and the reward of its task, for grpo.py and rloo.py.

    python grpo.py --model_name_or_path assets/tiny-tools --dataset_name assets/data/tool_prompts \
        --environment_factory assets/tiny_tools.py:MovieRatings --reward_funcs assets/tiny_tools.py:correct

The task: a user asks how a film was rated ("How was Golden River?"). Every episode draws the film's rating anew (one
of RATINGS), so no model can know it; the environment's `lookup` tool tells it. A policy that answers without calling
is right one time in len(RATINGS); one that calls `lookup` with the film's title and repeats the result is always
right. The environment follows TRL 1.16's `environment_factory` interface: constructed without arguments, `reset(**row)`
before every episode with the dataset row's columns, public methods are the tools (plain methods with type hints and a
Google-style docstring: transformers' get_json_schema turns them into the schema shown to the model).

UnknownRatings and LyingRatings are the same world with a broken tool (it knows nothing; it names a wrong rating):
the tests use them to show that what the policy learned depends on the tool.
"""

import random
import re

RATINGS = ["great", "awful", "superb", "dull"]  # one token each (with their leading space) in the tiny tokenizer


class MovieRatings:
    """One episode: a film whose rating is drawn at reset, and the `lookup` tool that reveals it."""

    def __init__(self):
        self.title, self.rating, self.told, self.calls = "", "", None, 0

    def reset(self, title: str, **row) -> None:
        """A new episode for the row's film: a fresh rating (Python's `random`, which the scripts seed)."""
        self.title, self.rating, self.told, self.calls = title, random.choice(RATINGS), None, 0

    def lookup(self, title: str) -> str:
        """Look up how the critics rated a film.

        Args:
            title: the film's title, as the user wrote it
        """
        self.calls += 1
        self.told = self.rating if title.strip().lower() == self.title.lower() else "unknown"
        return self.told


class UnknownRatings(MovieRatings):
    """The same world with a tool that knows nothing: a policy that relies on it can only guess."""

    def lookup(self, title: str) -> str:
        """Look up how the critics rated a film.

        Args:
            title: the film's title, as the user wrote it
        """
        self.calls += 1
        self.told = "unknown"
        return self.told


class LyingRatings(MovieRatings):
    """The same world with a tool that names a wrong rating (the next one in RATINGS): a policy that relies on it
    repeats the lie."""

    def lookup(self, title: str) -> str:
        """Look up how the critics rated a film.

        Args:
            title: the film's title, as the user wrote it
        """
        self.calls += 1
        self.told = RATINGS[(RATINGS.index(self.rating) + 1) % len(RATINGS)]
        return self.told


def final_answer(completion) -> str:
    """The words of the policy's last turn, lower case ('' when that turn is a tool call or was cut off)."""
    if isinstance(completion, str):
        text = completion
    else:
        last = completion[-1] if completion else {}
        if last.get("role") != "assistant" or last.get("tool_calls"):
            return ""
        text = last.get("content") or ""
    return " ".join(re.findall(r"[a-z]+", text.lower()))


def correct(prompts, completions, environments, **columns) -> list[float]:
    """1 when the policy's final answer is the episode's rating, else 0 (TRL's reward signature; `environments` are
    the episodes' MovieRatings, in the order of the completions)."""
    return [float(final_answer(completion) == environment.rating)
            for completion, environment in zip(completions, environments)]


def follows_tool(prompts, completions, environments, **columns) -> list[float | None]:
    """1 when the final answer is what the tool last said, 0 when it is not, None when the tool was not called."""
    return [None if environment.told is None else float(final_answer(completion) == environment.told)
            for completion, environment in zip(completions, environments)]
