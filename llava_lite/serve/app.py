"""The routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, and the chat page at `/`."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError

from llava_lite.inference.generator import Completion, Generator
from llava_lite.serve.auth import ApiKeyCheck
from llava_lite.serve.browser_guard import BrowserGuard
from llava_lite.serve.config import ServeConfig
from llava_lite.serve.errors import ApiError, install_error_handlers
from llava_lite.serve.prompts import PromptBuilder
from llava_lite.serve.scheduler import QueueFull, Scheduler
from llava_lite.serve.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ModelCard,
    ModelList,
    Usage,
)
from llava_lite.serve.streaming import ClosingStreamingResponse, chat_events

logger = logging.getLogger("llava_lite.serve")

PAGE_FILES = {"index.html": "text/html", "chat.js": "text/javascript", "chat.css": "text/css"}


def create_app(generator: Generator, config: ServeConfig) -> FastAPI:
    scheduler = Scheduler(generator, config.concurrency, config.queue_depth, config.max_batch_size)
    prompts = PromptBuilder(generator, config)
    page_files = {name: _page_file(name) for name in PAGE_FILES}
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.shutdown()

    app = FastAPI(
        title="llava_lite",
        lifespan=lifespan,
        docs_url=None,  # no third-party assets fetched by a page we serve
        redoc_url=None,
    )
    app.state.scheduler = scheduler
    install_error_handlers(app, config.max_body_bytes)
    app.add_middleware(ApiKeyCheck, api_key=config.api_key)  # the key before any byte of the body
    if config.allow_origins:
        # A listed page's JSON request comes after a preflight (OPTIONS, no API key): answered here, before the key.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    # Outermost: a request sent to a name that is not this server's, or by a foreign page, is refused first.
    bound = config.bound_host.strip("[]").lower().rstrip(".")
    app.add_middleware(
        BrowserGuard, host_names=frozenset({bound, *config.allowed_hosts}), origins=frozenset(config.allow_origins)
    )

    @app.get("/health")
    async def health() -> dict:
        stats = scheduler.stats()
        return {
            "status": "ok",
            "model": config.model_name,
            "running": stats.running,
            "waiting": stats.waiting,
            "concurrency": config.concurrency,
            "queue_depth": config.queue_depth,
            "counts": dict(stats.counts),
        }

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=config.model_name, created=created)])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        _check_model(model_id, config)
        return ModelCard(id=config.model_name, created=created)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> ChatCompletion | Response:
        _check_json_body(request)
        body = _parsed(await request.body())
        _check_model(body.model, config)
        # What every chunk of a stream, or the one plain answer, carries.
        envelope = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": config.model_name}
        try:
            scheduler.check_room()  # refuse before reading any image, not only when queueing
            prompt = await prompts.build(body)
            if body.stream:
                ticket = scheduler.stream(prompt.encoded, prompt.images, prompt.settings)
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return ClosingStreamingResponse(chat_events(ticket, envelope, include_usage))
            answering = scheduler.complete(prompt.encoded, prompt.images, prompt.settings)
            completion = await _unless_client_leaves(request, answering)
        except QueueFull as full:
            raise ApiError(503, str(full), "queue_full", headers={"Retry-After": str(full.retry_after)}) from None
        if completion is None:
            # Nobody is left to read an answer; 499 is what proxies log for "client closed the request".
            logger.info("POST /v1/chat/completions -> 499: the client left before its answer")
            return Response(status_code=499)
        return ChatCompletion(
            **envelope,
            choices=[Choice(message=AssistantMessage(content=completion.text), finish_reason=completion.finish_reason)],
            usage=Usage.of(completion),
        )

    # The chat page is static files that hold nothing secret; it asks for the API key itself and sends it
    # on its API calls (a browser cannot send a Bearer header when it opens a page).
    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_files["index.html"])

    @app.get("/page/{name}", include_in_schema=False)
    async def page_asset(name: str) -> Response:
        if name not in PAGE_FILES:
            raise ApiError(404, f"no page file {name}", "not_found")
        return Response(page_files[name], media_type=PAGE_FILES[name])

    return app


async def _unless_client_leaves(request: Request, answering: Awaitable[Completion]) -> Completion | None:
    """What `answering` gives, or None once the client has disconnected - `answering` is then cancelled, which
    takes the request out of the line or stops its generation. The server does not cancel a plain request's
    handler when its client leaves; the ASGI `http.disconnect` message, the next one after the body, says so."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(answering)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait({work})
    return None if work.cancelled() else work.result()


def _check_json_body(request: Request) -> None:
    """415 unless the body is declared JSON. The types a web page may send anywhere without a preflight
    (text/plain, form-urlencoded, multipart, or none) are what a cross-site request would use."""
    declared = request.headers.get("content-type")
    if declared is not None and declared.partition(";")[0].strip().lower() == "application/json":
        return
    shown = "none" if declared is None else repr(declared[:100])
    raise ApiError(
        415,
        f"the request body must be JSON sent with the header Content-Type: application/json (this one has {shown})",
        "unsupported_media_type",
    )


def _parsed(body: bytes) -> ChatCompletionRequest:
    """The request, parsed and validated by pydantic straight from the JSON bytes (strict JSON types); its
    refusals go to the validation handler: 400 for JSON that does not parse, 422 for the schema."""
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as err:
        raise RequestValidationError(err.errors(include_url=False, include_input=False)) from None


def _check_model(name: str, config: ServeConfig) -> None:
    if name != config.model_name:
        raise ApiError(
            404,
            f"the model {name!r} does not exist here; this server has {config.model_name!r}",
            "model_not_found",
            "model",
        )


def _page_file(name: str) -> str:
    return resources.files("llava_lite.serve").joinpath("page", name).read_text(encoding="utf-8")
