"""A multi-turn conversation with a model: history, images attached to the turn they came with, streaming."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from llava_lite.data.conversation import Conversation, Message, images_first
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
            text = images_first(text, 1, self.generator.model.config.image_token)
            self.images.append(self.pending_image)
            self.pending_image = None
        self.messages.append(Message("user", text))
        answer = self.generator.stream(Conversation(list(self.messages)), list(self.images), self.settings)
        yield from answer  # closing this generator early closes the answer's too, which ends the generation
        self.messages.append(Message("assistant", answer.completion.text or " "))
