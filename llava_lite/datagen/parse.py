"""A model's reply to turns: `Question:` / `Answer:` pairs, or one description, or a `Rejection` saying why not.

Models decorate labels (`**Question 1:**`, `Q:`, `User:`), put `===` between turns and add a line of preamble;
all of that is tolerated. What cannot be read as alternating questions and answers is `unparsable`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LABEL = re.compile(
    r"^[ \t>#*_\-]*(?:\d+[.)]\s*)?"  # markdown and numbering in front: "**", "> ", "1. "
    r"(question|answer|description|q|a|user|human|assistant|gpt)"
    r"\s*\d*\s*[*_]*\s*:[*_]*[ \t]*",  # "Question 2:", "**Answer:**"
    re.IGNORECASE | re.MULTILINE,
)
ASKING = {"question", "q", "user", "human"}
SEPARATOR = re.compile(r"^\s*(?:={3,}|-{3,}|\*{3,})\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str


class Rejection(Exception):
    """A reply that does not become a record; `reason` is the short key the rejects file and summary count."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def parse_turns(text: str) -> list[Turn]:
    """Alternating question and answer blocks; text before the first label is taken as preamble and dropped."""
    text = SEPARATOR.sub("", text)
    labels = list(LABEL.finditer(text))
    if not labels:
        raise Rejection("unparsable", "no Question:/Answer: labels in the reply")
    blocks = []
    for label, following in zip(labels, [*labels[1:], None]):
        end = following.start() if following else len(text)
        blocks.append((label.group(1).lower() in ASKING, _tidy(text[label.end() : end])))
    turns = []
    for index in range(0, len(blocks), 2):
        asking, question = blocks[index]
        answer_block = blocks[index + 1] if index + 1 < len(blocks) else None
        if not asking or answer_block is None or answer_block[0]:
            raise Rejection("unparsable", f"turn {index // 2 + 1} is not a question followed by an answer")
        turns.append(Turn(question, answer_block[1]))
    return turns


def parse_description(text: str) -> str:
    """A description as one text; an `Answer:` or `Description:` label in front is dropped."""
    text = SEPARATOR.sub("", text).strip()
    labels = list(LABEL.finditer(text))
    if any(label.group(1).lower() in ASKING for label in labels):
        raise Rejection("unparsable", "a description was asked for; the reply holds questions")
    if labels and labels[0].start() == 0:
        text = text[labels[0].end() :]
    return _tidy(text)


def _tidy(block: str) -> str:
    """Lines stripped; paragraphs kept apart by one blank line."""
    lines = "\n".join(line.strip() for line in block.strip().splitlines())
    return re.sub(r"\n{3,}", "\n\n", lines)
