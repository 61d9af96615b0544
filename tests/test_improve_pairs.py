"""`data pairs`: the filters drop what they should and the summary counts them; the pairs load in stage 3 and the
best answers as SFT records."""

from __future__ import annotations

import json

from improve_helpers import corner_prompts, read_lines

from llava_lite.cli import main
from llava_lite.data.config import DataConfig, DataSource
from llava_lite.data.dataset import load_conversations
from llava_lite.data.preference_formats import read_pairs
from llava_lite.improve.pairs import PairSettings, build_pairs


def scored(path, cases: list[list[tuple[str, float | None]]]) -> str:
    rows = [
        {
            "id": f"q{n}",
            "image": f"p0_{n:05d}.png",
            "prompt": "Which corner is the shape in?",
            "candidates": [{"text": text, "score": score} for text, score in candidates],
        }
        for n, candidates in enumerate(cases)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


CASES = [
    [("top left", 1.0), ("bottom left", 0.0), ("Top left.", 1.0)],  # kept: best against worst
    [("top right", 0.0), ("Top right", 0.0)],  # the same answer twice: identical_candidates
    [("top left", 0.0), ("top right", 0.0)],  # no preference: tied
    [("bottom left", 0.6), ("bottom right", 0.5)],  # a gap under min_gap 0.2: small_gap
    [("bottom left", None), ("top left", 1.0)],  # one scored: too_few_scored
    [("", 0.0), ("bottom right", 1.0), ("top right", 0.0)],  # the empty one left out, the rest kept
]


def test_each_filter_drops_its_case_and_the_summary_counts_it(tmp_path):
    rows, sft, summary = build_pairs(scored(tmp_path / "s.jsonl", CASES), PairSettings(min_gap=0.2))
    assert [(r["id"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("q0", "top left", "bottom left"),
        ("q5", "bottom right", "top right"),
    ]
    assert dict(summary.dropped) == {
        "identical_candidates": 1,
        "tied": 1,
        "small_gap": 1,
        "too_few_scored": 1,
        "empty_candidate": 1,
    }
    assert summary.prompts == 6 and summary.pairs == 2
    assert summary.length_ratio == 1.0 and summary.chosen_longer_share == 0.0
    assert len(sft) == 6  # every prompt with a scored answer has a best one (no sft_min_score)


def test_every_pair_over_the_gap_and_the_sft_threshold(tmp_path):
    path = scored(tmp_path / "s.jsonl", [[("a", 3.0), ("b", 2.0), ("c", 1.0)], [("d", 0.5), ("e", 0.2)]])
    rows, sft, summary = build_pairs(path, PairSettings(mode="all", min_gap=1.0, sft_min_score=1.0))
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("a", "b"),
        ("a", "c"),
        ("b", "c"),
    ]
    assert summary.dropped["small_gap"] == 1
    assert [record["messages"][-1]["content"] for record in sft] == ["a"]


def test_length_balancing_drops_the_chosen_is_longer_pairs_in_excess(tmp_path):
    cases = [
        [("the shape is in the top left corner of it", 1.0), ("top right", 0.0)],  # chosen 9 words longer
        [("it is top left", 1.0), ("top right", 0.0)],  # 2 longer
        [("it is bottom left", 1.0), ("bottom right", 0.0)],  # 2 longer
        [("top left", 1.0), ("it is the top right one", 0.0)],  # chosen shorter
    ]
    path = scored(tmp_path / "s.jsonl", cases)
    _, _, unbalanced = build_pairs(path, PairSettings())
    assert unbalanced.chosen_longer_share == 0.75 and unbalanced.length_ratio > 1.5
    rows, _, balanced = build_pairs(path, PairSettings(balance_length=True))
    assert balanced.dropped["length_balance"] == 2
    assert [r["id"] for r in rows] == ["q2", "q3"]  # the most lopsided went first (q0, then q1 of the equals)
    assert balanced.chosen_longer_share == 0.5


def test_the_command_writes_pairs_stage_3_reads_and_sft_records_stage_2_reads(tmp_path, capsys):
    images = corner_prompts(tmp_path, 6)["images"]
    source = scored(tmp_path / "scored.jsonl", CASES)
    pairs, sft, summary = tmp_path / "pairs.jsonl", tmp_path / "sft.jsonl", tmp_path / "summary.json"
    command = [
        "data", "pairs", "--input", source, "--output", str(pairs), "--sft", str(sft), "--summary", str(summary),
        "--min-gap", "0.2", "--sft-min-score", "1",
    ]  # fmt: skip
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "pairs kept: 2" in printed and "small_gap 1" in printed and "diversity: distinct_lead_pairs 1" in printed
    assert json.loads(summary.read_text())["dropped"]["tied"] == 1
    read, skipped = read_pairs(DataSource(str(pairs), str(images)))
    assert not skipped and len(read) == 2
    assert read[0].chosen == "top left" and read[0].rejected == "bottom left"
    assert read[0].images == [str(images / "p0_00000.png")]
    conversations, skipped = load_conversations(DataConfig(sources=[DataSource(str(sft), str(images))]))
    assert not skipped and [c.messages[-1].content for c in conversations] == ["top left", "top left", "bottom right"]
    assert read_lines(sft)[0]["images"] == ["p0_00000.png"]
