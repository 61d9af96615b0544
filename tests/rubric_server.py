"""Stand-in OpenAI-compatible judges on 127.0.0.1, for the evaluations and scorers that call one.

`RepliesServer` answers every chat-completions request with what its `reply(body)` gives (an HTTP status and the
assistant's text), records every request's body (so a test can see what the judge was shown: the context, the
images) and stops itself after `lifetime` seconds should a test forget to.

`RubricServer` is the loop's rubric judge: the answer under review decides the reply. One holding `great` gets 9
and 7, `poor` 2 and 1, `rambling` a reply without the scores, `crash` an HTTP 500 every time (the client's retries
then give up), any other 1 + its length modulo 10 on both axes."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler

from local_http_server import LocalHTTPServer

ANSWER = re.compile(r"\[Answer\]\n(.*?)\n\n\[End of answer\]", re.DOTALL)


class RepliesServer(LocalHTTPServer):
    def __init__(self, reply: Callable[[dict], tuple[int, str]], lifetime: float = 120) -> None:
        self.reply = reply
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        super().__init__(_handler(self), lifetime)


class RubricServer(RepliesServer):
    def __init__(self) -> None:
        super().__init__(_rubric_reply)


def user_text(body: dict) -> str:
    content = body["messages"][-1]["content"]
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content


def _rubric_reply(body: dict) -> tuple[int, str]:
    match = ANSWER.search(user_text(body))
    answer = match.group(1) if match else ""
    if "crash" in answer:
        return 500, ""
    if "rambling" in answer:
        return 200, "A fine answer, I would say, all things considered."
    if "great" in answer:
        return 200, "Helpfulness: 9\nFaithfulness: 7\nIt answers the question and matches the image."
    if "poor" in answer:
        return 200, "Helpfulness: 2\nFaithfulness: 1\nIt invents things."
    points = 1 + len(answer) % 10  # any other answer: a score that varies with it, so that pairs can be formed
    return 200, f"Helpfulness: {points}\nFaithfulness: {points}\nAs long as it is."


def _handler(state: RepliesServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.bodies.append(body)
            status, text = state.reply(body)
            if status != 200:
                return self._send(status, {"error": {"message": "boom"}})
            message = {"role": "assistant", "content": text}
            usage = {"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60}
            self._send(200, {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": usage})

        def _send(self, status: int, data: dict) -> None:
            payload = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler
