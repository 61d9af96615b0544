"""Every shipped config validates: its fields, its recipe defaults and its model description."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT

from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset, resolve_model_config
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
        assert config.recipe == "stage2" and config.init_from


def test_stage2_configs_start_from_their_stage1_run():
    for path in CONFIGS:
        config = load_train_config(path)
        if config.recipe == "stage2" and config.init_from:
            stage1 = path.with_name(path.name.replace("stage2_lora", "stage1").replace("stage2", "stage1"))
            assert load_train_config(stage1).output_dir == config.init_from, path.name


def test_a_string_stays_a_string_where_the_type_allows_one():
    from llava_lite.config_io import from_dict
    from llava_lite.train.config import LoraSettings

    assert from_dict(LoraSettings, {"target_modules": "all-linear"}).target_modules == "all-linear"
    assert from_dict(LoraSettings, {"target_modules": ["q_proj", "v_proj"]}).target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_round_trips_through_a_saved_train_config(path, tmp_path):
    """What a run saves as train_config.yaml loads back as the same config, with no difference that matters."""
    import yaml

    from llava_lite.config_io import to_dict
    from llava_lite.train.resume import config_differences

    config = resolved(load_train_config(path))
    saved = tmp_path / "train_config.yaml"
    saved.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    again = resolved(load_train_config(saved))
    assert again == config
    assert config_differences(to_dict(config), to_dict(again)) == []


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if load_train_config(p).finetune.method in ("lora", "peft")], ids=lambda p: p.stem
)
def test_shipped_adapter_config_builds_a_peft_model_on_a_tiny_stand_in(path):
    """The config's own finetune values (r, alpha, target_modules ...) applied to the tiny preset instead of its
    7B model: peft finds the modules it names."""
    import dataclasses

    from llava_lite.train.recipe import build_training_model

    config = resolved(load_train_config(path))
    stand_in = dataclasses.replace(config, init_from=None, model="tiny")
    model = build_training_model(stand_in)
    assert model.uses_adapters
    lora = model.language_model.peft_config["default"]
    assert lora.r == config.finetune.lora.r and lora.lora_alpha == config.finetune.lora.alpha
    adapted = {name for name, module in model.base_language_model.named_modules() if hasattr(module, "lora_A")}
    if config.finetune.lora.target_modules == "all-linear":  # every linear layer but the output head
        plain = LlavaLiteModel.from_config(preset("tiny")).language_model
        linear = {n for n, m in plain.named_modules() if type(m) is torch.nn.Linear and not n.endswith("lm_head")}
        assert linear and linear == adapted
    else:
        assert adapted
