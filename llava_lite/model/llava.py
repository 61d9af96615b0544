"""LlavaLiteModel: a vision tower and a projector feeding any transformers causal LM.

Each image placeholder in the text has already been expanded to `tokens_per_image` copies of the
`<image>` token id (a real row of the embedding, never a negative sentinel). Here the embeddings of
those positions are replaced by the projected image features in one `masked_scatter`: images in the
batch are taken in order, and their patches fill the image positions in row-major token order.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llava_lite.data.images import ImagePreprocessor
from llava_lite.data.processor import ConversationProcessor, Overflow
from llava_lite.data.templates import ChatTemplate, get_template, template_special_tokens
from llava_lite.model.config import ModelConfig
from llava_lite.model.language_model import add_special_tokens, build_language_model, fit_embeddings, load_tokenizer
from llava_lite.model.projector import Projector
from llava_lite.model.vision import VisionTower, build_vision_tower

logger = logging.getLogger(__name__)


class LlavaLiteModel(nn.Module):
    # For transformers' Trainer: labels are shifted inside the LM, so it counts targets over labels[..., 1:].
    loss_type = "ForCausalLM"

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
    def from_pretrained(
        cls, folder: str | Path, trainable_adapters: bool = False, quantization: str | None = None
    ) -> LlavaLiteModel:
        """Load a folder written by `save_pretrained` (see `llava_lite.model.saving` for its layout), or a
        transformers Llava folder (see `llava_lite.model.hf_llava`). `quantization` (4bit, 8bit) loads the LM
        quantized, as QLoRA trains it."""
        from llava_lite.model.hf_llava import is_hf_llava_folder, load_hf_llava
        from llava_lite.model.saving import load_model

        if is_hf_llava_folder(folder):
            if quantization not in (None, "none"):
                raise ValueError(f"{folder}: a transformers Llava folder cannot be loaded quantized ({quantization})")
            return load_hf_llava(folder)

        return load_model(folder, trainable_adapters, quantization)

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """What was trained and what exists nowhere else, as safetensors and JSON; no pickle anywhere."""
        from llava_lite.model.saving import save_model

        save_model(self, folder, state_dict)

    def set_chat_template(self, name: str) -> list[int]:
        """Switch template (stage 1 trains with `plain`, stage 2 with a chat template); returns added token ids."""
        new_ids = self.add_template_tokens(name)
        self.config.chat_template = name
        self._template = None
        return new_ids

    def add_template_tokens(self, name: str) -> list[int]:
        """Add the marker tokens template `name` needs (rows start at the mean); returns the ids added."""
        new_ids = add_special_tokens(self.tokenizer, list(template_special_tokens(name, self.tokenizer)))
        if new_ids:
            fit_embeddings(self.base_language_model, self.tokenizer, new_ids)
        return new_ids

    @property
    def uses_adapters(self) -> bool:
        return hasattr(self.language_model, "peft_config")

    @property
    def base_language_model(self) -> PreTrainedModel:
        """The transformers model itself, under any peft wrapping."""
        return self.language_model.get_base_model() if self.uses_adapters else self.language_model

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
        self, max_length: int | None = None, overflow: Overflow = "truncate", template: str | None = None
    ) -> ConversationProcessor:
        """Encodes conversations for this model; `template` renders them otherwise (stage 1 uses `plain`)."""
        chosen = (
            self.template if template in (None, self.config.chat_template) else get_template(template, self.tokenizer)
        )
        return ConversationProcessor(
            self.tokenizer, chosen, self.tokens_per_image, self.config.image_token, max_length, overflow
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
        """`kwargs` reach the LM: `num_items_in_batch` from the Trainer makes the loss a sum over the
        accumulated batches' target tokens divided by their count, not a mean of micro-batch means."""
        inputs_embeds = self.embed(input_ids, pixel_values)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """Token ids of the answers only: the LM's own `generate` (KV cache, sampling, stopping) on our embeddings."""
        inputs_embeds = self.embed(input_ids, pixel_values)
        return self.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Recompute the LM's activations in the backward pass (the Trainer calls this for activation_checkpointing)."""
        self.base_language_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs
        )
        # With a frozen embedding layer the checkpointed blocks would get no input that requires grad.
        self.base_language_model.enable_input_require_grads()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.base_language_model.is_activation_checkpointing


def prepare_tokenizer(config: ModelConfig) -> tuple[PreTrainedTokenizerBase, list[int]]:
    """The LM's tokenizer with `<image>` and the chat template's markers added; also the ids it added."""
    tokenizer = load_tokenizer(config.language_model)
    needed = [config.image_token, *template_special_tokens(config.chat_template, tokenizer)]
    return tokenizer, add_special_tokens(tokenizer, needed)
