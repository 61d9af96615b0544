"""The tokenizer's own Jinja chat template, with assistant spans found from where each message's text begins.

The text rendered for messages[:i+1] must extend the text for messages[:i]; the difference (message i's "delta")
holds the assistant header, the message and its end-of-turn marker. The trained span runs from the end of the
generation prompt (what inference appends before the model speaks) to the end of that marker, trailing
whitespace excluded. Templates that rewrite earlier turns when later ones are added break that property; they
are refused with a clear error rather than masked wrongly.

Where each delta begins is found in one of two ways, with the same result:
- a short conversation renders every prefix (that is the definition, and it costs the square of the length);
- a long one renders once, and once more with each message's content replaced by a marker, which lays the text
  out as template text ("glue") around the contents. A short probe conversation of the same shape (the same
  opening, a middle, the same ending) is laid out by its prefixes; when every glue of the long conversation is
  the probe's glue at the same place, the deltas begin where the probe's do. So the cost grows with the length,
  not its square. A template whose text between turns changes along the conversation (numbered rounds, say)
  is laid out by prefixes, up to `MAX_PREFIX_MESSAGES` messages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from llava_lite.data.conversation import Message
from llava_lite.data.templates.base import ChatTemplate, RenderedConversation, TemplateError, check_roles

logger = logging.getLogger(__name__)

_PROBE = [Message("user", "Hi"), Message("assistant", "Hello there")]
# Stand-ins for message contents: private-use characters that no template changes.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
# The probe: the conversation's opening (a system message, then this many turns), then its ending.
_HEAD_TURNS = 4
# From this many messages on, a conversation is laid out from one render instead of one per prefix.
LINEAR_FROM = 16
# Laying out by prefixes costs the square of the length; a template that needs it takes this many messages at most.
MAX_PREFIX_MESSAGES = 256


@dataclass(frozen=True)
class _Layout:
    text: str  # the conversation rendered, without a generation prompt
    starts: list[int]  # where each message's delta begins, then len(text)
    headers: dict[int, str]  # the generation prompt that comes before each assistant message


@dataclass(frozen=True)
class _Probe:
    size: int  # messages
    head: int  # messages of the conversation's opening it holds
    glues: list[str]  # template text before each message's content, and after the last
    places: list[tuple[int, int]]  # each delta's start: (which glue it lies in, offset into that glue)
    headers: dict[int, str]


class TokenizerChatTemplate(ChatTemplate):
    def __init__(self, tokenizer: PreTrainedTokenizerBase, name: str | None = None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("the tokenizer has no chat template of its own; choose a built-in template")
        self.tokenizer = tokenizer
        self.name = name or "tokenizer"
        self._probes: dict[tuple[bool, bool], _Probe | None] = {}
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
        layout = self._layout_by_glues(messages) if len(messages) >= LINEAR_FROM else None
        if layout is None:
            if len(messages) > MAX_PREFIX_MESSAGES:
                raise TemplateError(
                    f"chat template {self.name} writes the text between turns differently along the conversation, "
                    f"so it is laid out turn by turn, which takes at most {MAX_PREFIX_MESSAGES} messages (this "
                    f"conversation has {len(messages)}); use a built-in template (chat_template=chatml, ...)"
                )
            layout = self._layout_by_prefixes(messages)
        spans = [self._assistant_span(layout, i, m) for i, m in enumerate(messages) if m.role == "assistant"]
        text = self._apply(messages, add_generation_prompt=True) if add_generation_prompt else layout.text
        return RenderedConversation(text, tuple(spans))

    # ----- where each message's delta begins ---------------------------------------------------------------
    def _layout_by_prefixes(self, messages: list[Message]) -> _Layout:
        starts, headers = [0], {}
        previous = ""
        for index, message in enumerate(messages):
            current = self._apply(messages[: index + 1])
            if not current.startswith(previous):
                raise TemplateError(
                    f"chat template {self.name} rewrites earlier text when message {index + 1} is added, "
                    "so assistant spans cannot be located; use a built-in template (chat_template=chatml, ...)"
                )
            if message.role == "assistant":
                headers[index] = self._apply(messages[:index], add_generation_prompt=True)[len(previous) :]
            starts.append(len(current))
            previous = current
        return _Layout(previous, starts, headers)

    def _layout_by_glues(self, messages: list[Message]) -> _Layout | None:
        """The layout from two renders of the whole conversation, or None when the probe does not vouch for it."""
        if any(_MARK_OPEN in m.content or _MARK_CLOSE in m.content for m in messages):
            return None
        has_system = messages[0].role == "system"
        probe = self._probe(has_system, messages[-1].role == "user")
        if probe is None:
            return None
        count = len(messages)
        where = _probe_index(count, probe)
        glues = _glues(self._apply(_marked(messages)), count)
        if glues is None or any(glues[j] != probe.glues[where(j)] for j in range(count + 1)):
            return None
        text = self._apply(messages)
        content_ends = _content_ends(text, messages, glues)
        if content_ends is None:
            return None
        starts = []
        for index in range(count):
            glue, offset = probe.places[where(index)]
            segment = index - (where(index) - glue)  # the conversation's glue that corresponds to the probe's
            if segment < 0 or where(segment) != glue:
                return None
            starts.append((content_ends[segment - 1] if segment else 0) + offset)
        starts.append(len(text))
        headers = {i: probe.headers[where(i)] for i, m in enumerate(messages) if m.role == "assistant"}
        return _Layout(text, starts, headers)

    def _probe(self, has_system: bool, ends_with_user: bool) -> _Probe | None:
        """A short conversation of the given shape, laid out by its prefixes; cached, as it depends on the shape
        alone. None when the template rewrites it or splits a content."""
        key = (has_system, ends_with_user)
        if key not in self._probes:
            roles = (["system"] if has_system else []) + ["user", "assistant"] * (_HEAD_TURNS // 2)
            head = len(roles)
            roles += ["user", "assistant"] * 2 + (["user"] if ends_with_user else [])
            self._probes[key] = self._lay_out_probe(_marked([Message(role, "") for role in roles]), head)
        return self._probes[key]

    def _lay_out_probe(self, messages: list[Message], head: int) -> _Probe | None:
        try:
            layout = self._layout_by_prefixes(messages)
        except TemplateError:
            return None
        glues = _glues(layout.text, len(messages))
        if glues is None or any(_MARK_OPEN in header for header in layout.headers.values()):
            return None
        places = []
        content_end = 0
        position = 0  # where the current glue begins
        glue_index = 0
        for start in layout.starts[:-1]:
            # Walk forward to the glue holding `start`; a delta that begins inside a content makes no sense here.
            while glue_index < len(messages) and start > position + len(glues[glue_index]):
                content_end = position + len(glues[glue_index]) + len(_mark(glue_index))
                position, glue_index = content_end, glue_index + 1
            if start < position:
                return None
            places.append((glue_index, start - position))
        return _Probe(len(messages), head, glues, places, layout.headers)

    # ----- the trained span of one assistant message -------------------------------------------------------
    def _assistant_span(self, layout: _Layout, index: int, message: Message) -> tuple[int, int]:
        text = layout.text
        start, end = layout.starts[index], layout.starts[index + 1]
        header = layout.headers[index]
        prompt_end = start + len(header) if text.startswith(header, start, end) else None
        if not message.content.strip() and prompt_end is not None:
            # An empty answer (a model that said nothing, an earlier turn of a chat): its span is empty and sits
            # where the generation prompt ends; its end-of-turn marker follows as for any answer.
            return prompt_end, prompt_end + len(text[prompt_end:end].rstrip())
        for content in (message.content, message.content.strip()):
            offset = text.find(content, start if prompt_end is None else prompt_end, end) if content else -1
            if offset >= 0:
                break
        else:
            raise TemplateError(f"chat template {self.name} does not reproduce the assistant message verbatim")
        end_of_content = offset + len(content)
        marker = len(text[end_of_content:end].rstrip())
        # Train from where the generation prompt ends; a template whose generation prompt is not the
        # start of its assistant turn can only be trained from the message itself.
        return (offset if prompt_end is None else prompt_end), end_of_content + marker

    def _apply(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )


def _mark(index: int) -> str:
    return f"{_MARK_OPEN}{index}{_MARK_CLOSE}"


def _marked(messages: list[Message]) -> list[Message]:
    return [Message(m.role, _mark(i)) for i, m in enumerate(messages)]


def _glues(marked_text: str, count: int) -> list[str] | None:
    """The template text before each marker of `_marked` and after the last, or None when a marker is missing."""
    glues, cursor = [], 0
    for index in range(count):
        mark = _mark(index)
        found = marked_text.find(mark, cursor)
        if found < 0:
            return None
        glues.append(marked_text[cursor:found])
        cursor = found + len(mark)
    glues.append(marked_text[cursor:])
    return None if any(_MARK_OPEN in glue for glue in glues) else glues


def _content_ends(text: str, messages: list[Message], glues: list[str]) -> list[int] | None:
    """Where each message's content ends in `text`, when `text` is exactly the glues around the contents (each as
    written, or stripped as some templates do); else None."""
    ends, cursor = [], 0
    for index, message in enumerate(messages):
        if not text.startswith(glues[index], cursor):
            return None
        cursor += len(glues[index])
        for content in dict.fromkeys((message.content, message.content.strip())):
            if text.startswith(content, cursor) and text.startswith(glues[index + 1], cursor + len(content)):
                break
        else:
            return None
        cursor += len(content)
        ends.append(cursor)
    return ends if len(text) - cursor == len(glues[-1]) else None


def _probe_index(count: int, probe: _Probe):
    """Which of the probe's messages (and glues) stands for message (or glue) j of a conversation of `count`:
    the opening as it is, the ending as it is, every middle turn as the probe's first turn after its opening."""
    tail = probe.size - probe.head

    def where(j: int) -> int:
        if j < probe.head:
            return j
        if j >= count - tail:
            return probe.head + j - (count - tail)
        return probe.head + (j - probe.head) % 2

    return where
