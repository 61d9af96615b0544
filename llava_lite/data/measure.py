"""Every record's token count, image count and trained tokens, measured once per run - what packing, grouped batches
and replay's token share plan from.

Measuring is encoding every record with the processor (no image is decoded), exactly: packing must never overflow a
row. It is done once, not once per process: the processes of a run split the records, each encodes its share in a
pool of its part of the machine's cores (fork, Linux), and the counts are summed over the processes. The result is
kept beside the run (`measured.safetensors` in the output folder), keyed by the records' content and the processor
(tokenizer, template, length limit, image geometry), so a resumed or rerun run reads it back in a moment; only the
main process writes it, and nothing is pickled.

A bad record measures 0 tokens and carries its reason; under `on_bad_record: error` every process stops with the
first bad record's error, the same on each.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from llava_lite.data.cache import read_cached, write_cached
from llava_lite.data.conversation import Conversation
from llava_lite.data.errors import REASONS, BadRecordError
from llava_lite.data.processor import Processor
from llava_lite.run_folder import MEASURED_FILE

logger = logging.getLogger(__name__)

FORMAT = "1"
POOL_FROM = 4000  # records of one process's share from which a pool pays for its start
_CHUNK = 500  # records per task handed to a pool worker


@dataclass
class Measurement:
    """Per record: `lengths` (tokens, 0 when bad), `images` (images kept), `trained` (trained tokens after the
    first, as the Trainer counts them) and `reasons` (0, or 1 + the index of its reason in `REASONS`)."""

    lengths: np.ndarray
    images: np.ndarray
    trained: np.ndarray
    reasons: np.ndarray

    def bad(self) -> list[tuple[int, str]]:
        """The bad records and their reasons."""
        return [(int(i), REASONS[int(self.reasons[i]) - 1]) for i in np.flatnonzero(self.reasons)]


def measure(
    conversations: list[Conversation], processor: Processor, stop_on_bad: bool, cache_dir: str | Path | None = None
) -> Measurement:
    """The counts of `conversations`, from `cache_dir`'s cache when it holds these records under this processor,
    else measured (over every process of the run together, which must all call this) and cached there."""
    key = fingerprint(conversations, processor)
    cache = Path(cache_dir) / MEASURED_FILE if cache_dir is not None else None
    cached = _read(cache, key, len(conversations)) if cache is not None else None
    if not _everywhere(cached is not None):  # a process that cannot see the cache measures with the others
        cached = None
    if cached is not None:
        logger.info("token counts of %d records read from %s", len(conversations), cache)
        measured = cached
    else:
        measured = _measure_split(conversations, processor)
        if cache is not None and _rank() == 0:
            _write(cache, key, measured)
        if _distributed():
            dist.barrier()  # the cache is whole before any process might read it on a rerun
    if stop_on_bad and measured.reasons.any():
        first = int(np.flatnonzero(measured.reasons)[0])
        processor.encode(conversations[first])  # the record's own error, raised the same on every process
        raise BadRecordError(conversations[first].source, REASONS[int(measured.reasons[first]) - 1], "bad record")
    return measured


def fingerprint(conversations: list[Conversation], processor: Processor) -> str:
    """A digest of what the counts depend on: every record's messages and image paths, and the processor's
    tokenizer, template, length limit, overflow policy and image geometry (not the images' bytes: a rerun that
    swaps an image file's content under its name, under AnyRes, is not noticed)."""
    digest = hashlib.blake2b(digest_size=20)
    tokenizer = processor.tokenizer
    geometry = processor.geometry
    settings = (
        FORMAT,
        type(processor.template).__name__,
        getattr(processor.template, "name", ""),
        tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else repr(tokenizer.chat_template),
        processor.image_token,
        processor.max_length,
        processor.overflow,
        geometry.tokens_per_image,
        repr(geometry.anyres),
    )
    digest.update(repr(settings).encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    for conversation in conversations:
        digest.update(b"\x00R")
        for message in conversation.messages:
            digest.update(f"\x00{message.role}\x00".encode())
            digest.update(message.content.encode())
        for image in conversation.images:
            digest.update(f"\x00I{image}".encode())
    return digest.hexdigest()


def _measure_split(conversations: list[Conversation], processor: Processor) -> Measurement:
    """Each process measures its contiguous share; the shares are summed over the processes."""
    rank, world = _rank(), _world()
    bounds = np.linspace(0, len(conversations), world + 1).astype(int)
    start, end = int(bounds[rank]), int(bounds[rank + 1])
    table = torch.zeros(4, len(conversations), dtype=torch.int32)
    table[:, start:end] = torch.from_numpy(_measure_range(conversations, processor, start, end))
    if world > 1:
        table = table.to(_collective_device())
        dist.all_reduce(table)  # each record is measured by one process, zeros elsewhere
        table = table.cpu()
    lengths, images, trained, reasons = table.numpy()
    return Measurement(lengths, images, trained, reasons)


def _measure_range(conversations: list[Conversation], processor: Processor, start: int, end: int) -> np.ndarray:
    """`[4, end - start]` counts of records start..end-1, in a pool of this process's cores when there are many."""
    workers = _workers()
    bar = tqdm(total=end - start, desc="measuring", unit="record", disable=end - start < 5000 or _rank() != 0)
    tasks = [(s, min(s + _CHUNK, end)) for s in range(start, end, _CHUNK)]
    parts = []
    if workers > 1 and end - start >= POOL_FROM and "fork" in multiprocessing.get_all_start_methods():
        global _POOL_INPUT
        _POOL_INPUT = (conversations, processor)  # inherited by the forked workers, never pickled
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for part in pool.imap(_measure_task, tasks):
                    parts.append(part)
                    bar.update(part.shape[1])
        finally:
            _POOL_INPUT = None
    else:
        for first, last in tasks:
            parts.append(_counts(conversations, processor, first, last))
            bar.update(last - first)
    bar.close()
    return np.concatenate(parts, axis=1) if parts else np.zeros((4, 0), dtype=np.int32)


# What a forked pool worker measures from: set just before the pool starts, in the parent (process-global by
# necessity: fork hands a child the parent's memory, not arguments).
_POOL_INPUT: tuple[list[Conversation], Processor] | None = None


def _measure_task(task: tuple[int, int]) -> np.ndarray:
    conversations, processor = _POOL_INPUT
    return _counts(conversations, processor, *task)


def _counts(conversations: list[Conversation], processor: Processor, start: int, end: int) -> np.ndarray:
    out = np.zeros((4, end - start), dtype=np.int32)
    for offset, conversation in enumerate(conversations[start:end]):
        try:
            encoded = processor.encode(conversation)
        except BadRecordError as err:
            out[3, offset] = REASONS.index(err.reason) + 1
            continue
        out[0, offset] = len(encoded.input_ids)
        out[1, offset] = len(encoded.images)
        out[2, offset] = int((encoded.labels[1:] != -100).sum())
    return out


def _read(cache: Path, key: str, records: int) -> Measurement | None:
    table = (read_cached(cache, key) or {}).get("counts")
    if table is None or tuple(table.shape) != (4, records):
        return None
    lengths, images, trained, reasons = table.numpy()
    return Measurement(lengths, images, trained, reasons)


def _write(cache: Path, key: str, measured: Measurement) -> None:
    counts = np.stack([measured.lengths, measured.images, measured.trained, measured.reasons])
    write_cached(cache, key, {"counts": torch.from_numpy(counts)})


def _workers() -> int:
    """This process's share of the machine's cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // per_machine)


def _everywhere(flag: bool) -> bool:
    """Whether `flag` holds on every process of the run (every process must ask)."""
    if not _distributed():
        return flag
    agreed = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return bool(agreed.item())


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo, CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1
