"""Under load: 32 concurrent clients all answered, the excess over a full line answered 503 at once (saying when to
retry) while the rest complete, a client that leaves mid-stream, mid-answer or while waiting gives its place back.
The server runs one generation at a time with 31 waiting. Every wait here has a deadline; nothing asserts how fast
anything was."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from conftest import fixture_path
from serve_helpers import API_KEY, MODEL_NAME, QUEUE_DEPTH, data_uri, image_question, png_data_uri, shared_server

DEADLINE = 120  # seconds any wait here may take before the test fails instead of hanging


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    return shared_server(request.config, tmp_path_factory)


@pytest.fixture(autouse=True)
def idle(server):
    wait_for(lambda: server.health()["running"] == server.health()["waiting"] == 0, "the server to be idle")


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {DEADLINE} s for {what}")
        time.sleep(0.05)


def counts(server) -> dict:
    return server.health()["counts"]


def chat_body(max_tokens: int, stream: bool = False) -> dict:
    return {
        "model": MODEL_NAME,
        "messages": image_question(png_data_uri()),
        "max_tokens": max_tokens,
        "stream": stream,
    }


class LongStream:
    """A streamed answer far longer than any test waits for (the test model never ends one by itself), read up
    to its first text so that it surely holds the slot; `close` drops the connection as a departing client does."""

    def __init__(self, server, max_tokens: int = 1800) -> None:
        self.client = httpx.Client(timeout=DEADLINE, headers=server.headers())
        request = self.client.build_request(
            "POST", f"{server.url}/v1/chat/completions", json=chat_body(max_tokens, True)
        )
        self.response = self.client.send(request, stream=True)
        assert self.response.status_code == 200
        self.lines = self.response.iter_lines()  # kept: dropping the iterator would close the connection
        for line in self.lines:
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                return
        pytest.fail("the long stream ended before any text")

    def close(self) -> None:
        self.response.close()
        self.client.close()


def test_32_concurrent_clients_all_get_complete_answers(server):
    photo = data_uri(fixture_path("images", "waterview.jpg"))
    before = counts(server)

    async def one(client: openai.AsyncOpenAI, number: int) -> tuple[str, str, int]:
        messages = image_question(photo if number % 2 else png_data_uri(colour=(number * 7, 90, 200)))
        if number % 2:
            stream = await client.chat.completions.create(
                model=MODEL_NAME, messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True}
            )
            chunks = [chunk async for chunk in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
            return text, finish, chunks[-1].usage.completion_tokens
        reply = await client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12)
        return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage.completion_tokens

    async def everyone() -> list:
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=DEADLINE
        ) as client:
            return await asyncio.gather(*(one(client, n) for n in range(32)))

    answers = asyncio.run(everyone())
    assert len(answers) == 32
    assert all(text and finish == "length" and tokens == 12 for text, finish, tokens in answers)
    after = counts(server)
    assert after["served"] - before.get("served", 0) == 32
    assert after.get("rejected", 0) == before.get("rejected", 0)
    # 16 plain requests arrived together at a server that runs one at a time: those waiting went in shared batches.
    assert after["batches"] - before.get("batches", 0) < 16


def test_requests_beyond_a_full_line_get_503_at_once_and_the_rest_complete(server):
    before = counts(server)
    holder = LongStream(server)  # holds the only slot until closed: whatever else comes must wait or be refused

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=DEADLINE, headers=server.headers()) as client:
            url = f"{server.url}/v1/chat/completions"
            sends = [asyncio.ensure_future(client.post(url, json=chat_body(8))) for _ in range(QUEUE_DEPTH + 9)]
            # The 9 beyond the line are answered while the slot is still held: 503 at once, not a hang.
            while sum(send.done() for send in sends) < 9:
                await asyncio.sleep(0.05)
            refused = [send.result() for send in sends if send.done()]
            assert len(refused) == 9 and all(r.status_code == 503 for r in refused)
            assert server.health()["waiting"] == QUEUE_DEPTH
            assert counts(server)["rejected"] - before.get("rejected", 0) == 9
            holder.close()  # now the line is answered, in batches
            return await asyncio.gather(*sends)

    try:
        responses = asyncio.run(asyncio.wait_for(burst(), DEADLINE))
    finally:
        holder.close()
    refused = [r for r in responses if r.status_code == 503]
    answered = [r for r in responses if r.status_code == 200]
    assert (len(refused), len(answered)) == (9, QUEUE_DEPTH)
    assert all(r.json()["error"]["code"] == "queue_full" for r in refused)
    assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in refused)  # what the openai SDK waits before a retry
    assert all(r.json()["error"]["type"] == "server_error" for r in refused)
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in answered)


def test_a_client_dropped_mid_stream_frees_its_slot(server):
    before = counts(server)
    dropped = LongStream(server)
    assert server.health()["running"] == 1
    dropped.close()
    wait_for(lambda: server.health()["running"] == 0, "the dropped stream's slot to be given back")
    after = counts(server)
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1  # stopped, not run to its 1800 tokens
    assert after.get("served", 0) == before.get("served", 0)
    answer = httpx.post(
        f"{server.url}/v1/chat/completions", json=chat_body(4), headers=server.headers(), timeout=DEADLINE
    )
    assert answer.status_code == 200


def test_a_plain_request_whose_client_leaves_stops_generating_and_frees_its_slot(server):
    before = counts(server)
    log_start = len(server.log())
    body = json.dumps(chat_body(1800)).encode()  # the test model never ends an answer by itself
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    client = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE)
    try:
        client.sendall(head.encode() + body)
        wait_for(lambda: server.health()["running"] == 1, "the plain request to be answering")
    finally:
        client.close()  # gone before any answer came
    wait_for(lambda: server.health()["running"] == 0, "the plain request's slot to be given back")
    after = counts(server)
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1
    assert after.get("served", 0) == before.get("served", 0)
    wait_for(lambda: "its answer stopped after" in server.log()[log_start:], "the server to log the stop")
    stopped = re.search(r"its answer stopped after (\d+) of 1800 tokens", server.log()[log_start:])
    assert stopped and int(stopped.group(1)) < 1800


def test_clients_leaving_the_line_give_their_places_back(server):
    holder = LongStream(server)
    try:
        with httpx.Client(timeout=DEADLINE, headers=server.headers()) as client, contextlib.ExitStack() as waiting:
            for _ in range(3):
                request = client.build_request("POST", f"{server.url}/v1/chat/completions", json=chat_body(4, True))
                waiting.callback(client.send(request, stream=True).close)
            wait_for(lambda: server.health()["waiting"] == 3, "three streams to wait in line")
        wait_for(lambda: server.health()["waiting"] == 0, "the streams to leave the line")
        assert server.health()["running"] == 1  # the long stream still has the slot
    finally:
        holder.close()
    wait_for(lambda: server.health()["running"] == 0, "the long stream's slot")
