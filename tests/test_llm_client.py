"""The LLM client against a server that answers garbage or trickles: every malformed reply is a counted, named
failure of its request, never a traceback; `--timeout` bounds an attempt and `--deadline` a request; and the
commands that ask a server (`datagen`, `data score --scorer judge`) exit 1 with their journal intact, then finish
on a rerun once the server behaves."""

from __future__ import annotations

import json
import time

import pytest
from chat_server import write_scenes
from hostile_llm_server import BODIES, KINDS, TRICKLES, HostileServer

from llava_lite.cli import main
from llava_lite.improve.sample import journal_path
from llava_lite.llm import openai
from llava_lite.llm.chat import BACKEND_ERROR, MALFORMED_REPLY, ChatReply, ChatRequest
from llava_lite.llm.deadline import environment_proxy
from llava_lite.llm.openai import OpenAIBackend, nests_deeper_than

MARGIN = 1.5  # seconds past a bound that a loaded 2-core machine may take to notice it
MALFORMED = {  # kind -> (the request's error, its retries by cause with one retry allowed, words of the detail)
    "gzip_lie": (BACKEND_ERROR, {"bad_body": 1}, "Content-Encoding"),
    "message_string": (MALFORMED_REPLY, {}, "`choices[0].message` is a string"),
    "usage_string": (MALFORMED_REPLY, {}, "`usage` is a string"),
    "tokens_overflow": (MALFORMED_REPLY, {}, "`usage.prompt_tokens` is inf"),
    "tokens_word": (MALFORMED_REPLY, {}, "`usage.prompt_tokens` is 'many'"),
    "deep": (MALFORMED_REPLY, {}, "nests deeper than 64 levels"),
}
MESSAGES = [{"role": "system", "content": "You describe scenes."}, {"role": "user", "content": "A bus in scene 1."}]


def ask(url: str, **options) -> tuple[ChatReply, float]:
    """One request through a fresh client (one retry, short backoff unless given); the reply and its seconds."""
    backend = OpenAIBackend(url, "stand-in", **{"max_retries": 1, "backoff": 0.01, **options})
    started = time.monotonic()
    try:
        return backend.complete([ChatRequest("q1", "conversation", MESSAGES)])[0], time.monotonic() - started
    finally:
        backend.close()


def test_every_kind_of_garbage_is_covered():
    assert set(MALFORMED) == set(BODIES)


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_reply_is_a_named_failure_of_its_request(kind):
    with HostileServer(kind) as server:
        reply, _ = ask(server.url)
    error, retries, words = MALFORMED[kind]
    assert reply.failed and reply.error == error and reply.text is None
    assert words in reply.detail
    assert dict(reply.retries) == retries
    assert server.requests == 1 + sum(retries.values())  # a reply that is JSON but no completion is not asked again


def test_a_reply_over_the_size_limit_is_malformed_and_not_read_to_its_end(monkeypatch):
    monkeypatch.setattr(openai, "MAX_REPLY_BYTES", 64)  # the behaved reply is a few hundred bytes
    with HostileServer() as server:
        reply, _ = ask(server.url)
        assert reply.error == MALFORMED_REPLY and "over 64 bytes" in reply.detail
        monkeypatch.undo()
        assert ask(server.url)[0].text  # the same reply under the real limit


@pytest.mark.parametrize("kind", TRICKLES)
def test_a_trickling_server_holds_an_attempt_no_longer_than_the_timeout(kind):
    with HostileServer(kind) as server:
        reply, seconds = ask(server.url, timeout=1.0)  # two attempts of a second each
    assert reply.error == BACKEND_ERROR and dict(reply.retries) == {"timeout": 1}
    assert "no whole reply within 1s" in reply.detail
    assert 2.0 <= seconds < 2.0 + MARGIN


def test_the_deadline_bounds_a_request_across_its_retries():
    with HostileServer("trickle") as server:
        reply, seconds = ask(server.url, timeout=1.0, deadline=1.5, max_retries=10)
        assert server.requests == 2  # the second attempt is cut short by the deadline; no third is made
    assert reply.error == BACKEND_ERROR and "the request's deadline of 1.5s" in reply.detail
    assert 1.5 <= seconds < 1.5 + MARGIN


@pytest.mark.parametrize(
    "text, depth",
    [
        (b'{"a": [1, {"b": []}]}', 4),
        (b'{"a": "[[[[ {{{{ ]]", "b": [[]]}', 3),  # brackets inside a string do not count
        (b'{"a": "a \\"quoted\\" [[[[ {{{{", "b": [[]]}', 3),  # nor after an escaped quote
        (b'{"a": "a backslash \\\\", "b": [[[[]]]]}', 5),  # an escaped backslash does not escape the quote
    ],
)
def test_nesting_is_measured_outside_strings(text, depth):
    json.loads(text)  # each case is JSON
    assert nests_deeper_than(text, depth - 1) and not nests_deeper_than(text, depth)


def test_the_proxy_is_the_environments_unless_no_proxy_names_the_host(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert environment_proxy("https://api.example/v1") == "http://proxy.example:3128"
    assert environment_proxy("http://api.example/v1") is None
    monkeypatch.setenv("NO_PROXY", "api.example")
    assert environment_proxy("https://api.example/v1") is None


# ----- the commands ---------------------------------------------------------------------------------------------


def expected_reason(kind: str) -> str:
    """With no retries: what a request ends as, for each kind of garbage."""
    return BACKEND_ERROR if kind in TRICKLES or kind == "gzip_lie" else MALFORMED_REPLY


def journal_entries(path) -> list[dict]:
    """Every line of a journal as JSON (a line that is not is a failure here), the header left out."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[1:]]


CLIENT_FLAGS = ["--model", "stand-in", "--timeout", "1", "--max-retries", "0", "--concurrency", "2"]


@pytest.mark.parametrize("kind", KINDS)
def test_datagen_counts_garbage_replies_as_failed_exits_1_and_a_rerun_finishes(tmp_path, capsys, kind):
    annotations = write_scenes(tmp_path / "scenes.jsonl", 2)
    out = tmp_path / "out.jsonl"
    journal = tmp_path / "out.jsonl.journal"
    with HostileServer(kind) as server:
        argv = ["datagen", "--annotations", annotations, "--kinds", "conversation", "--backend", "openai"]
        argv += ["--base-url", server.url, *CLIENT_FLAGS, "--out", str(out)]
        started = time.monotonic()
        assert main(argv) == 1
        assert time.monotonic() - started < 1.0 + MARGIN  # two requests side by side, one attempt each
        printed = capsys.readouterr().out
        reason = expected_reason(kind)
        assert f"rejected: 2 ({reason} 2)" in printed and "2 task(s) failed" in printed
        entries = journal_entries(journal)
        assert sorted(e["key"] for e in entries) == ["img0-conversation", "img1-conversation"]
        assert {(e["status"], e["reason"]) for e in entries} == {("failed", reason)}

        server.misbehave = None
        assert main(argv) == 0
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == [
        "img0-conversation",
        "img1-conversation",
    ]
    assert not journal.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_data_score_counts_garbage_replies_as_unscored_exits_1_and_a_rerun_finishes(tmp_path, capsys, kind):
    source, out = tmp_path / "samples.jsonl", tmp_path / "scored.jsonl"
    row = {"id": "q0", "image": "p.png", "prompt": "Where is the circle?", "captions": ["A red circle."]}
    source.write_text(json.dumps({**row, "candidates": [{"text": "top left"}, {"text": "bottom"}]}) + "\n")
    with HostileServer(kind) as server:
        argv = ["data", "score", "--input", str(source), "--output", str(out), "--scorer", "judge"]
        argv += ["--base-url", server.url, *CLIENT_FLAGS]
        started = time.monotonic()
        assert main(argv) == 1
        assert time.monotonic() - started < 1.0 + MARGIN
        printed = capsys.readouterr()
        reason = expected_reason(kind)
        assert f"unscored: 2 ({reason} 2)" in printed.out and "rerun the same command" in printed.err
        assert {e["status"] for e in journal_entries(journal_path(out))} == {reason}

        server.misbehave = None
        assert main(argv) == 0
    scored = json.loads(out.read_text())
    assert [c["score"] for c in scored["candidates"]] == [7.0, 7.0]  # the stand-in's 8 and 6, averaged
    assert not journal_path(out).exists()


@pytest.mark.parametrize("flag, value", [("--timeout", "0"), ("--timeout", "inf"), ("--deadline", "-1"),
                                         ("--backoff", "-1"), ("--concurrency", "0")])  # fmt: skip
@pytest.mark.parametrize("command", [["datagen", "--annotations", "a.jsonl", "--out", "o.jsonl"],
                                     ["data", "score", "--input", "s.jsonl", "--output", "o.jsonl"]])  # fmt: skip
def test_a_bound_that_bounds_nothing_is_refused_by_its_flag(capsys, command, flag, value):
    with pytest.raises(SystemExit) as exited:
        main([*command, flag, value])
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: argument {flag}: " in last and repr(value) in last
