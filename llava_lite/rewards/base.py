"""What every reward kind shares: the function it builds, TRL's signature, and the checks of its settings.

A reward function takes `(prompts, completions, **columns)` and returns one score per completion, as TRL's
GRPOTrainer calls them: `prompts` and `completions` are lists (a prompt repeated for each of its completions),
each column a list of the same length - the prompt line's other fields (`reference`, `boxes`, `id`, ...), with
`completion_ids` (each completion's token ids, the stop token included), `images` (the prompt's image files) and
`image_sizes` (their (height, width)). A score of None means the reward does not apply to that completion (TRL's rule).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

RewardFunction = Callable[..., list[float | None]]

# Keys every reward entry may have, beside its kind's own.
COMMON_KEYS = ("kind", "weight", "name")


def check_keys(spec: dict, allowed: Sequence[str], where: str) -> None:
    """ValueError naming the first key of `spec` its kind does not take."""
    unknown = sorted(set(spec) - set(COMMON_KEYS) - set(allowed))
    if unknown:
        known = ", ".join(allowed) or "none beside kind, weight and name"
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} for kind {spec.get('kind')}; known: {known}")


def choice(spec: dict, key: str, allowed: Sequence[str], where: str) -> None:
    """ValueError when `spec[key]`, if given, is not one of `allowed`."""
    if key in spec and spec[key] not in allowed:
        raise ValueError(f"{where}.{key}: {spec[key]!r} is not one of {', '.join(allowed)}")


def number(spec: dict, key: str, where: str, default: float | None = None, minimum: float | None = None) -> float:
    """`spec[key]` as a number (`default` when absent), at least `minimum`."""
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}.{key}: expected a number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}.{key}: must be {minimum} or more, got {value}")
    return float(value)


def rows_of(columns: dict[str, list], count: int) -> list[dict]:
    """Per completion, its prompt line's fields, from TRL's columns (one list per field)."""
    return [{key: values[index] for key, values in columns.items()} for index in range(count)]
