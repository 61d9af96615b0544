"""The `reference` reward, and `data score`'s reference scorer: agreement of an answer with the line's known answer
(`reference`, or the best of `references` / `answers`), after VQAv2's normalisation (case, punctuation, articles,
number words). `match`: `exact` (1 or 0), `contains` (1 when the reference's words appear in the answer's, in order,
as a run) or token `f1` (SQuAD's). An `answer_pattern` (a regex; its first group, else its whole match) picks the
answer out of the completion first, e.g. `<answer>(.*?)</answer>`: a completion it does not match scores 0."""

from __future__ import annotations

import re
from collections import Counter

from llava_lite.eval.vqa import normalize_answer
from llava_lite.rewards.base import RewardFunction, check_keys, choice, rows_of

MATCHES = ("exact", "contains", "f1")
KEYS = ("match", "answer_pattern")


def reference_score(candidate: str, references: list[str], match: str = "exact") -> float:
    """The candidate's agreement with its best reference, from 0 to 1 (see the module doc for `match`)."""
    if match not in MATCHES:
        raise ValueError(f"unknown match {match!r}; choose from {', '.join(MATCHES)}")
    words = normalize_answer(candidate).split()
    best = 0.0
    for reference in references:
        wanted = normalize_answer(reference).split()
        if match == "exact":
            value = float(words == wanted)
        elif match == "contains":
            size = len(wanted)
            value = float(any(words[i : i + size] == wanted for i in range(len(words) - size + 1)) and size > 0)
        else:
            value = _token_f1(words, wanted)
        best = max(best, value)
    return best


def _token_f1(words: list[str], wanted: list[str]) -> float:
    common = sum((Counter(words) & Counter(wanted)).values())
    if not words or not wanted or not common:
        return float(words == wanted)
    precision, recall = common / len(words), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def line_references(row: dict) -> list[str] | None:
    """The line's known answers (`reference`, `references` or `answers`; VQAv2's `{"answer"}` objects too), or None
    when it has none that are strings."""
    value = row.get("reference", row.get("references", row.get("answers")))
    values = value if isinstance(value, list) else [value]
    values = [v.get("answer") if isinstance(v, dict) else v for v in values]
    if not values or not all(isinstance(v, str) for v in values):
        return None
    return values


def check(spec: dict, where: str) -> None:
    check_keys(spec, KEYS, where)
    choice(spec, "match", MATCHES, where)
    pattern = spec.get("answer_pattern")
    if pattern is not None:
        _compiled(pattern, where)


def build(spec: dict, where: str, context) -> RewardFunction:
    """The reward: each completion against its line's references; None for a line that has none."""
    check(spec, where)
    match = spec.get("match", "exact")
    pattern = _compiled(spec["answer_pattern"], where) if spec.get("answer_pattern") is not None else None

    def reference_reward(prompts: list, completions: list[str], **columns) -> list[float | None]:
        rows = rows_of(columns, len(completions))
        scores: list[float | None] = []
        for completion, row in zip(completions, rows):
            references = line_references(row)
            answer = completion if pattern is None else picked_answer(pattern, completion)
            if references is None:
                scores.append(None)
            else:
                scores.append(0.0 if answer is None else reference_score(answer, references, match))
        return scores

    return reference_reward


def picked_answer(pattern: re.Pattern, completion: str) -> str | None:
    """The answer `pattern` finds in `completion`: its first group, else its whole match; None when not found."""
    found = pattern.search(completion)
    if found is None:
        return None
    return found.group(1) if pattern.groups else found.group(0)


def _compiled(pattern, where: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise ValueError(f"{where}.answer_pattern: expected a regular expression, got {pattern!r}")
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as err:
        raise ValueError(f"{where}.answer_pattern: not a regular expression ({err})") from None
