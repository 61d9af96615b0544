"""Running a training command again: a finished run is left as it is, a checkpoint is continued only by the same
run, and `resume=never` starts over without the earlier run's checkpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from conftest import StopAt

from llava_lite.cli import main
from llava_lite.demo import shapes
from llava_lite.train.resume import config_differences


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> dict[str, Path]:
    return shapes.build_dataset(tmp_path_factory.mktemp("shapes"), 16, 2, 4, seed=0)


def recipe(tmp_path: Path, data: dict[str, Path], **train) -> Path:
    """A stage-1 recipe of 3 steps with a checkpoint at the last one; `scheduler: constant`, so a step more
    would change the weights."""
    settings = {
        "max_steps": 3,
        "batch_size": 4,
        "learning_rate": 1e-2,
        "scheduler": "constant",
        "warmup_ratio": 0.0,
        "save_steps": 3,
        "logging_steps": 1,
        "report_to": "none",
        **train,
    }
    raw = {
        "recipe": "stage1",
        "model": "tiny",
        "output_dir": str(tmp_path / "run"),
        "data": {"sources": [{"path": str(data["captions"]), "image_folder": str(data["images"])}]},
        "train": settings,
    }
    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder`, by relative path, with a hash of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_rerunning_a_finished_runs_command_trains_nothing_and_changes_no_file(tmp_path, shapes_data, capsys):
    config = recipe(tmp_path, shapes_data)
    assert main(["train", str(config)]) == 0
    out = tmp_path / "run"
    before = tree(out)
    assert "checkpoint-3/projector.safetensors" in before and "projector.safetensors" in before
    capsys.readouterr()

    assert main(["train", str(config)]) == 0
    stdout = capsys.readouterr().out
    assert f"{out} already holds this run, finished at step 3: nothing to train" in stdout
    assert tree(out) == before  # the final model bit for bit, and no checkpoint-4


def test_a_setting_that_does_not_change_the_weights_is_still_the_same_run(tmp_path, shapes_data, capsys):
    config = recipe(tmp_path, shapes_data)
    assert main(["train", str(config)]) == 0
    before = tree(tmp_path / "run")
    assert main(["train", str(config), "train.logging_steps=2", "train.report_to=none"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert tree(tmp_path / "run") == before


def test_a_finished_run_with_a_changed_config_is_refused_in_one_line_naming_the_change(tmp_path, shapes_data, capsys):
    config = recipe(tmp_path, shapes_data)
    assert main(["train", str(config)]) == 0
    before = tree(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", str(config), "train.learning_rate=0.02"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"llava-lite train: error: {tmp_path / 'run'} was trained with train.learning_rate: 0.01")
    assert "this config has 0.02" in err and "new output_dir or resume=never" in err
    assert tree(tmp_path / "run") == before


def test_a_checkpoint_is_not_continued_by_a_changed_config(tmp_path, shapes_data, capsys):
    from llava_lite.train.config import load_train_config
    from llava_lite.train.run import run_training

    config = recipe(tmp_path, shapes_data, max_steps=4, save_steps=2)
    run_training(load_train_config(config), callbacks=[StopAt(2)])
    out = tmp_path / "run"
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    capsys.readouterr()

    assert main(["train", str(config), "train.batch_size=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"llava-lite train: error: {out / 'checkpoint-2'} was trained with train.batch_size: 4, this config has 2; "
        "to train with the new config, give a new output_dir or resume=never (which starts over there)"
    )
    assert not (out / "checkpoint-4").exists()
    assert main(["train", str(config)]) == 0  # the same run continues and finishes
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


def test_resume_never_starts_over_without_the_earlier_runs_checkpoints(tmp_path, shapes_data):
    config = recipe(tmp_path, shapes_data, save_steps=1)  # checkpoints 2 and 3 kept
    assert main(["train", str(config)]) == 0
    out = tmp_path / "run"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]

    assert main(["train", str(config), "resume=never", "train.max_steps=2", "train.save_steps=2"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert yaml.safe_load((out / "checkpoint-2" / "train_config.yaml").read_text())["train"]["max_steps"] == 2
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


def test_config_differences_name_nested_fields_and_skip_what_does_not_change_the_weights():
    saved = {
        "output_dir": "a",
        "data": {"sources": [{"path": "x.json"}], "check_images_exist": True},
        "train": {"learning_rate": 0.01, "logging_steps": 1, "report_to": ["none"]},
    }
    current = {
        "output_dir": "b",
        "data": {"sources": [{"path": "y.json"}], "check_images_exist": False},
        "train": {"learning_rate": 0.01, "logging_steps": 5, "report_to": ["tensorboard"]},
    }
    assert config_differences(saved, current) == [("data.sources[0].path", "x.json", "y.json")]


def test_a_saved_train_config_fed_back_continues_and_then_is_the_same_finished_run(tmp_path, shapes_data, capsys):
    """A LoRA run on every linear layer (`target_modules: all-linear`, a string where a list is also allowed): the
    checkpoint's train_config.yaml, given as the config, resumes that run; the final one is the finished run."""
    from llava_lite.train.config import load_train_config
    from llava_lite.train.run import run_training

    raw = {
        "recipe": "stage2",
        "model": "tiny",
        "output_dir": str(tmp_path / "run"),
        "data": {"sources": [{"path": str(shapes_data["text"])}]},
        "finetune": {"method": "lora", "lora": {"r": 2, "alpha": 4, "target_modules": "all-linear"}},
        "train": {"max_steps": 2, "batch_size": 2, "save_steps": 1, "report_to": "none", "logging_steps": 1},
    }
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_training(load_train_config(config), callbacks=[StopAt(1)])
    out = tmp_path / "run"
    saved = out / "checkpoint-1" / "train_config.yaml"
    assert yaml.safe_load(saved.read_text())["finetune"]["lora"]["target_modules"] == "all-linear"
    capsys.readouterr()

    assert main(["train", str(saved)]) == 0  # the same run: continued from checkpoint-1 to its end
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    before = tree(out)
    capsys.readouterr()
    assert main(["train", str(out / "train_config.yaml")]) == 0
    assert "already holds this run, finished at step 2: nothing to train" in capsys.readouterr().out
    assert tree(out) == before
