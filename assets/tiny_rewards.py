"""Python reward functions for the tiny world, with TRL's reward-function signature, for grpo.py and rloo.py:

    python grpo.py --reward_funcs assets/tiny_rewards.py:sentiment

f(prompts, completions, completion_ids, **columns) -> one float per completion (or None where it does not apply);
`columns` holds the dataset's other columns, row by row."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_world import sentiment_score  # noqa: E402


def sentiment(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """The tiny world's ground truth: the sentiment of the completion, in (-1, 1) (positive words minus negative)."""
    return [sentiment_score(completion) for completion in completions]
