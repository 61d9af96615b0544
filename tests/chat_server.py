"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for tests, with faults injected on request.

Replies are a deterministic function of the request, so two runs over the same data agree. Faults are planned
per image: `faults={"scene 3": ["429", "500"]}` answers the first request mentioning "scene 3" with a 429, the
second with a 500, and the rest normally. It records how many requests it saw, and the most it ever had in
flight at once. Every request loop in it ends by itself: a slow reply waits a bounded time.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from local_http_server import LocalHTTPServer

SCENE = re.compile(r"scene \d+")


class ChatServer(LocalHTTPServer):
    def __init__(self, faults: dict[str, list[str]] | None = None, delay: float = 0.0, slow: float = 1.5, api_key=None):
        self.faults = {key: list(plan) for key, plan in (faults or {}).items()}
        self.delay = delay  # seconds every normal reply takes, so that concurrency shows
        self.slow = slow  # seconds a `slow` reply takes: longer than the client's timeout
        self.api_key = api_key
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.unauthorised = 0
        self.lock = threading.Lock()
        super().__init__(_handler(self), server_class=_QuietServer)

    def next_fault(self, messages: list[dict]) -> str | None:
        kind = kind_of(messages)
        scene = SCENE.search(messages[-1]["content"])
        with self.lock:
            self.requests += 1
            if scene is None:
                return None
            plan = self.faults.get(f"{scene.group(0)} {kind}", self.faults.get(scene.group(0)))
            return plan.pop(0) if plan else None


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a client that hung up mid-request (a stopped run) is expected here, not worth a traceback


def kind_of(messages: list[dict]) -> str:
    system = messages[0]["content"]
    if "review instruction data" in system:
        return "judge"
    if "in rich detail" in system:
        return "detail"
    if "takes reasoning" in system:
        return "reasoning"
    return "conversation"


def answer(messages: list[dict]) -> str:
    """The normal reply: built from the first line of the image's context (its first caption)."""
    kind = kind_of(messages)
    caption = messages[-1]["content"].splitlines()[0].rstrip(".")
    if kind == "judge":
        low = "low quality" in messages[-1]["content"]
        return f"The answers follow the image.\nScore: {3 if low else 8}"
    if kind == "detail":
        return f"{caption}. The street around it is busy, and the afternoon light makes every colour look bright."
    if kind == "reasoning":
        return (
            "Question: Why might the bus stop here?\n"
            f"Answer: {caption}, and since buses stop along their route to let people on and off, it is most "
            "likely picking up the passengers waiting nearby."
        )
    return (
        f"Question: What can you see in this picture?\nAnswer: {caption}.\n"
        "Question: What colour is the bus?\nAnswer: It is red."
    )


def _handler(state: ChatServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            with state.lock:
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            self.counted = True
            try:
                self._serve()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout): nothing to do
            finally:
                self._finished()

        def _finished(self) -> None:
            """The request stops counting as in flight before its reply is written: a client that has the reply
            may send its next request (on a new connection) before this handler returns."""
            if self.counted:
                self.counted = False
                with state.lock:
                    state.in_flight -= 1

        def _serve(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": "not found"})
            if state.api_key and self.headers.get("Authorization") != f"Bearer {state.api_key}":
                with state.lock:
                    state.unauthorised += 1
                return self._send(401, {"error": {"message": "bad key"}})
            messages = body["messages"]
            fault = state.next_fault(messages)
            if fault == "429":
                return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"})
            if fault == "500":
                return self._send(500, {"error": {"message": "boom"}})
            if fault == "drop":
                self.close_connection = True
                return  # no reply at all: the client sees the connection closed
            if fault == "malformed":
                return self._send_raw(200, b'{"choices": [{"message": ', "application/json")
            if fault == "slow":
                time.sleep(state.slow)
            elif state.delay:
                time.sleep(state.delay)
            message = {"role": "assistant", "content": answer(messages)}
            finish = "stop"
            if fault == "refusal":
                message = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
            elif fault == "sorry":
                message["content"] = "I'm sorry, but I can't help with that request."
            elif fault == "leak":
                message["content"] = "Question: What is shown?\nAnswer: According to the captions, a red bus."
            elif fault == "coordinates":
                message["content"] = "Question: Where is the bus?\nAnswer: The bus is at [0.12, 0.30, 0.55, 0.90]."
            elif fault == "length":
                finish = "length"
            self._send(
                200,
                {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "model": body.get("model"),
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
                },
            )

        def _send(self, status: int, data: dict, headers: dict | None = None) -> None:
            extra = headers or {}
            self._send_raw(status, json.dumps(data).encode(), "application/json", extra)

        def _send_raw(self, status: int, payload: bytes, content_type: str, headers: dict | None = None) -> None:
            self._finished()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

    return Handler


def write_scenes(path, count: int, low_quality: tuple[int, ...] = ()) -> str:
    """Captions-and-boxes records for `count` street scenes; the server keys its faults on "scene N"."""
    rows = []
    for number in range(count):
        quality = " low quality" if number in low_quality else ""
        rows.append(
            {
                "id": f"img{number}",
                "image": f"img{number}.jpg",
                "captions": [f"A red bus in scene {number} waits at a stop{quality}.", "A city street with a bus."],
                "instances": [
                    {"category": "bus", "bbox": [0.1, 0.2, 0.6, 0.9]},
                    {"category": "person", "bbox": [0.7, 0.4, 0.8, 0.95]},
                ],
            }
        )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)
