"""Conversation to model inputs, the text half: render, tokenize, mask, expand image slots, fit the length limit.

Data flows one way: Conversation -> RenderedConversation (text + spans) -> token ids and labels with one
placeholder per image -> ids with N image tokens per image -> cut to `max_length`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from llava_lite.data.conversation import IMAGE_PLACEHOLDER, Conversation
from llava_lite.data.errors import BadRecordError
from llava_lite.data.image_tokens import expand_image_tokens, truncate_keeping_images_whole
from llava_lite.data.masking import IGNORE_INDEX, tokenize_rendered
from llava_lite.data.templates import ChatTemplate, TemplateError

Overflow = Literal["truncate", "drop"]


@dataclass
class EncodedConversation:
    input_ids: np.ndarray
    labels: np.ndarray
    images: list[str]  # the images whose tokens survived truncation, in order

    @property
    def num_trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class ConversationProcessor:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: ChatTemplate,
        tokens_per_image: int,
        image_token: str = IMAGE_PLACEHOLDER,
        max_length: int | None = None,
        overflow: Overflow = "truncate",
    ) -> None:
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token} token; prepare it with add_image_token first")
        self.tokenizer = tokenizer
        self.template = template
        self.tokens_per_image = tokens_per_image
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.max_length = max_length
        self.overflow = overflow

    def encode(self, conversation: Conversation, add_generation_prompt: bool = False) -> EncodedConversation:
        source = conversation.source
        placeholders = conversation.placeholder_count(self.image_token)
        if placeholders != len(conversation.images):
            raise BadRecordError(
                source,
                "image_count_mismatch",
                f"{placeholders} {self.image_token} placeholder(s) but {len(conversation.images)} image(s)",
            )
        try:
            rendered = self.template.render(conversation.messages, add_generation_prompt=add_generation_prompt)
        except TemplateError as err:
            raise BadRecordError(source, "malformed", str(err)) from None
        tokens = tokenize_rendered(self.tokenizer, rendered, source)
        image_slots = int((tokens.input_ids == self.image_token_id).sum())
        if image_slots != placeholders:
            raise BadRecordError(
                source,
                "image_count_mismatch",
                f"the rendered text holds {image_slots} image tokens for {placeholders} placeholder(s)",
            )
        tokens = expand_image_tokens(tokens, self.image_token_id, self.tokens_per_image)
        images = list(conversation.images)
        if self.max_length is not None and len(tokens.input_ids) > self.max_length:
            if self.overflow == "drop":
                raise BadRecordError(
                    source, "too_long", f"{len(tokens.input_ids)} tokens exceed max_length {self.max_length}"
                )
            tokens, kept = truncate_keeping_images_whole(
                tokens, self.max_length, self.image_token_id, self.tokens_per_image
            )
            images = images[:kept]
        encoded = EncodedConversation(tokens.input_ids, tokens.labels, images)
        if not add_generation_prompt and encoded.num_trained_tokens == 0:
            raise BadRecordError(source, "no_trained_tokens", "no assistant token left to train (after truncation)")
        return encoded
