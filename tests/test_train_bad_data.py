"""`llava-lite train` on bad data: when no record is left to train on, one line naming the data and the skips by
reason, exit 2 - whether the records were found bad while reading or while encoding; and an error that stops a
run under way starts on a line of its own, not after the progress bar."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from llava_lite.cli import main
from llava_lite.demo import shapes


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> dict[str, Path]:
    return shapes.build_dataset(tmp_path_factory.mktemp("shapes"), 12, 2, 4, seed=0)


def recipe(tmp_path: Path, data_file: Path, images: Path, on_bad_record: str = "skip", **train) -> Path:
    raw = {
        "recipe": "stage1",
        "model": "tiny",
        "output_dir": str(tmp_path / "run"),
        "data": {
            "sources": [{"path": str(data_file), "image_folder": str(images)}],
            "on_bad_record": on_bad_record,
        },
        "train": {"max_steps": 2, "batch_size": 2, "report_to": "none", **train},
    }
    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.split("\n") if line.startswith("llava-lite train:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "num_samples" not in stderr
    return lines[0]


def test_every_record_bad_while_reading_is_one_line_with_the_skips(tmp_path, shapes_data, capsys):
    records = json.loads(shapes_data["captions"].read_text())
    for record in records:
        record["image"] = "gone.png"
    data = tmp_path / "captions.json"
    data.write_text(json.dumps(records))
    assert main(["train", str(recipe(tmp_path, data, shapes_data["images"]))]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (
        f"llava-lite train: error: data: no record left to train on in {data}: all 12 were skipped "
        "(on_bad_record: skip): missing_image 12"
    )


def test_every_record_bad_while_encoding_is_one_line_with_the_skips(tmp_path, shapes_data, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "corrupt.png").write_bytes(b"not an image")
    records = json.loads(shapes_data["captions"].read_text())
    for number, record in enumerate(records):
        if number % 3 == 0:  # two placeholders for one image
            record["conversations"][0]["value"] += " <image>"
        else:
            record["image"] = "corrupt.png"  # it exists: found bad only when it is decoded
    records[1]["image"] = "gone.png"  # and one found bad while reading
    data = tmp_path / "questions.json"
    data.write_text(json.dumps(records))
    for record in records[::3]:
        shutil.copyfile(shapes_data["images"] / record["image"], images / record["image"])

    assert main(["train", str(recipe(tmp_path, data, images))]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (
        f"llava-lite train: error: data: no record left to train on in {data}: all 12 were skipped "
        "(on_bad_record: skip): corrupt_image 7, image_count_mismatch 4, missing_image 1"
    )
    assert not (tmp_path / "run" / "trainer_state.json").exists()


def test_an_error_during_training_starts_on_its_own_line_after_the_progress_bar(tmp_path, shapes_data, capsys):
    images = shutil.copytree(shapes_data["images"], tmp_path / "images")
    (images / "corrupt.png").write_bytes(b"not an image")
    records = json.loads(shapes_data["captions"].read_text())
    records[-1]["image"] = "corrupt.png"  # found while training, some steps in
    data = tmp_path / "captions.json"
    data.write_text(json.dumps(records))
    config = recipe(tmp_path, data, images, on_bad_record="error", max_steps=-1, epochs=1, batch_size=1)

    assert main(["train", str(config)]) == 2
    stderr = capsys.readouterr().err
    assert "%|" in stderr  # the progress bar was drawn
    line = one_error_line(stderr)
    assert stderr.rstrip("\n").split("\n")[-1] == line  # the last line is the error, alone
    assert line.startswith(f"llava-lite train: error: {data}") and "corrupt.png cannot be read" in line
