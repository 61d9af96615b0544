"""The parts a model is composed of, as the loaders hand them over; `LlavaLiteModel` composes itself from them."""

from __future__ import annotations

from typing import NamedTuple

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llava_lite.model.config import ModelConfig
from llava_lite.model.projector import Projector
from llava_lite.model.vision.base import VisionTower


class ModelParts(NamedTuple):
    config: ModelConfig
    vision_tower: VisionTower
    projector: Projector
    language_model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
