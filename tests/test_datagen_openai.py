"""The openai backend against a real chat-completions server on 127.0.0.1 that injects faults."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

from chat_server import ChatServer, write_scenes

from llava_lite.cli import main
from llava_lite.data.annotations import load_annotations
from llava_lite.datagen.pipeline import TaskRunner, build_tasks, finish
from llava_lite.datagen.prompts import load_prompts
from llava_lite.llm import openai
from llava_lite.llm.journal import Journal
from llava_lite.llm.openai import OpenAIBackend

FAULTS = {
    "scene 1": ["429"],  # answered with Retry-After: 1
    "scene 2": ["500"],
    "scene 3": ["500", "500", "500", "500", "500"],  # more than the retries: fails this run
    "scene 4": ["slow"],  # past the client's timeout
    "scene 5": ["malformed"],
    "scene 6": ["refusal"],  # the API's own refusal field
    "scene 7": ["drop"],  # connection closed without a reply
    "scene 8": ["sorry"],  # a refusal in words
    "scene 9": ["leak"],
    "scene 10": ["coordinates"],
    "scene 11": ["length"],
}
EXPECTED_REJECTS = {
    "img3-conversation": "backend_error",
    "img6-conversation": "refusal",
    "img8-conversation": "refusal",
    "img9-conversation": "mentions_context",
    "img10-conversation": "mentions_context",
    "img11-conversation": "truncated",
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def generate(annotations: str, out: Path, server: ChatServer, concurrency: int = 3, kinds=("conversation",)):
    """One datagen run through the library, as the command does it; returns the backend and the summary."""
    images, _ = load_annotations([annotations])
    prompts = load_prompts(list(kinds))
    tasks = build_tasks(images, list(kinds), prompts, seed=0)
    backend = OpenAIBackend(server.url, "fake-model", concurrency=concurrency, timeout=0.5, max_retries=2, backoff=0.01)
    journal = Journal.open(out.with_name(out.name + ".journal"), {"test": 1})
    try:
        TaskRunner(backend, prompts, journal).run(tasks, progress=False)
        summary = finish(tasks, journal, out, out.with_name("rejects.jsonl"), near_duplicate=0.7)
    finally:
        backend.close()
    return backend, summary


def test_every_record_ends_as_exactly_one_output_or_one_reject_under_faults(tmp_path, monkeypatch):
    waits = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(openai, "time", SimpleNamespace(sleep=sleep))  # the backend's waits between retries
    annotations = write_scenes(tmp_path / "scenes.jsonl", 16)
    out = tmp_path / "out.jsonl"
    with ChatServer(faults=FAULTS) as server:
        _, summary = generate(annotations, out, server)
    records, rejects = read_jsonl(out), read_jsonl(tmp_path / "rejects.jsonl")
    kept = [record["id"] for record in records]
    rejected = [reject["id"] for reject in rejects]
    assert sorted(kept + rejected) == sorted(f"img{n}-conversation" for n in range(16))
    assert len(set(kept + rejected)) == 16  # none twice
    assert {reject["id"]: reject["reason"] for reject in rejects} == EXPECTED_REJECTS
    # 429 once, 500 once + 2 for the record that fails, one timeout, one unreadable body, one dropped connection.
    assert summary.retries == {"429": 1, "5xx": 3, "timeout": 1, "bad_body": 1, "connection": 1}
    assert len(waits) == 7 and 1.0 in waits  # one wait per retry; the 429's is the server's Retry-After
    assert sorted(waits)[-2] < 0.05  # the others the 0.01 s backoff, doubled at most once, with jitter
    assert summary.failed == 1
    assert summary.tokens["completion_tokens"] == 20 * 15  # the final reply of every record but the failed one
    assert records[0]["metadata"] == {
        "kind": "conversation", "backend": "openai", "model": "fake-model", "image_id": "img0"
    }  # fmt: skip


def test_a_rerun_retries_only_the_records_that_failed_at_the_backend(tmp_path):
    annotations = write_scenes(tmp_path / "scenes.jsonl", 6)
    out = tmp_path / "out.jsonl"
    with ChatServer(faults={"scene 2": ["500"] * 3, "scene 4": ["sorry"]}) as server:
        _, first = generate(annotations, out, server)
        assert first.failed == 1 and out.with_name("out.jsonl.journal").exists()
        before = server.requests
        _, second = generate(annotations, out, server)
        assert server.requests - before == 1  # only scene 2 is asked again
    assert second.failed == 0 and not out.with_name("out.jsonl.journal").exists()
    assert sorted(r["id"] for r in read_jsonl(out)) == [f"img{n}-conversation" for n in (0, 1, 2, 3, 5)]
    assert [(r["id"], r["reason"]) for r in read_jsonl(tmp_path / "rejects.jsonl")] == [
        ("img4-conversation", "refusal")
    ]


def test_no_more_requests_in_flight_than_the_concurrency(tmp_path):
    annotations = write_scenes(tmp_path / "scenes.jsonl", 12)
    with ChatServer(delay=0.15) as server:
        generate(annotations, tmp_path / "out.jsonl", server, concurrency=3, kinds=("conversation", "reasoning"))
    assert server.requests == 24
    assert 2 <= server.max_in_flight <= 3


def test_command_sends_the_key_from_the_environment(tmp_path, monkeypatch, capsys):
    annotations = write_scenes(tmp_path / "scenes.jsonl", 3)
    monkeypatch.setenv("TEST_LLM_KEY", "sekret")
    out = tmp_path / "out.json"
    with ChatServer(api_key="sekret") as server:
        argv = ["datagen", "--annotations", annotations, "--backend", "openai", "--base-url", server.url]
        code = main([*argv, "--model", "m", "--api-key-env", "TEST_LLM_KEY", "--out", str(out)])
    assert code == 0 and server.unauthorised == 0
    assert len(json.loads(out.read_text())) == 9  # 3 images x 3 kinds, in one JSON list
    assert "generated: 9 (conversation 3, detail 3, reasoning 3)" in capsys.readouterr().out


def test_a_rejected_key_stops_the_command_with_one_line(tmp_path, monkeypatch, capsys):
    annotations = write_scenes(tmp_path / "scenes.jsonl", 3)
    monkeypatch.delenv("TEST_LLM_KEY", raising=False)
    with ChatServer(api_key="sekret") as server:
        argv = ["datagen", "--annotations", annotations, "--backend", "openai", "--base-url", server.url]
        code = main([*argv, "--model", "m", "--api-key-env", "TEST_LLM_KEY", "--out", str(tmp_path / "o.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("llava-lite datagen: error:") and "401" in err
    assert not (tmp_path / "o.json").exists()


def test_judge_keeps_only_records_scored_at_or_above_the_threshold(tmp_path):
    annotations = write_scenes(tmp_path / "scenes.jsonl", 4, low_quality=(1, 3))
    out = tmp_path / "out.jsonl"
    with ChatServer() as server:
        argv = ["datagen", "--annotations", annotations, "--backend", "openai", "--base-url", server.url]
        argv += ["--model", "m", "--kinds", "conversation", "--judge", "--judge-threshold", "7", "--out", str(out)]
        assert main(argv) == 0
        assert server.requests == 8  # one generation and one judgement per image
    assert [(r["id"], r["metadata"]["judge_score"]) for r in read_jsonl(out)] == [
        ("img0-conversation", 8.0),
        ("img2-conversation", 8.0),
    ]
    rejects = read_jsonl(tmp_path / "out.rejects.jsonl")
    assert [(r["id"], r["reason"]) for r in rejects] == [
        ("img1-conversation", "low_judge_score"),
        ("img3-conversation", "low_judge_score"),
    ]


def test_the_command_closes_the_generating_and_the_judging_backend(tmp_path, monkeypatch):
    closed = []
    close = OpenAIBackend.close

    def recording_close(self) -> None:
        closed.append(self.model)
        close(self)

    monkeypatch.setattr(OpenAIBackend, "close", recording_close)
    annotations = write_scenes(tmp_path / "scenes.jsonl", 2)
    with ChatServer() as server:
        argv = ["datagen", "--annotations", annotations, "--backend", "openai", "--base-url", server.url]
        argv += ["--model", "m", "--kinds", "conversation", "--judge", "--judge-model", "j"]
        assert main([*argv, "--out", str(tmp_path / "out.jsonl")]) == 0
    assert sorted(closed) == ["j", "m"]


def test_retry_after_is_read_as_seconds_milliseconds_or_an_http_date():
    import email.utils
    import time

    import httpx

    from llava_lite.llm.openai import _retry_after

    def wait(**headers):
        return _retry_after(httpx.Response(429, headers=headers))

    assert wait(**{"retry-after": "7"}) == 7.0
    assert wait(**{"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= wait(**{"retry-after": in_a_minute}) <= 60
    assert wait(**{"retry-after": email.utils.formatdate(time.time() - 60, usegmt=True)}) == 0.0
    assert wait(**{"retry-after": "soon"}) is None
    assert wait() is None
