"""A multi-turn conversation with a model: history, images attached to the turn they came with, streaming."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from llava_lite.data.conversation import IMAGE_PLACEHOLDER, Conversation, Message
from llava_lite.data.images import load_image
from llava_lite.inference.generator import Generator, SamplingSettings


class ChatSession:
    def __init__(self, generator: Generator, settings: SamplingSettings, system: str | None = None) -> None:
        self.generator = generator
        self.settings = settings
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages: list[Message] = [Message("system", self.system)] if self.system else []
        self.images: list[Image.Image] = []
        self.pending_image: Image.Image | None = None

    def set_image(self, path: str | Path) -> None:
        """The image goes with the next user message (as LLaVA puts it: before the text)."""
        self.pending_image = load_image(path, str(path))

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to `text`; the full answer joins the history when the stream ends."""
        if self.pending_image is not None:
            text = f"{IMAGE_PLACEHOLDER}\n{text}"
            self.images.append(self.pending_image)
            self.pending_image = None
        self.messages.append(Message("user", text))
        conversation = Conversation(list(self.messages))
        pieces = []
        for piece in self.generator.stream(conversation, list(self.images), self.settings):
            pieces.append(piece)
            yield piece
        answer = self.generator.model.template.answer_from("".join(pieces))
        self.messages.append(Message("assistant", answer or " "))
