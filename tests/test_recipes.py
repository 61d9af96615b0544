"""A recipe is one module: registering a new one is all it takes for `run_training` to resolve and run it."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import yaml

from llava_lite.config_io import ConfigError, from_dict
from llava_lite.demo import shapes
from llava_lite.train.config import TrainConfig
from llava_lite.train.recipes import RECIPES, recipe_named, resolved
from llava_lite.train.run import prepare_run, run_training

# A recipe that adds nothing of its own: stage 2's data and trainer, the LM frozen, its own learning rate. Written
# as a user would write one: a module, then a line in the registry.
DO_NOTHING_RECIPE = '''
"""Stage 2's data and trainer with the LM frozen, at a learning rate of its own."""
from llava_lite.train.config import with_learning_rates
from llava_lite.train.recipes import stage2

SUMMARY = "a recipe of the tests"
DEFAULT_METHOD = "none"
SECTION = None
DATA = "conversations"
CALLS = []


def resolve(config):
    return with_learning_rates(config, 3e-3, projector_lr=None)


def build_trainer(config, callbacks, trust_remote_code):
    CALLS.append(config.output_dir)
    return stage2.build_trainer(config, callbacks, trust_remote_code)
'''


@pytest.fixture
def do_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "do_nothing_recipe.py").write_text(DO_NOTHING_RECIPE)
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module("do_nothing_recipe")
    monkeypatch.setitem(RECIPES, "do_nothing", module)
    yield module
    sys.modules.pop("do_nothing_recipe", None)


def _config(tmp_path: Path, recipe: str, **sections) -> TrainConfig:
    return from_dict(TrainConfig, _raw(tmp_path, recipe, **sections))


def _raw(tmp_path: Path, recipe: str, **sections) -> dict:
    data = shapes.build_dataset(tmp_path / "shapes", 8, 2, 4, seed=0)
    return {
        "recipe": recipe,
        "model": "tiny",
        "output_dir": str(tmp_path / "run"),
        "data": {"sources": [{"path": str(data["questions"]), "image_folder": str(data["images"])}], "max_length": 96},
        "train": {"max_steps": 2, "batch_size": 4, "report_to": "none", "save_steps": 100, "warmup_ratio": 0.0},
        **sections,
    }


def test_a_registered_module_is_a_recipe_that_trains_saves_and_is_left_alone_when_finished(tmp_path, do_nothing):
    config = _config(tmp_path, "do_nothing")
    assert resolved(config).train.learning_rate == 3e-3 and resolved(config).finetune.method == "none"
    output = run_training(config)
    assert [str(output)] == do_nothing.CALLS
    saved = yaml.safe_load((output / "train_config.yaml").read_text())
    assert saved["recipe"] == "do_nothing" and saved["train"]["learning_rate"] == 3e-3
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 2
    again = prepare_run(config)  # resolved once, the folder read once: finished, nothing to train
    assert again.finished_at == 2 and again.checkpoint is None
    assert run_training(again) == output and [str(output)] == do_nothing.CALLS


def test_every_shipped_recipe_says_what_it_is():
    for name, recipe in RECIPES.items():
        assert recipe.SUMMARY and recipe.DATA in ("conversations", "pairs", "prompts"), name
        assert recipe.DEFAULT_METHOD in ("none", "full"), name
        assert recipe_named(name) is recipe


def test_an_unknown_recipe_is_refused_naming_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="^recipe: unknown recipe 'stage4'; choose one of stage1, stage2, preference"):
        resolved(_config(tmp_path, "stage4"))


def test_a_recipe_section_is_refused_under_another_recipe(tmp_path):
    with pytest.raises(ConfigError, match="^the preference section is for recipe preference, not stage2$"):
        resolved(_config(tmp_path, "stage2", preference={"loss": "ipo"}))


def test_resolving_twice_changes_nothing(tmp_path):
    for recipe in ("stage1", "stage2"):
        config = resolved(_config(tmp_path, recipe))
        assert resolved(config) == config


def test_inspect_data_says_in_one_line_that_it_does_not_show_an_rl_recipes_prompts(tmp_path, capsys):
    from llava_lite.cli import main

    recipe = tmp_path / "rl.yaml"
    recipe.write_text(yaml.safe_dump({**_raw(tmp_path, "rl"), "rl": {"rewards": [{"kind": "format", "pattern": "."}]}}))
    assert main(["inspect-data", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "recipe rl trains on prompts, which inspect-data does not show" in err
