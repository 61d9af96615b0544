"""The `length` reward: DAPO's soft overlong punishment. A completion of L tokens scores 0 up to
`max_length - cache`, then falls linearly to -1 at `max_length`, and -1 beyond: long answers are discouraged
gradually instead of being cut off with no signal. `max_length` defaults to `rl.max_new_tokens`, `cache` to a
fifth of it (DAPO's 4096 of 20480)."""

from __future__ import annotations

from llava_lite.rewards.base import RewardFunction, check_keys, number

KEYS = ("max_length", "cache")


def soft_overlong_penalty(length: int, max_length: int, cache: int) -> float:
    """DAPO's R_length of a completion of `length` tokens."""
    if length <= max_length - cache:
        return 0.0
    if length <= max_length:
        return (max_length - cache - length) / cache
    return -1.0


def check(spec: dict, where: str) -> None:
    check_keys(spec, KEYS, where)
    for key in KEYS:
        if key in spec:
            value = number(spec, key, where, minimum=1)
            if value != int(value):
                raise ValueError(f"{where}.{key}: expected a whole number of tokens, got {spec[key]}")


def build(spec: dict, where: str, context) -> RewardFunction:
    check(spec, where)
    max_length = int(spec.get("max_length", context.max_new_tokens or 0))
    if max_length < 1:
        raise ValueError(f"{where}.max_length: give the length the penalty reaches -1 at")
    cache = int(spec.get("cache", max(1, max_length // 5)))
    if cache > max_length:
        raise ValueError(f"{where}.cache: {cache} is more than max_length {max_length}")

    def length_reward(prompts: list, completions: list[str], completion_ids: list, **columns) -> list[float | None]:
        return [soft_overlong_penalty(len(ids), max_length, cache) for ids in completion_ids]

    return length_reward
