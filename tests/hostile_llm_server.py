"""A stand-in OpenAI-compatible server on 127.0.0.1 that answers garbage on request, for the LLM client's tests.

`misbehave` names what every chat-completions request gets until it is set to None, when the server behaves: a
datagen request gets `chat_server.answer`'s reply, a rubric judge's request (its system message names
Faithfulness) a rubric reply. The kinds are the replies that once ended a run with a traceback:
- `gzip_lie`: `Content-Encoding: gzip` over a body that is not gzip;
- `message_string`, `usage_string`: `choices[0].message` or `usage` a string;
- `tokens_overflow`: `usage.prompt_tokens: 1e400`; `tokens_word`: `usage.prompt_tokens: "many"`;
- `deep`: a reply nested 200,000 levels;
- `trickle`: the headers, then one byte of the body every 0.5 s; `header_trickle`: a status line, then one byte of
  a header every 0.5 s. A trickle stops when the client hangs up, or after `TRICKLE_BYTES` bytes.
It counts the requests it was sent.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler

from chat_server import answer
from local_http_server import LocalHTTPServer

TRICKLE_BYTES = 120  # a minute of trickling: far past any timeout the tests give
_COMPLETION = b'{"choices": [{"message": {"role": "assistant", "content": "Hello."}, "finish_reason": "stop"}]'
BODIES = {
    "gzip_lie": _COMPLETION + b"}",
    "message_string": b'{"choices": [{"message": "Hello.", "finish_reason": "stop"}]}',
    "usage_string": _COMPLETION + b', "usage": "a few tokens"}',
    "tokens_overflow": _COMPLETION + b', "usage": {"prompt_tokens": 1e400, "completion_tokens": 3}}',
    "tokens_word": _COMPLETION + b', "usage": {"prompt_tokens": "many", "completion_tokens": 3}}',
    "deep": b'{"choices": [{"message": {"content": ' + b"[" * 200_000 + b"]" * 200_000 + b"}}]}",
}
TRICKLES = ("trickle", "header_trickle")
KINDS = (*BODIES, *TRICKLES)
RUBRIC_REPLY = "Helpfulness: 8\nFaithfulness: 6\nIt answers the question."


class HostileServer(LocalHTTPServer):
    def __init__(self, misbehave: str | None = None) -> None:
        self.misbehave = misbehave
        self.requests = 0
        self.lock = threading.Lock()
        super().__init__(_handler(self))


def behaved_reply(messages: list[dict]) -> str:
    if "Faithfulness" in messages[0]["content"]:
        return RUBRIC_REPLY
    return answer(messages)


def _handler(state: HostileServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def handle_one_request(self) -> None:
            try:
                super().handle_one_request()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up on a trickle: what it should do

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests += 1
                kind = state.misbehave
            if kind == "trickle":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(TRICKLE_BYTES))
                self.end_headers()
                self._trickle()
            elif kind == "header_trickle":
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slowly: ")
                self._trickle()
            elif kind is not None:
                headers = {"Content-Encoding": "gzip"} if kind == "gzip_lie" else {}
                self._send(BODIES[kind], headers)
            else:
                message = {"role": "assistant", "content": behaved_reply(body["messages"])}
                usage = {"prompt_tokens": 40, "completion_tokens": 10, "total_tokens": 50}
                reply = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": usage}
                self._send(json.dumps(reply).encode())

        def _trickle(self) -> None:
            self.close_connection = True
            for _ in range(TRICKLE_BYTES):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.5)

        def _send(self, payload: bytes, headers: dict | None = None) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

    return Handler
