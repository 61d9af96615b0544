"""Conversations and images to model inputs - what transformers' `LlavaProcessor` is to its model.

Built from a tokenizer, a chat template and the vision tower's geometry (`ImageGeometry`), never from a model:
records can be encoded with no weights loaded (`llava_lite.model.processor_for_config` builds the one a model config
implies). Data flows one way: Conversation -> RenderedConversation
(text + spans) -> token ids and labels with one placeholder per image -> each placeholder expanded to that
image's token count -> cut to `max_length` -> with the images' pixels, a sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from llava_lite.data.budget import CUT_MARGIN_TOKENS, characters_per_token, cut_to_characters, text_characters
from llava_lite.data.conversation import IMAGE_PLACEHOLDER, Conversation
from llava_lite.data.errors import BadRecordError
from llava_lite.data.geometry import ImageGeometry, ImageInput
from llava_lite.data.image_tokens import expand_image_tokens, truncate_keeping_images_whole
from llava_lite.data.images import load_image
from llava_lite.data.masking import IGNORE_INDEX, tokenize_rendered
from llava_lite.data.templates import ChatTemplate, RenderedConversation, TemplateError

Overflow = Literal["truncate", "drop"]


@dataclass
class EncodedConversation:
    input_ids: np.ndarray
    labels: np.ndarray
    images: list[ImageInput]  # the images whose tokens survived truncation, in order
    image_tokens: list[int]  # how many tokens each of those images takes, in order

    @property
    def num_trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class Processor:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: ChatTemplate,
        geometry: ImageGeometry,
        image_token: str = IMAGE_PLACEHOLDER,
        max_length: int | None = None,
        overflow: Overflow = "truncate",
    ) -> None:
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token} token; prepare it with add_image_token first")
        self.tokenizer = tokenizer
        self.template = template
        self.geometry = geometry
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.max_length = max_length
        self.overflow = overflow
        self._characters_per_token: int | None = None

    @property
    def characters_per_token(self) -> int:
        """The most characters a token stands for (the tokenizer's longest token), read once."""
        if self._characters_per_token is None:
            self._characters_per_token = characters_per_token(self.tokenizer)
        return self._characters_per_token

    def encode(
        self, conversation: Conversation, add_generation_prompt: bool = False, only_last_answer: bool = False
    ) -> EncodedConversation:
        """Ids and labels; each image's slots sized by the geometry (from its path or picture, not its pixels).
        `only_last_answer` trains the final assistant message alone (a preference pair's completion), masked as
        every answer is: from the end of the generation prompt through the end-of-turn marker."""
        source = conversation.source
        placeholders = conversation.placeholder_count(self.image_token)
        if placeholders != len(conversation.images):
            raise BadRecordError(
                source,
                "image_count_mismatch",
                f"{placeholders} {self.image_token} placeholder(s) but {len(conversation.images)} image(s)",
            )
        conversation = self._within_characters(conversation)
        placeholders = len(conversation.images)
        try:
            rendered = self.template.render(conversation.messages, add_generation_prompt=add_generation_prompt)
        except TemplateError as err:
            raise BadRecordError(source, "malformed", str(err)) from None
        if only_last_answer:
            rendered = RenderedConversation(rendered.text, rendered.assistant_spans[-1:])
        tokens = tokenize_rendered(self.tokenizer, rendered, source)
        image_slots = int((tokens.input_ids == self.image_token_id).sum())
        if image_slots != placeholders:
            raise BadRecordError(
                source,
                "image_count_mismatch",
                f"the rendered text holds {image_slots} image tokens for {placeholders} placeholder(s)",
            )
        images = list(conversation.images)
        try:
            image_tokens = [self.geometry.tokens_for(image) for image in images]
        except BadRecordError as err:  # an image whose header cannot be read, named after this record
            raise BadRecordError(source, err.reason, err.detail) from None
        tokens = expand_image_tokens(tokens, self.image_token_id, image_tokens)
        if self.max_length is not None and len(tokens.input_ids) > self.max_length:
            if self.overflow == "drop":
                raise BadRecordError(
                    source, "too_long", f"{len(tokens.input_ids)} tokens exceed max_length {self.max_length}"
                )
            tokens, kept = truncate_keeping_images_whole(tokens, self.max_length, self.image_token_id, image_tokens)
            images, image_tokens = images[:kept], image_tokens[:kept]
        encoded = EncodedConversation(tokens.input_ids, tokens.labels, images, image_tokens)
        if not add_generation_prompt and encoded.num_trained_tokens == 0:
            raise BadRecordError(source, "no_trained_tokens", "no assistant token left to train (after truncation)")
        return encoded

    def _within_characters(self, conversation: Conversation) -> Conversation:
        """A record with more characters than `max_length` tokens can hold is refused (`overflow: drop`) or cut
        to what truncation could keep, before it is rendered or tokenized whole."""
        if self.max_length is None:
            return conversation
        characters = text_characters(conversation)
        # Most records are told apart by the first test alone, without reading the vocabulary.
        if characters <= self.max_length or characters <= self.max_length * self.characters_per_token:
            return conversation
        per_token = self.characters_per_token
        if self.overflow == "drop":
            raise BadRecordError(
                conversation.source,
                "too_long",
                f"{characters} characters cannot fit in max_length {self.max_length} tokens (a token here stands "
                f"for at most {per_token} characters)",
            )
        kept = (self.max_length + CUT_MARGIN_TOKENS) * per_token
        return cut_to_characters(conversation, kept, self.image_token)

    def _load(self, images: list[ImageInput], source: str) -> list[Image.Image]:
        return [image if isinstance(image, Image.Image) else load_image(image, source) for image in images]

    def sample(self, conversation: Conversation, add_generation_prompt: bool = False) -> dict:
        """A model input for one conversation: `input_ids`, `labels`, and per image its `pixel_values`,
        `image_tokens` and `image_sizes` ((height, width), which AnyRes unpads by) - empty lists for a
        text-only sample."""
        encoded = self.encode(conversation, add_generation_prompt)
        return self.sample_from(encoded, conversation.source)

    def sample_from(self, encoded: EncodedConversation, source: str = "record") -> dict:
        pictures = self._load(encoded.images, source)
        preprocess = self.geometry.preprocessor
        return {
            "input_ids": torch.from_numpy(encoded.input_ids),
            "labels": torch.from_numpy(encoded.labels),
            "pixel_values": [preprocess(picture) for picture in pictures],
            "image_tokens": list(encoded.image_tokens),
            "image_sizes": [(picture.height, picture.width) for picture in pictures],
        }
