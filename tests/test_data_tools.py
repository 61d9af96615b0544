"""`data mix` hits its ratios reproducibly; `data stats` reports what a curator needs."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import fixture_path

from llava_lite.cli import main
from llava_lite.data.mix import allocate


def write_source(path: Path, name: str, count: int, turns: int = 1) -> str:
    """`count` LLaVA-format records whose ids say where they came from."""
    records = []
    for number in range(count):
        conversation = []
        for turn in range(turns):
            conversation += [
                {"from": "human", "value": f"Question {turn} about {name} {number}?"},
                {"from": "gpt", "value": " ".join(["word"] * (1 + number % 7)) + "."},
            ]
        records.append({"id": f"{name}-{number}", "conversations": conversation})
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


@pytest.fixture
def sources(tmp_path) -> list[str]:
    return [
        write_source(tmp_path / "conv.jsonl", "conv", 300, turns=3),
        write_source(tmp_path / "reasoning.jsonl", "reasoning", 200, turns=1),
        write_source(tmp_path / "text.jsonl", "text", 150, turns=2),
    ]


def origins(path: Path) -> Counter:
    return Counter(record["id"].split("-")[0] for record in json.loads(path.read_text()))


def test_mix_with_replacement_hits_the_ratios_within_sampling_error(tmp_path, sources):
    out = tmp_path / "mix.json"
    specs = [f"{sources[0]}:0.5", f"{sources[1]}:0.3", f"{sources[2]}:0.2"]
    assert main(["data", "mix", *specs, "--total", "1000", "--with-replacement", "--out", str(out)]) == 0
    counts = origins(out)
    for name, ratio in (("conv", 0.5), ("reasoning", 0.3), ("text", 0.2)):
        sampling_error = math.sqrt(1000 * ratio * (1 - ratio))
        assert abs(counts[name] - 1000 * ratio) <= 3 * sampling_error
        assert abs(counts[name] - 1000 * ratio) <= 1  # and in fact exact: shares are allocated, not drawn
    # 500 drawn with replacement from 300: some records repeat
    assert max(Counter(r["id"] for r in json.loads(out.read_text())).values()) > 1


def test_mix_is_reproducible_for_a_seed_and_changes_with_it(tmp_path, sources):
    specs = [f"{sources[0]}:2", f"{sources[1]}:1"]
    runs = {}
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        out = tmp_path / f"{name}.jsonl"
        assert main(["data", "mix", *specs, "--total", "150", "--seed", seed, "--out", str(out)]) == 0
        runs[name] = out.read_text()
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]


def test_mix_without_replacement_draws_distinct_records_and_refuses_to_overdraw(tmp_path, sources, capsys):
    out = tmp_path / "mix.json"
    assert main(["data", "mix", f"{sources[0]}:0.5", f"{sources[2]}:0.5", "--total", "300", "--out", str(out)]) == 0
    ids = [record["id"] for record in json.loads(out.read_text())]
    assert len(ids) == len(set(ids)) == 300
    assert origins(out) == {"conv": 150, "text": 150}
    assert main(["data", "mix", f"{sources[0]}:0.5", f"{sources[2]}:0.5", "--total", "400", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "text.jsonl: 200 records wanted at ratio 0.5 but it has 150" in err and err.count("\n") == 1


def test_mix_without_a_total_takes_the_largest_that_needs_no_repeats(tmp_path, sources):
    out = tmp_path / "mix.json"
    assert main(["data", "mix", f"{sources[1]}:0.5", f"{sources[2]}:0.5", "--out", str(out)]) == 0
    assert origins(out) == {"reasoning": 150, "text": 150}


def test_curriculum_orders_easy_to_hard(tmp_path, sources):
    out = tmp_path / "mix.json"
    specs = [f"{s}:1" for s in sources]
    assert main(["data", "mix", *specs, "--total", "300", "--curriculum", "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    keys = [(len(r["conversations"]) // 2, sum(len(t["value"].split()) for t in r["conversations"])) for r in records]
    assert keys == sorted(keys) and keys[0][0] == 1 and keys[-1][0] == 3


def test_allocation_is_within_one_record_of_every_share():
    for ratios, total in (([0.5, 0.3, 0.2], 7), ([1, 1, 1], 100), ([0.9, 0.05, 0.05], 33)):
        counts = allocate(ratios, total)
        assert sum(counts) == total
        assert all(abs(c - total * r / sum(ratios)) < 1 for c, r in zip(counts, ratios))


@pytest.mark.parametrize(
    "content, extra, message",
    [
        ('{not json\n[1, 2]\n{"conversations": []}\n', [], "no readable records (skipped: malformed 3)"),
        ("", ["--total", "10", "--with-replacement"], "no readable records (it is empty)"),
    ],
)
def test_a_source_without_readable_records_is_one_line_error_naming_it(
    tmp_path, sources, capsys, content, extra, message
):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(content)
    out = tmp_path / "mix.json"
    assert main(["data", "mix", f"{sources[0]}:0.5", f"{broken}:0.5", *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{broken}: {message}" in err and err.count("\n") == 1
    assert not out.exists()
    assert main(["data", "stats", str(broken)]) == 2  # the same reader: nothing to describe is an error too
    assert f"{broken}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message", [(["--with-replacement"], "--with-replacement needs --total"), (["--total", "0"], "positive")]
)
def test_mix_arguments_are_checked_before_any_source_is_read(tmp_path, capsys, extra, message):
    missing = tmp_path / "missing.jsonl"
    assert main(["data", "mix", f"{missing}:1", *extra, "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and "no such data file" not in err


def test_reading_a_source_shows_progress_on_a_terminal(tmp_path, sources, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["data", "mix", f"{sources[0]}:1", "--total", "10", "--out", str(tmp_path / "o.json")]) == 0
    assert f"reading {sources[0]}" in capsys.readouterr().err


def test_stats_loads_its_tokenizer_before_reading_the_data(tmp_path, capsys):
    tokenizer = tmp_path / "no-tokenizer"
    assert main(["data", "stats", str(tmp_path / "missing.jsonl"), "--tokenizer", str(tokenizer)]) == 2
    err = capsys.readouterr().err
    assert str(tokenizer) in err and "no such data file" not in err


@pytest.mark.parametrize("spec", ["nocolon.jsonl", "a.jsonl:-1", "a.jsonl:zero"])
def test_bad_source_specs_are_one_line_errors(tmp_path, capsys, spec):
    assert main(["data", "mix", spec, "--out", str(tmp_path / "o.json")]) == 2
    assert "expected PATH:RATIO" in capsys.readouterr().err


def test_stats_reports_records_images_turns_tokens_and_diversity(tmp_path, capsys):
    mixed = tmp_path / "mixed.jsonl"
    instruct = json.loads(fixture_path("data", "llava_instruct_100.json").read_text())
    text_only = [
        {
            "id": f"t{n}",
            "conversations": [{"from": "human", "value": f"Name colour {n}."}, {"from": "gpt", "value": "Blue."}],
        }
        for n in range(25)
    ]
    broken = ["{not json"]
    mixed.write_text("\n".join([json.dumps(r) for r in instruct + text_only] + broken) + "\n")
    assert main(["data", "stats", str(mixed), "--json", "--plot", str(tmp_path / "stats.png")]) == 0
    stats = json.loads(capsys.readouterr().out.split("\nplot:")[0])
    assert stats["records"] == 125 and stats["skipped"] == {"malformed": 1}
    assert stats["images"] == len({r["image"] for r in instruct})
    assert stats["text_only_share"] == 0.2
    turns = [len(r["conversations"]) // 2 for r in instruct] + [1] * 25
    assert stats["turns"]["max"] == max(turns) and stats["turns"]["mean"] == round(sum(turns) / 125, 1)
    assert stats["tokens"]["p50"] <= stats["tokens"]["p90"] <= stats["tokens"]["p99"] <= stats["tokens"]["max"]
    assert stats["kinds"] == {"unmarked": 125}
    instructions = stats["instructions"]
    assert instructions["distinct_lead_pairs"] > 50
    top = dict(instructions["top_lead_pairs"])
    assert top["name colour"] == 25  # the text-only records
    how_many = sum(
        t["value"].replace("<image>", "").strip().lower().startswith("how many")
        for r in instruct
        for t in r["conversations"]
        if t["from"] == "human"
    )
    assert top["how many"] == how_many > 0
    assert (tmp_path / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stats_table_counts_datagen_kinds(tmp_path, capsys):
    out = tmp_path / "gen.json"
    caps = str(fixture_path("data", "caps_boxes_coco2014_val_80.jsonl"))
    assert (
        main(["datagen", "--annotations", caps, "--limit", "10", "--kinds", "conversation,detail", "--out", str(out)])
        == 0
    )
    capsys.readouterr()
    assert main(["data", "stats", str(out)]) == 0
    table = capsys.readouterr().out
    assert "records            20 (skipped: none)" in table
    assert "record kinds       conversation 10, detail 10" in table
    assert "text-only records 0.0%" in table
