"""Typed configs: unknown keys and wrong types are named; overrides reach nested fields."""

from __future__ import annotations

import pytest

from llava_lite.config_io import ConfigError, apply_overrides, from_dict, load_yaml
from llava_lite.data.config import DataConfig
from llava_lite.model.config import ModelConfig
from llava_lite.model.presets import preset, resolve_model_config


def test_nested_dataclasses_build_from_a_dict():
    config = from_dict(DataConfig, {"sources": [{"path": "a.json"}], "max_length": 512})
    assert config.sources[0].path == "a.json" and config.max_length == 512


def test_unknown_key_is_named_with_its_path():
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]: unknown key\(s\) pth"):
        from_dict(DataConfig, {"sources": [{"pth": "a.json"}]}, "data")


def test_wrong_type_is_named_with_its_path():
    with pytest.raises(ConfigError, match=r"data\.max_length: expected an integer"):
        from_dict(DataConfig, {"max_length": "long"}, "data")


def test_value_outside_a_literal_is_refused():
    with pytest.raises(ConfigError, match=r"on_bad_record: 'ignore' is not one of"):
        from_dict(DataConfig, {"on_bad_record": "ignore"}, "data")


def test_overrides_set_nested_values_with_yaml_types():
    data = apply_overrides({"data": {"max_length": 10}}, ["data.max_length=2048", "model.projector.type=linear"])
    assert data == {"data": {"max_length": 2048}, "model": {"projector": {"type": "linear"}}}


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["data.max_length"])


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(path)


def test_preset_with_overrides_merges_section_by_section():
    config = resolve_model_config({"preset": "tiny", "projector": {"type": "linear"}})
    assert config.projector.type == "linear"
    assert config.language_model.model_config == preset("tiny").language_model.model_config


def test_naming_a_real_language_model_replaces_the_presets_random_one():
    config = resolve_model_config({"preset": "tiny", "language_model": {"name": "/models/qwen"}})
    assert config.language_model.name == "/models/qwen"
    assert config.language_model.model_config is None and config.language_model.tokenizer is None


def test_model_config_without_a_tower_source_is_refused():
    with pytest.raises(ConfigError, match="vision tower needs `name` or `model_config`"):
        from_dict(ModelConfig, {"vision_tower": {}, "language_model": {"name": "x"}}, "model")


def test_warmup_ratio_of_one_or_more_is_refused_not_read_as_steps():
    from llava_lite.train.config import TrainingSettings

    assert from_dict(TrainingSettings, {"warmup_ratio": 0.5}, "train").warmup_ratio == 0.5
    with pytest.raises(ConfigError, match=r"train: warmup_ratio must be in \[0, 1\), got 3"):
        from_dict(TrainingSettings, {"warmup_ratio": 3}, "train")
