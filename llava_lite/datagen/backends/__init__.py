"""Backends answer chat requests: an OpenAI-compatible server, a local transformers model, or offline templates.

Every backend takes a batch of `Request`s and returns one `Reply` per request, in order. A reply is text, or
an `error` reason: `refusal` and `truncated` are verdicts on the content (the record is rejected), while
`backend_error` means the backend failed after its retries (the record is retried when the run is repeated).
`concurrency` says how many batches may be in flight at once, `batch_size` how many requests make a batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from llava_lite.datagen.inputs import ImageAnnotations

BACKENDS = ("template", "openai", "hf")

REFUSAL = "refusal"
TRUNCATED = "truncated"
BACKEND_ERROR = "backend_error"


@dataclass
class Request:
    key: str  # the task this request serves ("IMAGE_ID-KIND", or "...-judge")
    kind: str
    messages: list[dict[str, str]]
    image: ImageAnnotations  # the template backend works from the annotations, not the text


@dataclass
class Reply:
    text: str | None = None
    error: str | None = None
    detail: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: Counter = field(default_factory=Counter)  # by cause: 429, 5xx, timeout, connection, bad_body


class Backend(Protocol):
    name: str
    model: str
    concurrency: int
    batch_size: int

    def complete(self, requests: list[Request]) -> list[Reply]: ...

    def close(self) -> None: ...


class BackendSetupError(ValueError):
    """The backend cannot work at all (wrong URL, rejected key, unknown model): stop the run, not the record."""
