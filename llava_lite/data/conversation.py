"""The record every reader produces: messages with roles, and the images their `<image>` placeholders stand for."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]
ROLES = ("system", "user", "assistant")
IMAGE_PLACEHOLDER = "<image>"


def images_first(text: str, images: int, placeholder: str = IMAGE_PLACEHOLDER) -> str:
    """`text` after its images' placeholders, each on a line of its own: LLaVA's layout, so that prompts written
    at inference look like the records a model was trained on."""
    return "\n".join([placeholder] * images + ([text] if text else []))


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass
class Conversation:
    """One training or inference sample.

    `images` are paths as the record gives them (resolved against an image folder later), in the
    order their placeholders appear in the messages. An empty list makes a text-only sample.
    `source` says where the record came from ("file.json record 17") for error messages.
    """

    messages: list[Message]
    images: list[str] = field(default_factory=list)
    id: str | None = None
    source: str = "<memory>"

    def placeholder_count(self, placeholder: str = IMAGE_PLACEHOLDER) -> int:
        return sum(message.content.count(placeholder) for message in self.messages)
