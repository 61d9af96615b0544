"""Samples to a padded batch: ids, labels, attention mask, position ids, and every image with its token count.

A batch is built in two steps: samples are first grouped into rows (`rows`: one sample per row), then rows are
padded. Images are listed in row-major token order, which is the order in which the model scatters their
features into the image-token slots; `image_tokens` says how many slots each one fills, `image_sizes` each
one's (height, width) before any resizing (AnyRes unpads by it). An AnyRes image is its views, `[views, 3, H, W]`.

Packed items (`llava_lite.data.packing`) make a batch of one row: every sample of every item laid end to end,
with no padding between them. The samples are kept apart by position ids that restart at 0 for each, and by
`cu_seq_lens`, their cumulative lengths (a trailing stretch of padding, if any, is one more). The batch has no
attention mask. The model hands `cu_seq_lens` to the LM's attention: variable-length kernels under flash
attention, one sdpa call per sample under sdpa (`llava_lite.model.attention`); without them (e.g. eager),
transformers reads the restarts as boundaries (`find_packed_sequence_indices`: a block-diagonal causal mask).
Either way no sample attends to another.

A batch holding replay text (`llava_lite.data.replay`) also marks its tokens, `replay_tokens`, for the loss.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

import torch

from llava_lite.data.masking import IGNORE_INDEX

REPLAY = "replay"  # sample key: a replay sample of general text (llava_lite.data.replay)
REPLAY_TOKENS = "replay_tokens"  # batch key: which tokens are replay text; the trainer takes it off the batch


@dataclass
class Row:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    replay: torch.Tensor  # per token: part of a replay sample
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # per image `[3, H, W]` (AnyRes `[views, 3, H, W]`)
    image_tokens: list[int] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Collator:
    pad_token_id: int
    # right for training; left for batched generation, so every prompt ends where generation starts.
    padding_side: Literal["right", "left"] = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, samples: list[dict]) -> dict:
        packed = []  # packed items' samples (and any lone sample beside them), all in one row
        if any("packed" in sample for sample in samples):
            packed = [part for sample in samples for part in sample.get("packed", [sample])]
        rows = [_packed_row(packed)] if packed else [_row(sample) for sample in samples]
        length = max(len(row.input_ids) for row in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.stack([self._pad(r.input_ids, length, self.pad_token_id) for r in rows]),
            "labels": torch.stack([self._pad(r.labels, length, IGNORE_INDEX) for r in rows]),
            "position_ids": torch.stack([self._pad(r.position_ids, length, 0) for r in rows]),
        }
        if packed:  # no attention mask: the samples' boundaries are the position ids' restarts and cu_seq_lens
            ends = list(itertools.accumulate(len(sample["input_ids"]) for sample in packed))
            batch["cu_seq_lens"] = torch.tensor([0, *ends, *([length] if length > ends[-1] else [])], dtype=torch.int32)
        else:
            batch["attention_mask"] = torch.stack([self._pad(torch.ones_like(r.input_ids), length, 0) for r in rows])
        if any(row.replay.any() for row in rows):
            batch[REPLAY_TOKENS] = torch.stack([self._pad(r.replay, length, False) for r in rows])
        images = [image for row in rows for image in row.pixel_values]
        if images:
            batch["pixel_values"] = stack_images(images)
            batch["image_tokens"] = torch.tensor([n for row in rows for n in row.image_tokens])
            sizes = [size for row in rows for size in row.image_sizes]
            if len(sizes) == len(images):  # samples made by hand may leave the sizes out
                batch["image_sizes"] = torch.tensor(sizes, dtype=torch.long).view(-1, 2)
        return batch

    def _pad(self, values: torch.Tensor, length: int, fill: int) -> torch.Tensor:
        padding = values.new_full((length - len(values),), fill)
        parts = (values, padding) if self.padding_side == "right" else (padding, values)
        return torch.cat(parts)


def _row(sample: dict) -> Row:
    return Row(
        input_ids=sample["input_ids"],
        labels=sample["labels"],
        position_ids=torch.arange(len(sample["input_ids"])),
        pixel_values=list(sample.get("pixel_values") or []),
        image_tokens=list(sample.get("image_tokens") or []),
        replay=torch.full(sample["input_ids"].shape, bool(sample.get(REPLAY)), dtype=torch.bool),
        image_sizes=[tuple(size) for size in sample.get("image_sizes") or []],
    )


def _packed_row(samples: list[dict]) -> Row:
    parts = [_row(sample) for sample in samples]
    labels = [p.labels.clone() for p in parts]
    for part in labels:
        # A sample's first token is never a target: unpacked, nothing predicts it; packed, the previous sample's
        # last token would.
        part[0] = IGNORE_INDEX
    return Row(
        input_ids=torch.cat([p.input_ids for p in parts]),
        labels=torch.cat(labels),
        position_ids=torch.cat([p.position_ids for p in parts]),  # restarting at 0 for each sample
        pixel_values=[image for p in parts for image in p.pixel_values],
        image_tokens=[n for p in parts for n in p.image_tokens],
        replay=torch.cat([p.replay for p in parts]),
        image_sizes=[size for p in parts for size in p.image_sizes],
    )


def batch_to(batch: dict, device: torch.device | str) -> dict:
    """The batch on `device`; images given as a list of tensors move one by one."""
    return {k: v.to(device) if torch.is_tensor(v) else [x.to(device) for x in v] for k, v in batch.items()}


def stack_images(images: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """One `[images, ...]` tensor when every image has the same shape; else the list, in order."""
    if all(image.shape == images[0].shape for image in images):
        return torch.stack(images)
    return list(images)
