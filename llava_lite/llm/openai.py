"""Any OpenAI-compatible `/chat/completions` endpoint (vLLM, SGLang, Ollama, llama.cpp server, OpenAI), over httpx.

Why httpx and not the `openai` package: the SDK retries inside its own loop, where retries cannot be counted
by cause, and it would add pydantic-typed responses we do not need. httpx gives the connection pool; the retry
policy here is a few lines we can test: retry 408, 409, 429, 5xx, timeouts, dropped connections and bodies that
are not JSON text, waiting what `Retry-After` (or `retry-after-ms`) asks, else exponential backoff with jitter.
Concurrency is bounded by the caller's worker count, and the pool is sized to match. The API key comes from an
environment variable, never from the command line.

A server is not trusted to answer well. `timeout` bounds a whole attempt - connect, wait and read, however slowly
the bytes come (`llava_lite.llm.deadline`) - and `deadline` a whole request, its retries and waits included. A
reply's body is read up to `MAX_REPLY_BYTES` and its nesting checked by one linear scan before `json.loads` sees
it; a reply that is JSON but no chat completion (a field of the wrong type, a token count out of range, nothing to
read) fails its request as `malformed_reply`, named in the detail, without a retry - the server would answer the
same. Nothing a server sends ends a run with a traceback.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import math
import os
import random
import re
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx

from llava_lite.llm.chat import (
    BACKEND_ERROR,
    MALFORMED_REPLY,
    REFUSAL,
    TRUNCATED,
    BackendSetupError,
    ChatReply,
    ChatRequest,
)
from llava_lite.llm.deadline import Deadline, bounded_by, deadline_transport, environment_proxy

RETRY_STATUS = {408, 409, 429}
# A server that says the request is wrong for everyone (bad URL, key, model) stops the run instead.
SETUP_STATUS = {401, 403, 404}
MAX_RETRY_AFTER_S = 600.0
MAX_REPLY_BYTES = 8 * 2**20  # a chat completion is kilobytes; logprobs of a long reply, a few megabytes at most
MAX_REPLY_DEPTH = 64  # a chat completion nests 6 levels (logprobs); json.loads recurses once per level
MAX_TOKEN_COUNT = 2**53  # a usage count above this is no count (and would lose precision as a float)
_JSON_SPECIAL = re.compile(rb'["\\\[\]{}]')


class MalformedReply(ValueError):
    """The server answered, but not with a chat completion: no retry mends it."""


class _UnreadableBody(ValueError):
    """The body is not JSON text at all (cut short, garbled, not the encoding it claims): worth another try."""


@dataclass
class _Attempt:
    reply: ChatReply | None = None  # what the request ends with (text, a verdict, or a failure no retry mends)
    cause: str = ""  # else: why another try may help (429, 5xx, timeout, connection, bad_body)
    detail: str = ""
    response: httpx.Response | None = None  # for the wait a 429 or 503 asks for


class OpenAIBackend:
    name = "openai"
    batch_size = 1

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 120.0,
        deadline: float = 600.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        temperature: float = 0.7,
        max_tokens: int = 1024,
    ) -> None:
        if not model:
            raise ValueError("the openai backend needs --model (the name the server serves the model under)")
        if not timeout > 0 or not deadline > 0:
            raise ValueError(f"the openai backend needs a timeout and a deadline above 0 (got {timeout}, {deadline})")
        if urllib.parse.urlsplit(base_url or "").scheme not in ("http", "https"):
            raise ValueError(f"the openai backend needs an http:// or https:// base URL, got {base_url!r}")
        self.model = model
        self.concurrency = concurrency
        self.timeout = timeout
        self.deadline = deadline
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.sampling = {"temperature": temperature, "max_tokens": max_tokens}
        headers = {}
        api_key = os.environ.get(api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = httpx.Client(
            base_url=base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(timeout),
            transport=deadline_transport(limits, environment_proxy(base_url)),
        )

    def complete(self, requests: list[ChatRequest]) -> list[ChatReply]:
        return [self._complete_one(request) for request in requests]

    def close(self) -> None:
        self.client.close()

    def _complete_one(self, request: ChatRequest) -> ChatReply:
        body = {"model": self.model, "messages": request.messages, **self.sampling}
        deadline = Deadline(self.deadline)
        retries: Counter = Counter()
        attempt = 0
        while True:
            outcome = self._attempt(body, deadline)
            if outcome.reply is not None:
                outcome.reply.retries = retries
                return outcome.reply
            if attempt >= self.max_retries:
                detail = f"gave up after {attempt} retries; last: {outcome.detail}"
                return ChatReply(error=BACKEND_ERROR, detail=detail, retries=retries)
            wait = self._wait(attempt, outcome.response)
            if wait >= deadline.remaining():  # no time left for another try: fail now rather than sleep for nothing
                detail = f"no reply within the request's deadline of {self.deadline:g}s; last: {outcome.detail}"
                return ChatReply(error=BACKEND_ERROR, detail=detail, retries=retries)
            retries[outcome.cause] += 1
            time.sleep(wait)
            attempt += 1

    def _attempt(self, body: dict, request_deadline: Deadline) -> _Attempt:
        """One request, connect to last byte within `timeout` (and the request's deadline)."""
        seconds = max(min(self.timeout, request_deadline.remaining()), 0.0)
        deadline = Deadline(seconds)
        try:
            with bounded_by(deadline), self.client.stream("POST", "chat/completions", json=body) as response:
                raw = _read_capped(response)
        except httpx.TimeoutException:
            return _Attempt(cause="timeout", detail=f"no whole reply within {seconds:.3g}s")
        except httpx.DecodingError as err:  # e.g. `Content-Encoding: gzip` over a body that is not gzip
            return _Attempt(cause="bad_body", detail=f"a body that does not decode as its Content-Encoding says: {err}")
        except httpx.TransportError as err:  # refused, reset, closed before or during the reply: worth another try
            return _Attempt(cause="connection", detail=f"{type(err).__name__}: {err}")
        except MalformedReply as err:
            return _Attempt(ChatReply(error=MALFORMED_REPLY, detail=str(err)))
        status = response.status_code
        detail = f"HTTP {status}: {raw[:200].decode('utf-8', 'replace')}".strip()
        if status in SETUP_STATUS:
            raise BackendSetupError(f"{response.request.url} answered {detail}")
        if status in RETRY_STATUS:
            return _Attempt(cause=str(status), detail=detail, response=response)
        if status >= 500:
            return _Attempt(cause="5xx", detail=detail, response=response)
        if status != 200:  # e.g. 400 for a prompt too long: this record only
            return _Attempt(ChatReply(error=BACKEND_ERROR, detail=detail))
        try:
            return _Attempt(parse_completion(raw))
        except _UnreadableBody as err:
            return _Attempt(cause="bad_body", detail=f"unreadable reply body ({err}): {raw[:200]!r}", response=response)
        except MalformedReply as err:
            return _Attempt(ChatReply(error=MALFORMED_REPLY, detail=f"not a chat completion: {err}"))

    def _wait(self, attempt: int, response: httpx.Response | None) -> float:
        asked = _retry_after(response) if response is not None else None
        if asked is not None:
            return min(asked, MAX_RETRY_AFTER_S)
        # Exponential backoff with jitter, so that many workers refused at once do not return at once.
        return min(self.backoff * 2**attempt, self.max_backoff) * random.uniform(0.5, 1.0)


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds the server asked us to wait: `retry-after-ms`, or `Retry-After` as seconds or as an HTTP date."""
    for header, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = response.headers.get(header)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            seconds = None
        if seconds is not None and math.isfinite(seconds):
            return max(seconds, 0.0)
        if header == "retry-after":
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                continue  # neither a number nor a date: fall back to backoff
            if when.tzinfo is None:  # RFC 9110 dates are GMT; a zone-less one is read as such
                when = when.replace(tzinfo=datetime.timezone.utc)
            return max((when - datetime.datetime.now(datetime.timezone.utc)).total_seconds(), 0.0)
    return None


# ----- reading a reply ------------------------------------------------------------------------------------------


def _read_capped(response: httpx.Response) -> bytes:
    """The body, decoded as its Content-Encoding says; over `MAX_REPLY_BYTES` it is refused, unread past that."""
    limit = MAX_REPLY_BYTES
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise MalformedReply(f"a reply body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_completion(raw: bytes) -> ChatReply:
    """A chat completion's first choice: its text, or a verdict on it (refusal, truncated), with the token counts.
    Raises `MalformedReply` naming the field that is wrong, `_UnreadableBody` when the body is not JSON at all."""
    data = _load_json(raw)
    if not isinstance(data, dict):
        raise MalformedReply(f"the reply is {_kind(data)}, not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise MalformedReply(f"`choices` is {_kind(choices)}, not a list of at least one choice")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise MalformedReply(f"`choices[0]` is {_kind(choice)}, not an object")
    message = choice.get("message")
    if not isinstance(message, dict):
        raise MalformedReply(f"`choices[0].message` is {_kind(message)}, not an object")
    tokens = _usage(data.get("usage"))
    finish = choice.get("finish_reason")
    refusal = message.get("refusal")
    if refusal or finish == "content_filter":
        return ChatReply(error=REFUSAL, detail=str(refusal or "content filter")[:500], **tokens)
    content = message.get("content")
    if not isinstance(content, str):
        raise MalformedReply(f"`choices[0].message.content` is {_kind(content)}, not text")
    if finish == "length":
        return ChatReply(text=content, error=TRUNCATED, detail="the reply hit max_tokens", **tokens)
    return ChatReply(text=content, **tokens)


def _load_json(raw: bytes) -> Any:
    if nests_deeper_than(raw, MAX_REPLY_DEPTH):
        raise MalformedReply(f"the reply nests deeper than {MAX_REPLY_DEPTH} levels")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _UnreadableBody(str(err)) from None
    except ValueError as err:  # a number of more digits than Python converts
        raise MalformedReply(str(err)) from None


def _no_constant(name: str) -> None:
    raise MalformedReply(f"`{name}` is not a JSON number")


def nests_deeper_than(raw: bytes, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels in JSON text, brackets inside strings not counted:
    one linear scan over the quotes, backslashes and brackets, stopped as soon as the depth passes `limit`."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # too few brackets to pass the limit, however they nest
    depth = 0
    in_string = False
    escaped = -1  # the offset of the character a backslash escapes
    for match in _JSON_SPECIAL.finditer(raw):
        at, char = match.start(), raw[match.start()]
        if in_string:
            if at == escaped:
                continue
            if char == 0x5C:  # backslash
                escaped = at + 1
            elif char == 0x22:  # quote
                in_string = False
        elif char == 0x22:
            in_string = True
        elif char in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif char in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def _usage(usage: Any) -> dict[str, int]:
    if usage is None:
        return {"prompt_tokens": 0, "completion_tokens": 0}
    if not isinstance(usage, dict):
        raise MalformedReply(f"`usage` is {_kind(usage)}, not an object")
    return {name: _token_count(usage.get(name), f"usage.{name}") for name in ("prompt_tokens", "completion_tokens")}


def _token_count(value: Any, where: str) -> int:
    if value is None:
        return 0
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or not 0 <= value <= MAX_TOKEN_COUNT:
        raise MalformedReply(f"`{where}` is {_kind(value, shown=True)}, not a token count")
    return int(value)


def _kind(value: Any, shown: bool = False) -> str:
    """What a JSON value is, for a message: `a string`, `an object`; with `shown`, numbers and short text quoted."""
    if shown and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
