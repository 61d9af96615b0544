"""How many tokens an image takes under a model config: the tower's view, then the layout (one view, or AnyRes
tiles) and the projector's pixel shuffle - from the config alone, with no weights built.

The tower answers for one view (`vision_geometry`); this adds what the rest of the model config decides, and
refuses combinations that cannot work, with the reason.
"""

from __future__ import annotations

import dataclasses

from llava_lite.data.anyres import AnyRes, default_pinpoints
from llava_lite.data.geometry import ImageGeometry
from llava_lite.model.config import ModelConfig, VisionTowerConfig
from llava_lite.model.vision import vision_geometry


def image_geometry(config: ModelConfig) -> ImageGeometry:
    """The geometry the processor and the model share: per-view tokens after merging, and the layout."""
    return with_layout(vision_geometry(config.vision_tower), config.vision_tower, config.projector.pixel_shuffle)


def with_layout(geometry: ImageGeometry, tower: VisionTowerConfig, pixel_shuffle: int = 1) -> ImageGeometry:
    grid_height, grid_width = geometry.patch_grid
    kept_cls = geometry.tokens_per_image - grid_height * grid_width
    if pixel_shuffle > 1:
        if kept_cls:
            raise ValueError("projector.pixel_shuffle merges patches of a grid; it needs vision_tower.cls_token: drop")
        if grid_height % pixel_shuffle or grid_width % pixel_shuffle:
            raise ValueError(
                f"projector.pixel_shuffle {pixel_shuffle} does not divide the tower's {grid_height}x{grid_width} "
                "patch grid"
            )
        grid_height, grid_width = grid_height // pixel_shuffle, grid_width // pixel_shuffle
        geometry = dataclasses.replace(geometry, tokens_per_image=grid_height * grid_width)
    if tower.image_layout == "single":
        return geometry
    if kept_cls:
        raise ValueError("image_layout anyres arranges the patches of tiles; it needs vision_tower.cls_token: drop")
    tile_height, tile_width = geometry.image_size
    if tile_height != tile_width or grid_height != grid_width:
        raise ValueError(f"image_layout anyres needs a square tower input, not {tile_height}x{tile_width}")
    pinpoints = tower.grid_pinpoints or default_pinpoints(tile_height)
    if not all(isinstance(p, list | tuple) and len(p) == 2 for p in pinpoints):
        raise ValueError(f"grid_pinpoints must be [[height, width], ...], got {pinpoints}")
    anyres = AnyRes(tuple(tuple(int(v) for v in p) for p in pinpoints), tile_height, grid_height, geometry.resample)
    return dataclasses.replace(geometry, anyres=anyres)
