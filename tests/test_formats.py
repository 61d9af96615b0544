"""Reading real data files, and every kind of bad input: an error naming file and record, or a counted skip."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import fixture_path, processor_for, solid_image

from llava_lite.data.config import DataConfig, DataSource
from llava_lite.data.dataset import build_dataset
from llava_lite.data.errors import BadRecordError
from llava_lite.data.formats import read_source
from llava_lite.data.masking import IGNORE_INDEX


@pytest.fixture
def llava_instruct_folder(tmp_path: Path) -> Path:
    """The real LLaVA-Instruct records with every COCO image they name mapped to a real fixture image."""
    records = json.loads(fixture_path("data", "llava_instruct_100.json").read_text())
    folder = tmp_path / "coco"
    folder.mkdir()
    source = fixture_path("images", "extreme_ironing.jpg")
    for record in records:
        shutil.copyfile(source, folder / record["image"])
    return folder


def write_records(path: Path, records: list, jsonl: bool = False) -> Path:
    text = "\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records)
    path.write_text(text)
    return path


def good_record(image: str | None = "red.png", **changes) -> dict:
    record = {
        "id": "r1",
        "conversations": [
            {"from": "human", "value": ("<image>\n" if image else "") + "What colour is it?"},
            {"from": "gpt", "value": "Red."},
        ],
    }
    if image:
        record["image"] = image
    record.update(changes)
    return record


def test_llava_instruct_fixture_loads_every_record_and_turn(tiny_model, llava_instruct_folder):
    path = fixture_path("data", "llava_instruct_100.json")
    raw = json.loads(path.read_text())
    conversations, skipped = read_source(DataSource(str(path), image_folder=str(llava_instruct_folder)))
    assert not skipped
    assert len(conversations) == len(raw) == 100
    for record, conversation in zip(raw, conversations):
        assert conversation.id == record["id"]
        assert [m.content for m in conversation.messages] == [t["value"] for t in record["conversations"]]
        assert [m.role for m in conversation.messages] == [
            "user" if t["from"] == "human" else "assistant" for t in record["conversations"]
        ]
        assert conversation.images == [str((llava_instruct_folder / record["image"]).resolve())]


def test_llava_instruct_fixture_samples_have_the_right_image_token_counts(tiny_model, llava_instruct_folder):
    config = DataConfig(
        sources=[DataSource(str(fixture_path("data", "llava_instruct_100.json")), str(llava_instruct_folder))],
        max_length=4096,
    )
    dataset = build_dataset(config, processor_for(tiny_model, max_length=4096))
    for index in range(0, len(dataset), 7):
        sample = dataset[index]
        assert (sample["input_ids"] == tiny_model.image_token_id).sum() == tiny_model.vision_tower.num_patches
        assert [tuple(p.shape) for p in sample["pixel_values"]] == [(3, *tiny_model.vision_tower.image_size)]
        assert (sample["labels"] != IGNORE_INDEX).sum() > 0
    assert not dataset.skips.counts()


def test_mllm_demo_fixture_loads_with_several_images_per_record(tiny_model):
    path = fixture_path("data", "mllm_demo", "mllm_demo.json")
    raw = json.loads(path.read_text())
    config = DataConfig(sources=[DataSource(str(path))])
    dataset = build_dataset(config, processor_for(tiny_model))
    assert len(dataset) == len(raw) == 6
    for record, conversation, index in zip(raw, dataset.conversations, range(len(raw))):
        assert len(conversation.messages) == len(record["messages"])
        assert [Path(p).name for p in conversation.images] == [Path(p).name for p in record["images"]]
        sample = dataset[index]
        images = len(record["images"])
        assert len(sample["pixel_values"]) == images
        assert (sample["input_ids"] == tiny_model.image_token_id).sum() == images * tiny_model.vision_tower.num_patches


def test_jsonl_messages_with_openai_content_parts(tmp_path):
    solid_image(tmp_path / "red.png", (255, 0, 0))
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Look: "}, {"type": "image", "image": "red.png"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        ]
    }
    path = write_records(tmp_path / "data.jsonl", [record, good_record(image=None)], jsonl=True)
    conversations, _ = read_source(DataSource(str(path)))
    assert conversations[0].messages[1].content == "Look: <image>"
    assert conversations[0].images == [str((tmp_path / "red.png").resolve())]
    assert conversations[1].images == []


def test_parquet_with_a_column_mapping(tmp_path):
    import datasets

    solid_image(tmp_path / "red.png", (255, 0, 0))
    rows = {
        "uid": ["a", "b"],
        "dialog": [
            [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Red."}],
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
        ],
        "pictures": [["red.png"], []],
    }
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "data.parquet"))
    source = DataSource(
        str(tmp_path / "data.parquet"), columns={"messages": "dialog", "images": "pictures", "id": "uid"}
    )
    conversations, skipped = read_source(source)
    assert not skipped
    assert [c.id for c in conversations] == ["a", "b"]
    assert len(conversations[0].images) == 1 and conversations[1].images == []


def test_saved_dataset_folder_loads(tmp_path):
    import datasets

    datasets.Dataset.from_list([good_record(image=None)]).save_to_disk(str(tmp_path / "saved"))
    conversations, _ = read_source(DataSource(str(tmp_path / "saved")))
    assert conversations[0].messages[1].content == "Red."


def test_extra_role_names_map_through_the_source(tmp_path):
    record = {"conversations": [{"from": "asker", "value": "Q?"}, {"from": "answerer", "value": "A."}]}
    path = write_records(tmp_path / "d.json", [record])
    source = DataSource(str(path), roles={"asker": "user", "answerer": "assistant"})
    assert read_source(source)[0][0].messages[1].role == "assistant"


# ----- bad input: each kind is an error naming file and record, or a counted skip -------------------

BAD_RECORDS = {
    "malformed": {"id": "x", "conversations": "not a list"},
    "unknown_role": {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    "empty_answer": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]},
    "out_of_order": {"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "yo"}]},
    "missing_image": good_record(image="nowhere.png"),
    "image_outside_folder": good_record(image="../outside.png"),
}
EXPECTED_REASON = {
    "malformed": "malformed",
    "unknown_role": "malformed",
    "empty_answer": "malformed",
    "out_of_order": "malformed",
    "missing_image": "missing_image",
    "image_outside_folder": "image_outside_folder",
}


@pytest.fixture
def data_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    solid_image(folder / "red.png", (255, 0, 0))
    solid_image(tmp_path / "outside.png", (0, 0, 255))
    return folder


@pytest.mark.parametrize("kind", list(BAD_RECORDS))
def test_bad_record_raises_naming_file_and_record(data_folder, kind):
    path = write_records(data_folder / "d.json", [good_record(), BAD_RECORDS[kind]])
    with pytest.raises(BadRecordError, match=r"d\.json record 1") as caught:
        read_source(DataSource(str(path)))
    assert caught.value.reason == EXPECTED_REASON[kind]


@pytest.mark.parametrize("kind", list(BAD_RECORDS))
def test_bad_record_is_skipped_and_counted_under_skip(data_folder, kind):
    path = write_records(data_folder / "d.json", [good_record(), BAD_RECORDS[kind], good_record()])
    conversations, skipped = read_source(DataSource(str(path)), on_bad_record="skip")
    assert len(conversations) == 2
    assert skipped == {EXPECTED_REASON[kind]: 1}


def test_broken_jsonl_line_names_its_line(data_folder):
    path = data_folder / "d.jsonl"
    path.write_text(json.dumps(good_record()) + "\n{not json\n" + json.dumps(good_record()) + "\n")
    with pytest.raises(BadRecordError, match=r"d\.jsonl line 2: not valid JSON"):
        read_source(DataSource(str(path)))
    conversations, skipped = read_source(DataSource(str(path)), on_bad_record="skip")
    assert len(conversations) == 2 and skipped == {"malformed": 1}


def test_broken_json_file_names_the_file(data_folder):
    path = data_folder / "d.json"
    path.write_text('[{"id": 1,')
    with pytest.raises(BadRecordError, match=r"d\.json: not valid JSON"):
        read_source(DataSource(str(path)))


def test_symlink_leaving_the_image_folder_is_refused(data_folder, tmp_path):
    os.symlink(tmp_path / "outside.png", data_folder / "link.png")
    path = write_records(data_folder / "d.json", [good_record(image="link.png")])
    with pytest.raises(BadRecordError, match="leaves the image folder"):
        read_source(DataSource(str(path)))


def test_corrupt_image_is_an_error_naming_the_record(tiny_model, data_folder):
    (data_folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    path = write_records(data_folder / "d.json", [good_record(image="bad.png", id="broken")])
    dataset = build_dataset(
        DataConfig(sources=[DataSource(str(path))]),
        processor_for(tiny_model),
    )
    with pytest.raises(BadRecordError, match=r"record 0 \(id broken\): image .*bad\.png cannot be read"):
        dataset[0]


def test_corrupt_image_is_skipped_for_the_next_good_record_and_counted(tiny_model, data_folder):
    (data_folder / "bad.png").write_bytes(b"garbage")
    path = write_records(data_folder / "d.json", [good_record(image="bad.png"), good_record(id="good")])
    config = DataConfig(sources=[DataSource(str(path))], on_bad_record="skip")
    dataset = build_dataset(config, processor_for(tiny_model))
    sample = dataset[0]
    assert dataset.skips.counts() == {"corrupt_image": 1}
    assert not dataset.skipped_at_load  # a skip while training is counted where it happens, so only once
    assert len(sample["pixel_values"]) == 1


def test_placeholder_image_mismatch_is_skipped_and_counted(tiny_model, data_folder):
    mismatch = good_record()
    mismatch["conversations"][0]["value"] = "No placeholder here."
    path = write_records(data_folder / "d.json", [mismatch, good_record()])
    config = DataConfig(sources=[DataSource(str(path))], on_bad_record="skip")
    dataset = build_dataset(config, processor_for(tiny_model))
    dataset[0]
    assert dataset.skips.counts() == {"image_count_mismatch": 1}


def test_a_missing_local_data_path_is_refused_without_asking_the_hub(tmp_path, monkeypatch):
    import datasets

    from llava_lite.data.formats import iter_rows

    def no_hub(*args, **kwargs):
        raise AssertionError("a local-looking path was handed to datasets.load_dataset")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    for path in (str(tmp_path / "gone.parquet"), "./gone_folder", "data/gone.csv"):
        with pytest.raises(ValueError, match=f"^{re.escape(path)}: no such data file or folder$"):
            next(iter_rows(DataSource(path)))
