"""Every shipped config validates: its fields, its recipe defaults and its model description."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import ROOT

from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset, resolve_model_config
from llava_lite.train.config import load_train_config
from llava_lite.train.recipes import resolved

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs_for_the_demo_llava15_and_a_small_modern_model():
    names = {path.stem for path in CONFIGS}
    assert {"demo_stage1", "demo_stage2", "llava15_7b_stage1", "llava15_7b_stage2"} <= names
    assert any(name.startswith("qwen25") for name in names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_validates(path):
    config = resolved(load_train_config(path))
    assert config.train.learning_rate > 0 and config.data.sources
    if config.init_from is None:
        model = resolve_model_config(config.model)
        assert model.vision_tower.name or model.vision_tower.model_config
    else:  # the model is the earlier stage's run; `model` may only say how its LM loads
        assert config.recipe in ("stage2", "preference")


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


DATA_SIZE = re.compile(r"^# data size: ([\d,]+) records; (\d+) process", re.MULTILINE)


def planned_steps(path) -> int:
    """The steps of a shipped run, from the data size and process count its header comment states: the Trainer's
    batches per epoch (the last one partial) over the accumulation, times the epochs (or max_steps)."""
    found = DATA_SIZE.search(path.read_text(encoding="utf-8"))
    assert found, f"{path.name}: the header should state what it is sized for ('# data size: N records; P processes')"
    records, processes = int(found[1].replace(",", "")), int(found[2])
    train = resolved(load_train_config(path)).train
    if train.max_steps > 0:
        return train.max_steps
    per_epoch = math.ceil(records / (train.batch_size * processes)) // train.gradient_accumulation
    return math.ceil(per_epoch * train.epochs)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_run_checkpoints_and_evaluates_at_least_three_times(path):
    train = resolved(load_train_config(path)).train
    steps = planned_steps(path)
    assert steps // train.save_steps >= 3, f"{path.name}: {steps} steps, a checkpoint every {train.save_steps}"
    assert steps // (train.eval_steps or train.save_steps) >= 3
    assert train.save_total_limit is None or train.save_total_limit >= 1


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.stem.startswith("demo")], ids=lambda p: p.stem)
def test_the_real_model_configs_group_or_pack_and_take_flash_attention_where_installed(path):
    config = resolved(load_train_config(path))
    if config.recipe == "stage2":
        assert config.data.group_by_modality_length or config.data.packing
    lm = config.model.get("language_model", {}) if config.init_from else config.model["language_model"]
    assert lm.get("attn_implementation") == "auto" and lm.get("dtype") == "bfloat16"


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

    from llava_lite.train.trainable_model import build_training_model

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
