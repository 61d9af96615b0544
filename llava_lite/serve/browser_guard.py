"""What a web page in the user's browser may make this server do: nothing, unless it is the server's own page.

Any page the user visits can send requests to `http://127.0.0.1:8000`. A browser lets it POST there without
asking first when the body is `text/plain`, form-urlencoded or multipart (no CORS preflight): the page cannot
read the answer, but the server does the work. And a page on a name that its owner points at 127.0.0.1 after
it loaded (DNS rebinding) is same-origin with the server, so it could read answers too. Three checks close both:

- `Host` must name this server: localhost, an IP address, the name the server was bound to, or one listed in
  `--allowed-hosts`. A rebinding page's requests carry the attacker's name; an IP address cannot be rebound.
  The port is not compared: a forwarded port (a container's `-p 9000:8000`) changes it, and it says nothing
  about who sent the request.
- A request that carries `Origin` comes from a page (programs such as curl or the `openai` client send none);
  it is refused unless that origin is the server's own (the chat page at `/`) or listed in `--allow-origin`.
  `Origin: null` (a sandboxed frame, a local file) is nobody's own origin.
- The chat route takes only `application/json` bodies (app.py), which a page may send elsewhere only after a
  preflight, and the preflight is answered only for `--allow-origin`'s origins.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from llava_lite.serve.errors import ApiError, error_response

ALWAYS_ALLOWED_HOSTS = frozenset({"localhost"})
SHOWN_HEADER_CHARS = 100  # of a refused header's value, in the error message and the log line


def normalized_origin(text: str) -> str:
    """`scheme://host[:port]` in lower case, as browsers send `Origin`; ValueError for anything else."""
    parts = urlsplit(text.strip().rstrip("/").lower())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query or parts.fragment:
        raise ValueError(f"--allow-origin {text!r} is not an origin: write it as scheme://host[:port], no path")
    return f"{parts.scheme}://{parts.netloc}"


def normalized_host_name(text: str) -> str:
    """A name for `--allowed-hosts`, in lower case without a trailing dot; ValueError for a port, scheme or path."""
    name = text.strip().lower().rstrip(".")
    bracketed = name.startswith("[") and name.endswith("]")
    if not name or "/" in name or (":" in name and not bracketed):
        raise ValueError(f"--allowed-hosts {text!r} is not a host name: give the name alone, without port or scheme")
    return name.strip("[]")


def host_name(header: str) -> str | None:
    """The name in a `Host` header (`name`, `name:port`, `[v6]:port`), lower case; None when it is malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        name, bracket, port = header[1:].partition("]")
        port = port[1:] if port.startswith(":") else port
    else:
        name, _, port = header.partition(":")
        bracket = "]"
    if not name or not bracket or (port and not port.isdigit()):
        return None
    return name.rstrip(".")


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class BrowserGuard:
    """ASGI middleware, outermost: a 400 for a `Host` that does not name this server and a 403 for a foreign
    `Origin`, before any other part of the server sees the request (the API key check included)."""

    def __init__(self, app: ASGIApp, host_names: frozenset[str], origins: frozenset[str]) -> None:
        self.app = app
        self.host_names = host_names | ALWAYS_ALLOWED_HOSTS
        self.origins = origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name: value.decode("latin-1") for name, value in scope["headers"]}
        error = self._host_refusal(headers.get(b"host")) or self._origin_refusal(
            headers.get(b"origin"), headers.get(b"host", "")
        )
        if error is None:
            await self.app(scope, receive, send)
            return
        await error_response(Request(scope), error)(scope, receive, send)

    def _host_refusal(self, host: str | None) -> ApiError | None:
        if host is None:  # HTTP/1.0 without one: not a browser, which always sends it
            return None
        name = host_name(host)
        if name is not None and (name in self.host_names or is_ip_address(name)):
            return None
        return ApiError(
            400,
            f"the Host header {_shown(host)} does not name this server; start it with --allowed-hosts NAME "
            "to answer requests sent to that name",
            "host_not_allowed",
        )

    def _origin_refusal(self, origin: str | None, host: str) -> ApiError | None:
        if origin is None:
            return None
        parts = urlsplit(origin.strip().lower())
        own = parts.scheme in ("http", "https") and parts.netloc == host.strip().lower()
        if own or f"{parts.scheme}://{parts.netloc}" in self.origins:
            return None
        return ApiError(
            403,
            f"requests from web pages at {_shown(origin)} are refused (Origin header); start the server with "
            "--allow-origin ORIGIN to accept a page's requests",
            "origin_not_allowed",
        )


def _shown(value: str) -> str:
    return repr(value[:SHOWN_HEADER_CHARS] + ("..." if len(value) > SHOWN_HEADER_CHARS else ""))
