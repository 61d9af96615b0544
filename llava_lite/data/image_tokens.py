"""Image slots in token sequences: each image's placeholder becomes as many image tokens as that image takes;
truncation never splits an image's tokens."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llava_lite.data.masking import IGNORE_INDEX, TokenizedConversation


def expand_image_tokens(
    tokens: TokenizedConversation, image_token_id: int, image_tokens: Sequence[int]
) -> TokenizedConversation:
    """Repeat the i-th image placeholder `image_tokens[i]` times; image tokens are never trained."""
    is_image = tokens.input_ids == image_token_id
    if int(is_image.sum()) != len(image_tokens):
        raise ValueError(f"{int(is_image.sum())} image placeholders but token counts for {len(image_tokens)} images")
    repeats = np.ones(len(tokens.input_ids), dtype=np.int64)
    repeats[is_image] = np.asarray(image_tokens, dtype=np.int64)
    ids = np.repeat(tokens.input_ids, repeats)
    labels = np.repeat(tokens.labels, repeats)
    labels[ids == image_token_id] = IGNORE_INDEX
    return TokenizedConversation(ids, labels)


def truncate_keeping_images_whole(
    tokens: TokenizedConversation, max_length: int, image_token_id: int, image_tokens: Sequence[int]
) -> tuple[TokenizedConversation, int]:
    """Cut to at most `max_length` tokens, moving the cut before any image block it would split.

    `image_tokens` are the expanded images' token counts, in order. Returns the cut sequence and how many
    images it still holds (the first ones, in order).
    """
    image_positions = np.flatnonzero(tokens.input_ids == image_token_id)
    cut = min(max_length, len(tokens.input_ids))
    before_cut = int(np.searchsorted(image_positions, cut))  # image tokens left of the cut
    block_ends = np.cumsum(image_tokens, dtype=np.int64)
    whole = int(np.searchsorted(block_ends, before_cut, side="right"))  # images whose every token is kept
    kept_tokens = int(block_ends[whole - 1]) if whole else 0
    if before_cut != kept_tokens:
        cut = int(image_positions[kept_tokens])  # the first token of the image the cut would split
    cut_tokens = TokenizedConversation(tokens.input_ids[:cut], tokens.labels[:cut])
    return cut_tokens, whole
