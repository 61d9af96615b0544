"""What a web page in the user's browser can make a local server do: send JSON as one of the content types a page
may post anywhere without a preflight, post from a foreign origin, or reach the server by a rebound name - each
refused before a generation starts - while programs (httpx, the `openai` client) and the server's own chat page
still get answers."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from serve_helpers import MODEL_NAME, make_run_folder, shared_server

from llava_lite.cli import main
from llava_lite.inference.generator import Generator
from llava_lite.serve.app import create_app
from llava_lite.serve.config import ServeConfig

SERVER = "http://127.0.0.1:8000"  # the address the in-process app is reached at, as a browser would write it
ASK = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
# The content types a web page may POST to any address without a CORS preflight, with the JSON body as the attack
# would send it.
BROWSER_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]


class CountingGenerator:
    """The real generator, counting the generations the server starts (plain and streamed)."""

    def __init__(self, generator: Generator) -> None:
        self._generator = generator
        self.generations = 0

    def __getattr__(self, name: str):
        return getattr(self._generator, name)

    def complete(self, *args, **kwargs):
        self.generations += 1
        return self._generator.complete(*args, **kwargs)

    def stream(self, *args, **kwargs):
        self.generations += 1
        return self._generator.stream(*args, **kwargs)


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> CountingGenerator:
    return CountingGenerator(Generator.from_folder(make_run_folder(tmp_path_factory.mktemp("browsers") / "run"), "cpu"))


def open_server(generator: CountingGenerator, **settings) -> TestClient:
    """The app without an API key - the case a page on the internet can reach - as served on 127.0.0.1:8000."""
    return TestClient(create_app(generator, ServeConfig(model_name=MODEL_NAME, **settings)), base_url=SERVER)


def post(client: TestClient, headers: dict) -> httpx.Response:
    return client.post("/v1/chat/completions", content=json.dumps(ASK).encode(), headers=headers)


@pytest.mark.parametrize("content_type", BROWSER_TYPES + [None], ids=["text", "form", "multipart", "none"])
def test_a_body_not_declared_json_is_refused_with_415_before_generating(generator, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    before = generator.generations
    with open_server(generator) as client:
        answer = post(client, headers)
    assert answer.status_code == 415, answer.text
    error = answer.json()["error"]
    assert error["code"] == "unsupported_media_type"
    assert "Content-Type: application/json" in error["message"] and "\n" not in error["message"]
    assert generator.generations == before


@pytest.mark.parametrize("origin", ["http://evil.example", "https://127.0.0.1:8001", "null"])
def test_a_foreign_page_is_refused_before_generating(generator, origin):
    before = generator.generations
    with open_server(generator) as client:
        answer = post(client, {"Content-Type": "application/json", "Origin": origin})
        streamed = client.post("/v1/chat/completions", json={**ASK, "stream": True}, headers={"Origin": origin})
        preflight = client.options(
            "/v1/chat/completions",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        )
    for refused in (answer, streamed, preflight):
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in refused.headers
    assert "--allow-origin" in answer.json()["error"]["message"]
    assert generator.generations == before


@pytest.mark.parametrize("host", ["evil.example:8000", "evil.example", "localhost.evil.example", "bad host:x"])
def test_a_request_sent_to_a_name_that_is_not_this_servers_is_refused(generator, host):
    """DNS rebinding: a page whose name now points at 127.0.0.1 is same-origin with the server, so only the name
    it sends in Host gives it away. Reading routes are refused too: such a page could read their answers."""
    before = generator.generations
    with open_server(generator) as client:
        origin = f"http://{host}"
        answer = post(client, {"Content-Type": "application/json", "Host": host, "Origin": origin})
        read = [client.get(path, headers={"Host": host}) for path in ("/v1/models", "/health", "/")]
    for refused in (answer, *read):
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "host_not_allowed"
    assert generator.generations == before


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "localhost:9000", "192.168.1.20:8000"]
)
def test_localhost_and_ip_addresses_reach_the_server_by_any_port(generator, host):
    """A forwarded port (a container's -p 9000:8000) changes the port in Host; an IP address cannot be rebound."""
    with open_server(generator) as client:
        answer = client.get("/v1/models", headers={"Host": host})
    assert answer.status_code == 200, answer.text


def test_the_servers_own_page_and_programs_get_answers(generator):
    before = generator.generations
    with open_server(generator) as client:
        # The chat page: same-origin, as the browser sends its fetch (Origin on a POST, JSON with a charset).
        page = post(client, {"Content-Type": "application/json; charset=utf-8", "Origin": SERVER})
        assert page.status_code == 200, page.text
        program = client.post("/v1/chat/completions", json=ASK)  # no Origin: not a web page
        assert program.status_code == 200, program.text
        assert client.get("/", headers={"Origin": SERVER}).status_code == 200
    assert generator.generations == before + 2


def test_allow_origin_lets_that_page_post_after_its_preflight(generator):
    listed = "http://localhost:3000"
    before = generator.generations
    with open_server(generator, allow_origins=("http://LOCALHOST:3000/",)) as client:
        preflight = client.options(
            "/v1/chat/completions",
            headers={
                "Origin": listed,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == listed
        answer = post(client, {"Content-Type": "application/json", "Origin": listed})
        assert answer.status_code == 200, answer.text
        assert answer.headers["access-control-allow-origin"] == listed
        other = post(client, {"Content-Type": "application/json", "Origin": "http://localhost:3001"})
        assert other.status_code == 403
        plain_text = post(client, {"Content-Type": "text/plain", "Origin": listed})  # still JSON only
        assert plain_text.status_code == 415
    assert generator.generations == before + 1


def test_allowed_hosts_and_the_bound_name_are_answered(generator):
    with open_server(generator, bound_host="gpu-box.lan", allowed_hosts=("Chat.Example.org.",)) as client:
        for host in ("gpu-box.lan:8000", "chat.example.org", "chat.example.org.:443"):
            assert client.get("/v1/models", headers={"Host": host}).status_code == 200, host
        assert client.get("/v1/models", headers={"Host": "other.example.org"}).status_code == 400


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--allow-origin", "localhost:3000"], "--allow-origin"),
        (["--allow-origin", "http://localhost:3000/chat"], "--allow-origin"),
        (["--allowed-hosts", "example.org:8000"], "--allowed-hosts"),
        (["--allowed-hosts", "http://example.org"], "--allowed-hosts"),
    ],
)
def test_bad_browser_settings_are_refused_in_one_line(tmp_path, capsys, flags, named):
    assert main(["serve", "--model", str(tmp_path / "run"), *flags]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and named in error, error


# ----- the real server (uvicorn, in its own process), as a page or a program would reach it -------------


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    return shared_server(request.config, tmp_path_factory)


def generations(server) -> int:
    counts = server.health()["counts"]
    return counts.get("batches", 0) + counts.get("served", 0) + counts.get("failed", 0)


def test_the_real_server_refuses_what_a_page_sends_and_answers_programs(server):
    before = generations(server)
    url = f"{server.url}/v1/chat/completions"
    body = json.dumps(ASK).encode()
    for content_type in BROWSER_TYPES:
        refused = httpx.post(url, content=body, headers={**server.headers(), "Content-Type": content_type})
        assert refused.status_code == 415, (content_type, refused.text)
    foreign = httpx.post(url, json=ASK, headers={**server.headers(), "Origin": "http://evil.example"})
    assert foreign.status_code == 403, foreign.text
    rebound = httpx.post(url, json=ASK, headers={**server.headers(), "Host": f"evil.example:{server.port}"})
    assert rebound.status_code == 400, rebound.text
    assert generations(server) == before

    plain = httpx.post(url, content=body, headers={**server.headers(), "Content-Type": "application/json"})
    assert plain.status_code == 200 and plain.json()["choices"][0]["message"]["content"], plain.text
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)
    reply = client.chat.completions.create(model=MODEL_NAME, messages=ASK["messages"], max_tokens=2)
    assert reply.choices[0].message.content
    assert generations(server) > before
