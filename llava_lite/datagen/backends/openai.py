"""Any OpenAI-compatible `/chat/completions` endpoint (vLLM, SGLang, Ollama, llama.cpp server, OpenAI), over httpx.

Why httpx and not the `openai` package: the SDK retries inside its own loop, where retries cannot be counted
by cause, and it would add pydantic-typed responses we do not need. httpx gives the
connection pool and timeouts; the retry policy here is a few lines we can test: retry 408, 409, 429, 5xx,
timeouts, dropped connections and unreadable bodies, waiting what `Retry-After` (or `retry-after-ms`) asks,
else exponential backoff with jitter. Concurrency is bounded by the caller's worker count, and the pool is
sized to match. The API key comes from an environment variable, never from the command line.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import os
import random
import time
from collections import Counter

import httpx

from llava_lite.datagen.backends import BACKEND_ERROR, REFUSAL, TRUNCATED, BackendSetupError, Reply, Request

RETRY_STATUS = {408, 409, 429}
# A server that says the request is wrong for everyone (bad URL, key, model) stops the run instead.
SETUP_STATUS = {401, 403, 404}
MAX_RETRY_AFTER_S = 600.0


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
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        temperature: float = 0.7,
        max_tokens: int = 1024,
    ) -> None:
        if not model:
            raise ValueError("the openai backend needs --model (the name the server serves the model under)")
        self.model = model
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.sampling = {"temperature": temperature, "max_tokens": max_tokens}
        headers = {}
        api_key = os.environ.get(api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.client = httpx.Client(
            base_url=base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

    def complete(self, requests: list[Request]) -> list[Reply]:
        return [self._complete_one(request) for request in requests]

    def close(self) -> None:
        self.client.close()

    def _complete_one(self, request: Request) -> Reply:
        body = {"model": self.model, "messages": request.messages, **self.sampling}
        retries: Counter = Counter()
        attempt = 0
        while True:
            reply, cause, detail, response = self._attempt(body)
            if reply is not None:
                reply.retries = retries
                return reply
            if attempt >= self.max_retries:
                detail = f"gave up after {attempt} retries; last: {detail}"
                return Reply(error=BACKEND_ERROR, detail=detail, retries=retries)
            retries[cause] += 1
            time.sleep(self._wait(attempt, response))
            attempt += 1

    def _attempt(self, body: dict) -> tuple[Reply | None, str, str, httpx.Response | None]:
        """One request: a reply (text, a verdict, or an error no retry mends), or why it is worth another try."""
        try:
            response = self.client.post("chat/completions", json=body)
        except httpx.TimeoutException:
            return None, "timeout", f"no reply within {self.client.timeout.read}s", None
        except httpx.TransportError as err:  # refused, reset, closed before the reply: all worth another try
            return None, "connection", f"{type(err).__name__}: {err}", None
        status = response.status_code
        detail = f"HTTP {status}: {response.text[:200]}".strip()
        if status in SETUP_STATUS:
            raise BackendSetupError(f"{response.request.url} answered {detail}")
        if status in RETRY_STATUS:
            return None, str(status), detail, response
        if status >= 500:
            return None, "5xx", detail, response
        if status != 200:  # e.g. 400 for a prompt too long: this record only
            return Reply(error=BACKEND_ERROR, detail=detail), "", detail, response
        reply = _parse_body(response)
        if reply is None:
            return None, "bad_body", f"unreadable reply body: {response.text[:200]!r}", response
        return reply, "", "", response

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
            return max(float(value) / scale, 0.0)
        except ValueError:
            pass
        if header == "retry-after":
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                continue  # neither a number nor a date: fall back to backoff
            if when.tzinfo is None:  # RFC 9110 dates are GMT; a zone-less one is read as such
                when = when.replace(tzinfo=datetime.timezone.utc)
            return max((when - datetime.datetime.now(datetime.timezone.utc)).total_seconds(), 0.0)
    return None


def _parse_body(response: httpx.Response) -> Reply | None:
    """The reply text or a content verdict; None when the body is not a chat completion at all."""
    try:
        data = response.json()
        choice = data["choices"][0]
        message = choice["message"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
        return None
    usage = data.get("usage") or {}
    tokens = {
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
    }
    if message.get("refusal") or choice.get("finish_reason") == "content_filter":
        return Reply(error=REFUSAL, detail=str(message.get("refusal") or "content filter"), **tokens)
    content = message.get("content")
    if not isinstance(content, str):
        return None
    if choice.get("finish_reason") == "length":
        return Reply(text=content, error=TRUNCATED, detail="the reply hit max_tokens", **tokens)
    return Reply(text=content, **tokens)
