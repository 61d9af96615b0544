"""The OpenAI chat-completions shapes this server reads and writes, as pydantic models (validation is pydantic's).

Fields OpenAI clients commonly send that do not change our answers (`user`, `frequency_penalty`, ...) are
accepted and ignored, so LangChain and friends work unchanged; fields we cannot honour are refused. Requests are
validated strictly, as JSON types: a boolean is `true` or `false` (not "yes" or 1), a number is not a string, and
a seed fits in 64 bits (OpenAI's range) - anything else is a 422 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from llava_lite.inference.generator import Completion


class _Lenient(BaseModel):
    """Unknown fields ignored; known ones of exactly their JSON type."""

    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageUrl(_Lenient):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Lenient):
    # `developer` is what newer OpenAI clients call the system message.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=1)  # one answer per request: the generator makes one per conversation
    stream: bool | None = False  # null as OpenAI allows: not streamed
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


# ----- responses ------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, completion: Completion) -> Usage:
        total = completion.prompt_tokens + completion.completion_tokens
        return cls(
            prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens, total_tokens=total
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


def _absent(value: object) -> bool:
    return value is None


class Delta(BaseModel):
    # A chunk's delta carries only what it adds, as OpenAI's do: no `"role": null`.
    role: Literal["assistant"] | None = Field(default=None, exclude_if=_absent)
    content: str | None = Field(default=None, exclude_if=_absent)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llava_lite"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
