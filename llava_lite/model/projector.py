"""The trainable bridge from vision features to the language model's embedding space.

Submodules are named `linear_1`, `act`, `linear_2`, ... as in transformers' `LlavaMultiModalProjector`,
so exporting a `mlp2x_gelu` projector to that format is a rename of the prefix alone. Two options change how
many tokens an image takes: a pixel shuffle before the MLP (`pixel_shuffle` k: each k x k block of neighbouring
patches becomes one token, k * k times wider), and, for the AnyRes layout, the learned `image_newline` that ends
each row of tile features (LLaVA-NeXT's; it lives here so it trains and saves with the projector).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

_MLP = re.compile(r"mlp(\d+)x_gelu")


def projector_depth(projector_type: str) -> int:
    """How many linear layers a projector type has: `linear` is 1, `mlp{N}x_gelu` is N."""
    if projector_type == "linear":
        return 1
    match = _MLP.fullmatch(projector_type)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"unknown projector type {projector_type!r}; use linear or mlp{{N}}x_gelu, e.g. mlp2x_gelu")
    return int(match.group(1))


def pixel_shuffle(features: torch.Tensor, k: int) -> torch.Tensor:
    """Space to depth on square patch grids: `[views, g * g, D]` -> `[views, (g / k) ** 2, k * k * D]`. The token
    of block (i, j) holds patches (i * k + a, j * k + b) for a, b in 0..k-1, in that order; no value is lost."""
    views, tokens, width = features.shape
    grid = math.isqrt(tokens)
    if grid * grid != tokens or grid % k:
        raise ValueError(f"pixel shuffle {k} needs a square patch grid divisible by {k}, got {tokens} tokens")
    blocks = features.reshape(views, grid // k, k, grid // k, k, width).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(views, (grid // k) ** 2, k * k * width)


class Projector(nn.Module):
    def __init__(
        self,
        projector_type: str,
        vision_hidden_size: int,
        text_hidden_size: int,
        pixel_shuffle: int = 1,
        image_newline: bool = False,
    ) -> None:
        super().__init__()
        depth = projector_depth(projector_type)
        self.depth = depth
        self.pixel_shuffle = pixel_shuffle
        self.linear_1 = nn.Linear(vision_hidden_size * pixel_shuffle * pixel_shuffle, text_hidden_size)
        if depth > 1:
            self.act = nn.GELU()
        for index in range(2, depth + 1):
            setattr(self, f"linear_{index}", nn.Linear(text_hidden_size, text_hidden_size))
        if image_newline:  # initialised as LLaVA-NeXT and transformers do
            self.image_newline = nn.Parameter(torch.randn(text_hidden_size) / math.sqrt(text_hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`[..., D]` features to `[..., text_hidden]`; with a pixel shuffle, `[views, patches, D]` per view."""
        if self.pixel_shuffle > 1:
            features = pixel_shuffle(features, self.pixel_shuffle)
        hidden = self.linear_1(features)
        for index in range(2, self.depth + 1):
            hidden = getattr(self, f"linear_{index}")(self.act(hidden))
        return hidden


def projector_for(config, vision_hidden_size: int, text_hidden_size: int) -> Projector:
    """The projector a `ModelConfig` describes (its newline when the tower's layout is AnyRes)."""
    return Projector(
        config.projector.type,
        vision_hidden_size,
        text_hidden_size,
        pixel_shuffle=config.projector.pixel_shuffle,
        image_newline=config.vision_tower.image_layout == "anyres",
    )
