"""Every kind of bad request gets its status and an OpenAI-shaped error body, no stack trace, and the server
answers the next request as before."""

from __future__ import annotations

import base64
import io
import os
import re

import httpx
import pytest
from PIL import Image
from serve_helpers import MAX_TOKENS_LIMIT, MODEL_NAME, image_question, png_data_uri, shared_server

from llava_lite.cli import build_parser, main
from llava_lite.commands.serve import serve_config


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    return shared_server(request.config, tmp_path_factory)


def _uri(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


def _big_png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 10)).save(buffer, format="PNG")  # one colour: few bytes, many pixels
    return buffer.getvalue()


def _ask(*image_urls: str, **fields) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    content.append({"type": "text", "text": "What is this?"})
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


BAD_REQUESTS = {
    # name: (body - a dict sent as JSON, or raw bytes - , status, code)
    "malformed JSON": (b'{"model": "tiny-run", "messages": [', 400, "invalid_json"),
    "bad base64": (_ask("data:image/png;base64,iVBORw0KGgo!!!not-base64"), 400, "invalid_base64"),
    "not an image": (_ask(_uri("image/png", b"just some text, no picture")), 400, "invalid_image"),
    "a GIF": (_ask(_uri("image/gif", _gif())), 400, "invalid_image"),
    "more images than the model takes": (_ask(png_data_uri(), png_data_uri(), png_data_uri()), 400, "too_many_images"),
    "image text placeholder": (
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "<image> hi"}]},
        400,
        "invalid_content",
    ),
    "max_tokens over the limit": (_ask(png_data_uri(), max_tokens=MAX_TOKENS_LIMIT + 1), 400, "max_tokens"),
    "prompt over the limit": (
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "tell me " * 400}]},
        400,
        "context_length_exceeded",
    ),
    "ends with the assistant": (
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        400,
        "invalid_messages",
    ),
    "unknown model": (_ask(png_data_uri(), model="gpt-4o"), 404, "model_not_found"),
    "body over the limit": (_ask(png_data_uri(), padding="x" * 3_100_000), 413, "request_too_large"),
    "image bytes over the limit": (_ask(_uri("image/png", os.urandom(1_100_000))), 413, "image_too_large"),
    "image pixels over the limit": (_ask(_uri("image/png", _big_png((2100, 2000)))), 413, "image_too_large"),
    "no messages": ({"model": MODEL_NAME, "messages": []}, 422, "invalid_schema"),
    "missing model": ({"messages": [{"role": "user", "content": "hi"}]}, 422, "invalid_schema"),
    "temperature out of range": (_ask(png_data_uri(), temperature=5), 422, "invalid_schema"),
    "n above 1": (_ask(png_data_uri(), n=2), 422, "invalid_schema"),
    "unknown content part": (
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]},
        422,
        "invalid_schema",
    ),
    "unknown role": ({"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 422, "invalid_schema"),
}


@pytest.mark.parametrize("kind", list(BAD_REQUESTS))
def test_bad_request_gets_its_status_and_an_error_body(server, kind):
    body, status, code = BAD_REQUESTS[kind]
    sent = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers={**server.headers(), "Content-Type": "application/json"},
        timeout=60,
        **sent,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    assert error["type"] == "invalid_request_error"
    assert "Traceback" not in response.text and 'File "' not in response.text
    assert server.health()["status"] == "ok"


def test_unknown_route_and_method_are_openai_shaped(server):
    missing = httpx.get(f"{server.url}/v1/embeddings", headers=server.headers(), timeout=10)
    wrong_method = httpx.delete(f"{server.url}/v1/models", headers=server.headers(), timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"


def test_server_still_answers_after_bad_requests(server):
    for body, _, _ in BAD_REQUESTS.values():
        sent = {"content": body} if isinstance(body, bytes) else {"json": body}
        httpx.post(
            f"{server.url}/v1/chat/completions",
            headers={**server.headers(), "Content-Type": "application/json"},
            timeout=60,
            **sent,
        )
    good = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": image_question(png_data_uri()), "max_tokens": 4},
        headers=server.headers(),
        timeout=60,
    )
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"]


def test_every_error_is_logged_in_one_line(server):
    headers = {**server.headers(), "Content-Type": "application/json"}
    httpx.post(f"{server.url}/v1/chat/completions", content=b"{", headers=headers, timeout=10)
    lines = [line for line in server.log().splitlines() if "invalid_json" in line]
    assert lines and all("-> 400 invalid_json:" in line for line in lines)
    assert "Traceback" not in server.log()


def test_chunked_body_over_the_limit_gets_413(server):
    def chunks():  # no Content-Length: the limit is found while reading
        for _ in range(40):
            yield b"x" * 100_000

    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=chunks(),
        headers={**server.headers(), "Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


# ----- bad settings: refused when the server starts, before the model loads ------------------------------


def settings(*flags: str):
    return serve_config(build_parser().parse_args(["serve", "--model", "run", *flags]))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--concurrency", "0"], "--concurrency must be at least 1, not 0"),
        (["--max-batch-size", "0"], "--max-batch-size must be at least 1, not 0"),
        (["--max-tokens-limit", "0"], "--max-tokens-limit must be at least 1, not 0"),
        (["--max-body-bytes", "-5"], "--max-body-bytes must be at least 1, not -5"),
        (["--max-images", "-1"], "--max-images must be 0 or more, not -1"),
        (["--queue-depth", "-1"], "--queue-depth must be 0 or more, not -1"),
        (["--default-max-tokens", "300", "--max-tokens-limit", "100"], "--max-tokens-limit (100), not 300"),
        (["--remote-image-timeout", "0"], "--remote-image-timeout must be more than 0 seconds"),
        (["--remote-image-timeout", "-2"], "--remote-image-timeout must be more than 0 seconds"),
        (["--remote-image-timeout", "nan"], "--remote-image-timeout must be more than 0 seconds"),
    ],
)
def test_bad_server_settings_name_their_option(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        settings(*flags)


def test_good_server_settings_pass():
    config = settings("--max-images", "0", "--queue-depth", "0", "--remote-image-timeout", "0.5")
    assert (config.max_images, config.queue_depth, config.remote_image_timeout) == (0, 0, 0.5)


def test_bad_server_settings_end_in_one_line_before_the_model_loads(tmp_path, capsys):
    # The model folder does not exist: an error about it would mean the model was loaded first.
    assert main(["serve", "--model", str(tmp_path / "none"), "--concurrency", "0"]) == 2
    assert capsys.readouterr().err.strip() == "llava-lite serve: error: --concurrency must be at least 1, not 0"


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_a_port_outside_0_to_65535_is_refused_by_the_parser(port, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--model", "run", "--port", port])
    assert exited.value.code == 2
    assert f"argument --port: {port} is not a port number (0-65535)" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "--model", "run", "--port", "0"]).port == 0
