"""Batches of one modality and similar lengths, for those who do not pack (LLaVA's `group_by_modality_length`).

Each epoch, in an order fixed by the seed and the epoch: image samples and text-only samples are shuffled apart,
cut into mega-batches, sorted by length inside each so that neighbours pad little, and cut into groups of
`group_size` (the per-device batch times the number of processes: every process's micro-batch of a step then
comes from one group, of one modality). The groups are shuffled and laid end to end; the two modalities' short
last groups go last.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

MEGA_BATCH_GROUPS = 8  # groups sorted together: larger pads less, smaller keeps more randomness


class ModalityLengthSampler(Sampler[int]):
    def __init__(self, lengths: Sequence[int], images: Sequence[int], group_size: int, seed: int = 0) -> None:
        self.lengths = list(lengths)
        self.images = list(images)
        self.group_size = max(1, group_size)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        groups: list[list[int]] = []
        leftovers: list[int] = []  # each modality's last, short group: laid at the end, so groups stay aligned
        for with_images in (True, False):
            members = [i for i, n in enumerate(self.images) if (n > 0) == with_images]
            modality = self._groups(members, generator)
            if modality and len(modality[-1]) < self.group_size:
                leftovers.extend(modality.pop())
            groups.extend(modality)
        order = torch.randperm(len(groups), generator=generator).tolist()
        return iter([index for g in order for index in groups[g]] + leftovers)

    def _groups(self, members: list[int], generator: torch.Generator) -> list[list[int]]:
        shuffled = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        mega = self.group_size * MEGA_BATCH_GROUPS
        groups = []
        for start in range(0, len(shuffled), mega):
            ranked = sorted(shuffled[start : start + mega], key=lambda i: -self.lengths[i])
            groups.extend(ranked[i : i + self.group_size] for i in range(0, len(ranked), self.group_size))
        return groups  # only the last can be short: every mega-batch but the last is a whole number of groups
