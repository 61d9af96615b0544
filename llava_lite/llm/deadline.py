"""Deadlines httpx's timeouts cannot give: httpx (through httpcore) restarts its read timeout with every chunk it
receives, so a server that trickles one byte every half second holds a request for as long as it likes.

Here an attempt sets its `Deadline` for the calling thread (`bounded_by`), and every socket operation made for it -
the connect, the TLS handshake, each write, each read, of headers and body alike - waits at most what is left of
it; once it has passed, the next one raises httpcore's timeout, which httpx reports as its own. A sync httpx
request runs in the thread that sent it, from its first byte to its last, so the deadline is kept per thread.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import httpcore
import httpx

WRITE_SLICE = 64 * 1024  # a request body goes out in slices, each given what is left of the deadline

_current = threading.local()


class Deadline:
    """A moment on the monotonic clock, `seconds` from now."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()


@contextmanager
def bounded_by(deadline: Deadline) -> Iterator[None]:
    """Every socket operation this thread makes through a `deadline_transport` ends by `deadline`."""
    previous = getattr(_current, "deadline", None)
    _current.deadline = deadline
    try:
        yield
    finally:
        _current.deadline = previous


def deadline_transport(limits: httpx.Limits, proxy: str | None = None) -> httpx.HTTPTransport:
    """httpx's own HTTP transport (its pool, its error mapping, a proxy if given), its sockets bounded by the
    calling thread's deadline."""
    transport = httpx.HTTPTransport(limits=limits, proxy=proxy)
    # httpcore's pool takes a network backend, but httpx builds it with the default one and offers no way to pass
    # another: wrap the pool's. Reading the attribute first fails loudly should a release rename it.
    pool = transport._pool
    pool._network_backend = _DeadlineBackend(pool._network_backend)
    return transport


def environment_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, less NO_PROXY), as httpx
    would have used it had it built its transport itself."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


def _bounded(timeout: float | None, expired: type[Exception]) -> float | None:
    """`timeout`, shortened to what is left of this thread's deadline; `expired` raised once it has passed."""
    deadline = getattr(_current, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline.remaining()
    if left <= 0:
        raise expired("the attempt's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # httpcore gives one timeout to a whole `write`, however many sends a slow reader makes it take.
        for start in range(0, len(buffer), WRITE_SLICE):
            self._stream.write(buffer[start : start + WRITE_SLICE], _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None, timeout: float | None = None):
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, bounded))

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address=None, socket_options=None):
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_tcp(host, port, bounded, local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_unix_socket(path, bounded, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)
