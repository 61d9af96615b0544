"""Image slots in token sequences: one placeholder becomes N image tokens; truncation never splits them."""

from __future__ import annotations

import numpy as np

from llava_lite.data.masking import IGNORE_INDEX, TokenizedConversation


def expand_image_tokens(
    tokens: TokenizedConversation, image_token_id: int, tokens_per_image: int
) -> TokenizedConversation:
    """Repeat each image placeholder `tokens_per_image` times; image tokens are never trained."""
    is_image = tokens.input_ids == image_token_id
    repeats = np.where(is_image, tokens_per_image, 1)
    ids = np.repeat(tokens.input_ids, repeats)
    labels = np.repeat(tokens.labels, repeats)
    labels[ids == image_token_id] = IGNORE_INDEX
    return TokenizedConversation(ids, labels)


def truncate_keeping_images_whole(
    tokens: TokenizedConversation, max_length: int, image_token_id: int, tokens_per_image: int
) -> tuple[TokenizedConversation, int]:
    """Cut to at most `max_length` tokens, moving the cut before any image block it would split.

    Returns the cut sequence and how many images it still holds (the first ones, in order).
    """
    image_positions = np.flatnonzero(tokens.input_ids == image_token_id)
    cut = min(max_length, len(tokens.input_ids))
    before_cut = int(np.searchsorted(image_positions, cut))
    if before_cut % tokens_per_image:
        cut = int(image_positions[before_cut - before_cut % tokens_per_image])
        before_cut -= before_cut % tokens_per_image
    cut_tokens = TokenizedConversation(tokens.input_ids[:cut], tokens.labels[:cut])
    return cut_tokens, before_cut // tokens_per_image
