"""Every shipped config validates: its fields, its recipe defaults and its model description."""

from __future__ import annotations

import pytest
from conftest import ROOT

from llava_lite.model.presets import resolve_model_config
from llava_lite.train.config import load_train_config, resolved

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs_for_the_demo_llava15_and_a_small_modern_model():
    names = {path.stem for path in CONFIGS}
    assert {"demo_stage1", "demo_stage2", "llava15_7b_stage1", "llava15_7b_stage2"} <= names
    assert any(name.startswith("qwen25") for name in names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_validates(path):
    config = resolved(load_train_config(path))
    assert config.train.learning_rate > 0 and config.data.sources
    if config.model is not None:
        model = resolve_model_config(config.model)
        assert model.vision_tower.name or model.vision_tower.model_config
    else:
        assert config.recipe in ("stage2", "preference") and config.init_from


def test_stage3_configs_start_from_their_stage2_run():
    stage3 = [path for path in CONFIGS if load_train_config(path).recipe == "preference"]
    assert stage3
    for path in stage3:
        stage2 = path.with_name(path.name.split("_stage3")[0] + "_stage2.yaml")
        assert load_train_config(stage2).output_dir == load_train_config(path).init_from, path.name


def test_stage2_configs_start_from_their_stage1_run():
    for path in CONFIGS:
        config = load_train_config(path)
        if config.recipe == "stage2" and config.init_from:
            stage1 = path.with_name(path.name.replace("stage2_lora", "stage1").replace("stage2", "stage1"))
            assert load_train_config(stage1).output_dir == config.init_from, path.name
