"""Pairwise win rates through `llava-lite eval --versus`: the tiny model against a file of reference answers or
another run, a judge behind a real chat-completions server with scripted verdicts, both orders asked and combined;
and the win-rate maths (length control, bootstrap) on crafted outcomes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import solid_image
from judged_helpers import record_generations, save_talkative_run
from rubric_server import RepliesServer, user_text

from llava_lite.cli import main
from llava_lite.config_io import ConfigError, from_dict
from llava_lite.eval.report import category_panels
from llava_lite.eval.versus import VersusSettings, compare_runs, parse_preference
from llava_lite.eval.win_rate import LOSS, TIE, WIN, bootstrap_intervals, outcome_of, summarize_outcomes

# Per prompt: the verdict when our answer is shown as A, and when it is shown as B.
VERDICTS = {
    1: ("A", "B"),  # ours preferred in both orders: a win
    2: ("B", "A"),  # the reference preferred in both: a loss
    3: ("A", "A"),  # the judge prefers whatever comes first: a tie
    4: ("C", "C"),  # a tie twice
    5: ("A", "C"),  # ours once, a tie once: a tie
    6: ("A", "B"),  # a win
}
OUTCOMES = {1: WIN, 2: LOSS, 3: TIE, 4: TIE, 5: TIE, 6: WIN}
CATEGORIES = {1: "advice", 2: "advice", 3: "advice", 4: "explain", 5: "explain", 6: "explain"}
PROMPT = re.compile(r"\[Question\]\nP(\d)")
ANSWER_A = re.compile(r"\[Answer of assistant A\]\n(.*?)\n\[End of answer A\]", re.DOTALL)
ANSWER_B = re.compile(r"\[Answer of assistant B\]\n(.*?)\n\[End of answer B\]", re.DOTALL)


def shown(body: dict) -> tuple[int, str, str]:
    """(prompt number, answer shown as A, answer shown as B) of a judge request."""
    text = user_text(body)
    return int(PROMPT.search(text).group(1)), ANSWER_A.search(text).group(1), ANSWER_B.search(text).group(1)


class VerdictJudge(RepliesServer):
    """Gives `verdicts[prompt]`'s first verdict when the reference answer is B (ours first), its second when the
    reference is A; a verdict None is a reply without one."""

    def __init__(self, verdicts: dict) -> None:
        super().__init__(lambda body: (200, self.verdict(body)))
        self.verdicts = verdicts

    def verdict(self, body: dict) -> str:
        prompt, first, _ = shown(body)
        verdict = self.verdicts[prompt][1 if first.startswith("REF") else 0]
        return "Both have merits; hard to say." if verdict is None else f"A comparison.\nVerdict: [[{verdict}]]"


def write_references(folder: Path) -> Path:
    rows = [
        {
            "instruction": f"P{number} Say something about topic {number}.",
            "output": reference_answer(number),
            "generator": "handwritten",
            "dataset": CATEGORIES[number],
        }
        for number in VERDICTS
    ]
    path = folder / "references.json"
    path.write_text(json.dumps(rows))
    return path


def reference_answer(number: int) -> str:
    return " ".join([f"REF-{number}"] + ["words"] * number)


def argv(run: Path, baseline: Path, judge_url: str, out: Path, *extra: str) -> list[str]:
    return [
        "eval", "--model", str(run), "--versus", str(baseline), "--judge-base-url", judge_url,
        "--judge-model", "judge-pair", "--max-new-tokens", "6", "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return save_talkative_run(tmp_path_factory.mktemp("run"))


@pytest.fixture
def generations(monkeypatch) -> list:
    return record_generations(monkeypatch)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_both_orders_are_asked_and_combined_into_wins_ties_and_losses(tmp_path, tiny_run, capsys):
    references = write_references(tmp_path)
    out = tmp_path / "results.json"
    with VerdictJudge(VERDICTS) as judge:
        assert main(argv(tiny_run, references, judge.url, out, "--judge-concurrency", "3")) == 0
    answers = {row["id"]: row for row in read_lines(out.with_name("results.versus.answers.jsonl"))}
    # Each prompt was asked twice: our answer as A with the reference as B, then the other way round.
    asked = sorted(shown(body) for body in judge.bodies)
    expected = []
    for number in VERDICTS:
        ours, reference = answers[str(number - 1)]["ours"], reference_answer(number)
        assert answers[str(number - 1)]["baseline"] == reference
        expected += [(number, ours, reference), (number, reference, ours)]
    assert asked == sorted(expected)
    for number, outcome in OUTCOMES.items():
        assert answers[str(number - 1)]["outcome"] == outcome
    scores = {number: {WIN: 1.0, TIE: 0.5, LOSS: 0.0}[outcome] for number, outcome in OUTCOMES.items()}
    result = json.loads(out.read_text())["versus"]
    assert result["win_rate"] == pytest.approx(sum(scores.values()) / 6)  # (2 wins + 3 ties / 2) / 6
    assert (result["wins"], result["ties"], result["losses"], result["unjudged"]) == (2, 3, 1, 0)
    assert result["tie_rate"] == pytest.approx(3 / 6)
    assert result["consistency"] == pytest.approx(4 / 6)  # prompts 3 and 5 got different verdicts by order
    for category in ("advice", "explain"):
        mine = [scores[n] for n in VERDICTS if CATEGORIES[n] == category]
        assert result["by_category"][category]["win_rate"] == pytest.approx(sum(mine) / len(mine))
    low, high = result["win_rate_ci95"]
    assert 0 <= low <= result["win_rate"] <= high <= 1 and low < high
    assert result["judge"]["asked_now"] == 12 and result["judge"]["completion_tokens"] == 120
    printed = capsys.readouterr().out
    assert f"win rate vs {references}" in printed and "length-controlled" in printed
    (title, _, bars), *_ = category_panels({"versus": result})  # what --plot draws
    assert str(references) in title and bars == pytest.approx(
        {"all": 100 * result["win_rate"], **{k: 100 * c["win_rate"] for k, c in result["by_category"].items()}}
    )
    audited = read_lines(out.with_name("results.versus.judgements.jsonl"))
    orders = ("ours_first", "ours_second")
    assert {row["key"]: row["verdict"] for row in audited} == {
        f"{n - 1}#{order}": VERDICTS[n][index] for n in VERDICTS for index, order in enumerate(orders)
    }


def test_an_unparsable_verdict_leaves_its_prompt_unjudged_until_a_rerun_asks_again(tmp_path, tiny_run, generations):
    references = write_references(tmp_path)
    out = tmp_path / "results.json"
    garbled = {**VERDICTS, 5: ("A", None)}
    with VerdictJudge(garbled) as judge:
        assert main(argv(tiny_run, references, judge.url, out)) == 0
    result = json.loads(out.read_text())["versus"]
    assert result["unjudged"] == 1 and result["judged"] == 5
    assert result["judge"]["statuses"] == {"ok": 11, "unparsable": 1}
    answered = len(generations)
    with VerdictJudge(VERDICTS) as judge:
        assert main(argv(tiny_run, references, judge.url, out)) == 0
        assert [shown(body)[0] for body in judge.bodies] == [5]  # that request only
    assert len(generations) == answered  # no answer generated again
    result = json.loads(out.read_text())["versus"]
    assert result["unjudged"] == 0 and result["ties"] == 3 and result["judge"]["reused"] == 11


def test_a_run_baseline_answers_every_prompt_too_with_the_images(tmp_path, tiny_run, generations):
    baseline = save_talkative_run(tmp_path / "baseline", seed=1)
    for number in range(3):
        solid_image(tmp_path / f"picture{number}.png", (80 * number, 40, 200 - 60 * number))
    prompts = tmp_path / "wildvision.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"question_id": f"wv{n}", "instruction": f"P{n} What is here?", "image": f"picture{n}.png"})
            + "\n"
            for n in range(3)
        )
    )
    out = tmp_path / "results.json"
    with RepliesServer(lambda body: (200, "The first one.\n[[A]]")) as judge:  # a judge that always prefers A
        assert main(argv(tiny_run, baseline, judge.url, out, "--prompts", str(prompts), "--judge-images")) == 0
    assert len(generations) == 6  # three prompts, two models: ours first, then the baseline
    assert all(c.images == [str(tmp_path / f"picture{prompt_number(c)}.png")] for c, _ in generations)
    ours = {prompt_number(c): answer for c, answer in generations[:3]}
    theirs = {prompt_number(c): answer for c, answer in generations[3:]}
    rows = read_lines(out.with_name("results.versus.answers.jsonl"))
    assert {row["id"]: (row["ours"], row["baseline"]) for row in rows} == {f"wv{n}": (ours[n], theirs[n]) for n in ours}
    assert all(ours[n] != theirs[n] for n in ours)  # two different models answered
    assert len(judge.bodies) == 6
    for body in judge.bodies:
        image_part, text_part = body["messages"][-1]["content"]
        assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
        assert "shown above" in text_part["text"]
    # Position bias alone: every prompt a tie, whatever the answers; nothing leans either way.
    result = json.loads(out.read_text())["versus"]
    assert (result["ties"], result["win_rate"], result["consistency"]) == (3, 0.5, 0.0)
    assert result["baseline"] == str(baseline)


def prompt_number(conversation) -> int:
    return int(re.search(r"P(\d)", conversation.messages[0].content).group(1))


# ----- the maths --------------------------------------------------------------------------------------------------


def outcome_rows(outcomes: list[str], differences: list[float], category: str = "all") -> list[dict]:
    return [{"outcome": o, "length_difference": d, "category": category} for o, d in zip(outcomes, differences)]


def test_length_control_undoes_a_judge_that_always_prefers_the_longer_answer():
    """Ours is longer on 18 prompts and wins each; on 2 the lengths are equal and the judge calls a tie. The raw
    win rate is 19/20; with the length difference regressed out, the win probability at equal length is the ties'
    0.5 (the slope's small ridge moves it by well under 0.01)."""
    rows = outcome_rows([WIN] * 18 + [TIE] * 2, [120.0] * 18 + [0.0] * 2)
    summary = summarize_outcomes(rows)
    assert summary["win_rate"] == pytest.approx(19 / 20)
    assert summary["length_controlled_win_rate"] == pytest.approx(0.5, abs=0.01)


def test_length_control_reads_the_win_rate_of_equal_lengths_when_two_length_groups_fit_exactly():
    """Two groups of length difference: a logistic model with an intercept and a slope fits both groups' rates
    exactly, so the rate at difference 0 - here 1.5 of 4, from one win, one tie and two losses - is the answer."""
    outcomes = [WIN] * 5 + [LOSS] + [WIN, TIE, LOSS, LOSS]
    differences = [80.0] * 6 + [0.0] * 4
    summary = summarize_outcomes(outcome_rows(outcomes, differences))
    assert summary["win_rate"] == pytest.approx((6 + 0.5) / 10)
    assert summary["length_controlled_win_rate"] == pytest.approx(1.5 / 4, abs=2e-3)


def test_without_length_differences_the_length_controlled_rate_is_the_win_rate():
    summary = summarize_outcomes(outcome_rows([WIN, WIN, TIE, LOSS, WIN], [7.0] * 5))
    assert summary["length_controlled_win_rate"] == pytest.approx(summary["win_rate"]) == pytest.approx(0.7)


def test_bootstrap_intervals_are_seeded_and_per_category():
    scores = [1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0]
    differences = [30.0, -10.0, 0.0, 5.0, 50.0, -40.0, 3.0, 12.0]
    assert bootstrap_intervals(scores, differences, seed=3) == bootstrap_intervals(scores, differences, seed=3)
    low, high = bootstrap_intervals(scores, differences, seed=3)["win_rate"]
    assert low < sum(scores) / len(scores) < high
    rows = outcome_rows([WIN, LOSS, TIE], [1.0, 2.0, 3.0], "a") + outcome_rows([WIN, WIN], [4.0, 5.0], "b")
    rows.append({"outcome": None, "length_difference": 0, "category": "a"})
    summary = summarize_outcomes(rows, seed=1)
    assert summary["by_category"]["a"]["win_rate"] == pytest.approx(0.5)
    assert summary["by_category"]["b"]["win_rate_ci95"] == [1.0, 1.0]
    assert summary["unjudged"] == 1 and summary["judged"] == 5


@pytest.mark.parametrize(
    ("ours_first", "ours_second", "outcome"),
    [("A", "B", WIN), ("B", "A", LOSS), ("A", "A", TIE), ("B", "B", TIE), ("C", "C", TIE), ("A", "C", TIE),
     ("C", "A", TIE)],
)  # fmt: skip
def test_the_two_orders_combine_by_the_conservative_rule(ours_first, ours_second, outcome):
    assert outcome_of(ours_first, ours_second) == outcome


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [("...\n[[A]]", "A"), ("Verdict: [[ B ]]", "B"), ("[[C]]", "C"), ("A is better: [[A]]. Yes, [[A]].", "A"),
     ("[[A]] or [[B]]", None), ("Assistant A", None), ("[[D]]", None), ("[A]", None)],
)  # fmt: skip
def test_the_verdict_is_read_from_double_brackets_only(reply, verdict):
    assert parse_preference(reply) == verdict


def test_versus_needs_its_prompts_and_a_judge(tmp_path, tiny_run, capsys):
    out = tmp_path / "results.json"
    assert main(argv(tiny_run, tiny_run, "http://127.0.0.1:9/v1", out)) == 2
    assert "--versus RUN needs --prompts FILE" in capsys.readouterr().err
    references = write_references(tmp_path)
    without_judge = [arg for arg in argv(tiny_run, references, "x", out) if arg not in ("--judge-base-url", "x")]
    assert main(without_judge) == 2
    assert "give --judge-base-url and --judge-model" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "Hi", "output": "Hello"}, {"output": "No prompt"}]))
    assert main(argv(tiny_run, tmp_path / "bad.json", "http://127.0.0.1:9/v1", out)) == 2
    assert f"{tmp_path / 'bad.json'} record 1: needs an `instruction`" in capsys.readouterr().err


def test_two_runs_compared_from_a_config_as_the_improve_loop_would(tmp_path, tiny_run, generations):
    """`compare_runs` with settings read as a config file gives them: round N against round N-1."""
    previous = save_talkative_run(tmp_path / "previous", seed=2)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": n, "instruction": f"P{n} Tell me more."}) + "\n" for n in (1, 2)))
    with RepliesServer(lambda body: (200, "[[C]]")) as judge:
        raw = {"prompts": str(prompts), "max_new_tokens": 4, "judge": {"base_url": judge.url, "model": "j"}}
        settings = from_dict(VersusSettings, raw, "eval.versus")
        result = compare_runs(tiny_run, previous, settings, tmp_path / "round_2" / "eval.json")
        assert len(judge.bodies) == 4
    assert (result["ties"], result["win_rate"], result["baseline"]) == (2, 0.5, str(previous))
    assert len(generations) == 4 and (tmp_path / "round_2" / "eval.versus.answers.jsonl").is_file()
    with pytest.raises(ConfigError, match=r"eval.versus.judge: .*model"):
        from_dict(VersusSettings, {"prompts": str(prompts), "judge": {"base_url": "http://x/v1"}}, "eval.versus")


def test_the_improve_loop_measures_a_round_by_its_win_rate_against_the_round_before(tmp_path, tiny_run):
    """`eval.versus` in an improve config: round 0 has no metric, round N's is its win rate against round N-1, and a
    round improves only when it wins above 0.5 (+ min_improvement) - not when it beats an earlier win rate."""
    from llava_lite.improve.config import ImproveConfig
    from llava_lite.improve.loop import _improved, evaluate, metric_value

    previous = save_talkative_run(tmp_path / "previous", seed=2)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": n, "instruction": f"P{n} Tell me more."}) + "\n" for n in (1, 2, 3)))

    def later_in_the_alphabet_wins(body: dict) -> tuple[int, str]:  # the same answer in both orders
        _, first, second = shown(body)
        return 200, "[[C]]" if first == second else f"[[{'A' if first > second else 'B'}]]"

    with RepliesServer(later_in_the_alphabet_wins) as judge:
        raw = {
            "start": str(previous), "output_dir": str(tmp_path / "loop"), "prompts": str(prompts),
            "train": {"recipe": "stage2"}, "min_improvement": 0.1,
            "eval": {"metric": "versus.win_rate", "versus": {
                "prompts": str(prompts), "max_new_tokens": 4, "judge": {"base_url": judge.url, "model": "j"}}},
        }  # fmt: skip
        config = from_dict(ImproveConfig, raw, "improve.yaml")
        round_0 = evaluate(config, previous, tmp_path / "round_0")
        round_1 = evaluate(config, tiny_run, tmp_path / "round_1", previous=previous)
        assert len(judge.bodies) == 6  # three prompts, both orders, for round 1 alone
    assert metric_value(round_0, "versus.win_rate") is None
    answers = read_lines(Path(round_1["versus"]["files"]["answers"]))
    by_hand = [1.0 if a["ours"] > a["baseline"] else 0.0 if a["ours"] < a["baseline"] else 0.5 for a in answers]
    assert metric_value(round_1, "versus.win_rate") == pytest.approx(sum(by_hand) / 3)
    assert _improved(config, 0.61, best=0.9) and not _improved(config, 0.59, best=None)
    with pytest.raises(ConfigError, match="eval.metric versus.win_rate: set eval.versus"):
        from_dict(ImproveConfig, {**raw, "eval": {"metric": "versus.win_rate", "held_out": "x"}}, "improve.yaml")
