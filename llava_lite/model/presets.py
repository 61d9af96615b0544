"""Named model configs. `tiny` builds in a second on a CPU from configs alone (random weights, shipped tokenizer)."""

from __future__ import annotations

import copy

from llava_lite.config_io import from_dict
from llava_lite.model.config import ModelConfig

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
    """A preset as a ModelConfig; keyword arguments replace whole top-level sections or fields."""
    data = preset_dict(name)
    data.update(overrides)
    return from_dict(ModelConfig, data, f"preset {name}")
