"""Streamed answers as server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Send

from llava_lite.serve.errors import error_body
from llava_lite.serve.scheduler import StreamTicket
from llava_lite.serve.schemas import ChatCompletionChunk, ChunkChoice, Delta, Usage

logger = logging.getLogger("llava_lite.serve")


class ClosingStreamingResponse(StreamingResponse):
    """Closes its event stream however sending ends. Starlette leaves it suspended when a client disconnects
    between two events; closing it here is what cancels the generation and frees the request's slot."""

    def __init__(self, content: AsyncIterator[str]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):  # a disconnect cancels this task; the cleanup must still run
                await self.body_iterator.aclose()


async def chat_events(ticket: StreamTicket, envelope: dict, include_usage: bool) -> AsyncIterator[str]:
    """The stream's events; `envelope` holds the `id`, `created` and `model` every chunk carries."""

    def event(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(**envelope, choices=choices, usage=usage)
        return f"data: {chunk.model_dump_json()}\n\n"

    try:
        yield event([ChunkChoice(delta=Delta(role="assistant", content=""))])
        async for text in ticket:
            yield event([ChunkChoice(delta=Delta(content=text))])
        completion = ticket.completion
        if completion is None:
            return  # cancelled: nobody is reading any more
        yield event([ChunkChoice(delta=Delta(), finish_reason=completion.finish_reason)])
        if include_usage:
            yield event([], Usage.of(completion))
        yield "data: [DONE]\n\n"
    except Exception as err:
        # Headers are sent: the failure can only be told in the stream, as OpenAI does.
        logger.error("POST /v1/chat/completions (stream) -> error: %s: %s", type(err).__name__, err)
        yield f"data: {json.dumps(error_body(500, 'the server failed to finish this answer', 'internal_error'))}\n\n"
    finally:
        await ticket.aclose()
