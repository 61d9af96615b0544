"""lmms-eval's requests as our prompts: chat messages or a task's text and images become a `Conversation` with
its pictures, laid out as LLaVA trains (each user turn's images first, one placeholder a line), and a task's
generation settings become `SamplingSettings`.

Nothing here imports lmms-eval: messages are read by their fields (`role`, `content` parts with `type`, `text`,
`url`), as lmms-eval's `ChatMessages` and plain dicts both give them.
"""

from __future__ import annotations

import logging
from typing import Any

from PIL import Image

from llava_lite.data.conversation import Conversation, Message, images_first
from llava_lite.data.images import load_image
from llava_lite.inference.generator import SamplingSettings

logger = logging.getLogger(__name__)

# Generation settings that lmms-eval tasks carry for other models and that change nothing here.
_IGNORED_SETTINGS = {"image_aspect_ratio", "image_sizes", "use_cache", "modalities"}


def chat_conversation(messages: list, image_token: str, source: str) -> tuple[Conversation, list[Image.Image]]:
    """A task's chat messages (lmms-eval's `doc_to_messages`): system messages join into one, images (pictures
    or paths) go with the user turn that holds them; video and audio are refused."""
    converted: list[Message] = []
    pictures: list[Image.Image] = []
    for message in messages:
        role = _field(message, "role")
        texts, visuals = [], []
        for part in _parts(_field(message, "content")):
            kind = _field(part, "type")
            if kind == "text":
                texts.append(_field(part, "text") or "")
            elif kind == "image":
                visuals.append(_field(part, "url"))
            else:
                raise ValueError(f"{source}: llava_lite takes text and images, not {kind}")
        if visuals and role != "user":
            raise ValueError(f"{source}: only user messages may carry images, not {role}")
        text = "\n".join(texts)
        if role == "system" and converted and converted[-1].role == "system":
            converted[-1] = Message("system", f"{converted[-1].content}\n\n{text}")
            continue
        converted.append(Message(role, place_images(text, len(visuals), image_token, source)))
        pictures += [picture(visual, source) for visual in visuals]
    return Conversation(converted, source=source), pictures


def simple_conversation(
    context: str, visuals: list, image_token: str, source: str, answer: str | None = None
) -> tuple[Conversation, list[Image.Image]]:
    """A task's text (`doc_to_text`, few-shot examples included) and its images as one user turn; with `answer`,
    followed by that assistant turn (a `loglikelihood` request's continuation)."""
    visuals = [visual for visual in visuals or [] if visual is not None]
    messages = [Message("user", place_images(context, len(visuals), image_token, source))]
    if answer is not None:
        messages.append(Message("assistant", answer))
    return Conversation(messages, source=source), [picture(visual, source) for visual in visuals]


def place_images(text: str, images: int, image_token: str, source: str) -> str:
    """`text` with one placeholder per image: its own when it has exactly that many, else (none) images first."""
    placeholders = text.count(image_token)
    if placeholders == images:
        return text
    if placeholders == 0:
        return images_first(text, images, image_token)
    raise ValueError(f"{source}: the text holds {placeholders} {image_token} placeholder(s) for {images} image(s)")


def picture(visual: Any, source: str) -> Image.Image:
    if isinstance(visual, Image.Image):
        return visual.convert("RGB")
    if isinstance(visual, str):
        return load_image(visual, source)
    raise ValueError(f"{source}: llava_lite takes images (pictures or image paths), not {type(visual).__name__}")


def sampling_settings(gen_kwargs: dict, default_max_new_tokens: int) -> SamplingSettings:
    """A task's `generation_kwargs`: `until` strings also end an answer, beside the end-of-turn marker."""
    settings = dict(gen_kwargs or {})
    until = settings.pop("until", None) or []
    until = [until] if isinstance(until, str) else [stop for stop in until if stop]
    max_new_tokens = int(settings.pop("max_new_tokens", None) or default_max_new_tokens)
    temperature = float(settings.pop("temperature", None) or 0.0)
    if settings.pop("do_sample", None) is False:
        temperature = 0.0
    top_p = settings.pop("top_p", None)
    if int(settings.pop("num_beams", None) or 1) != 1:
        raise ValueError("llava_lite answers greedily or by sampling; beam search (num_beams > 1) is not offered")
    unknown = sorted(set(settings) - _IGNORED_SETTINGS)
    if unknown:
        logger.warning("llava_lite ignores these generation settings of the task: %s", ", ".join(unknown))
    return SamplingSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=float(top_p) if top_p else 1.0, stop=until
    )


def _field(item: Any, name: str) -> Any:
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


def _parts(content: Any) -> list:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content)
