"""The tokenizer's own Jinja chat template, with assistant spans found by rendering growing prefixes.

For each assistant message i, the text rendered for messages[:i+1] must extend the text for messages[:i];
the difference holds the assistant header, the message and its end-of-turn marker. The trained span
runs from the end of the generation prompt (what inference appends before the model speaks) to the end
of that marker, trailing whitespace excluded.
Templates that rewrite earlier turns when later ones are added break that property; they are refused
with a clear error rather than masked wrongly.
"""

from __future__ import annotations

import logging

from transformers import PreTrainedTokenizerBase

from llava_lite.data.conversation import Message
from llava_lite.data.templates.base import ChatTemplate, RenderedConversation, TemplateError, check_roles

logger = logging.getLogger(__name__)

_PROBE = [Message("user", "Hi"), Message("assistant", "Hello there")]


class TokenizerChatTemplate(ChatTemplate):
    def __init__(self, tokenizer: PreTrainedTokenizerBase, name: str | None = None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("the tokenizer has no chat template of its own; choose a built-in template")
        self.tokenizer = tokenizer
        self.name = name or "tokenizer"
        rendered = self.render(_PROBE)
        start, end = rendered.assistant_spans[0]
        self._end_of_turn = rendered.text[start:end].strip().removeprefix("Hello there").strip()
        if not self._end_of_turn:
            logger.warning(
                "chat template %s ends assistant turns with no marker: the model cannot learn to stop", self.name
            )

    @property
    def end_of_turn(self) -> str:
        return self._end_of_turn

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> RenderedConversation:
        check_roles(messages)
        spans: list[tuple[int, int]] = []
        previous = self._apply([])
        for index, message in enumerate(messages):
            current = self._apply(messages[: index + 1])
            if not current.startswith(previous):
                raise TemplateError(
                    f"chat template {self.name} rewrites earlier text when message {index + 1} is added, "
                    "so assistant spans cannot be located; use a built-in template (chat_template=chatml, ...)"
                )
            if message.role == "assistant":
                spans.append(self._assistant_span(messages[:index], message, previous, current))
            previous = current
        text = self._apply(messages, add_generation_prompt=True) if add_generation_prompt else previous
        return RenderedConversation(text, tuple(spans))

    def _assistant_span(self, history: list[Message], message: Message, previous: str, current: str) -> tuple[int, int]:
        delta = current[len(previous) :]
        header = self._apply(history, add_generation_prompt=True)[len(previous) :]
        prompt_end = len(header) if delta.startswith(header) else None
        for content in (message.content, message.content.strip()):
            offset = delta.find(content, prompt_end or 0) if content else -1
            if offset >= 0:
                break
        else:
            raise TemplateError(f"chat template {self.name} does not reproduce the assistant message verbatim")
        end_of_content = offset + len(content)
        marker = delta[end_of_content:].rstrip()
        # Train from where the generation prompt ends; a template whose generation prompt is not the
        # start of its assistant turn can only be trained from the message itself.
        start = prompt_end if prompt_end is not None else offset
        return len(previous) + start, len(previous) + end_of_content + len(marker)

    def _apply(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
