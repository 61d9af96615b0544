"""Records skipped while samples are built, counted where it happens and summed over processes at the end.

One code per record, in shared memory: a DataLoader worker process marks the record it passed over and the
main process sees it; a record met again (a later epoch, another rank's shard) counts once. Across processes
the codes are combined with an element-wise max, so every bad record any rank met is counted exactly once.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

from llava_lite.data.errors import REASONS


class SkipCounter:
    def __init__(self, records: int) -> None:
        # 0: not skipped; i + 1: skipped for REASONS[i].
        self.codes = torch.zeros(records, dtype=torch.int32).share_memory_()

    def mark(self, record: int, reason: str) -> None:
        self.codes[record] = REASONS.index(reason) + 1

    def counts(self) -> Counter:
        """This process's skips, by reason."""
        return _by_reason(self.codes)

    def counts_across_processes(self) -> Counter:
        """Skips of every process of a distributed run (each record once), by reason; every rank must call it."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.counts()
        codes = self.codes.clone()
        if dist.get_backend() == "nccl":
            codes = codes.cuda()
        dist.all_reduce(codes, op=dist.ReduceOp.MAX)
        return _by_reason(codes.cpu())


def _by_reason(codes: torch.Tensor) -> Counter:
    found = torch.bincount(codes, minlength=len(REASONS) + 1)[1:]
    return Counter({REASONS[i]: int(n) for i, n in enumerate(found.tolist()) if n})


def skips_note(skipped: Counter) -> str:
    """`; skipped records: REASON N, ...` for a log line, or nothing when no record was skipped."""
    if not skipped:
        return ""
    return "; skipped records: " + ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items()))
