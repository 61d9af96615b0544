"""The rubric an LLM judge (or the run itself) scores a candidate answer on: helpfulness and visual faithfulness,
VLFeedback's axes, each 1 to 10; the candidate's score is their mean.

A judge that cannot see the image is given what is known about it - the line's captions and object boxes, as data
generation shows them - and told to count anything they do not support as unfaithful. A judge that sees the image
(the run judging its own answers, Self-Rewarding's way) gets the image in the prompt instead.
"""

from __future__ import annotations

import re

from llava_lite.data.annotations import Box, ImageAnnotations, build_context
from llava_lite.data.conversation import IMAGE_PLACEHOLDER

AXES = ("helpfulness", "faithfulness")
MAX_SCORE = 10.0

SYSTEM = (
    "You review answers of a vision-language assistant. Rate the answer on two axes, each from 1 to 10:\n"
    "Helpfulness: does it answer what was asked, clearly and completely, without padding?\n"
    "Faithfulness: is everything it says about the image true of the image? Invented objects, wrong colours, "
    "counts or positions make it unfaithful.\n"
    "Reply with exactly two lines, `Helpfulness: N` and `Faithfulness: N`, then one sentence giving your reason."
)
_LINE = re.compile(r"^\W*(helpfulness|faithfulness)\W*[:=]\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE | re.MULTILINE)


def context_of(row: dict) -> str:
    """What the line says about its image: `captions` (a string or strings) and `instances` (`{category, bbox}`,
    bbox `[x1, y1, x2, y2]` from 0 to 1), as datagen's prompts show them; empty when it says nothing."""
    captions = row.get("captions") or []
    captions = [captions] if isinstance(captions, str) else [c for c in captions if isinstance(c, str)]
    boxes = []
    for instance in row.get("instances") or []:
        if not isinstance(instance, dict) or not isinstance(instance.get("category"), str):
            continue
        bbox = instance.get("bbox")
        if isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox):
            boxes.append(Box(instance["category"], *(float(v) for v in bbox)))
    return build_context(ImageAnnotations(str(row.get("id")), str(row.get("image")), captions, boxes))


def judge_text(question: str, answer: str, context: str, sees_image: bool) -> str:
    """The request's user text for one candidate; `question` is the prompt's last user turn."""
    question = question.replace(IMAGE_PLACEHOLDER, "").strip()
    if sees_image:
        known = "The image is shown above."
    elif context:
        known = f"What is known about the image (captions, then object boxes [x1, y1, x2, y2] from 0 to 1):\n{context}"
    else:
        known = "Nothing is known about the image beyond the question: judge faithfulness by plausibility."
    return f"{known}\n\n[Question]\n{question}\n\n[Answer]\n{answer}\n\n[End of answer]"


def parse_rubric(text: str | None) -> dict[str, float] | None:
    """Both axes' scores from a reply (the first of each), each within 1-10; None when either is missing."""
    found: dict[str, float] = {}
    for axis, value in _LINE.findall(text or ""):
        found.setdefault(axis.lower(), float(value))
    if set(found) != set(AXES) or not all(1.0 <= v <= MAX_SCORE for v in found.values()):
        return None
    return {axis: found[axis] for axis in AXES}


def text_judge_messages(row: dict, answer: str) -> list[dict]:
    """A text-only judge's request: the rubric, what the line says about its image, the question, the answer."""
    text = judge_text(last_question(row), answer, context_of(row), sees_image=False)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def last_question(row: dict) -> str:
    """The prompt's last user turn as text (its image parts left out)."""
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    for message in reversed(row.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content)
    return ""
