"""A model's answers to prompts of one or more turns, asked turn by turn - turn t with the model's own answers to
turns 1 to t-1 in context, as MT-Bench asks its second turn - and kept in a journal beside the results, so that a
rerun (after a kill, or to judge again) generates only what is missing.

Each answer is one journal entry keyed `DIALOGUE#TURN` with a fingerprint of everything that decided it: the model
(its folder, and the sizes and times of its files), the generation settings, the turns asked so far, the answers
before and the images. An entry whose fingerprint differs (another model, an edited question, an earlier answer
generated anew) is generated again; the others are reused. Answers are greedy: the same model answers the same.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from llava_lite.data.conversation import IMAGE_PLACEHOLDER, Conversation, Message, images_first
from llava_lite.data.errors import BadRecordError
from llava_lite.data.images import load_image
from llava_lite.llm.journal import Journal
from llava_lite.run_folder import CHECKPOINT_PREFIX


@dataclass
class Dialogue:
    key: str
    turns: list[str]  # the user's messages, in order
    images: list[str] = field(default_factory=list)  # resolved paths; they go with the first turn
    source: str = ""  # for error messages: "FILE question 7"


class LazyGenerator:
    """A generator loaded on its first use: a rerun that finds every answer in the journal loads no model."""

    def __init__(self, load: Callable[[], object]) -> None:
        self._load = load
        self._generator = None

    def generate(self, *args, **kwargs) -> list[str]:
        if self._generator is None:
            self._generator = self._load()
        return self._generator.generate(*args, **kwargs)


@dataclass
class AnswerReport:
    generated: int = 0  # answers this run generated
    reused: int = 0  # answers found in the journal
    unanswered: dict[str, str] = field(default_factory=dict)  # `DIALOGUE#TURN` -> why it could not be asked


def model_identity(folder: str | Path) -> str:
    """The model folder and the size and modification time of every file in it (checkpoints and hidden folders
    left out): a run trained again in the same place is another model, a run read again is the same."""
    root = Path(folder).resolve()
    files = []
    for directory, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith((CHECKPOINT_PREFIX, ".")))
        for name in sorted(names):
            stat = (Path(directory) / name).stat()
            files.append([str((Path(directory) / name).relative_to(root)), stat.st_size, stat.st_mtime_ns])
    return _digest([str(root), files])


def answer_dialogues(
    generator,
    dialogues: list[Dialogue],
    journal: Journal,
    model: str,
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[dict[str, list[str]], AnswerReport]:
    """Every turn of every dialogue answered by `generator` (an inference Generator), greedy, turn 1 of all of
    them first, then turn 2, ...; `model` is the model's identity (`model_identity`). Returns the answers by
    dialogue key, each a list with one answer per turn asked. A turn the model cannot be asked (the chat template
    refuses the conversation - an empty earlier answer, say - or it is too long) is journaled with its reason and
    ends its dialogue there; it is in `report.unanswered`, and the next run tries it again."""
    from llava_lite.inference.generator import SamplingSettings

    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    answers: dict[str, list[str]] = {dialogue.key: [] for dialogue in dialogues}
    report = AnswerReport()
    for turn in range(max((len(d.turns) for d in dialogues), default=0)):
        # A dialogue goes on while every earlier turn got an answer.
        asked = [d for d in dialogues if turn < len(d.turns) and len(answers[d.key]) == turn]
        todo = []
        for dialogue in asked:
            fingerprint = _fingerprint(dialogue, turn, answers[dialogue.key], model, max_new_tokens)
            entry = journal.entries.get(f"{dialogue.key}#{turn + 1}")
            if entry is not None and entry.get("fingerprint") == fingerprint and entry.get("answer") is not None:
                answers[dialogue.key].append(entry["answer"])
                report.reused += 1
            else:
                todo.append((dialogue, fingerprint))
        description = f"answers, turn {turn + 1}"
        for start in tqdm(range(0, len(todo), batch_size), desc=description, unit="batch", disable=not progress):
            batch = todo[start : start + batch_size]
            entries = _answered(generator, batch, turn, answers, settings)
            journal.append(entries)
            for (dialogue, _), entry in zip(batch, entries):
                if entry["answer"] is None:
                    report.unanswered[entry["key"]] = entry["error"]
                else:
                    answers[dialogue.key].append(entry["answer"])
                    report.generated += 1
    return answers, report


def _answered(generator, batch: list[tuple[Dialogue, str]], turn: int, answers: dict, settings) -> list[dict]:
    """Journal entries for one batch: its answers; when the batch cannot be encoded, each dialogue asked alone, so
    that a conversation the template refuses costs only its own answer (`answer` None and the `error`)."""
    error = None
    try:
        texts = _generate(generator, [dialogue for dialogue, _ in batch], turn, answers, settings)
    except BadRecordError as err:
        if len(batch) > 1:
            return [entry for item in batch for entry in _answered(generator, [item], turn, answers, settings)]
        texts, error = [None], str(err)
    entries = []
    for (dialogue, fingerprint), text in zip(batch, texts):
        entry = {"key": f"{dialogue.key}#{turn + 1}", "fingerprint": fingerprint, "answer": text}
        entries.append(entry if text is not None else {**entry, "error": error})
    return entries


def _generate(generator, dialogues: list[Dialogue], turn: int, answers: dict, settings) -> list[str]:
    conversations = [conversation_at(d, turn, answers[d.key]) for d in dialogues]
    images = [[load_image(path, d.source) for path in d.images] for d in dialogues]
    return generator.generate(conversations, images, settings)


def conversation_at(dialogue: Dialogue, turn: int, earlier_answers: list[str]) -> Conversation:
    """The conversation that asks turn `turn` (0-based): the user's turns up to it, the model's answers between."""
    messages = []
    for index, question in enumerate(dialogue.turns[: turn + 1]):
        if index == 0 and dialogue.images and IMAGE_PLACEHOLDER not in question:
            question = images_first(question, len(dialogue.images))
        messages.append(Message("user", question))
        if index < turn:
            messages.append(Message("assistant", earlier_answers[index]))
    return Conversation(messages, list(dialogue.images), dialogue.key, dialogue.source)


def _fingerprint(dialogue: Dialogue, turn: int, earlier_answers: list[str], model: str, max_new_tokens: int) -> str:
    return _digest([model, max_new_tokens, dialogue.turns[: turn + 1], earlier_answers[:turn], dialogue.images])


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode("utf-8")).hexdigest()[:32]
