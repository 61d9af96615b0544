"""The trainable bridge from vision features to the language model's embedding space.

Submodules are named `linear_1`, `act`, `linear_2`, ... as in transformers' `LlavaMultiModalProjector`,
so exporting a `mlp2x_gelu` projector to that format is a rename of the prefix alone.
"""

from __future__ import annotations

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


class Projector(nn.Module):
    def __init__(self, projector_type: str, vision_hidden_size: int, text_hidden_size: int) -> None:
        super().__init__()
        depth = projector_depth(projector_type)
        self.depth = depth
        self.linear_1 = nn.Linear(vision_hidden_size, text_hidden_size)
        if depth > 1:
            self.act = nn.GELU()
        for index in range(2, depth + 1):
            setattr(self, f"linear_{index}", nn.Linear(text_hidden_size, text_hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(features)
        for index in range(2, self.depth + 1):
            hidden = getattr(self, f"linear_{index}")(self.act(hidden))
        return hidden
