"""open_clip image towers: any open_clip model name, a local checkpoint, or an architecture dict."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from llava_lite.model.config import VisionTowerConfig
from llava_lite.model.vision.base import VisionTower, hidden_state_index


class OpenClipVisionTower(VisionTower):
    def __init__(self, config: VisionTowerConfig) -> None:
        super().__init__(config)
        visual, model_cfg, preprocess_cfg = _create_visual(config)
        self.visual = visual
        self._model_cfg = model_cfg
        self._preprocess_cfg = preprocess_cfg
        self._transform = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
        self.image_size = tuple(visual.image_size)
        self.image_mean = tuple(preprocess_cfg["mean"])
        num_blocks = len(visual.transformer.resblocks)
        index = hidden_state_index(config.feature_layer, num_blocks)
        if index == 0:
            raise ValueError("open_clip towers give block outputs only: feature_layer 0 (embeddings) is not offered")
        self._block_index = index - 1
        grid = visual.grid_size
        self.num_patches = grid[0] * grid[1] + (1 if config.cls_token == "keep" else 0)
        self.hidden_size = visual.transformer.width
        self.freeze_if_configured()

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._transform(image)

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
            preprocess=self._preprocess_cfg,
        )


def _create_visual(config: VisionTowerConfig):
    """The visual half of an open_clip model (the text half is let go), its config and preprocessing."""
    if config.model_config is not None:
        model = open_clip.CLIP(**config.model_config)
        model_cfg = dict(config.model_config)
    else:
        model = open_clip.create_model(config.name, pretrained=config.pretrained)
        model_cfg = known_model_cfg(config.name)
    visual = model.visual
    if not hasattr(visual, "transformer") or not hasattr(visual, "forward_intermediates"):
        raise ValueError(
            f"open_clip model {config.name or 'from model_config'} is not a ViT; only ViT towers are supported"
        )
    preprocess_cfg = dataclasses.asdict(PreprocessCfg())
    preprocess_cfg.update(open_clip.get_model_preprocess_cfg(model))
    preprocess_cfg.update(config.preprocess or {})
    preprocess_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess_cfg.items()}
    return visual, model_cfg, preprocess_cfg


def known_model_cfg(name: str) -> dict | None:
    """The architecture config open_clip has for `name` (a model name or `local-dir:` folder), or None."""
    if name.startswith("local-dir:"):
        path = Path(name.removeprefix("local-dir:")) / "open_clip_config.json"
        return json.loads(path.read_text(encoding="utf-8")).get("model_cfg")
    cfg = open_clip.get_model_config(name)
    return dict(cfg) if cfg is not None else None
