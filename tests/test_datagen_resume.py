"""A killed run resumes without duplicates or losses; the journal survives a line cut short; outputs appear whole."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from chat_server import ChatServer, write_scenes
from conftest import ROOT

from llava_lite.cli import main
from llava_lite.llm.journal import Journal

TASKS = 40  # 20 images x 2 kinds


def whole_entries(journal: Path) -> int:
    """Journal lines a resume will keep: complete JSON lines after the header."""
    count = 0
    with open(journal, "rb") as handle:
        for number, line in enumerate(handle):
            if not line.endswith(b"\n"):
                break
            json.loads(line)
            count += number > 0
    return count


def test_killed_run_resumed_gives_the_records_of_an_uninterrupted_run(tmp_path, capsys):
    annotations = write_scenes(tmp_path / "scenes.jsonl", TASKS // 2)
    with ChatServer(delay=0.1) as server:

        def argv(out: Path) -> list[str]:
            return [
                "datagen", "--annotations", annotations, "--kinds", "conversation,reasoning", "--backend", "openai",
                "--base-url", server.url, "--model", "fake", "--concurrency", "4", "--out", str(out),
            ]  # fmt: skip

        out = tmp_path / "killed" / "data.jsonl"
        out.parent.mkdir()
        journal = out.with_name("data.jsonl.journal")
        command = [sys.executable, "-m", "llava_lite", *argv(out)]
        run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not journal.exists() or whole_entries(journal) < 10:
            assert run.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.02)
        run.kill()
        run.communicate()
        assert not out.exists()  # the final file appears only when the run completes
        done = whole_entries(journal)
        assert 10 <= done < TASKS
        requests_before = server.requests

        # The same command again (in this process: only the kill needs a process of its own).
        assert main(argv(out)) == 0
        assert f"resuming: {done} of {TASKS} tasks already done" in capsys.readouterr().err
        assert server.requests - requests_before == TASKS - done  # nothing done twice
        assert not journal.exists()

        uninterrupted = tmp_path / "whole" / "data.jsonl"
        assert main(argv(uninterrupted)) == 0

    assert out.read_text() == uninterrupted.read_text()
    assert len(out.read_text().splitlines()) == TASKS
    assert out.with_name("data.rejects.jsonl").read_text() == ""


def test_a_line_cut_short_by_a_kill_is_dropped_and_the_journal_goes_on(tmp_path):
    path = tmp_path / "run.journal"
    journal = Journal.open(path, {"model": "a"})
    journal.append([{"key": "1", "status": "ok"}, {"key": "2", "status": "ok"}])
    journal.close()
    with open(path, "a") as handle:
        handle.write('{"key": "3", "sta')  # the kill came mid-write
    resumed = Journal.open(path, {"model": "a"})
    assert sorted(resumed.entries) == ["1", "2"]
    resumed.append([{"key": "3", "status": "rejected"}])
    resumed.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line.get("key") for line in lines] == [None, "1", "2", "3"]


def test_a_journal_from_other_settings_is_not_resumed(tmp_path):
    path = tmp_path / "run.journal"
    Journal.open(path, {"model": "a", "seed": 0}).close()
    with pytest.raises(ValueError, match=r"other settings \(model\).*--overwrite"):
        Journal.open(path, {"model": "b", "seed": 0})


def test_a_journal_with_other_settings_is_refused_before_the_backend_is_built(tmp_path, monkeypatch, capsys):
    annotations = write_scenes(tmp_path / "scenes.jsonl", 2)
    out = tmp_path / "out.jsonl"
    Journal.open(out.with_name("out.jsonl.journal"), {"model": "another"}).close()

    def no_backend(*args):
        raise AssertionError("the backend (for hf: minutes of loading) was built before the journal was checked")

    monkeypatch.setattr("llava_lite.datagen.run._backend", no_backend)
    assert main(["datagen", "--annotations", annotations, "--out", str(out)]) == 2
    assert "left by a run with other settings" in capsys.readouterr().err


def test_a_backend_that_cannot_start_leaves_no_journal_to_refuse_the_corrected_command(tmp_path, capsys):
    annotations = write_scenes(tmp_path / "scenes.jsonl", 2)
    out = tmp_path / "out.jsonl"
    with ChatServer() as server:
        argv = ["datagen", "--annotations", annotations, "--backend", "openai", "--base-url", server.url]
        assert main([*argv, "--out", str(out)]) == 2
        assert "needs --model" in capsys.readouterr().err
        assert not out.with_name("out.jsonl.journal").exists()
        assert main([*argv, "--model", "m", "--out", str(out)]) == 0  # no --overwrite needed


def test_a_finished_output_is_not_overwritten_without_asking(tmp_path, capsys):
    annotations = write_scenes(tmp_path / "scenes.jsonl", 2)
    out = tmp_path / "out.json"
    argv = ["datagen", "--annotations", annotations, "--out", str(out)]
    assert main(argv) == 0
    assert main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind
