"""The `format` reward: 1 when the whole completion (whitespace around it aside) matches a regex, else 0. The
default is DeepSeek-R1's layout, reasoning then answer: `<think>...</think>` followed by `<answer>...</answer>`."""

from __future__ import annotations

import re

from llava_lite.rewards.base import RewardFunction, check_keys

R1_FORMAT = r"<think>.*?</think>\s*<answer>.*?</answer>"
KEYS = ("pattern",)


def check(spec: dict, where: str) -> None:
    check_keys(spec, KEYS, where)
    _compiled(spec.get("pattern", R1_FORMAT), where)


def build(spec: dict, where: str, context) -> RewardFunction:
    check(spec, where)
    pattern = _compiled(spec.get("pattern", R1_FORMAT), where)

    def format_reward(prompts: list, completions: list[str], **columns) -> list[float | None]:
        return [float(pattern.fullmatch(completion.strip()) is not None) for completion in completions]

    return format_reward


def _compiled(pattern, where: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise ValueError(f"{where}.pattern: expected a regular expression, got {pattern!r}")
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as err:
        raise ValueError(f"{where}.pattern: not a regular expression ({err})") from None
