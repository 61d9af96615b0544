"""What the data side must know of a vision tower, without its weights: how an image becomes pixels, and how
many image tokens it takes in the text.

A tower class answers this from its config alone (`VisionTower.geometry_of`), so the processor can be built and
records encoded before - or without - any model being built. Today every image takes the tower's patch count;
layouts that tile an image or compress its tokens answer `tokens_for` per image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from llava_lite.data.images import ImagePreprocessor

# An image as the processor meets it: a path (records) or an already loaded picture (chat, serve).
ImageInput = str | Path | Image.Image


@dataclass(frozen=True)
class ImageGeometry:
    tokens_per_image: int  # tokens of one view: the patch grid, plus a kept CLS token
    image_size: tuple[int, int]  # the tower's input (height, width)
    image_mean: tuple[float, float, float]
    transform: Callable[[Image.Image], torch.Tensor]  # the tower's own resize, crop and normalisation
    pad_to_square: bool = False  # LLaVA-1.5's `pad`: pad with the mean colour before the transform

    def tokens_for(self, image: ImageInput | None = None) -> int:
        """How many image tokens `image` takes in the text; known without decoding its pixels. None: an image
        not yet read (a layout whose count depends on the image size needs the image)."""
        return self.tokens_per_image

    @property
    def preprocessor(self) -> ImagePreprocessor:
        return ImagePreprocessor.for_mean(self.transform, self.pad_to_square, self.image_mean)
