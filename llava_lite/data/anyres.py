"""LLaVA-NeXT's AnyRes layout: an image as a downscaled whole view plus tiles of the tower's resolution, and the
views' features as one sequence - tiles in place, padding removed, a learned newline after each row.

The grid is the pinpoint that best fits the image (transformers' `select_best_resolution`: the most of the
image's own resolution kept, then the least canvas wasted); the image is resized into it keeping its aspect,
centred on black, and cut into tiles row by row. The token count follows from the image size alone, so it is
known from an image file's header, before any pixel is decoded. Every rule here is transformers' own
(`select_best_resolution`, `get_patch_output_size`, `get_anyres_image_grid_shape`, `unpad_image`), called, not
copied, so counts, pixels and features agree with `LlavaNextProcessor` and `LlavaNextForConditionalGeneration`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

# LLaVA-NeXT's pinpoints, [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], in tiles of 336.
DEFAULT_PINPOINT_TILES = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def default_pinpoints(tile: int) -> list[list[int]]:
    """LLaVA-NeXT's pinpoints for a tower of input side `tile` (its own list when `tile` is 336)."""
    return [[rows * tile, cols * tile] for rows, cols in DEFAULT_PINPOINT_TILES]


@dataclass(frozen=True)
class AnyRes:
    pinpoints: tuple[tuple[int, int], ...]  # (height, width), each a whole number of tiles
    tile: int  # the tower's input side, in pixels
    grid: int  # a view's feature grid side (patches per side, after any merging)
    resample: int = Image.BICUBIC

    def __post_init__(self) -> None:
        for height, width in self.pinpoints:
            if height < self.tile or width < self.tile or height % self.tile or width % self.tile:
                raise ValueError(
                    f"grid pinpoint {height}x{width} is not a whole number of the tower's {self.tile}-pixel tiles"
                )

    def best_resolution(self, size: tuple[int, int]) -> tuple[int, int]:
        """The pinpoint an image of `size` (height, width) is fitted into."""
        return tuple(select_best_resolution(tuple(size), [list(p) for p in self.pinpoints]))

    def tile_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """Tile rows and columns for an image of `size` (height, width)."""
        return tuple(get_anyres_image_grid_shape(list(size), [list(p) for p in self.pinpoints], self.tile))

    def unpadded_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """The tiles' feature grid (height, width) once the rows or columns that only saw padding are removed."""
        rows, cols = self.tile_grid(size)
        shape = unpad_image(torch.empty(0, rows * self.grid, cols * self.grid), list(size)).shape
        return shape[1], shape[2]

    def tokens(self, size: tuple[int, int]) -> int:
        """Image tokens for an image of `size` (height, width): the whole view, the unpadded tiles, one newline
        per row of tile features."""
        height, width = self.unpadded_grid(size)
        return self.grid * self.grid + height * width + height

    def views(self, image: Image.Image) -> list[Image.Image]:
        """The whole image squashed to one tile, then the tiles of the image fitted into its pinpoint, row by row."""
        size = (image.height, image.width)
        best_height, best_width = self.best_resolution(size)
        new_height, new_width = get_patch_output_size(np.empty((0, *size)), (best_height, best_width), _FIRST)
        canvas = Image.new("RGB", (best_width, best_height), (0, 0, 0))
        canvas.paste(
            image.resize((new_width, new_height), self.resample),
            ((best_width - new_width) // 2, (best_height - new_height) // 2),
        )
        tiles = [
            canvas.crop((left, top, left + self.tile, top + self.tile))
            for top in range(0, best_height, self.tile)
            for left in range(0, best_width, self.tile)
        ]
        return [image.resize((self.tile, self.tile), self.resample), *tiles]

    def pack(self, features: torch.Tensor, size: tuple[int, int], newline: torch.Tensor) -> torch.Tensor:
        """One image's view features `[views, grid * grid, D]` as its token sequence `[tokens, D]`: the whole
        view's features, then the tiles' features as one picture, unpadded, row by row, each row ended by
        `newline` (`[D]`)."""
        rows, cols = self.tile_grid(size)
        if features.shape[0] != rows * cols + 1:
            raise ValueError(f"an image of {size[0]}x{size[1]} has {rows * cols + 1} views, got {features.shape[0]}")
        base, tiles = features[0], features[1:]
        grid, width = self.grid, features.shape[-1]
        # [rows, cols, grid, grid, D] -> [D, rows * grid, cols * grid]: the tiles' features as one picture.
        picture = tiles.view(rows, cols, grid, grid, width).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        picture = unpad_image(picture, list(size))
        ends = newline.to(picture)[:, None, None].expand(-1, picture.shape[1], 1)
        picture = torch.cat([picture, ends], dim=2)
        return torch.cat([base, picture.flatten(1, 2).transpose(0, 1)])


_FIRST = ChannelDimension.FIRST
