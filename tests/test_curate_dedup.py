"""`data dedup` drops planted exact, near and image copies of the fixtures' records and nothing else, writes the rest
as they came, reports each drop with the record it repeats, and does work that grows with the data, not its square."""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path

import pytest
from conftest import fixture_path
from PIL import Image

from llava_lite.cli import main
from llava_lite.curate import dedup
from llava_lite.data.conversation import Conversation, Message


@pytest.fixture
def data(tmp_path) -> dict:
    """The fixtures' LLaVA records and `messages` records (with their pictures), each file with copies planted."""
    llava = json.loads(fixture_path("data", "llava_instruct_100.json").read_text())
    demo_folder = tmp_path / "demo"
    shutil.copytree(fixture_path("data", "mllm_demo"), demo_folder)
    demo = json.loads((demo_folder / "mllm_demo.json").read_text())
    pictures = demo_folder / "mllm_demo_data"
    Image.open(pictures / "1.jpg").convert("RGB").save(pictures / "1_reencoded.jpg", quality=60)
    picture = Image.open(pictures / "2.jpg").convert("RGB")
    picture.resize((picture.width // 2, picture.height // 2)).save(pictures / "2_small.png")

    shouted = copy.deepcopy(llava[3])  # the same record, in other case, spacing and punctuation
    for turn in shouted["conversations"]:
        shout = turn["value"].upper().replace("<IMAGE>", "<image>")
        turn["value"] = "  " + shout.replace(".", " !").replace(" ", "  ")
    one_word = copy.deepcopy(llava[7])
    answer = one_word["conversations"][1]
    answer["value"] = answer["value"].replace(" the ", " a ", 1)
    assert answer["value"] != llava[7]["conversations"][1]["value"]
    llava_planted = [*llava, shouted, one_word]

    reencoded = {**copy.deepcopy(demo[0]), "images": ["mllm_demo_data/1_reencoded.jpg"] * 2}
    resized = {**copy.deepcopy(demo[1]), "images": ["mllm_demo_data/2_small.png"]}
    other_question = {
        "messages": [
            {"role": "user", "content": "<image>What colour is the grass?"},
            {"role": "assistant", "content": "It is green."},
        ],
        "images": ["mllm_demo_data/2.jpg"],
    }
    other_picture = {**copy.deepcopy(demo[1]), "images": ["mllm_demo_data/3.jpg"]}
    demo_planted = [*demo, reencoded, resized, other_question, other_picture]

    llava_path, demo_path = tmp_path / "llava.json", demo_folder / "demo.jsonl"
    llava_path.write_text(json.dumps(llava_planted))
    demo_path.write_text("".join(json.dumps(record) + "\n" for record in demo_planted))
    return {
        "paths": [str(llava_path), str(demo_path)],
        "records": llava_planted + demo_planted,
        "planted": {
            ("exact", f"{llava_path} record 100", llava[3]["id"]),
            ("near_text", f"{llava_path} record 101", llava[7]["id"]),
            ("image", f"{demo_path} line 7", f"{demo_path} line 1"),
            ("image", f"{demo_path} line 8", f"{demo_path} line 2"),
        },
        "planted_positions": {100, 101, len(llava_planted) + 6, len(llava_planted) + 7},
    }


def run_dedup(paths: list[str], out: Path, *options: str) -> list[dict]:
    assert main(["data", "dedup", *paths, "--out", str(out), *options]) == 0
    return [json.loads(line) for line in out.with_name(f"{out.stem}.dropped.jsonl").read_text().splitlines()]


def test_the_planted_copies_are_dropped_by_reason_with_the_record_they_repeat_and_nothing_else(data, tmp_path):
    dropped = run_dedup(data["paths"], tmp_path / "clean.jsonl")
    assert {(d["reason"], d["source"].split(" (id")[0], d["duplicate_of"]) for d in dropped} == data["planted"]


def test_a_picture_copy_is_within_the_default_distance_and_an_exact_copy_has_none(data, tmp_path):
    dropped = run_dedup(data["paths"], tmp_path / "clean.jsonl")
    distances = {d["reason"]: d["image_distance"] for d in dropped}
    assert 0 <= distances["image"] <= 4
    assert distances["exact"] == 0  # the same path: the same (missing) picture
    near = next(d for d in dropped if d["reason"] == "near_text")
    assert near["similarity"] >= 0.85


def test_the_kept_records_are_written_as_they_came_in_their_own_shape(data, tmp_path):
    out = tmp_path / "clean.json"
    run_dedup(data["paths"], out)
    kept = [r for n, r in enumerate(data["records"]) if n not in data["planted_positions"]]
    assert json.loads(out.read_text()) == kept
    assert {"conversations" in r for r in kept} == {True, False}  # both shapes, unchanged


def test_a_reencoded_or_halved_photo_keeps_its_perceptual_hash_exactly(data, tmp_path):
    strict = run_dedup(data["paths"], tmp_path / "strict.jsonl", "--image-distance", "0")
    assert sum(d["reason"] == "image" for d in strict) == 2


def test_a_near_copy_less_similar_than_near_is_kept(tmp_path):
    llava = json.loads(fixture_path("data", "llava_instruct_100.json").read_text())
    changed = copy.deepcopy(llava[7])
    for turn in changed["conversations"][1::2]:  # a word of every answer
        turn["value"] = "Indeed " + turn["value"]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([*llava[:10], changed]))
    [near] = run_dedup([str(path)], tmp_path / "a.jsonl")
    assert near["reason"] == "near_text" and 0.85 <= near["similarity"] < 0.99
    assert run_dedup([str(path)], tmp_path / "b.jsonl", "--near", "0.99") == []


def test_the_unchanged_fixtures_have_no_duplicates(tmp_path):
    paths = [fixture_path("data", "llava_instruct_100.json"), fixture_path("data", "mllm_demo", "mllm_demo.json")]
    paths = [str(path) for path in paths]
    assert run_dedup(paths, tmp_path / "clean.jsonl") == []
    assert len((tmp_path / "clean.jsonl").read_text().splitlines()) == 106


def test_the_summary_counts_each_reason_and_warns_of_pictures_compared_by_path(data, tmp_path, capsys):
    run_dedup(data["paths"], tmp_path / "clean.jsonl")
    out = capsys.readouterr().out
    assert "112 read, 108 kept, 4 dropped (exact 1, near_text 1, image 2)" in out
    assert "100 image(s) not found, compared by path only" in out  # the LLaVA records' COCO pictures


def test_bad_settings_and_a_missing_library_are_one_line_each(data, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "clean.jsonl")
    assert main(["data", "dedup", *data["paths"], "--out", out, "--near", "1.5"]) == 2
    assert main(["data", "dedup", *data["paths"], "--out", out, "--image-distance", "40"]) == 2
    monkeypatch.setattr(dedup, "MinHash", None)
    assert main(["data", "dedup", *data["paths"], "--out", out]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3
    assert "--near" in errors[0] and "--image-distance" in errors[1]
    assert "pip install 'llava_lite[curate]'" in errors[2]
    assert not Path(out).exists()


# ----- cost -------------------------------------------------------------------------------------------------------


def synthetic(count: int, folder: Path) -> tuple[list[Conversation], int]:
    """`count` distinct text-only records, a tenth of them copied with a word changed, and a quarter as many records
    with pictures of their own. Returns the conversations and how many near copies were planted."""
    rng = random.Random(count)
    records = [conversation(rng, 12, 100) for _ in range(count)]
    near = [copy.deepcopy(records[n]) for n in range(0, count, 10)]
    for record in near:
        answer = record.messages[1].content.split()
        answer[50] = "changed"
        record.messages[1] = Message("assistant", " ".join(answer))
    records += near
    records += [conversation(rng, 12, 100, [picture(rng, folder / f"{n}.png")]) for n in range(count // 4)]
    return records, len(near)


def conversation(rng: random.Random, question: int | str, answer: int | str, images: list[str] = ()) -> Conversation:
    """A question and its answer: the text given, or that many random words."""
    question, answer = (" ".join(rng.choices(VOCABULARY, k=n)) if isinstance(n, int) else n for n in (question, answer))
    prefix = "<image>\n" * len(images)
    return Conversation([Message("user", prefix + question), Message("assistant", answer)], list(images))


def picture(rng: random.Random, path: Path) -> str:
    Image.frombytes("L", (32, 32), rng.randbytes(32 * 32)).save(path)
    return str(path)


VOCABULARY = [f"w{n}" for n in range(3000)]


def test_the_work_grows_linearly_with_the_records(tmp_path):
    work = {}
    for count in (200, 800):
        folder = tmp_path / str(count)
        folder.mkdir()
        records, near = synthetic(count, folder)
        _, report, deduplicator = dedup.deduplicate(records)
        assert report.dropped == {"near_text": near}  # the planted copies, and only they
        work[count] = deduplicator.comparisons
        assert work[count] >= near
    # Linear: about 4 times the work for 4 times the records; all pairs would be 16 times.
    assert work[800] / work[200] < 6


def test_one_question_of_many_pictures_and_many_questions_of_one_picture_are_not_compared_pairwise(tmp_path):
    rng = random.Random(0)
    shared = picture(rng, tmp_path / "shared.png")
    same_question = [
        conversation(rng, "Is there a cat?", "Yes.", [picture(rng, tmp_path / f"{n}.png")]) for n in range(300)
    ]
    same_picture = [conversation(rng, 12, 20, [shared]) for _ in range(300)]
    _, report, deduplicator = dedup.deduplicate(same_question + same_picture)
    assert report.kept == 600
    assert deduplicator.comparisons < 300  # all pairs within each group would be 2 x 44850
