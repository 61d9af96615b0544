"""The model's config: vision tower, projector and language model, saved as versioned JSON beside the weights."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llava_lite.config_io import ConfigError, from_dict, to_dict
from llava_lite.run_folder import MODEL_CONFIG_FILE

# Bump when the saved layout changes; add a step to _MIGRATIONS so older run folders keep loading.
FORMAT_VERSION = 1


@dataclass
class VisionTowerConfig:
    """Which frozen image encoder to use and which of its features to hand to the projector."""

    # open_clip: an open_clip model name (e.g. "ViT-L-14-336"), "local-dir:PATH", or none with `model_config`.
    # hf_clip / hf_siglip: a local folder or hub name of a transformers (CLIP|SigLIP)(Vision)Model.
    type: Literal["open_clip", "hf_clip", "hf_siglip"] = "open_clip"
    name: str | None = None
    # open_clip only: a pretrained tag or a local checkpoint file.
    pretrained: str | None = None
    # Build from this architecture dict instead (random weights): open_clip's model config, or a
    # transformers vision config. This is how tiny models and saved run folders are described.
    model_config: dict[str, Any] | None = None
    # open_clip only: preprocessing overrides (size, mean, std, interpolation, resize_mode).
    preprocess: dict[str, Any] | None = None
    # Index into the hidden states as transformers counts them: 0 = embeddings, -1 = last layer,
    # -2 = penultimate (LLaVA's choice, the last layer being shaped by the contrastive loss).
    feature_layer: int = -2
    cls_token: Literal["drop", "keep"] = "drop"
    frozen: bool = True
    # LLaVA-1.5 pads images to a square with the tower's mean colour instead of centre-cropping.
    image_aspect: Literal["pad", "crop"] = "crop"
    # single: one view per image. anyres: LLaVA-NeXT's tiles on the best-fitting of `grid_pinpoints` plus the whole
    # image, padding removed, a learned newline after each row; an image's token count follows from its size.
    image_layout: Literal["single", "anyres"] = "single"
    # anyres: [[height, width], ...] in pixels, each a whole number of the tower's tiles; default LLaVA-NeXT's list
    # in tiles ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] for a 336-pixel tower).
    grid_pinpoints: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if self.name is None and self.model_config is None:
            raise ValueError("vision tower needs `name` or `model_config`")
        if self.grid_pinpoints is not None and self.image_layout != "anyres":
            raise ValueError("grid_pinpoints apply to image_layout: anyres only")
        if self.image_layout == "anyres" and self.image_aspect == "pad":
            raise ValueError(
                "image_layout anyres squashes the whole view as LLaVA-NeXT does; image_aspect pad does not apply"
            )


@dataclass
class ProjectorConfig:
    # linear | mlp2x_gelu | mlp{N}x_gelu
    type: str = "mlp2x_gelu"
    # k > 1: each k x k block of neighbouring patches becomes one token of k * k times the width before the MLP
    # (pixel shuffle, as nanoVLM and Idefics3): k * k times fewer image tokens, every feature value kept.
    pixel_shuffle: int = 1

    def __post_init__(self) -> None:
        if self.pixel_shuffle < 1:
            raise ValueError(f"projector.pixel_shuffle must be 1 (off) or more, got {self.pixel_shuffle}")


@dataclass
class LanguageModelConfig:
    # A local folder or hub name of any transformers causal LM; or none with `model_config`.
    name: str | None = None
    # Build from this config dict instead (random weights); needs `model_type`, e.g. "llama".
    model_config: dict[str, Any] | None = None
    # A tokenizer folder or hub name, or "tiny" for the one shipped in the package; default: `name`.
    tokenizer: str | None = None
    # The dtype the weights are loaded and stored in; in training, what trains is kept in float32 all the same
    # (train.master_weights), so bfloat16 only halves the frozen parts.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    # transformers' attention (sdpa, eager, flash_attention_2, ...); auto: flash_attention_2 on a CUDA GPU where
    # flash-attn is installed, else transformers' default.
    attn_implementation: str | None = None
    # Load the weights quantized (QLoRA: 4bit NF4 with double quantization); needs bitsandbytes (CUDA or its CPU
    # backend).
    quantization: Literal["none", "4bit", "8bit"] = "none"
    # Let transformers run code that the LM's or tokenizer's folder brings (`auto_map`). A recipe may set it for a
    # model it names; a saved run folder that sets it is refused unless the command is given --trust-remote-code.
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.name is None and self.model_config is None:
            raise ValueError("language model needs `name` or `model_config`")
        if self.tokenizer is None and self.name is None:
            raise ValueError("language model built from `model_config` needs `tokenizer`")


@dataclass
class ModelConfig:
    vision_tower: VisionTowerConfig
    language_model: LanguageModelConfig
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    # "auto": the tokenizer's own chat template when it has one, else chatml. Or "tokenizer",
    # or a built-in name: plain, chatml, llama2, vicuna_v1, alpaca, xml, json.
    chat_template: str = "auto"
    image_token: str = "<image>"
    # A saved run trained with adapters: the peft adapter folder applied on top of the language model.
    adapter: str | None = None


def model_config_from_dict(data: dict, where: str = "model") -> ModelConfig:
    return from_dict(ModelConfig, data, where)


def save_model_config(config: ModelConfig, folder: str | Path) -> None:
    payload = {"format_version": FORMAT_VERSION, "model": to_dict(config)}
    path = Path(folder) / MODEL_CONFIG_FILE
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def load_model_config(folder: str | Path, trust_remote_code: bool = False) -> ModelConfig:
    """The config saved in a run folder. `trust_remote_code` is the decision of the person running the command; a
    folder whose config asks for remote code by itself is refused (ConfigError) without it."""
    path = Path(folder) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{folder}: not a llava_lite model folder (no {MODEL_CONFIG_FILE})")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    version = payload.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ConfigError(
            f"{path}: format_version {version!r} is newer than this llava_lite understands ({FORMAT_VERSION}); "
            "upgrade llava_lite"
        )
    while version < FORMAT_VERSION:
        payload = _MIGRATIONS[version](payload)
        version = payload["format_version"]
    config = model_config_from_dict(payload["model"], where=str(path))
    if config.language_model.trust_remote_code and not trust_remote_code:
        raise ConfigError(
            f"{folder}: its {MODEL_CONFIG_FILE} sets language_model.trust_remote_code, which would run code that came "
            "with the folder; a folder cannot allow that itself - give --trust-remote-code if you trust it"
        )
    # A saved run names parts by folders inside the run; make them independent of the working directory.
    config.language_model.name = _inside(folder, config.language_model.name)
    config.language_model.tokenizer = _inside(folder, config.language_model.tokenizer)
    config.adapter = _inside(folder, config.adapter)
    return config


def _inside(folder: str | Path, name: str | None) -> str | None:
    if name and not Path(name).is_absolute() and (Path(folder) / name).is_dir():
        return str(Path(folder) / name)
    return name


def _from_version_0(payload: dict) -> dict:
    # Version 0 is the bare layout: the model sections at the top level with no envelope, as a person
    # writes it by hand (the same shape as a recipe's `model:` section).
    model = {k: v for k, v in payload.items() if k != "format_version"}
    return {"format_version": 1, "model": model}


_MIGRATIONS = {0: _from_version_0}
