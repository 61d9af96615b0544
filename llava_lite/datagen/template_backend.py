"""The offline backend: replies built from the annotations alone, deterministic for a seed, true of the boxes.

It lives in datagen, not in `llava_lite.llm`: it is no LLM client but datagen's offline stand-in for one,
answering only datagen's own kinds from the annotations; it speaks the same `Backend` protocol, so the pipeline
cannot tell. Conversations ask a few questions of different sorts (counts, presence, where, left or right, above
or below, size); a detailed description is the captions followed by what the boxes show; a reasoning question
orders objects from left to right, adds counts up, or compares the halves of the image, step by step. Replies
use the same `Question:`/`Answer:` form an LLM is asked for, so they go through the same parsing and filters.
"""

from __future__ import annotations

import random

from llava_lite.data.annotations import ImageAnnotations
from llava_lite.datagen import facts
from llava_lite.llm.chat import ChatReply, ChatRequest

CONVERSATION_TURNS = 4
DETAIL_CAPTIONS = 3
NOTHING_TO_ASK = "nothing_to_ask"


class TemplateBackend:
    name = "template"
    model = "template"
    concurrency = 1
    batch_size = 32

    def __init__(self, vocabulary: list[str], seed: int = 0) -> None:
        self.vocabulary = vocabulary
        self.seed = seed

    def complete(self, requests: list[ChatRequest]) -> list[ChatReply]:
        return [self._reply(request) for request in requests]

    def close(self) -> None:
        pass

    def _reply(self, request: ChatRequest) -> ChatReply:
        rng = random.Random(f"{self.seed}:{request.key}")
        if request.kind == "detail":
            text = describe(request.annotations)
        elif request.kind == "reasoning":
            boxes = request.annotations.boxes
            qa = facts.order_question(boxes, rng) or facts.total_question(boxes, rng) or facts.halves_question(boxes)
            text = _format([qa]) if qa else ""
        else:
            text = _format(self.conversation(request.annotations, rng))
        if not text:
            return ChatReply(error=NOTHING_TO_ASK, detail="the annotations give nothing to ask about")
        return ChatReply(text=text)

    def conversation(self, image: ImageAnnotations, rng: random.Random) -> list[facts.QA]:
        boxes = image.boxes
        pool = (
            facts.count_questions(boxes)
            + facts.presence_questions(boxes, self.vocabulary, rng)
            + facts.position_questions(boxes)
            + facts.size_questions(boxes)
        )
        if not pool and image.captions:
            return [facts.QA("caption", "What is happening in this image?", image.captions[0])]
        # One question of each sort first, in a random order, so that a conversation is not all counting.
        by_fact: dict[str, list[facts.QA]] = {}
        for qa in pool:
            by_fact.setdefault(qa.fact, []).append(qa)
        chosen = []
        for fact in rng.sample(sorted(by_fact), len(by_fact)):
            chosen.append(rng.choice(by_fact[fact]))
        rest = [qa for qa in pool if qa not in chosen]
        chosen += rng.sample(rest, max(0, min(len(rest), CONVERSATION_TURNS - len(chosen))))
        return chosen[:CONVERSATION_TURNS]


def describe(image: ImageAnnotations) -> str:
    """Up to three distinct captions as sentences, then what the boxes show."""
    sentences: list[str] = []
    for caption in image.captions:
        sentence = caption.strip().rstrip(".") + "."
        sentence = sentence[0].upper() + sentence[1:]
        if sentence.lower() not in (s.lower() for s in sentences):
            sentences.append(sentence)
    summary = facts.object_summary(image.boxes)
    return " ".join(sentences[:DETAIL_CAPTIONS] + ([summary] if summary else []))


def _format(qas: list[facts.QA]) -> str:
    return "\n".join(f"Question: {qa.question}\nAnswer: {qa.answer}" for qa in qas)
