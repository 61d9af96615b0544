"""The stand-in servers' common part: a threading HTTP server on 127.0.0.1 (the port the system picks) that serves
from a thread of its own while a `with` block lasts, and stops itself after `lifetime` seconds, when one is given,
should a test forget to."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LocalHTTPServer:
    def __init__(
        self,
        handler: type[BaseHTTPRequestHandler],
        lifetime: float | None = None,
        server_class: type[ThreadingHTTPServer] = ThreadingHTTPServer,
    ) -> None:
        self.server = server_class(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.watchdog = threading.Timer(lifetime, self.server.shutdown) if lifetime else None

    @property
    def url(self) -> str:
        """The OpenAI-compatible base URL."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        if self.watchdog:
            self.watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.watchdog:
            self.watchdog.cancel()
        self.server.shutdown()
        self.server.server_close()
