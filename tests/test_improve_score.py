"""`data score`: the reference scorer on hand-made cases; the judge and the run judging itself through a stand-in
OpenAI-compatible server with fixed, malformed and failing replies; an hf judge loaded from a folder; the run judging
itself loaded here."""

from __future__ import annotations

import json

import pytest
from improve_helpers import corner_prompts, read_lines, tiny_run
from rubric_server import RubricServer, user_text

from llava_lite.cli import main
from llava_lite.improve.sample import journal_path
from llava_lite.improve.score import reference_score
from llava_lite.rewards.rubric import parse_rubric


@pytest.mark.parametrize(
    ("candidate", "references", "match", "expected"),
    [
        ("Top left.", ["top left"], "exact", 1.0),  # case and the full stop do not count
        ("the TWO dogs", ["2 dogs"], "exact", 1.0),  # articles dropped, number words as digits
        ("top right", ["top left"], "exact", 0.0),
        ("It is in the top left corner", ["top left"], "exact", 0.0),
        ("It is in the top left corner", ["top left"], "contains", 1.0),
        ("left top", ["top left"], "contains", 0.0),  # the words in order, as a run
        ("top right", ["top left"], "f1", 0.5),
        ("bottom right", ["top left"], "f1", 0.0),
        ("red", ["blue", "Red"], "exact", 1.0),  # the best of several references
    ],
)
def test_the_reference_scorer_on_hand_made_cases(candidate, references, match, expected):
    assert reference_score(candidate, references, match) == pytest.approx(expected)


def test_the_rubric_reply_needs_both_axes_within_range():
    assert parse_rubric("Helpfulness: 8\n**Faithfulness:** 6\nbecause") == {"helpfulness": 8.0, "faithfulness": 6.0}
    assert parse_rubric("Helpfulness: 8\nno second score") is None
    assert parse_rubric("Helpfulness: 80\nFaithfulness: 6") is None
    assert parse_rubric(None) is None


def samples(path, answers: list[list[str]], with_context: bool = True) -> None:
    rows = []
    for number, texts in enumerate(answers):
        row = {"id": f"q{number}", "image": f"p0_{number:05d}.png", "prompt": "Which corner is the shape in?"}
        if with_context:
            row["captions"] = [f"A red circle in picture {number}."]
            row["instances"] = [{"category": "circle", "bbox": [0.1, 0.1, 0.4, 0.4]}]
        rows.append({**row, "candidates": [{"text": text} for text in texts]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_the_judge_scores_by_the_rubric_counts_malformed_and_failed_replies_and_a_rerun_retries_only_failures(
    tmp_path, capsys
):
    source, out = tmp_path / "samples.jsonl", tmp_path / "scored.jsonl"
    samples(source, [["great answer", "poor answer"], ["rambling answer", "crash now"]])
    with RubricServer() as server:
        command = [
            "data", "score", "--input", str(source), "--output", str(out), "--scorer", "judge",
            "--model", "stand-in", "--base-url", server.url, "--max-retries", "1", "--backoff", "0.01",
        ]  # fmt: skip
        assert main(command) == 1  # a request failed at the backend: say so
        printed = capsys.readouterr()
        assert "unscored: 2 (backend_error 1, no_score 1)" in printed.out
        assert "judge: 4 requests now, tokens 150 prompt, 30 completion; retries 1 (5xx 1)" in printed.out
        rows = read_lines(out)
        great, poor = rows[0]["candidates"]
        assert great["score"] == 8.0 and great["axes"] == {"helpfulness": 9.0, "faithfulness": 7.0}
        assert poor["score"] == 1.5
        rambling, crashed = rows[1]["candidates"]
        assert rambling["score"] is None and rambling["error"] == "no_score"
        assert crashed["score"] is None and crashed["error"] == "backend_error"
        # The judge was told what is known about the image: its caption and its box. Requests run concurrently, so
        # picture 0's is found by its answer, not by its place.
        asked = next(body for body in server.bodies if "[Answer]\ngreat answer\n" in user_text(body))
        assert "A red circle in picture 0." in user_text(asked)
        assert "circle: [0.100, 0.100, 0.400, 0.400]" in user_text(asked)
        assert "Faithfulness" in asked["messages"][0]["content"]
        assert journal_path(out).exists()  # kept for the retry

        seen = len(server.bodies)
        assert main(command) == 1
        assert len(server.bodies) - seen == 2  # only the failed request, tried again (1 retry): nothing else
        assert "judge: 1 requests now" in capsys.readouterr().out


def test_self_served_sends_the_image_and_self_loaded_runs_the_run_itself(tmp_path, capsys):
    data = corner_prompts(tmp_path, 2)
    source = tmp_path / "samples.jsonl"
    samples(source, [["great", "poor"], ["great", "great"]], with_context=False)
    with RubricServer() as server:
        served = tmp_path / "served.jsonl"
        command = [
            "data", "score", "--input", str(source), "--output", str(served), "--scorer", "self",
            "--model", "run", "--base-url", server.url, "--image-folder", str(data["images"]),
        ]  # fmt: skip
        assert main(command) == 0
        assert [c["score"] for row in read_lines(served) for c in row["candidates"]] == [8.0, 1.5, 8.0, 8.0]
        parts = server.bodies[0]["messages"][-1]["content"]
        assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
        assert "The image is shown above." in user_text(server.bodies[0])

    # Loaded here: the tiny random run cannot follow a rubric, so every reply is counted as giving no score.
    run = tiny_run(tmp_path / "run")
    local = tmp_path / "local.jsonl"
    command = [
        "data", "score", "--input", str(source), "--output", str(local), "--scorer", "self", "--model", str(run),
        "--image-folder", str(data["images"]), "--max-tokens", "8", "--device", "cpu",
    ]  # fmt: skip
    capsys.readouterr()
    assert main(command) == 0
    assert "unscored: 4 (no_score 4)" in capsys.readouterr().out
    assert all(c["error"] == "no_score" for row in read_lines(local) for c in row["candidates"])


def test_the_reference_scorer_names_a_line_without_a_reference(tmp_path, capsys):
    source = tmp_path / "samples.jsonl"
    samples(source, [["a", "b"]])
    assert main(["data", "score", "--input", str(source), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "line 1" in capsys.readouterr().err


def test_an_hf_judge_loaded_from_a_folder_answers_every_candidate_in_batches(tmp_path, tiny_model, capsys):
    # A random tiny LM as the judge: its replies carry no rubric, so each candidate is left unscored as no_score.
    folder = tmp_path / "judge"
    tiny_model.language_model.save_pretrained(folder)
    tiny_model.tokenizer.save_pretrained(folder)
    source, out = tmp_path / "samples.jsonl", tmp_path / "scored.jsonl"
    samples(source, [["top left", "bottom right", "centre"], ["top right", "left"]])
    command = [
        "data", "score", "--input", str(source), "--output", str(out), "--scorer", "judge", "--backend", "hf",
        "--model", str(folder), "--device", "cpu", "--max-tokens", "4", "--batch-size", "2",
    ]  # fmt: skip
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "unscored: 5 (no_score 5)" in printed and "judge: 5 requests now" in printed
    rows = read_lines(out)
    assert [[c["text"] for c in row["candidates"]] for row in rows] == [["top left", "bottom right", "centre"],
                                                                       ["top right", "left"]]  # fmt: skip
    assert all(c["score"] is None and c["error"] == "no_score" for row in rows for c in row["candidates"])
    assert not journal_path(out).exists()  # every candidate answered: nothing left to retry
