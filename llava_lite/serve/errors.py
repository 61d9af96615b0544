"""Errors as OpenAI clients expect them: `{"error": {"message", "type", "param", "code"}}` with the right
status, one log line each, and never a stack trace in a response."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("llava_lite.serve")

# Status -> the `type` OpenAI's API gives errors of that status, where it is not `invalid_request_error`.
ERROR_TYPES = {401: "authentication_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """A request the server refuses; `code` is a short machine-readable reason, `headers` go with the answer
    (`Retry-After` on a 503)."""

    def __init__(
        self, status: int, message: str, code: str, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(request: Request, error: ApiError, headers: dict | None = None) -> JSONResponse:
    logger.warning("%s %s -> %d %s: %s", request.method, request.url.path, error.status, error.code, error.message)
    return JSONResponse(error_body(error.status, error.message, error.code, error.param), error.status, headers)


def install_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(_CatchAll)  # added last: outermost


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
    return error_response(request, error, {**headers, **error.headers})


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = error.errors()
    if any(problem.get("type") == "json_invalid" for problem in problems):
        detail = problems[0].get("ctx", {}).get("error", "JSON decode error")
        return error_response(request, ApiError(400, f"the request body is not valid JSON ({detail})", "invalid_json"))
    first = problems[0] if problems else {}
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid')}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem(s))"
    return error_response(request, ApiError(422, message, "invalid_schema", ".".join(where) or None))


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    # Starlette's own refusals: unknown paths, wrong methods, bodies over the size limit.
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    message = {
        404: f"no route {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
        413: "the request body is larger than this server accepts",
    }.get(error.status_code, str(error.detail))
    return error_response(request, ApiError(error.status_code, message, codes.get(error.status_code, "http_error")))


class _CatchAll:
    """The one place a bug surfaces: one log line for the operator, a plain 500 for the client.

    Pure ASGI rather than an `Exception` handler, because Starlette re-raises after calling that handler and
    the server would then print the whole traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception as error:
            where = f"{scope['method']} {scope['path']}"
            if started:  # too late for a status; most often the client went away
                logger.warning("%s -> failed mid-response: %s: %s", where, type(error).__name__, error)
                return
            logger.error("%s -> 500: %s: %s", where, type(error).__name__, error)
            body = error_body(500, "the server failed to answer this request", "internal_error")
            await JSONResponse(body, 500)(scope, receive, send)


class _BodyLimit:
    """413 for a body over the limit: at once when Content-Length says so, else as soon as the bytes that
    arrive pass it. (FastAPI's own `max_body_size` answers the first case in plain text, not OpenAI's shape.)"""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            error = ApiError(413, f"the request body is larger than {self.max_bytes} bytes", "request_too_large")
            await error_response(Request(scope), error)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413)  # raised inside body reading: the route's handlers answer it
            return message

        await self.app(scope, limited_receive, send)
