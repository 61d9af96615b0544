"""Who may call the API: `Authorization: Bearer KEY` on every `/v1/` route, checked before a byte of the body is
read or parsed - a caller without the key learns nothing about what the server makes of its request.

`/health` and the chat page's static files are open (the page asks for the key itself and sends it)."""

from __future__ import annotations

import secrets

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from llava_lite.serve.errors import ApiError, error_response

PROTECTED_PREFIX = "/v1/"


class ApiKeyCheck:
    """ASGI middleware: a 401 in OpenAI's shape for a missing or wrong key, before the route runs."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.api_key is None or scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        error = self._refusal(dict(scope["headers"]).get(b"authorization"))
        if error is None:
            await self.app(scope, receive, send)
            return
        response = error_response(Request(scope), error, {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _refusal(self, header: bytes | None) -> ApiError | None:
        scheme, _, key = (header or b"").partition(b" ")
        if not header or scheme.lower() != b"bearer" or not key.strip():
            return ApiError(401, "this server needs an API key: send Authorization: Bearer KEY", "missing_api_key")
        if not secrets.compare_digest(key.strip(), self.api_key):
            return ApiError(401, "the API key is not valid for this server", "invalid_api_key")
        return None
