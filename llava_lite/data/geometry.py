"""What the data side must know of a vision tower, without its weights: how an image becomes pixels, and how
many image tokens it takes in the text.

A tower class answers this from its config alone (`VisionTower.geometry_of`), so the processor can be built and
records encoded before - or without - any model being built. A single view takes the same count for every image;
the AnyRes layout (`llava_lite.data.anyres`) counts each image's tokens from its size, read from the file's header.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from llava_lite.data.anyres import AnyRes
from llava_lite.data.images import ImagePreprocessor, image_size_of

# An image as the processor meets it: a path (records) or an already loaded picture (chat, serve).
ImageInput = str | Path | Image.Image


@dataclass(frozen=True)
class ImageGeometry:
    tokens_per_image: int  # tokens of one view: the patch grid, plus a kept CLS token
    image_size: tuple[int, int]  # the tower's input (height, width)
    image_mean: tuple[float, float, float]
    transform: Callable[[Image.Image], torch.Tensor]  # the tower's own resize, crop and normalisation
    pad_to_square: bool = False  # LLaVA-1.5's `pad`: pad with the mean colour before the transform
    patch_grid: tuple[int, int] | None = None  # a view's patch grid (height, width), a kept CLS token aside
    resample: int = Image.BICUBIC  # how the tower's transform resizes (AnyRes resizes into tiles the same way)
    anyres: AnyRes | None = None  # LLaVA-NeXT tiling; None: one view per image

    def tokens_for(self, image: ImageInput | None = None) -> int:
        """How many image tokens `image` takes in the text; known without decoding its pixels (AnyRes reads the
        size from the file's header). None: an image not yet read, which only a single view can count."""
        if self.anyres is None:
            return self.tokens_per_image
        if image is None:
            raise ValueError("under the anyres layout an image's token count needs its size")
        return self.anyres.tokens(image_size_of(image))

    @property
    def preprocessor(self) -> ImagePreprocessor:
        return ImagePreprocessor.for_mean(self.transform, self.pad_to_square, self.image_mean, self.anyres)
