"""LlavaLiteModel: a vision tower and a projector feeding any transformers causal LM.

Each image placeholder in the text has already been expanded to `tokens_per_image` copies of the
`<image>` token id (a real row of the embedding, never a negative sentinel). Here the embeddings of
those positions are replaced by the projected image features in one `masked_scatter`: images in the
batch are taken in order, and their patches fill the image positions in row-major token order.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llava_lite.data.images import ImagePreprocessor
from llava_lite.data.processor import ConversationProcessor, Overflow
from llava_lite.data.templates import ChatTemplate, get_template, template_special_tokens
from llava_lite.model.config import (
    LanguageModelConfig,
    ModelConfig,
    load_model_config,
    save_model_config,
)
from llava_lite.model.language_model import add_special_tokens, build_language_model, fit_embeddings, load_tokenizer
from llava_lite.model.projector import Projector
from llava_lite.model.vision import VisionTower, build_vision_tower

logger = logging.getLogger(__name__)

PROJECTOR_FILE = "projector.safetensors"
TOWER_DIR = "vision_tower"
LM_DIR = "language_model"


class LlavaLiteModel(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        vision_tower: VisionTower,
        projector: Projector,
        language_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        self._template: ChatTemplate | None = None

    # ----- building and loading -------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ModelConfig) -> LlavaLiteModel:
        """A new model: tower and LM as the config names them, a freshly initialised projector."""
        tokenizer, new_ids = prepare_tokenizer(config)
        language_model = build_language_model(config.language_model)
        fit_embeddings(language_model, tokenizer, new_ids)
        vision_tower = build_vision_tower(config.vision_tower)
        projector = Projector(
            config.projector.type, vision_tower.hidden_size, language_model.get_input_embeddings().embedding_dim
        )
        return cls(config, vision_tower, projector, language_model, tokenizer)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> LlavaLiteModel:
        """Load a folder written by `save_pretrained`; it needs nothing from outside the folder."""
        folder = Path(folder)
        config = load_model_config(folder)
        lm_config = config.language_model
        lm_folder = lm_config.name
        tokenizer = AutoTokenizer.from_pretrained(lm_folder, trust_remote_code=lm_config.trust_remote_code)
        dtype = "auto" if lm_config.dtype == "auto" else getattr(torch, lm_config.dtype)
        language_model = AutoModelForCausalLM.from_pretrained(
            lm_folder, dtype=dtype, trust_remote_code=lm_config.trust_remote_code
        )
        vision_tower = build_vision_tower(config.vision_tower)
        vision_tower.load_weights(folder / TOWER_DIR)
        projector = Projector(
            config.projector.type, vision_tower.hidden_size, language_model.get_input_embeddings().embedding_dim
        )
        projector.load_state_dict(load_file(str(folder / PROJECTOR_FILE)))
        return cls(config, vision_tower, projector, language_model, tokenizer)

    def save_pretrained(self, folder: str | Path) -> None:
        """Config, projector, tower and LM (with its tokenizer) as safetensors and JSON; no pickle anywhere."""
        folder = Path(folder)
        (folder / TOWER_DIR).mkdir(parents=True, exist_ok=True)
        tower_config = self.vision_tower.save(folder / TOWER_DIR)
        save_file(_plain_state(self.projector), str(folder / PROJECTOR_FILE))
        self.language_model.save_pretrained(folder / LM_DIR)
        self.tokenizer.save_pretrained(folder / LM_DIR)
        _keep_legacy_flag(self.tokenizer, folder / LM_DIR)
        saved_lm = LanguageModelConfig(
            name=LM_DIR,
            dtype=self.config.language_model.dtype,
            attn_implementation=self.config.language_model.attn_implementation,
            trust_remote_code=self.config.language_model.trust_remote_code,
        )
        saved = ModelConfig(
            vision_tower=tower_config,
            language_model=saved_lm,
            projector=self.config.projector,
            chat_template=self.config.chat_template,
            image_token=self.config.image_token,
        )
        save_model_config(saved, folder)

    # ----- data side -------------------------------------------------------------------------
    @property
    def tokens_per_image(self) -> int:
        return self.vision_tower.num_patches

    @property
    def template(self) -> ChatTemplate:
        if self._template is None:
            self._template = get_template(self.config.chat_template, self.tokenizer)
        return self._template

    def conversation_processor(
        self, max_length: int | None = None, overflow: Overflow = "truncate"
    ) -> ConversationProcessor:
        return ConversationProcessor(
            self.tokenizer, self.template, self.tokens_per_image, self.config.image_token, max_length, overflow
        )

    def image_preprocessor(self) -> ImagePreprocessor:
        tower = self.vision_tower
        return ImagePreprocessor.for_mean(tower.preprocess, tower.config.image_aspect == "pad", tower.image_mean)

    # ----- forward ---------------------------------------------------------------------------
    def train(self, mode: bool = True) -> LlavaLiteModel:
        super().train(mode)
        self.vision_tower.train(mode)  # a frozen tower refuses to leave eval mode
        return self

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[images, 3, H, W]` to `[images, tokens_per_image, lm_hidden]` in the LM's embedding dtype."""
        features = self.vision_tower(pixel_values)
        projected = self.projector(features.to(self.projector.linear_1.weight.dtype))
        return projected.to(self.language_model.get_input_embeddings().weight.dtype)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.language_model.get_input_embeddings()(input_ids)
        image_positions = input_ids == self.image_token_id
        slots = int(image_positions.sum())
        images = 0 if pixel_values is None else pixel_values.shape[0]
        if slots != images * self.tokens_per_image:
            raise ValueError(
                f"the batch has {slots} image tokens but {images} image(s) x {self.tokens_per_image} tokens each; "
                "every <image> placeholder needs exactly one image"
            )
        if images == 0:
            return embeds  # text-only batch: the tower is not run at all
        features = self.encode_images(pixel_values)
        return embeds.masked_scatter(image_positions.unsqueeze(-1), features.reshape(-1, features.shape[-1]))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **kwargs,
    ):
        inputs_embeds = self.embed(input_ids, pixel_values)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            **kwargs,
        )


def prepare_tokenizer(config: ModelConfig) -> tuple[PreTrainedTokenizerBase, list[int]]:
    """The LM's tokenizer with `<image>` and the chat template's markers added; also the ids it added."""
    tokenizer = load_tokenizer(config.language_model)
    needed = [config.image_token, *template_special_tokens(config.chat_template, tokenizer)]
    return tokenizer, add_special_tokens(tokenizer, needed)


def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def _keep_legacy_flag(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """transformers 5 drops Llama tokenizers' `legacy` flag on save, and the reloaded copy then tokenizes
    text after special tokens differently; write it back so a saved run tokenizes as it trained."""
    legacy = getattr(tokenizer, "legacy", None)
    path = folder / "tokenizer_config.json"
    if legacy is None or not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("legacy") != legacy:
        config["legacy"] = legacy
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
