"""The `self` scorer's judge: the run that sampled the candidates, seeing each one's image, answering the rubric.

Loaded here (`RunJudge`, an LLM backend over our batched generator, greedy) or served by `llava-lite serve` and
reached through `llava_lite.llm`'s `openai` backend, the images then sent as data URIs in the request.
"""

from __future__ import annotations

import base64
import mimetypes
from pathlib import Path

from llava_lite.data.conversation import IMAGE_PLACEHOLDER, Conversation, Message
from llava_lite.data.images import load_image, resolve_image_path
from llava_lite.inference.generator import Generator, SamplingSettings
from llava_lite.llm.chat import Backend, ChatReply, ChatRequest
from llava_lite.rewards import rubric
from llava_lite.rewards.rubric import last_question


def image_paths(row: dict, folder: str | Path) -> list[Path]:
    """The line's images (`image` or `images`), inside `folder`."""
    names = row.get("images", row.get("image")) or []
    names = [names] if isinstance(names, str) else list(names)
    return [resolve_image_path(folder, name, f"sample {row.get('id')}") for name in names]


def self_messages(row: dict, answer: str, folder: str | Path) -> list[dict]:
    """The request in our own form: the images as placeholders in the text, their paths in `images` (read by
    `RunJudge`, or turned into data URIs by `served_messages`)."""
    paths = image_paths(row, folder)
    text = rubric.judge_text(last_question(row), answer, "", sees_image=bool(paths))
    user = {"role": "user", "content": IMAGE_PLACEHOLDER * len(paths) + "\n" + text, "images": [str(p) for p in paths]}
    return [{"role": "system", "content": rubric.SYSTEM}, user]


def served_messages(messages: list[dict]) -> list[dict]:
    """`self_messages`' request as an OpenAI-compatible server takes it: each image an `image_url` data URI part."""
    converted = []
    for message in messages:
        images = message.get("images")
        if not images:
            converted.append({"role": message["role"], "content": message["content"]})
            continue
        parts = [{"type": "image_url", "image_url": {"url": _data_uri(Path(path))}} for path in images]
        text = message["content"].replace(IMAGE_PLACEHOLDER, "").strip()
        converted.append({"role": message["role"], "content": [*parts, {"type": "text", "text": text}]})
    return converted


def _data_uri(path: Path) -> str:
    kind = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


class RunJudge:
    """An LLM backend answering with a run loaded here: greedy, batched, the images read per batch."""

    name = "self"
    concurrency = 1  # one model: the batch is the parallelism

    def __init__(self, generator: Generator, model: str, batch_size: int = 8, max_new_tokens: int = 48) -> None:
        self.generator = generator
        self.model = model
        self.batch_size = batch_size
        self.settings = SamplingSettings(max_new_tokens=max_new_tokens)

    def complete(self, requests: list[ChatRequest]) -> list[ChatReply]:
        conversations, images = [], []
        for request in requests:
            paths = [path for message in request.messages for path in message.get("images", [])]
            messages = [Message(m["role"], m["content"]) for m in request.messages]
            conversations.append(Conversation(messages, paths, request.key, f"judging {request.key}"))
            images.append([load_image(path, request.key) for path in paths])
        done = self.generator.complete(conversations, images, self.settings)
        return [ChatReply(c.text, prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens) for c in done]

    def close(self) -> None:
        pass


class ServedRunJudge:
    """The `openai` backend, the requests' images turned into data URIs first."""

    name = "self"

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.model = backend.model
        self.concurrency = backend.concurrency
        self.batch_size = backend.batch_size

    def complete(self, requests: list[ChatRequest]) -> list[ChatReply]:
        converted = [ChatRequest(r.key, r.kind, served_messages(r.messages), r.annotations) for r in requests]
        return self.backend.complete(converted)

    def close(self) -> None:
        self.backend.close()
