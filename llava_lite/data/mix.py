"""Datasets combined by ratio: exact counts per source, sampled with or without replacement, seeded.

Each source's share of `total` is its ratio's, rounded by largest remainder, so the counts are as close to
the ratios as whole records allow. Records are copied as written (any format the loaders read; image paths
unchanged, so sources should share an image root). The mix is shuffled, or ordered easy to hard (fewer
turns, then fewer words first) as a curriculum.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from llava_lite.data.config import DataSource
from llava_lite.data.conversation import Conversation
from llava_lite.data.errors import BadRecordError

# The foundation's reader of raw rows: it names the file and line of a broken record.
from llava_lite.data.formats import iter_rows, parse_record


@dataclass
class Record:
    raw: dict  # the record as written, copied to the output unchanged
    conversation: Conversation  # the same, parsed: for difficulty and statistics


@dataclass
class MixSource:
    path: str
    ratio: float
    records: list[Record] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


def parse_spec(spec: str) -> MixSource:
    """`PATH:RATIO` (the ratio after the last colon)."""
    path, sep, ratio = spec.rpartition(":")
    try:
        value = float(ratio)
    except ValueError:
        value = math.nan
    if not sep or not path or not value > 0 or math.isinf(value):
        raise ValueError(f"{spec!r}: expected PATH:RATIO with a positive ratio, e.g. conv.jsonl:0.5")
    return MixSource(path, value)


def read_records(path: str | Path) -> tuple[list[Record], Counter]:
    """Every readable record of a file as written, and the unreadable ones counted by reason."""
    if not Path(path).exists():
        raise ValueError(f"{path}: no such data file")
    records, skipped = [], Counter()
    # disable=None: a bar on a terminal only, so piped output and logs stay clean.
    rows = tqdm(iter_rows(DataSource(str(path))), desc=f"reading {path}", unit=" records", disable=None, leave=False)
    for where, row in rows:
        try:
            if isinstance(row, BadRecordError):
                raise row
            conversation = parse_record(row, where)  # first: it refuses a row that is not an object
            records.append(Record(dict(row), conversation))
        except BadRecordError as err:
            skipped[err.reason] += 1
    if not records:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items()))
        raise ValueError(f"{path}: no readable records" + (f" (skipped: {reasons})" if reasons else " (it is empty)"))
    return records, skipped


def allocate(ratios: list[float], total: int) -> list[int]:
    """Whole counts summing to `total`, each within one of its exact share (largest remainder)."""
    weights = [r / sum(ratios) for r in ratios]
    shares = [w * total for w in weights]
    counts = [math.floor(s) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: shares[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def largest_total(sources: list[MixSource]) -> int:
    """The largest total that every source can fill at its ratio without repeating a record."""
    ratios = [s.ratio for s in sources]
    total = math.floor(min(len(s.records) * sum(ratios) / s.ratio for s in sources))
    while total > 0 and any(n > len(s.records) for n, s in zip(allocate(ratios, total), sources)):
        total -= 1  # rounding may ask one record too many of a source
    return total


def mix(
    sources: list[MixSource], total: int, replacement: bool, seed: int, curriculum: bool = False
) -> tuple[list[dict], list[int]]:
    """The mixed records and how many came from each source."""
    counts = allocate([s.ratio for s in sources], total)
    rng = random.Random(seed)
    chosen: list[Record] = []
    for source, count in zip(sources, counts):
        if replacement:
            chosen += rng.choices(source.records, k=count)
        elif count > len(source.records):
            raise ValueError(
                f"{source.path}: {count} records wanted at ratio {source.ratio:g} but it has {len(source.records)}; "
                "lower --total or sample --with-replacement"
            )
        else:
            chosen += rng.sample(source.records, count)
    rng.shuffle(chosen)
    if curriculum:
        chosen.sort(key=difficulty)  # stable: records equally hard stay shuffled
    return [record.raw for record in chosen], counts


def difficulty(record: Record) -> tuple[int, int]:
    """Easy to hard: fewer question-answer turns first, then fewer words."""
    messages = record.conversation.messages
    turns = sum(m.role == "assistant" for m in messages)
    return turns, sum(len(m.content.split()) for m in messages)
