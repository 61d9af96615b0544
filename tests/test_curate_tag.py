"""`data tag`: the heuristic tagger is deterministic and tags the fixtures' instructions; tags are normalised (case,
lemmas, synonyms, a floor); an LLM tagger through a stand-in server counts malformed and failed replies and asks
again for them alone on a rerun, and a killed run resumes without asking twice; `data stats` reports tag coverage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import ROOT, fixture_path
from rubric_server import RepliesServer, user_text

from llava_lite.cli import main
from llava_lite.curate.heuristic_tags import heuristic_tags
from llava_lite.curate.records import read_curate_records
from llava_lite.curate.tags import instructions_of, tag_records

FIXTURE = fixture_path("data", "llava_instruct_100.json")


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def fixture_instructions() -> list[str]:
    records = json.loads(FIXTURE.read_text())
    return [turn["value"].replace("<image>", " ").strip() for r in records for turn in r["conversations"][::2]]


# ----- the heuristic tagger ---------------------------------------------------------------------------------------


def test_the_heuristic_tagger_writes_the_same_file_in_processes_with_other_hash_seeds(tmp_path):
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"tags{seed}.jsonl"
        command = [sys.executable, "-m", "llava_lite", "data", "tag", str(FIXTURE), "--out", str(out)]
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert b'"tags"' in outputs[0]


def test_every_instruction_of_the_fixture_gets_a_tag_and_each_record_its_complexity(tmp_path):
    assert all(heuristic_tags(text) for text in fixture_instructions())
    out = tmp_path / "tagged.jsonl"
    assert main(["data", "tag", str(FIXTURE), "--out", str(out)]) == 0
    records = read_out(out)
    assert len(records) == 100
    for record in records:
        assert record["tags"] and len(set(record["tags"])) == len(record["tags"])
        assert record["complexity"] == len(record["tags"])
    assert len({tag for record in records for tag in record["tags"]}) > 50  # varied instructions, varied tags


def test_question_types_and_verb_object_heads():
    assert heuristic_tags("<image>\nHow many people are in the image?") == ["how many question", "counting", "people"]
    assert heuristic_tags("Could you please describe the picture in detail?") == ["describe picture", "detailed"]
    assert heuristic_tags("Is the man holding anything?") == ["yes/no question", "man"]
    assert heuristic_tags("Why is he on the ground?") == ["why question", "reasoning", "ground"]
    assert heuristic_tags("Where is the cat? Count the dogs.") == ["where question", "cat", "count dogs"]
    assert heuristic_tags("The image shows a bus.") == []  # a statement, not an instruction


def records_of(tmp_path: Path, instructions: list[str]) -> list:
    path = tmp_path / "records.jsonl"
    turns = [[{"role": "user", "content": q}, {"role": "assistant", "content": "A."}] for q in instructions]
    rows = [{"messages": messages} for messages in turns]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return read_curate_records(path, check_images=False)


def test_tags_are_normalised_by_case_lemma_and_synonym_and_rare_ones_dropped(tmp_path):
    raw = {
        "q1": ["Image-Description", "counting objects"],
        "q2": ["image descriptions", "Photo description", "count object"],
        "q3": ["IMAGE DESCRIPTION", "a rare tag"],
    }
    records = records_of(tmp_path, list(raw))
    report = tag_records(records, lambda texts: ({t: raw[t] for t in texts}, {}), min_count=2)
    assert [r.raw["tags"] for r in records] == [
        ["image description", "count object"],
        ["image description", "count object"],
        ["image description"],
    ]
    assert [r.raw["complexity"] for r in records] == [2, 2, 1]
    assert report.merged == {("photo", "image"): 1}
    assert "synonyms merged: photo -> image (1)" in report.lines()
    assert (report.raw_tags, report.normalised_tags, len(report.kept_tags)) == (7, 3, 2)


def test_a_statement_without_an_instruction_is_counted_untagged(tmp_path):
    records = records_of(tmp_path, ["The image shows a bus.", "Describe the bus."])
    report = tag_records(records, lambda texts: ({t: heuristic_tags(t) for t in texts}, {}))
    assert [r.raw["tags"] for r in records] == [[], ["describe bus"]]
    assert report.untagged == {"none_found": 1}


# ----- data stats -------------------------------------------------------------------------------------------------


def test_data_stats_reports_the_tag_coverage_of_tagged_records(tmp_path, capsys):
    out = tmp_path / "tagged.jsonl"
    assert main(["data", "tag", str(FIXTURE), "--out", str(out)]) == 0
    records = read_out(out)
    capsys.readouterr()
    assert main(["data", "stats", str(out), "--json"]) == 0
    tags = json.loads(capsys.readouterr().out)["tags"]
    assert tags["records_tagged"] == 100
    assert tags["distinct"] == len({tag for record in records for tag in record["tags"]})
    assert tags["per_record"]["max"] == max(record["complexity"] for record in records)
    commonest = max(tags["top"], key=lambda pair: pair[1])
    assert commonest[1] == sum(commonest[0] in record["tags"] for record in records)
    assert main(["data", "stats", str(FIXTURE), "--json"]) == 0
    assert "tags" not in json.loads(capsys.readouterr().out)  # untagged records: no coverage to report


# ----- an LLM tagger ----------------------------------------------------------------------------------------------


def instruction_of(body: dict) -> str:
    return user_text(body).split("User query:\n", 1)[1]


class Tagger:
    """A stand-in LLM: tags from the instruction's first word. With `failures`, the first reply about the weather has
    no tag list and the first request about surfing fails (HTTP 500)."""

    def __init__(self, failures: bool = True, delay: float = 0.0) -> None:
        self.failures = failures
        self.delay = delay
        self.asked: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, body: dict) -> tuple[int, str]:
        text = instruction_of(body)
        with self.lock:
            self.asked[text] = self.asked.get(text, 0) + 1
            first = self.asked[text] == 1 and self.failures
        time.sleep(self.delay)
        if first and "weather" in text:
            return 200, "Sure! This query is about the weather."
        if first and "surf" in text:
            return 500, ""
        return 200, json.dumps(["Visual Question Answering", f"{text.split()[0].lower()} questions"])


def tag_argv(url: str, out: Path, *options: str) -> list[str]:
    return ["data", "tag", str(FIXTURE), "--out", str(out), "--backend", "openai", "--base-url", url, "--model", "m",
            "--max-retries", "0", *options]  # fmt: skip


def test_malformed_and_failed_replies_are_counted_and_asked_again_alone_on_a_rerun(tmp_path, capsys):
    out = tmp_path / "tagged.jsonl"
    distinct = set(fixture_instructions())
    weather = {t for t in distinct if "weather" in t}
    surf = {t for t in distinct if "surf" in t and t not in weather}
    assert weather and surf
    tagger = Tagger()
    with RepliesServer(tagger) as server:
        assert main(tag_argv(server.url, out)) == 1
        first = capsys.readouterr()
        assert f"no_tags {len(weather)}" in first.out
        assert f"backend_error {len(surf)}" in first.out
        assert "rerun the same command" in first.err
        assert out.with_name("tagged.jsonl.journal").exists()
        assert sum(tagger.asked.values()) == len(distinct)  # each distinct instruction asked once

        assert main(tag_argv(server.url, out)) == 0
        second = capsys.readouterr()
    assert f"{len(weather) + len(surf)} requests this run" in second.out
    assert all(tagger.asked[t] == 2 for t in weather | surf)
    assert sum(tagger.asked.values()) == len(distinct) + len(weather | surf)
    assert not out.with_name("tagged.jsonl.journal").exists()
    records = read_out(out)
    assert all("visual question answering" in r["tags"] for r in records)
    weather_record = next(r for r in records if any("weather" in t["value"] for t in r["conversations"]))
    assert weather_record["complexity"] == len(weather_record["tags"]) >= 2
    assert "prompt and" in second.out and "completion tokens" in second.out


def whole_entries(journal: Path) -> int:
    with open(journal, "rb") as handle:
        return sum(1 for number, line in enumerate(handle) if number > 0 and line.endswith(b"\n"))


def test_a_killed_run_resumes_without_asking_twice_and_writes_what_an_uninterrupted_run_writes(tmp_path, capsys):
    distinct = len(set(fixture_instructions()))
    tagger = Tagger(failures=False, delay=0.03)
    with RepliesServer(tagger) as server:
        out = tmp_path / "killed" / "tagged.jsonl"
        out.parent.mkdir()
        journal = out.with_name("tagged.jsonl.journal")
        command = [sys.executable, "-m", "llava_lite", *tag_argv(server.url, out, "--concurrency", "4")]
        run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not journal.exists() or whole_entries(journal) < 40:
            assert run.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.02)
        run.kill()
        run.communicate()
        assert not out.exists()
        done = whole_entries(journal)
        assert 40 <= done < distinct
        before = sum(tagger.asked.values())

        assert main(tag_argv(server.url, out)) == 0
        assert f"resuming: {done} of {distinct} instructions already tagged" in capsys.readouterr().err
        asked_again = sum(tagger.asked.values()) - before
        assert asked_again == distinct - done

        whole = tmp_path / "whole" / "tagged.jsonl"
        whole.parent.mkdir()
        assert main(tag_argv(server.url, whole)) == 0
    assert out.read_text() == whole.read_text()


def test_the_output_of_a_finished_run_is_not_overwritten_without_asking(tmp_path, capsys):
    out = tmp_path / "tagged.jsonl"
    argv = ["data", "tag", str(FIXTURE), "--out", str(out)]
    assert main(argv) == 0
    assert main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_instructions_are_the_user_turns_without_image_placeholders():
    records = read_curate_records(FIXTURE, check_images=False)
    assert instructions_of(records[0].conversation)[0] == "What is the man doing in the back of the pickup truck?"


def test_an_hf_tagger_loaded_from_a_folder_asks_every_instruction_and_a_random_lm_leaves_them_untagged(
    tmp_path, tiny_model, capsys
):
    folder = tmp_path / "lm"
    tiny_model.language_model.save_pretrained(folder)
    tiny_model.tokenizer.save_pretrained(folder)
    records_of(tmp_path, ["Describe the bus.", "How many cats are there?", "Describe the bus."])
    out = tmp_path / "tagged.jsonl"
    argv = ["data", "tag", str(tmp_path / "records.jsonl"), "--out", str(out), "--backend", "hf", "--model",
            str(folder), "--device", "cpu", "--batch-size", "2", "--max-tokens", "4"]  # fmt: skip
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "untagged: no_tags 3" in printed  # three instructions, two of them the same: asked once
    assert "2 requests this run" in printed
    assert [r["tags"] for r in read_out(out)] == [[], [], []]
    journal = [json.loads(line) for line in out.with_name("tagged.jsonl.journal").read_text().splitlines()[1:]]
    assert [entry["status"] for entry in journal] == ["no_tags", "no_tags"]
    assert all(entry["usage"]["prompt_tokens"] > 0 for entry in journal)
