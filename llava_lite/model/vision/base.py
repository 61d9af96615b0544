"""The interface every vision tower offers: preprocess an image, turn a batch into patch features."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from llava_lite.data.geometry import ImageGeometry
from llava_lite.model.config import VisionTowerConfig
from llava_lite.model.weights_files import read_safetensors
from llava_lite.run_folder import TOWER_WEIGHTS_FILE


class VisionTower(nn.Module):
    """Images in, patch features `[batch, num_patches, hidden_size]` out; frozen and in eval mode by default.

    Subclasses implement `geometry_of` (the input transform and token count, from the config alone: the one
    place the patch count is computed), set `geometry` and `hidden_size`, and implement `extract_features`
    and `architecture_config` (the config that rebuilds them with no outside reference, used when a run
    folder is saved).
    """

    geometry: ImageGeometry
    hidden_size: int

    def __init__(self, config: VisionTowerConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def frozen(self) -> bool:
        return self.config.frozen

    def freeze_if_configured(self) -> None:
        if self.frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> VisionTower:
        # A frozen tower stays in eval mode (no dropout, fixed norms) whatever the model around it does.
        return super().train(mode and not self.frozen)

    @classmethod
    def geometry_of(cls, config: VisionTowerConfig) -> ImageGeometry:
        """What the data side needs of a tower with this config, without building its weights."""
        raise NotImplementedError

    @property
    def num_patches(self) -> int:
        return self.geometry.tokens_per_image

    @property
    def image_size(self) -> tuple[int, int]:
        return self.geometry.image_size

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return self.geometry.image_mean

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One RGB image to a `[3, H, W]` tensor, with the tower's own resize, crop and normalisation."""
        return self.geometry.transform(image)

    def extract_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def architecture_config(self) -> VisionTowerConfig:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(dtype=self.dtype)
        if self.frozen:
            with torch.no_grad():
                return self.extract_features(pixel_values)
        return self.extract_features(pixel_values)

    def save(self, folder: str | Path) -> VisionTowerConfig:
        """Write the weights into `folder`; return the config that rebuilds this tower from them."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(Path(folder) / TOWER_WEIGHTS_FILE))
        return self.architecture_config()

    def load_weights(self, folder: str | Path) -> None:
        state = read_safetensors(Path(folder) / TOWER_WEIGHTS_FILE)
        self.load_state_dict(state, strict=True)


def hidden_state_index(feature_layer: int, num_layers: int) -> int:
    """`feature_layer` (0 = embeddings, -1 = last layer) as a non-negative hidden-state index."""
    index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 0 <= index <= num_layers:
        raise ValueError(f"feature_layer {feature_layer} is out of range for a tower with {num_layers} layers")
    return index
