"""What a chat template gives: the rendered text and the character spans that are trained."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from llava_lite.data.conversation import Message


@dataclass(frozen=True)
class RenderedConversation:
    """Text with the `[start, end)` character spans of every assistant message and its end-of-turn marker.

    The spans are the single source of truth for labels: tokens whose characters overlap a span are
    trained, every other token (system, user, image, headers, padding) is ignored.
    """

    text: str
    assistant_spans: tuple[tuple[int, int], ...]


class TemplateError(ValueError):
    """A conversation the template cannot render, or a template that cannot be masked reliably."""


class ChatTemplate:
    """Renders messages to text, tracking which characters the assistant said."""

    name: str
    tokenizer: PreTrainedTokenizerBase
    # Tokens the tokenizer must have as single special tokens for this template (added if missing).
    special_tokens: tuple[str, ...] = ()

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> RenderedConversation:
        raise NotImplementedError

    @property
    def end_of_turn(self) -> str:
        """The text that closes an assistant turn; generation stops when it is produced."""
        raise NotImplementedError

    @property
    def visible_end_of_turn(self) -> str:
        """What is left of the end-of-turn marker in text decoded without special tokens: `</assistant>` of
        `</assistant></s>`, nothing of `<|im_end|>`. Streams hold it back; answers end before it."""
        marker = self.end_of_turn
        for token in self.tokenizer.all_special_tokens:
            marker = marker.replace(token, "")
        return marker.strip()

    def answer_from(self, generated: str) -> str:
        """The answer as a person reads it, from generated text decoded without special tokens."""
        text = generated.strip()
        marker = self.visible_end_of_turn
        return text.removesuffix(marker).rstrip() if marker else text


def check_roles(messages: list[Message], source: str = "conversation") -> None:
    """At most one system message, first; then user and assistant strictly alternating, the user first."""
    turns = messages[1:] if messages and messages[0].role == "system" else messages
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message.role != expected:
            raise TemplateError(
                f"{source}: message {index + 1 + len(messages) - len(turns)} is from "
                f"{message.role}, expected {expected}"
            )
