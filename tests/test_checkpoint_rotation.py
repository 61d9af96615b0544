"""Checkpoint rotation that a kill cannot leave half done: a removed checkpoint is renamed away before it is
deleted, and the next start finishes what an interrupted rotation left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import llava_lite.train.checkpoints as checkpoints
from llava_lite.cli import main
from llava_lite.demo import shapes
from llava_lite.train.checkpoints import finish_rotation


def _folders(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.is_dir())


def test_the_next_start_deletes_what_a_rotation_renamed_away_and_rotates_the_rest(tmp_path):
    for step in (1, 2, 3, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "projector.safetensors").write_bytes(b"x")
    (tmp_path / ".rotated-checkpoint-0").mkdir()  # half deleted when the run was killed
    (tmp_path / ".rotated-checkpoint-0" / "optimizer.pt").write_bytes(b"x")
    finish_rotation(tmp_path, limit=2)
    assert _folders(tmp_path) == ["checkpoint-3", "checkpoint-4"]
    finish_rotation(tmp_path, limit=None)  # no limit: nothing more to remove
    assert _folders(tmp_path) == ["checkpoint-3", "checkpoint-4"]


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> dict[str, Path]:
    return shapes.build_dataset(tmp_path_factory.mktemp("shapes"), 8, 1, 2, seed=0)


def test_a_run_killed_during_rotation_keeps_no_half_deleted_checkpoint(tmp_path, shapes_data, monkeypatch):
    raw = {
        "recipe": "stage1",
        "model": "tiny",
        "output_dir": str(tmp_path / "run"),
        "data": {"sources": [{"path": str(shapes_data["captions"]), "image_folder": str(shapes_data["images"])}]},
        "train": {"max_steps": 3, "batch_size": 4, "save_steps": 1, "save_total_limit": 1, "report_to": "none"},
    }
    config = tmp_path / "stage1.yaml"
    config.write_text(yaml.safe_dump(raw))

    def killed(folder: Path) -> None:
        (folder / "optimizer.pt").unlink()  # some of it deleted, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "_delete", killed)
    assert main(["train", str(config)]) == 130
    run = tmp_path / "run"
    assert _folders(run) == [".rotated-checkpoint-1", "checkpoint-2"]  # the old one renamed away, never half there

    monkeypatch.undo()
    assert main(["train", str(config)]) == 0  # resumes from checkpoint-2 and finishes
    assert [name for name in _folders(run) if "checkpoint" in name] == ["checkpoint-3"]
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 3
