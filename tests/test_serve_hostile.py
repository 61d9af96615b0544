"""Requests written to hurt: the key is checked before the body is read, types are JSON's own (no "yes" for true),
seeds fit in 64 bits, and a prompt too long to fit is refused from its length before it is rendered or
tokenized."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient
from serve_helpers import MODEL_NAME, make_run_folder, shared_server

from llava_lite.inference.generator import Generator
from llava_lite.serve.app import create_app
from llava_lite.serve.config import ServeConfig


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    return shared_server(request.config, tmp_path_factory)


def _post(server, body, headers=None) -> httpx.Response:
    send = {"content": body} if isinstance(body, bytes) else {"json": body}
    headers = server.headers() if headers is None else headers
    headers = {**headers, "Content-Type": "application/json"}  # declared JSON, as httpx's json= says it
    return httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=60, **send)


def _ask(**fields) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, **fields}


@pytest.mark.parametrize(
    "body",
    [b'{"model": "tiny-run", "messages": [', b"\xff\xfe not json", b"{}", b'{"model": 5}'],
    ids=["truncated JSON", "not text", "empty object", "wrong types"],
)
def test_without_the_key_nothing_of_the_body_is_looked_at(server, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        answer = _post(server, body, headers)
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
    assert _post(server, body).status_code in (400, 422)  # with the key, the body's own fault


def test_a_body_over_the_limit_without_the_key_is_a_401(server):
    answer = _post(server, b"x" * 4_000_000, {})
    assert answer.status_code == 401


BAD_TYPES = {
    # field: values that a lax parser would coerce, each a 422 here
    "stream": ["yes", 1, "true"],
    "seed": [2**70, -(2**63) - 1, "5", 1.5, True],
    "max_tokens": ["4", 4.0, False],
    "temperature": ["0.5"],
    "n": [2, "1", True],
    "stream_options": [{"include_usage": "yes"}],
}


@pytest.mark.parametrize("field", BAD_TYPES)
def test_fields_take_their_json_type_only(server, field):
    for value in BAD_TYPES[field]:
        body = _ask(**{field: value})
        if field == "stream_options":
            body["stream"] = True
        answer = _post(server, body)
        assert answer.status_code == 422, (field, value, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "invalid_schema" and error["param"].startswith(field), (field, value, error)


def test_seeds_across_the_64_bit_range_are_taken(server):
    for seed in (-(2**63), 0, 2**63 - 1):
        answer = _post(server, _ask(seed=seed, temperature=0.7))
        assert answer.status_code == 200, (seed, answer.text)
    assert _post(server, _ask(temperature=1, stream=False)).status_code == 200  # an int where a float goes is fine


def test_too_many_messages_are_refused_before_rendering(server):
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "Hi"} for i in range(257)]
    answer = _post(server, {"model": MODEL_NAME, "messages": messages, "max_tokens": 1})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "too_many_messages"


@pytest.fixture(scope="module")
def roomy_app(tmp_path_factory):
    """The app in this process, with the default limits (a 32 MB body), reached as 127.0.0.1 (TestClient's own
    name, testserver, is not one the server answers to)."""
    generator = Generator.from_folder(make_run_folder(tmp_path_factory.mktemp("roomy") / "run"), "cpu")
    app = create_app(generator, ServeConfig(model_name=MODEL_NAME))
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        yield client


def test_a_20_mb_prompt_is_refused_at_once_from_its_length(roomy_app):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "word " * 4_000_000}], "max_tokens": 1}
    start = time.monotonic()
    answer = roomy_app.post("/v1/chat/completions", json=body)
    took = time.monotonic() - start
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "context_length_exceeded" and "20000000 characters" in error["message"]
    assert took < 2, took  # the bound is 1 s; a shared machine gets twice that


def test_many_system_messages_become_one(roomy_app):
    messages = [{"role": "system", "content": f"rule {i}"} for i in range(200)] + [{"role": "user", "content": "Hi"}]
    answer = roomy_app.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": messages, "max_tokens": 1})
    assert answer.status_code == 200, answer.text
