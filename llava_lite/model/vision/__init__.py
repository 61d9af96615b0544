"""Vision towers: one interface, one builder per backend, chosen by `VisionTowerConfig.type`."""

from __future__ import annotations

from llava_lite.data.geometry import ImageGeometry
from llava_lite.model.config import VisionTowerConfig
from llava_lite.model.vision.base import VisionTower
from llava_lite.model.vision.hf_tower import HFVisionTower
from llava_lite.model.vision.open_clip_tower import OpenClipVisionTower

VISION_TOWERS: dict[str, type[VisionTower]] = {
    "open_clip": OpenClipVisionTower,
    "hf_clip": HFVisionTower,
    "hf_siglip": HFVisionTower,
}


def build_vision_tower(config: VisionTowerConfig) -> VisionTower:
    return VISION_TOWERS[config.type](config)


def vision_geometry(config: VisionTowerConfig) -> ImageGeometry:
    """The tower's input transform and image token counts, from its config alone: no weights are built."""
    return VISION_TOWERS[config.type].geometry_of(config)


__all__ = ["VISION_TOWERS", "VisionTower", "build_vision_tower", "vision_geometry"]
