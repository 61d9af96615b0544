"""What keeps a parsed reply out of the data: refusals, talk of the given captions or coordinates, length, repeats.

Each check raises a `Rejection` with a short reason (the rejects file and the summary count them). Duplicates
are judged once, when the final files are written, in the run's fixed task order, so a resumed run drops
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llava_lite.datagen.parse import Rejection, Turn

# A refusal opens the reply or an answer; "as an AI" gives one away anywhere.
REFUSAL_START = re.compile(
    r"^\W*(?:i'?m sorry|i am sorry|sorry,|i apologi[sz]e|unfortunately,? i can|"
    r"i (?:can(?:no|')t|won'?t|am unable to|'m unable to|am not able to|'m not able to) "
    r"(?:help|assist|provide|answer|comply|fulfil|do that|see|view|access))",
    re.IGNORECASE,
)
REFUSAL_ANYWHERE = re.compile(
    r"\bas an ai\b|\bi (?:can(?:no|')t|cannot) (?:see|view) (?:the |this )?image", re.IGNORECASE
)

# The model was shown captions and boxes as if it saw the image; a reply that says so gives the game away.
CONTEXT_MENTIONS = [
    re.compile(r"\bcaptions?\b", re.IGNORECASE),
    re.compile(r"\bb(?:ounding[ -])?box(?:es)?\b|\bbbox(?:es)?\b", re.IGNORECASE),
    re.compile(r"\bcoordinates?\b", re.IGNORECASE),
    re.compile(
        r"\b(?:according to|based on|from) the (?:given |provided )?"
        r"(?:descriptions?|annotations?|information|context)\b",
        re.IGNORECASE,
    ),
    re.compile(r"\b(?:given|provided) (?:descriptions?|annotations?|information|context)\b", re.IGNORECASE),
    re.compile(r"\[\s*-?\d*\.\d+\s*,"),  # a box written out: [0.37, ...
    re.compile(r"\b[01]?\.\d{2,3}\s*,\s*[01]?\.\d{2,3}\b"),  # or its numbers: 0.370, 0.584
]


@dataclass(frozen=True)
class Bounds:
    """Length limits in words, and how many question-answer turns a record of the kind may have."""

    min_answer_words: int
    max_answer_words: int
    max_question_words: int
    min_turns: int
    max_turns: int


DEFAULT_BOUNDS = {
    "conversation": Bounds(1, 300, 80, 1, 10),
    "detail": Bounds(10, 500, 80, 1, 1),
    "reasoning": Bounds(10, 500, 120, 1, 1),
}


def check_reply(text: str | None) -> str:
    """The reply's text, or a rejection when it is empty or a refusal (before any parsing)."""
    if text is None or not text.strip():
        raise Rejection("empty", "the reply is empty")
    _check_refusal(text)
    return text


def check_turns(turns: list[Turn], bounds: Bounds) -> None:
    if not bounds.min_turns <= len(turns) <= bounds.max_turns:
        raise Rejection(
            "wrong_turn_count", f"{len(turns)} turns; this kind needs {bounds.min_turns} to {bounds.max_turns}"
        )
    seen = set()
    for number, turn in enumerate(turns, 1):
        if not turn.question or not turn.answer:
            raise Rejection("empty", f"turn {number} has an empty {'question' if not turn.question else 'answer'}")
        for text in (turn.question, turn.answer):
            _check_refusal(text)
            _check_mentions(text)
        answer_words, question_words = len(turn.answer.split()), len(turn.question.split())
        if answer_words < bounds.min_answer_words:
            raise Rejection("too_short", f"answer {number} has {answer_words} words, under {bounds.min_answer_words}")
        if answer_words > bounds.max_answer_words:
            raise Rejection("too_long", f"answer {number} has {answer_words} words, over {bounds.max_answer_words}")
        if question_words > bounds.max_question_words:
            raise Rejection(
                "too_long", f"question {number} has {question_words} words, over {bounds.max_question_words}"
            )
        key = normalise(turn.question)
        if key in seen:
            raise Rejection("repeated_question", f"question {number} was already asked")
        seen.add(key)


def normalise(text: str) -> str:
    """Lower case, words only: texts that differ in case, spacing or punctuation compare equal."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


class DuplicateFilter:
    """Exact duplicates (after `normalise`) anywhere; near duplicates among the records of the same image.

    Near means the Jaccard similarity of the texts' word pairs reaches `threshold` (one word changed in a
    twenty-word answer still counts; two answers sharing a question's frame do not); comparing within an
    image keeps this linear in the data, and that is where near copies come from (one image, several kinds).
    """

    def __init__(self, threshold: float = 0.7) -> None:
        self.threshold = threshold
        self.seen: set[str] = set()
        self.by_image: dict[str, list[set]] = {}

    def check(self, image_id: str, text: str) -> None:
        key = normalise(text)
        if key in self.seen:
            raise Rejection("duplicate", "the same text is already in the data")
        shingles = _shingles(key)
        earlier = self.by_image.setdefault(image_id, [])
        for other in earlier:
            similarity = len(shingles & other) / max(len(shingles | other), 1)
            if similarity >= self.threshold:
                raise Rejection("near_duplicate", f"{similarity:.2f} similar to another record of this image")
        self.seen.add(key)
        earlier.append(shingles)


def parse_score(text: str | None) -> float | None:
    """The judge's `Score: N` (the last one given), or None."""
    found = re.findall(r"score\s*[:=]\s*\**\s*(\d+(?:\.\d+)?)", text or "", re.IGNORECASE)
    return float(found[-1]) if found else None


def _check_refusal(text: str) -> None:
    if REFUSAL_START.search(text) or REFUSAL_ANYWHERE.search(text):
        raise Rejection("refusal", f"reads as a refusal: {text.strip()[:80]!r}")


def _check_mentions(text: str) -> None:
    for pattern in CONTEXT_MENTIONS:
        found = pattern.search(text)
        if found:
            raise Rejection("mentions_context", f"mentions what it was given: {found.group(0)!r}")


def _shingles(normalised: str) -> set:
    words = normalised.split()
    return {tuple(words[i : i + 2]) for i in range(max(len(words) - 1, 1))}
