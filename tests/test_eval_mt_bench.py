"""MT-Bench-style judged scores through `llava-lite eval --mt-bench`: the tiny model answers turn by turn, a judge
behind a real chat-completions server on 127.0.0.1 gives scripted scores, and the means are worked out here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, solid_image
from judged_helpers import record_generations, save_talkative_run
from rubric_server import RepliesServer, user_text

from llava_lite.cli import main
from llava_lite.data.errors import BadRecordError
from llava_lite.eval.mt_bench import parse_rating
from llava_lite.eval.report import category_panels
from llava_lite.inference.generator import Generator

# The score the judge gives each answer, by (question, turn); None: a reply without a score.
SCORES = {(1, 1): 8, (1, 2): 6, (2, 1): 9, (2, 2): 3, (3, 1): 5, (3, 2): None, (4, 1): 7, (4, 2): 4, (5, 1): 2}
CATEGORIES = {1: "writing", 2: "writing", 3: "math", 4: "vision", 5: "math"}
TAG = re.compile(r"Q(\d)T(\d)")


class ScoringJudge(RepliesServer):
    """Scores the answer to the last question tag its request shows (a later turn's request shows the earlier
    ones too); `SCORES`' None gets a reply with no `[[N]]`. `delay` slows every reply (for the kill)."""

    def __init__(self, scores: dict, delay: float = 0.0) -> None:
        super().__init__(lambda body: (200, self.verdict(body)))
        self.scores = scores
        self.delay = delay

    def verdict(self, body: dict) -> str:
        time.sleep(self.delay)
        question, turn = judged_turn(body)
        score = self.scores[(question, turn)]
        return "Good enough, I suppose; a 7 out of 10 feel." if score is None else f"Reasons.\nScore: [[{score}]]"


def judged_turn(body: dict) -> tuple[int, int]:
    tags = [(int(q), int(t)) for q, t in TAG.findall(user_text(body))]
    return max(tags, key=lambda tag: tag[1])


def write_questions(folder: Path) -> Path:
    solid_image(folder / "red.png", (200, 20, 20))
    rows = [
        {"question_id": 1, "category": "writing", "turns": ["Q1T1 Write a haiku.", "Q1T2 Now make it sadder."]},
        {"question_id": 2, "category": "writing", "turns": ["Q2T1 Name a river.", "Q2T2 And a longer one?"]},
        {
            "question_id": 3,
            "category": "math",
            "turns": ["Q3T1 What is 2 + 3?", "Q3T2 Times 4?"],
            "reference": ["REF-five", "REF-twenty"],
        },
        {"question_id": 4, "category": "vision", "image": "red.png", "turns": ["Q4T1 What colour?", "Q4T2 Sure?"]},
        {"question_id": 5, "category": "math", "turns": ["Q5T1 What is 9 - 9?"], "reference": ["REF-zero"]},
    ]
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return save_talkative_run(tmp_path_factory.mktemp("run"))


@pytest.fixture
def generations(monkeypatch) -> list:
    return record_generations(monkeypatch)


def argv(run: Path, questions: Path, judge_url: str, out: Path) -> list[str]:
    return [
        "eval", "--model", str(run), "--mt-bench", str(questions), "--judge-base-url", judge_url,
        "--judge-model", "judge-mt", "--judge-concurrency", "2", "--max-new-tokens", "6", "--out", str(out),
    ]  # fmt: skip


def expected_means(scores: dict) -> dict:
    """The means worked out from the scripted scores: overall, per turn, per category and its turns."""
    given = {key: value for key, value in scores.items() if value is not None}

    def mean(values):
        values = list(values)
        return sum(values) / len(values)

    categories = sorted(set(CATEGORIES.values()))
    return {
        "score": mean(given.values()),
        "turns": {str(t): mean(v for (q, turn), v in given.items() if turn == t) for t in (1, 2)},
        "by_category": {name: mean(v for (q, _), v in given.items() if CATEGORIES[q] == name) for name in categories},
        "category_turn": {
            (name, t): mean(v for (q, turn), v in given.items() if CATEGORIES[q] == name and turn == t)
            for name in categories
            for t in (1, 2)
            if any(CATEGORIES[q] == name and turn == t for (q, turn) in given)
        },
    }


def test_scores_per_turn_and_category_equal_a_hand_computation(tmp_path, tiny_run, capsys):
    questions = write_questions(tmp_path)
    out = tmp_path / "results.json"
    with ScoringJudge(SCORES) as judge:
        assert main(argv(tiny_run, questions, judge.url, out)) == 0
    result = json.loads(out.read_text())["mt_bench"]
    expected = expected_means(SCORES)
    assert result["score"] == pytest.approx(expected["score"])
    assert result["turns"] == pytest.approx(expected["turns"])
    for name, score in expected["by_category"].items():
        assert result["by_category"][name]["score"] == pytest.approx(score)
    for (name, turn), score in expected["category_turn"].items():
        assert result["by_category"][name]["turns"][str(turn)] == pytest.approx(score)
    assert result["judged"] == 8 and result["unparsable"] == 1 and result["failed"] == 0
    assert result["by_category"]["math"]["count"] == 2  # 3's turn 2 is unparsable: left out, not a 0
    assert len(judge.bodies) == len(SCORES)
    assert result["judge"]["prompt_tokens"] == 50 * len(SCORES)  # the stand-in's usage, counted per request
    assert "MT-Bench score" in capsys.readouterr().out
    # The plot draws them too: a bar per turn and per category.
    (title, _, bars), *_ = category_panels({"mt_bench": result})
    assert title.startswith("MT-Bench") and bars == pytest.approx(
        {**{f"turn {t}": v for t, v in expected["turns"].items()}, **expected["by_category"]}
    )
    # The judge was shown the reference for math, and no reference for writing.
    shown = {judged_turn(body): user_text(body) for body in judge.bodies}
    assert "REF-five" in shown[(3, 1)] and "REF-five" in shown[(3, 2)] and "REF-twenty" in shown[(3, 2)]
    assert "Reference" not in shown[(1, 1)] and "Reference" not in shown[(1, 2)]
    assert "1 image(s), which you cannot see" in shown[(4, 1)]
    # Prompts and verdicts are kept for people beside the results.
    audited = [json.loads(line) for line in out.with_name("results.mt_bench.judgements.jsonl").read_text().splitlines()]
    assert {(int(row["question_id"]), row["turn"]): row["score"] for row in audited} == SCORES
    assert all(row["prompt"] and row["reply"] for row in audited)


def test_the_second_turn_is_asked_with_the_models_own_first_answer(tmp_path, tiny_run, generations):
    questions = write_questions(tmp_path)
    out = tmp_path / "results.json"
    with ScoringJudge(SCORES) as judge:
        assert main(argv(tiny_run, questions, judge.url, out)) == 0
    first_answers = {c.messages[0].content: a for c, a in generations if len(c.messages) == 1}
    second_turns = [c for c, _ in generations if len(c.messages) == 3]
    assert len(first_answers) == 5 and len(second_turns) == 4
    for conversation in second_turns:
        user, assistant, follow_up = conversation.messages
        assert (user.role, assistant.role, follow_up.role) == ("user", "assistant", "user")
        assert assistant.content == first_answers[user.content]  # the model's own answer, not a reference
        assert TAG.search(follow_up.content).group(2) == "2"
    # The image went with the first turn, in both of question 4's conversations.
    assert all(c.images == [str(tmp_path / "red.png")] for c, _ in generations if "Q4T1" in c.messages[0].content)
    # The judge saw the same conversation when it scored turn 2.
    saved = {
        row["question_id"]: row["answers"]
        for row in map(json.loads, out.with_name("results.mt_bench.answers.jsonl").read_text().splitlines())
    }
    request = next(user_text(b) for b in judge.bodies if judged_turn(b) == (2, 2))
    assert f"User (question 1):\nQ2T1 Name a river.\n\nAssistant:\n{saved['2'][0]}\n\nUser (question 2)" in request
    assert f"Assistant:\n{saved['2'][1]}\n[End of conversation]" in request


def test_an_unparsable_verdict_is_asked_again_on_rerun_and_nothing_else(tmp_path, tiny_run, generations):
    questions = write_questions(tmp_path)
    out = tmp_path / "results.json"
    with ScoringJudge(SCORES) as judge:
        assert main(argv(tiny_run, questions, judge.url, out)) == 0
    answered = len(generations)
    mended = {**SCORES, (3, 2): 10}
    with ScoringJudge(mended) as judge:
        assert main(argv(tiny_run, questions, judge.url, out)) == 0
        assert [judged_turn(body) for body in judge.bodies] == [(3, 2)]
    assert len(generations) == answered  # every answer reused
    result = json.loads(out.read_text())["mt_bench"]
    assert result["unparsable"] == 0 and result["judged"] == 9
    assert result["score"] == pytest.approx(expected_means(mended)["score"])
    assert result["answers"] == {"generated": 0, "reused": 9}
    assert result["judge"]["asked_now"] == 1 and result["judge"]["reused"] == 8


def whole_entries(journal: Path) -> int:
    lines = journal.read_bytes().split(b"\n")[:-1] if journal.exists() else []
    return max(len(lines) - 1, 0)  # after the header; a torn last line has no newline yet


def test_a_killed_evaluation_resumes_without_answering_or_judging_again(tmp_path, tiny_run, generations):
    questions = write_questions(tmp_path)
    out = tmp_path / "results.json"
    journal = out.with_name("results.mt_bench.judgements.journal")
    with ScoringJudge(SCORES, delay=0.3) as judge:
        command = [sys.executable, "-m", "llava_lite", *argv(tiny_run, questions, judge.url, out)]
        command[command.index("--judge-concurrency") + 1] = "1"
        run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while whole_entries(journal) < 3:
            assert run.poll() is None, f"the evaluation ended before it could be killed: {run.communicate()[1][-800:]}"
            assert time.monotonic() < deadline, "the evaluation made no progress"
            time.sleep(0.02)
        run.kill()  # SIGKILL: no handler runs
        run.communicate()
        assert not out.exists()
        judged_before = whole_entries(journal)
        assert 3 <= judged_before < len(SCORES)
        judge.bodies.clear()
        judge.delay = 0.0
        assert main(argv(tiny_run, questions, judge.url, out)) == 0
        assert len(judge.bodies) == len(SCORES) - judged_before  # only what the killed run had not judged
    assert generations == []  # every answer came from the killed run's journal: no model was even asked
    result = json.loads(out.read_text())["mt_bench"]
    assert result["score"] == pytest.approx(expected_means(SCORES)["score"])
    assert result["judge"]["reused"] == judged_before


def test_a_turn_the_template_refuses_is_counted_unanswered_and_asked_on_rerun(tmp_path, tiny_run, monkeypatch):
    """A conversation the chat template cannot render (here: question 2's second turn) costs that answer alone; it
    is neither judged nor scored, and the next run asks it again."""
    questions = write_questions(tmp_path)
    out = tmp_path / "results.json"
    generate = Generator.generate

    def refusing(self, conversations, images, settings):
        if any("Q2T2" in c.messages[-1].content for c in conversations):
            raise BadRecordError(conversations[0].source, "malformed", "the template refuses it")
        return generate(self, conversations, images, settings)

    monkeypatch.setattr(Generator, "generate", refusing)
    with ScoringJudge(SCORES) as judge:
        assert main(argv(tiny_run, questions, judge.url, out)) == 0
        assert (2, 2) not in [judged_turn(body) for body in judge.bodies]
    result = json.loads(out.read_text())["mt_bench"]
    assert (result["judged"], result["unanswered"], result["unparsable"]) == (7, 1, 1)
    expected = expected_means({key: value for key, value in SCORES.items() if key != (2, 2)})
    assert result["score"] == pytest.approx(expected["score"])
    saved = [json.loads(line) for line in out.with_name("results.mt_bench.answers.jsonl").read_text().splitlines()]
    assert "the template refuses it" in saved[1]["unanswered"]["2#2"]
    monkeypatch.setattr(Generator, "generate", generate)
    asked = record_generations(monkeypatch)
    with ScoringJudge(SCORES) as judge:
        assert main(argv(tiny_run, questions, judge.url, out)) == 0
        assert sorted(judged_turn(body) for body in judge.bodies) == [(2, 2), (3, 2)]  # and the unparsable one
    assert [c.messages[-1].content for c, _ in asked] == ["Q2T2 And a longer one?"]
    assert json.loads(out.read_text())["mt_bench"]["unanswered"] == 0


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("Clear and correct.\nScore: [[8]]", 8.0),
        ("Rating: [[ 7.5 ]]", 7.5),
        ("I first thought [[6]], and I stand by [[6]].", 6.0),
        ("Between [[6]] and [[7]].", None),  # two different scores: no verdict
        ("Score: [[11]]", None),
        ("Score: [[0]]", None),
        ("Score: 8/10", None),
        ("Score: [8]", None),
    ],
)
def test_the_score_is_read_from_double_brackets_only(reply, score):
    assert parse_rating(reply) == score


def test_bad_questions_and_missing_settings_are_one_line_errors(tmp_path, tiny_run, capsys):
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question_id": 1, "turns": ["Hi"]}\n{"question_id": 2, "turns": []}\n')
    out = tmp_path / "results.json"
    assert main(argv(tiny_run, questions, "http://127.0.0.1:9/v1", out)) == 2
    assert f"{questions} line 2: `turns` must be a non-empty list" in capsys.readouterr().err
    questions.write_text('{"question_id": 1, "turns": ["Hi"], "image": "missing.png"}\n')
    assert main(argv(tiny_run, questions, "http://127.0.0.1:9/v1", out)) == 2
    assert "line 1: image missing.png not found" in capsys.readouterr().err
    without_out = argv(tiny_run, questions, "http://127.0.0.1:9/v1", out)[:-2]
    assert main(without_out) == 2
    assert "give --out RESULTS.json" in capsys.readouterr().err
    assert not list(tmp_path.glob("results*"))
