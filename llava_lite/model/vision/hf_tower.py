"""transformers image towers: CLIP and SigLIP vision models, from a local folder, a hub name or a config dict."""

from __future__ import annotations

import dataclasses
import json

import torch
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from llava_lite.data.geometry import ImageGeometry
from llava_lite.model.config import VisionTowerConfig
from llava_lite.model.vision.base import VisionTower, hidden_state_index
from llava_lite.model.weights_files import require_safetensors_folder

# Image-processor settings the CLIP and SigLIP processors share with transformers' LlavaImageProcessor.
PROCESSOR_SETTINGS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)


def processor_settings(processor) -> dict:
    """Those of `PROCESSOR_SETTINGS` an image processor has, as plain JSON values."""
    settings = json.loads(processor.to_json_string())
    return {key: settings[key] for key in PROCESSOR_SETTINGS if key in settings}


# type -> (model class, its vision config class, image processor class)
_FAMILIES = {
    "hf_clip": (CLIPVisionModel, CLIPVisionConfig, CLIPImageProcessor),
    "hf_siglip": (SiglipVisionModel, SiglipVisionConfig, SiglipImageProcessor),
}


class HFVisionTower(VisionTower):
    def __init__(self, config: VisionTowerConfig) -> None:
        super().__init__(config)
        model_cls, config_cls, _ = _FAMILIES[config.type]
        self.geometry = self.geometry_of(config)
        self.processor = self.geometry.transform.processor
        if config.model_config is not None:
            self.model = model_cls(config_cls(**config.model_config))
        else:
            require_safetensors_folder(config.name, "vision tower")  # a local folder's weights: never a pickle
            self.model = model_cls.from_pretrained(config.name)
        vision_config = self.model.config
        self._index = hidden_state_index(config.feature_layer, vision_config.num_hidden_layers)
        self._skip_cls = _has_cls(config) and config.cls_token == "drop"
        self.hidden_size = vision_config.hidden_size
        self.freeze_if_configured()

    @classmethod
    def geometry_of(cls, config: VisionTowerConfig) -> ImageGeometry:
        """From the vision config and the image processor's settings (a named tower's JSON files, not its weights)."""
        _, config_cls, processor_cls = _FAMILIES[config.type]
        if config.cls_token == "keep" and not _has_cls(config):
            raise ValueError("SigLIP has no CLS token: cls_token must be 'drop'")
        if config.model_config is not None:
            vision = config_cls(**config.model_config)
            processor = processor_cls(**(config.preprocess or _default_processor(config.type, vision.image_size)))
        else:
            vision = config_cls.from_pretrained(config.name)
            processor = (
                processor_cls(**config.preprocess) if config.preprocess else processor_cls.from_pretrained(config.name)
            )
        grid = vision.image_size // vision.patch_size
        kept_cls = 1 if _has_cls(config) and config.cls_token == "keep" else 0
        return ImageGeometry(
            tokens_per_image=grid * grid + kept_cls,
            image_size=(vision.image_size, vision.image_size),
            image_mean=tuple(processor.image_mean),
            transform=_Transform(processor),
            pad_to_square=config.image_aspect == "pad",
            patch_grid=(grid, grid),
            resample=int(processor.resample),
        )

    def extract_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        features = out.hidden_states[self._index]
        return features[:, 1:] if self._skip_cls else features

    def architecture_config(self) -> VisionTowerConfig:
        processor = json.loads(self.processor.to_json_string())
        model_config = self.model.config.to_diff_dict()
        for key in ("image_processor_type", "processor_class", "transformers_version", "model_type"):
            processor.pop(key, None)
            model_config.pop(key, None)
        return dataclasses.replace(
            self.config, name=None, pretrained=None, model_config=model_config, preprocess=processor
        )


class _Transform:
    """The image processor as a PIL-to-tensor transform."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def _has_cls(config: VisionTowerConfig) -> bool:
    return config.type == "hf_clip"


def _default_processor(tower_type: str, size: int) -> dict:
    """Processor settings for a tower built from a config dict: its resolution, the family's normalisation."""
    if tower_type == "hf_clip":
        return {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    return {"size": {"height": size, "width": size}}
