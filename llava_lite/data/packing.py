"""Sequence packing: several samples in one row, each still alone.

Rows are planned once, before training, from every sample's token and image counts (known without loading a
pixel): the samples, in an order shuffled by the seed, are taken a window at a time and placed by best-fit
decreasing into rows that hold at most `tokens` tokens and `images` images. A sample is never split; one longer
than the budget gets a row of its own. The plan depends on the seed alone, so a resumed run packs the same rows.

Isolation is the model's side: the collator lays a step's rows end to end, restarts position ids at each
sample, sends no attention mask and names the samples' boundaries (`cu_seq_lens`); the LM's attention then runs
each sample alone (flash attention's variable-length kernels, `llava_lite.model.attention` under sdpa) or under
transformers' block-diagonal mask (eager) - see `llava_lite.data.collator`.
"""

from __future__ import annotations

import bisect
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from torch.utils.data import Dataset

from llava_lite.data.config import DataConfig
from llava_lite.data.dataset import ConversationDataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackingBudget:
    tokens: int
    images: int | None = None  # None: no limit

    def __post_init__(self) -> None:
        if self.tokens < 1 or (self.images is not None and self.images < 1):
            raise ValueError(f"a packing budget needs at least one token and one image, got {self}")

    @classmethod
    def of(cls, data: DataConfig, tokens: int | None = None) -> PackingBudget:
        """The budget `data` packs with: `tokens` if given, else `pack_length`, else `max_length`."""
        return cls(tokens or data.pack_length or data.max_length, data.pack_images)


def plan_rows(
    lengths: Sequence[int],
    images: Sequence[int],
    budget: PackingBudget,
    window: int = 1000,
    seed: int = 0,
) -> list[list[int]]:
    """Sample indices grouped into rows; every index appears in exactly one row."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    for start in range(0, len(order), max(1, window)):
        rows.extend(_best_fit_decreasing(order[start : start + window], lengths, images, budget))
    return rows


def _best_fit_decreasing(
    indices: list[int], lengths: Sequence[int], images: Sequence[int], budget: PackingBudget
) -> list[list[int]]:
    """Longest sample first, each into the row it fills best (the least room left that still takes it, and has
    room for its images); ties keep the shuffled order, so the plan is deterministic."""
    ranked = sorted(indices, key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    image_room: list[float] = []
    open_rows: list[tuple[int, int]] = []  # (tokens left, row), sorted
    image_limit = float("inf") if budget.images is None else budget.images
    for index in ranked:
        length, count = lengths[index], images[index]
        position = bisect.bisect_left(open_rows, (length, -1))
        while position < len(open_rows) and image_room[open_rows[position][1]] < count:
            position += 1
        if position < len(open_rows):
            left, row = open_rows.pop(position)
            rows[row].append(index)
            image_room[row] -= count
            bisect.insort(open_rows, (left - length, row))
        else:
            rows.append([index])
            image_room.append(image_limit - count)
            bisect.insort(open_rows, (budget.tokens - length, len(rows) - 1))
    return rows


def packing_efficiency(rows: list[list[int]], lengths: Sequence[int], budget: PackingBudget) -> float:
    """The share of the rows' token budget that samples fill."""
    if not rows:
        return 0.0
    return sum(lengths[i] for row in rows for i in row) / (len(rows) * budget.tokens)


class PackedDataset(Dataset):
    """Rows of packed samples over a `ConversationDataset`: item i is `{"packed": [sample, ...]}`, the samples of
    row i in order. Planned once from the records' measured lengths; bad records (under `skip`) are left out, and
    one that fails only when its images are loaded leaves its row a sample shorter."""

    def __init__(self, samples: ConversationDataset, budget: PackingBudget, window: int = 1000, seed: int = 0) -> None:
        self.samples = samples
        lengths, images = samples.measure()
        good = [record for record, length in enumerate(lengths) if length > 0]
        if not good:
            raise ValueError("every record of the data is bad; nothing to pack")
        plan = plan_rows([lengths[r] for r in good], [images[r] for r in good], budget, window, seed)
        self.rows = [[good[i] for i in row] for row in plan]
        efficiency = packing_efficiency(plan, [lengths[r] for r in good], budget)
        logger.info(
            "packed %d samples into %d rows of up to %d tokens (%.1f %% of the rows' tokens filled)",
            len(good), len(self.rows), budget.tokens, 100 * efficiency,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.rows)):
            row = self.rows[(index + attempt) % len(self.rows)]
            packed = [sample for record in row if (sample := self.samples.sample_of(record)) is not None]
            if packed:
                return {"packed": packed}
        raise RuntimeError("every record of the data is bad; nothing to train on")

    @property
    def skips(self):
        return self.samples.skips
