"""What an LLM backend takes and gives: a batch of `ChatRequest`s in, one `ChatReply` per request out, in order.

A reply is text, or an `error` reason. `refusal` and `truncated` are verdicts on the content (the caller rejects
the record); `backend_error` (the backend failed after its retries: a status, a timeout, a dropped connection) and
`malformed_reply` (the server answered, but not with a chat completion) are failures of the request: callers
journal them and ask again when the run is repeated. `concurrency` says how many batches may be in flight at
once, `batch_size` how many requests make a batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from llava_lite.data.annotations import ImageAnnotations

REFUSAL = "refusal"
TRUNCATED = "truncated"
BACKEND_ERROR = "backend_error"
MALFORMED_REPLY = "malformed_reply"
FAILURES = (BACKEND_ERROR, MALFORMED_REPLY)  # the request failed, not the content: a rerun asks again


@dataclass
class ChatRequest:
    key: str  # the task this request serves ("IMAGE_ID-KIND", "...-judge", a candidate's key)
    kind: str
    messages: list[dict]
    annotations: ImageAnnotations | None = None  # datagen's offline template backend answers from these


@dataclass
class ChatReply:
    text: str | None = None
    error: str | None = None
    detail: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: Counter = field(default_factory=Counter)  # by cause: 429, 5xx, timeout, connection, bad_body

    @property
    def failed(self) -> bool:
        """The request failed (at the backend, or with a reply that is not a chat completion): ask again later."""
        return self.error in FAILURES


class Backend(Protocol):
    name: str
    model: str
    concurrency: int
    batch_size: int

    def complete(self, requests: list[ChatRequest]) -> list[ChatReply]: ...

    def close(self) -> None: ...


class BackendSetupError(ValueError):
    """The backend cannot work at all (wrong URL, rejected key, unknown model): stop the run, not the record."""
