"""Named model configs. `tiny` builds in a second on a CPU from configs alone (random weights, shipped tokenizer)."""

from __future__ import annotations

import copy
from pathlib import Path

from llava_lite.config_io import ConfigError, from_dict
from llava_lite.model.config import ModelConfig, load_model_config
from llava_lite.run_folder import MODEL_CONFIG_FILE

TINY_OPEN_CLIP_TOWER = {
    "type": "open_clip",
    "model_config": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    },
}

TINY_HF_CLIP_TOWER = {
    "type": "hf_clip",
    "model_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
}

TINY_LANGUAGE_MODEL = {
    "tokenizer": "tiny",
    "model_config": {
        "model_type": "llama",
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    },
}

PRESETS: dict[str, dict] = {
    "tiny": {"vision_tower": TINY_OPEN_CLIP_TOWER, "language_model": TINY_LANGUAGE_MODEL},
    "tiny-hf-clip": {"vision_tower": TINY_HF_CLIP_TOWER, "language_model": TINY_LANGUAGE_MODEL},
}


def preset_dict(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def preset(name: str, **overrides) -> ModelConfig:
    """A preset as a ModelConfig; keyword arguments are merged into it section by section."""
    return from_dict(ModelConfig, deep_merge(preset_dict(name), overrides), f"preset {name}")


def resolve_model_config(spec: str | dict, where: str = "model", trust_remote_code: bool = False) -> ModelConfig:
    """A model given as a preset name, a saved model folder, or a dict (optionally `preset:` plus overrides).
    `trust_remote_code` is the command's: a saved folder cannot ask for remote code itself (a dict can)."""
    if isinstance(spec, str):
        if (Path(spec) / MODEL_CONFIG_FILE).is_file():
            return load_model_config(spec, trust_remote_code)
        if spec in PRESETS:
            return preset(spec)
        raise ConfigError(f"{where}: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a saved model folder")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a preset name, a folder or a mapping")
    spec = dict(spec)
    base_name = spec.pop("preset", None)
    if not base_name:
        return from_dict(ModelConfig, spec, where)
    base = preset_dict(base_name)
    for section in ("vision_tower", "language_model"):
        # Naming a real model replaces the preset's random architecture (and its tokenizer) outright.
        if isinstance(spec.get(section), dict) and spec[section].get("name"):
            base[section] = {}
    return from_dict(ModelConfig, deep_merge(base, spec), where)


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
