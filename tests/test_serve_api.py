"""`llava-lite serve` as OpenAI's own Python client meets it: plain and streamed answers about an image, history,
the model list, greedy answers identical to `llava-lite chat`, the API key, and where images may come from."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import fixture_path
from serve_helpers import API_KEY, MODEL_NAME, QUESTION, data_uri, image_question, session_paths, shared_server

from llava_lite.cli import main


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    return shared_server(request.config, tmp_path_factory)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def photo() -> str:
    return data_uri(fixture_path("images", "waterview.jpg"))


def test_plain_completion_about_an_image(client, photo):
    reply = client.chat.completions.create(model=MODEL_NAME, messages=image_question(photo), max_tokens=12)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.created > 0
    assert reply.model == MODEL_NAME
    [choice] = reply.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # a random model does not stop by itself within 12 tokens
    assert reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens > 16  # the image alone is 16 tokens in the tiny model
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_the_image_reaches_the_model(client, photo, server):
    other = data_uri(fixture_path("images", "extreme_ironing.jpg"))
    answers = [
        client.chat.completions.create(model=MODEL_NAME, messages=image_question(uri), max_tokens=12)
        for uri in (photo, other)
    ]
    assert answers[0].choices[0].message.content != answers[1].choices[0].message.content


def test_streamed_completion_joins_to_the_plain_answer(client, photo):
    plain = client.chat.completions.create(model=MODEL_NAME, messages=image_question(photo), max_tokens=12)
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=image_question(photo),
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1
    assert "".join(pieces) == plain.choices[0].message.content
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == ["length"]
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_stream_is_server_sent_events_ending_with_done(server, photo):
    body = {"model": MODEL_NAME, "messages": image_question(photo), "max_tokens": 4, "stream": True}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers(), timeout=60)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [event for event in response.text.split("\n\n") if event]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"


def test_stop_string_ends_the_answer_with_finish_reason_stop(client, photo):
    full = client.chat.completions.create(model=MODEL_NAME, messages=image_question(photo), max_tokens=12)
    text = full.choices[0].message.content
    stop = text[len(text) // 2 :][:3]
    cut = client.chat.completions.create(model=MODEL_NAME, messages=image_question(photo), max_tokens=12, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].message.content
    assert text.startswith(cut.choices[0].message.content)


def test_multi_turn_history_is_part_of_the_prompt(client, photo):
    first = client.chat.completions.create(model=MODEL_NAME, messages=image_question(photo), max_tokens=8)
    answer = first.choices[0].message.content
    history = [
        {"role": "system", "content": "You describe pictures."},
        *image_question(photo),
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And what colour is it?"},
    ]
    follow_up = client.chat.completions.create(model=MODEL_NAME, messages=history, max_tokens=8)
    alone = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "And what colour is it?"}], max_tokens=8
    )
    assert follow_up.choices[0].message.content
    # The image (16 tokens), the first question and the answer all went in again with the follow-up.
    assert follow_up.usage.prompt_tokens > first.usage.prompt_tokens + alone.usage.prompt_tokens
    assert follow_up.choices[0].message.content != alone.choices[0].message.content


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).owned_by == "llava_lite"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_greedy_answer_equals_llava_lite_chat(client, photo, capsys):
    # `llava-lite chat` through its entry point, in this process: a second process would import torch again,
    # which is most of what a start costs on a small machine.
    image = fixture_path("images", "waterview.jpg")
    command = ["chat", "--model", str(session_paths()["model"]), "--image", str(image), "--prompt", QUESTION]
    assert main([*command, "--max-new-tokens", "16"]) == 0
    printed = capsys.readouterr().out
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=image_question(photo), max_tokens=16, temperature=0
    )
    assert reply.choices[0].message.content
    assert reply.choices[0].message.content == printed.strip()


def test_api_key_is_enforced_on_every_route_but_health(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
        models = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10)
        chat = httpx.post(f"{server.url}/v1/chat/completions", json={}, headers=headers, timeout=10)
        assert models.status_code == chat.status_code == 401
        assert models.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/v1/models", headers=server.headers(), timeout=10).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_local_file_under_the_image_root_is_read(client, photo):
    by_file = client.chat.completions.create(model=MODEL_NAME, messages=image_question("waterview.jpg"), max_tokens=8)
    by_uri = client.chat.completions.create(model=MODEL_NAME, messages=image_question(photo), max_tokens=8)
    assert by_file.choices[0].message.content == by_uri.choices[0].message.content


@pytest.mark.parametrize("where", ["../secret.jpg", "SECRET_ABSOLUTE", "file://SECRET_ABSOLUTE"])
def test_path_outside_the_image_root_is_refused(client, where):
    secret = str(session_paths()["base"] / "secret.jpg")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL_NAME, messages=image_question(where.replace("SECRET_ABSOLUTE", secret)), max_tokens=4
        )
    assert refused.value.body["code"] == "image_outside_root"


def test_remote_url_is_refused_without_the_flag(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL_NAME, messages=image_question("http://127.0.0.1:9/cat.jpg"), max_tokens=4
        )
    assert refused.value.body["code"] == "remote_images_disabled"
    assert "--allow-remote-images" in refused.value.body["message"]
