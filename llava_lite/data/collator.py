"""Samples to a padded batch: ids, labels, attention mask, position ids and all the batch's images.

A batch is built in two steps: samples are first grouped into rows (`rows`: one sample per row today;
sequence packing will put several samples in a row, each segment restarting its position ids), then
rows are padded. Images are concatenated in row-major token order, which is the order in which the
model scatters their features into the image-token slots.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch

from llava_lite.data.masking import IGNORE_INDEX


@dataclass
class Row:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: list[torch.Tensor]


@dataclass
class Collator:
    pad_token_id: int
    # right for training; left for batched generation, so every prompt ends where generation starts.
    padding_side: Literal["right", "left"] = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, samples: list[dict]) -> dict:
        skipped = Counter(reason for sample in samples for reason in sample.get("skipped", ()))
        rows = self.rows(samples)
        length = max(len(row.input_ids) for row in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.stack([self._pad(r.input_ids, length, self.pad_token_id) for r in rows]),
            "labels": torch.stack([self._pad(r.labels, length, IGNORE_INDEX) for r in rows]),
            "attention_mask": torch.stack([self._pad(torch.ones_like(r.input_ids), length, 0) for r in rows]),
            "position_ids": torch.stack([self._pad(r.position_ids, length, 0) for r in rows]),
        }
        images = [image for row in rows for image in row.pixel_values]
        if images:
            batch["pixel_values"] = torch.cat(images)
        if skipped:
            # Carried in the batch so that skips in DataLoader worker processes reach the trainer's count.
            batch["skipped_records"] = dict(skipped)
        return batch

    def rows(self, samples: list[dict]) -> list[Row]:
        """One row per sample. Packing replaces this step alone."""
        return [
            Row(
                input_ids=sample["input_ids"],
                labels=sample["labels"],
                position_ids=torch.arange(len(sample["input_ids"])),
                pixel_values=[] if sample.get("pixel_values") is None else [sample["pixel_values"]],
            )
            for sample in samples
        ]

    def _pad(self, values: torch.Tensor, length: int, fill: int) -> torch.Tensor:
        padding = values.new_full((length - len(values),), fill)
        parts = (values, padding) if self.padding_side == "right" else (padding, values)
        return torch.cat(parts)
