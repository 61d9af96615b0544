"""open_clip image towers: any open_clip model name, a local checkpoint, or an architecture dict."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from llava_lite.imports import without_module

with without_module("wandb"):  # timm, which open_clip imports, would import wandb for a logger we never call
    import open_clip
from open_clip.factory import merge_preprocess_dict
from open_clip.model import CLIPVisionCfg
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.utils import to_2tuple
from PIL import Image

from llava_lite.data.geometry import ImageGeometry
from llava_lite.model.config import VisionTowerConfig
from llava_lite.model.vision.base import VisionTower, hidden_state_index
from llava_lite.model.weights_files import require_safetensors_file, require_safetensors_folder


class OpenClipVisionTower(VisionTower):
    def __init__(self, config: VisionTowerConfig) -> None:
        super().__init__(config)
        model_cfg = _model_cfg(config)
        self.visual = _create_visual(config)
        self._model_cfg = model_cfg
        self.geometry = self.geometry_of(config, self.visual)
        num_blocks = len(self.visual.transformer.resblocks)
        index = hidden_state_index(config.feature_layer, num_blocks)
        if index == 0:
            raise ValueError("open_clip towers give block outputs only: feature_layer 0 (embeddings) is not offered")
        self._block_index = index - 1
        self.hidden_size = self.visual.transformer.width
        self.freeze_if_configured()

    @classmethod
    def geometry_of(cls, config: VisionTowerConfig, visual: torch.nn.Module | None = None) -> ImageGeometry:
        """From the architecture config; a model open_clip has no config for is built on the meta device (no
        weights) to read its input size."""
        model_cfg = _model_cfg(config)
        if model_cfg is not None:
            vision = CLIPVisionCfg(**model_cfg["vision_cfg"])
            if vision.timm_model_name or not isinstance(vision.layers, int):
                raise ValueError(
                    f"open_clip model {config.name or 'from model_config'} is not a ViT; only ViT towers are supported"
                )
            image_size, patch_size = to_2tuple(vision.image_size), to_2tuple(vision.patch_size)
        else:
            if visual is None:
                with torch.device("meta"):
                    visual = _create_visual(dataclasses.replace(config, pretrained=None))
            image_size, patch_size = tuple(visual.image_size), tuple(visual.patch_size)
        grid = (image_size[0] // patch_size[0], image_size[1] // patch_size[1])
        preprocess = _preprocess_cfg(config, image_size)
        return ImageGeometry(
            tokens_per_image=grid[0] * grid[1] + (1 if config.cls_token == "keep" else 0),
            image_size=tuple(image_size),
            image_mean=tuple(preprocess["mean"]),
            transform=_Transform(preprocess),
            pad_to_square=config.image_aspect == "pad",
            patch_grid=grid,
            # open_clip's eval transform takes "random" as bicubic.
            resample=Image.BILINEAR if preprocess.get("interpolation") == "bilinear" else Image.BICUBIC,
        )

    def extract_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        keep_cls = self.config.cls_token == "keep"
        out = self.visual.forward_intermediates(
            pixel_values,
            indices=[self._block_index],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=keep_cls,
        )
        patches = out["image_intermediates"][0]
        if keep_cls:
            patches = torch.cat([out["image_intermediates_prefix"][0], patches], dim=1)
        return patches

    def architecture_config(self) -> VisionTowerConfig:
        # With the architecture known, the saved tower needs nothing outside the run folder; a model
        # open_clip only knows by a hub name keeps that name (the weights still come from the folder).
        known = self._model_cfg is not None
        return dataclasses.replace(
            self.config,
            name=None if known else self.config.name,
            pretrained=None,
            model_config=self._model_cfg,
            preprocess=dict(self.geometry.transform.settings),
        )


class _Transform:
    """open_clip's eval transform, remembering the settings it was built from (they are saved with a run)."""

    def __init__(self, settings: dict) -> None:
        self.settings = settings
        self._transform = image_transform_v2(PreprocessCfg(**settings), is_train=False)

    def __call__(self, image):
        return self._transform(image)


def _preprocess_cfg(config: VisionTowerConfig, image_size: tuple[int, int]) -> dict:
    """open_clip's defaults, the tower's input size, what a pretrained tag prescribes, then the config's overrides:
    the order in which `open_clip.create_model` merges them."""
    settings = dataclasses.asdict(PreprocessCfg())
    settings["size"] = list(image_size)
    if config.name and config.pretrained:
        settings = merge_preprocess_dict(settings, open_clip.get_pretrained_cfg(config.name, config.pretrained) or {})
    if config.name and config.name.startswith("local-dir:"):
        settings = merge_preprocess_dict(settings, _local_dir_json(config.name).get("preprocess_cfg", {}))
    settings.update(config.preprocess or {})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def _create_visual(config: VisionTowerConfig) -> torch.nn.Module:
    """The visual half of an open_clip model (the text half is let go)."""
    if config.model_config is not None:
        model = open_clip.CLIP(**config.model_config)
    else:
        _require_safe_checkpoint(config)
        model = open_clip.create_model(config.name, pretrained=config.pretrained)
    visual = model.visual
    if not hasattr(visual, "transformer") or not hasattr(visual, "forward_intermediates"):
        raise ValueError(
            f"open_clip model {config.name or 'from model_config'} is not a ViT; only ViT towers are supported"
        )
    return visual


def _require_safe_checkpoint(config: VisionTowerConfig) -> None:
    """open_clip unpickles any checkpoint not named .safetensors: a local `pretrained` file, or the weights of a
    `local-dir:` folder, must be safetensors."""
    if config.pretrained and Path(config.pretrained).is_file():
        require_safetensors_file(config.pretrained, "open_clip tower's pretrained checkpoint")
    if config.name and config.name.startswith("local-dir:"):
        require_safetensors_folder(config.name.removeprefix("local-dir:"), "open_clip tower")


def _model_cfg(config: VisionTowerConfig) -> dict | None:
    if config.model_config is not None:
        return dict(config.model_config)
    return known_model_cfg(config.name)


def known_model_cfg(name: str) -> dict | None:
    """The architecture config open_clip has for `name` (a model name or `local-dir:` folder), or None."""
    if name.startswith("local-dir:"):
        return _local_dir_json(name).get("model_cfg")
    cfg = open_clip.get_model_config(name)
    return dict(cfg) if cfg is not None else None


def _local_dir_json(name: str) -> dict:
    path = Path(name.removeprefix("local-dir:")) / "open_clip_config.json"
    return json.loads(path.read_text(encoding="utf-8"))
