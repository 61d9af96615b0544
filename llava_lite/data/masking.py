"""Labels from character spans: a token is trained exactly when its characters overlap an assistant span.

The whole rendered text is tokenized once, with offsets, by the fast tokenizer; there is no per-turn
tokenization whose lengths could drift from the full text (LLaVA's "tokenization mismatch").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from llava_lite.data.errors import BadRecordError
from llava_lite.data.templates import RenderedConversation

IGNORE_INDEX = -100


@dataclass
class TokenizedConversation:
    input_ids: np.ndarray  # int64, one id per token; each image still a single placeholder token here
    labels: np.ndarray  # int64, IGNORE_INDEX wherever the token is not trained


def trained_token_mask(offsets: np.ndarray, spans: tuple[tuple[int, int], ...]) -> np.ndarray:
    """For `[n, 2]` token character offsets and sorted, disjoint `[start, end)` spans: which tokens overlap one."""
    if not spans or len(offsets) == 0:
        return np.zeros(len(offsets), dtype=bool)
    span_starts = np.array([s for s, _ in spans])
    span_ends = np.array([e for _, e in spans])
    starts, ends = offsets[:, 0], offsets[:, 1]
    # The first span ending after the token starts is the only one it can overlap.
    candidate = np.searchsorted(span_ends, starts, side="right")
    inside = candidate < len(spans)
    candidate = np.minimum(candidate, len(spans) - 1)
    return inside & (span_starts[candidate] < ends) & (ends > starts)


def tokenize_rendered(
    tokenizer: PreTrainedTokenizerBase, rendered: RenderedConversation, source: str = "conversation"
) -> TokenizedConversation:
    if not tokenizer.is_fast:
        raise ValueError("llava_lite needs a fast tokenizer (offset mappings); this one is a slow tokenizer")
    encoding = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoding["input_ids"], dtype=np.int64)
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    mask = trained_token_mask(offsets, rendered.assistant_spans)
    _check_every_span_trained(offsets, mask, rendered.assistant_spans, source)
    labels = np.where(mask, ids, IGNORE_INDEX)
    return TokenizedConversation(ids, labels)


def _check_every_span_trained(offsets, mask, spans, source: str) -> None:
    """Every span overlaps a trained token. Each trained token overlaps a run of the sorted, disjoint spans (from
    the first ending after it starts to the last starting before it ends); the runs are marked in one pass, so the
    check takes time linear in tokens and spans, not their product."""
    if not spans:
        return
    span_starts = np.array([s for s, _ in spans])
    span_ends = np.array([e for _, e in spans])
    trained = offsets[mask]
    first = np.searchsorted(span_ends, trained[:, 0], side="right")
    last = np.searchsorted(span_starts, trained[:, 1], side="left")  # one past the last span it reaches
    reach = first < last
    runs = np.zeros(len(spans) + 1, dtype=np.int64)
    np.add.at(runs, first[reach], 1)
    np.add.at(runs, last[reach], -1)
    covered = np.cumsum(runs[:-1]) > 0
    if not covered.all():
        number = int(np.flatnonzero(~covered)[0]) + 1
        raise BadRecordError(source, "empty_answer", f"assistant message {number} gives no tokens to train")
