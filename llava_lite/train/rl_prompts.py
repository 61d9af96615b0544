"""Prompt lines - what on-policy RL samples answers to - read through `data.sources` like every recipe's data.

A line is what `llava-lite generate` and `data sample` read: `{"id", "image"?, "prompt"}` or `{"id", "messages"}`
(`images` beside them, or image parts in the messages), the conversation ending on the user's turn. Every other
field (`reference`, `references`, `boxes`, `captions`, `instances`, ...) is kept and handed to the reward
functions. Any reader, `datasets` and a column mapping work as for instruction data
(`llava_lite.data.formats.read_sources`); images resolve inside the image folder. A bad line is a `BadRecordError`
naming the file and line, or under `on_bad_record: skip` a skip counted by its reason: `malformed`,
`prompt_not_ending_on_user`, `image_count_mismatch`, `missing_image`, `too_long` (a prompt over `max_length`
tokens: a prompt is never cut, its end is where the answer starts).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from llava_lite.data.config import DataConfig, DataSource
from llava_lite.data.conversation import Conversation, Message
from llava_lite.data.errors import BadRecordError
from llava_lite.data.formats import DEFAULT_ROLES, parse_record, read_source, read_sources
from llava_lite.data.processor import EncodedConversation, Processor
from llava_lite.data.skips import SkipCounter
from llava_lite.inference.batch import conversation_from_prompt_line

# The fields that make the conversation; every other field of a line is carried to the rewards.
CONVERSATION_FIELDS = ("messages", "conversations", "images", "image")


@dataclass
class PromptLine:
    messages: list[Message]  # ending on the user's turn
    images: list[str] = field(default_factory=list)  # absolute once read from a source, in placeholder order
    id: str = ""
    source: str = "<memory>"
    fields: dict[str, Any] = field(default_factory=dict)  # the line's other fields, `prompt` and `id` included

    @property
    def conversation(self) -> Conversation:
        return Conversation(self.messages, list(self.images), self.id, self.source)

    @property
    def prompt(self) -> Any:
        """The prompt as TRL's reward functions get it: the line's `prompt` text, or its messages."""
        if isinstance(self.fields.get("prompt"), str):
            return self.fields["prompt"]
        return [{"role": m.role, "content": m.content} for m in self.messages]


def load_prompt_lines(data: DataConfig) -> tuple[list[PromptLine], Counter]:
    """Every source's prompt lines, in order, and the lines skipped while reading them, by reason."""
    if not data.sources:
        raise ValueError("data: no sources given")
    return read_sources(data.sources, data.on_bad_record, data.check_images_exist, read=read_prompt_lines)


def read_prompt_lines(
    source: DataSource, on_bad_record: str = "error", check_images_exist: bool = True
) -> tuple[list[PromptLine], Counter]:
    return read_source(source, on_bad_record, check_images_exist, parse=parse_prompt_line)


def parse_prompt_line(row: Any, where: str, roles: dict[str, str] | None = None) -> PromptLine:
    """One raw line as a checked PromptLine (image paths as the line gives them)."""
    if not isinstance(row, dict):
        raise BadRecordError(where, "malformed", f"a prompt line must be an object, got {type(row).__name__}")
    line_id = str(row.get("id", where.rsplit(" ", 1)[-1]))
    if row.get("id") is not None:
        where = f"{where} (id {row['id']})"
    if "messages" in row or "conversations" in row:
        conversation = parse_record(row, where, roles or DEFAULT_ROLES, require_answer=False)
    elif isinstance(row.get("prompt"), str):
        conversation = conversation_from_prompt_line(row)
    else:
        raise BadRecordError(where, "malformed", "needs a string `prompt` or a `messages` list")
    if conversation.messages[-1].role != "user":
        raise BadRecordError(where, "prompt_not_ending_on_user", "the last message must be the user's")
    if conversation.placeholder_count() != len(conversation.images):
        raise BadRecordError(
            where,
            "image_count_mismatch",
            f"{conversation.placeholder_count()} <image> placeholder(s) but {len(conversation.images)} image(s)",
        )
    fields = {key: value for key, value in row.items() if key not in CONVERSATION_FIELDS}
    return PromptLine(conversation.messages, list(conversation.images), line_id, where, fields)


class PromptDataset(Dataset):
    """Item i: `{"index": i, "sample": ...}`, the prompt of line i encoded with its generation prompt and its
    images loaded (the processor's sample). Every prompt is encoded once when the dataset is made, so that a bad
    line (too long, a placeholder count that differs) fails or is counted before training starts; a line whose
    image fails to load is passed over for the next good one under `skip`, and counted in `skips`."""

    def __init__(self, lines: list[PromptLine], processor: Processor, max_length: int, on_bad_record: str) -> None:
        self.lines = lines
        self.processor = processor
        self.on_bad_record = on_bad_record
        self.skips = SkipCounter(len(lines))
        self.encoded: list[EncodedConversation | None] = [self._encoded(i, max_length) for i in range(len(lines))]

    def __len__(self) -> int:
        return len(self.lines)

    def first_good(self) -> int | None:
        return next((i for i, encoded in enumerate(self.encoded) if encoded is not None), None)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.lines)):
            line = (index + attempt) % len(self.lines)
            sample = self.sample_of(line)
            if sample is not None:
                return {"index": line, "sample": sample}
        raise RuntimeError("every prompt line is bad; nothing to sample from")

    def sample_of(self, line: int) -> dict | None:
        encoded = self.encoded[line]
        if encoded is None:
            return None
        try:
            return self.processor.sample_from(encoded, self.lines[line].source)
        except BadRecordError as err:
            self._bad(line, err)
            return None

    def _encoded(self, line: int, max_length: int) -> EncodedConversation | None:
        prompt = self.lines[line]
        try:
            encoded = self.processor.encode(prompt.conversation, add_generation_prompt=True)
            if len(encoded.input_ids) > max_length:
                count = len(encoded.input_ids)
                raise BadRecordError(prompt.source, "too_long", f"the prompt takes {count} tokens, over {max_length}")
        except BadRecordError as err:
            self._bad(line, err)
            return None
        return encoded

    def _bad(self, line: int, err: BadRecordError) -> None:
        if self.on_bad_record == "error":
            raise err
        self.skips.mark(line, err.reason)
