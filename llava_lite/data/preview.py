"""A sample as a person reads it: decoded text with the trained tokens marked and image slots collapsed."""

from __future__ import annotations

from itertools import groupby

import numpy as np
from transformers import PreTrainedTokenizerBase

from llava_lite.data.masking import IGNORE_INDEX

_GREEN, _MAGENTA, _RESET = "\033[32m", "\033[35m", "\033[0m"


def mark_trained(
    tokenizer: PreTrainedTokenizerBase,
    input_ids: np.ndarray,
    labels: np.ndarray,
    image_token_id: int,
    image_tokens: list[int],
    color: bool,
) -> str:
    """Trained runs in green (or `[[...]]` without colour); each image's tokens shown as `<image xN>`, N being
    that image's token count (`image_tokens`, in order)."""
    kinds = np.where(input_ids == image_token_id, 2, np.where(labels != IGNORE_INDEX, 1, 0))
    pieces = []
    position = 0
    counts = iter(image_tokens)
    for kind, run in groupby(kinds.tolist()):
        length = len(list(run))
        ids = input_ids[position : position + length].tolist()
        position += length
        if kind == 2:
            text = ""
            while length > 0:  # adjacent images form one run of image tokens
                count = next(counts)
                text += f"<image x{count}>"
                length -= count
            pieces.append(f"{_MAGENTA}{text}{_RESET}" if color else text)
            continue
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if kind == 1:
            text = f"{_GREEN}{text}{_RESET}" if color else f"[[{text}]]"
        pieces.append(text)
    return "".join(pieces)
