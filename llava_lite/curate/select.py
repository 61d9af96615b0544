"""`llava-lite data select`: keep N records (or a fraction) by one rule, and say what the choice kept and dropped.

The rules (`--by`):
- `loss`: the lowest answer losses of a run (`--model`, or the `answer_loss` fields `data rate` wrote). Networks
  fit clean labels before noisy ones, so after a short run the wrong answers are the high-loss ones (the small-loss
  rule against noisy labels).
- `ifd`: the highest IFD below 1 (`data rate`'s `ifd`, or from `--model`): answers the instruction helps predict,
  but least; at 1 or more the answer does not follow from its instruction and the record is never kept.
- `instag`: InsTag's complexity-first diverse sampling over `data tag`'s `tags`: by `complexity` (default: the tag
  count), highest first, a record is kept when it brings a tag not yet covered; then the rest, in the same order,
  fill what is left.
- `quality`: the highest `quality` (`data rate --scorer`).
- `diverse`: deita's rule: by a score (`quality`, else `complexity`, else minus the answer loss: whichever every
  record has), highest first, a record is kept only when its embedding - the run's LM mean hidden state over the
  record's tokens (`--model`) - is farther than `--min-distance` (cosine distance) from every record kept. A record
  too close is dropped for good: fewer than N may be kept.
- `random`: `--seed`'s draw, the baseline.
Ties keep the file's order; the kept records are written in the file's order.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llava_lite.curate.records import CurateRecord, read_curate_records
from llava_lite.curate.signals import SignalScorer
from llava_lite.curate.summary import SelectionSummary, summarize
from llava_lite.data.writing import write_lines_atomically, write_records

BY = ("loss", "ifd", "instag", "quality", "diverse", "random")
RUN_RULES = ("loss", "ifd", "diverse")  # the rules a run informs (loss and ifd can read `data rate`'s fields instead)
NEEDS_A_RUN = ("diverse",)  # always: embeddings come only from a run
DEFAULT_MIN_DISTANCE = 0.1  # deita's threshold: cosine similarity 0.9


@dataclass
class SelectSettings:
    by: str
    keep: str | int | float  # a count, or a fraction of the records in (0, 1] (a string with a dot, or a float)
    seed: int = 0
    min_distance: float = DEFAULT_MIN_DISTANCE
    batch_size: int = 8
    packed: bool = False

    def __post_init__(self) -> None:
        if self.by not in BY:
            raise ValueError(f"--by must be one of {', '.join(BY)}, got {self.by!r}")
        if not 0 <= self.min_distance <= 2:
            raise ValueError(f"--min-distance is a cosine distance, from 0 to 2; got {self.min_distance}")
        keep_count(self.keep, 1)  # the form is checked now, before any record is read


@dataclass
class Selection:
    kept: list[int]  # record indices, in the order the rule chose them
    scores: dict[str, list[float | None]] = field(default_factory=dict)  # per record, every score the rule saw
    notes: list[str] = field(default_factory=list)


def keep_count(keep: str | int | float, records: int) -> int:
    """How many of `records` to keep: a count (at most all of them), or a fraction in (0, 1] of them, rounded."""
    text = str(keep).strip()
    try:
        value = float(text) if (isinstance(keep, float) or "." in text) else int(text)
    except ValueError:
        raise ValueError(f"--keep {keep!r}: expected a count (100) or a fraction (0.5)") from None
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise ValueError(f"--keep {keep!r}: a fraction must be above 0 and at most 1")
        return max(1, round(value * records))
    if value < 1:
        raise ValueError(f"--keep {keep!r}: keep at least one record")
    return min(value, records)


# ----- the rules -------------------------------------------------------------------------------------------------


def lowest(values: list[float], keep: int) -> list[int]:
    return sorted(range(len(values)), key=lambda i: (values[i], i))[:keep]


def highest(values: list[float], keep: int, eligible: Callable[[float], bool] = lambda v: True) -> list[int]:
    candidates = [i for i, v in enumerate(values) if v is not None and eligible(v)]
    return sorted(candidates, key=lambda i: (-values[i], i))[:keep]


def by_instag(tags: list[list[str]], complexity: list[float], keep: int) -> list[int]:
    """InsTag's complexity-first diverse sampling (see the module doc)."""
    order = sorted(range(len(tags)), key=lambda i: (-complexity[i], i))
    covered: set[str] = set()
    kept: list[int] = []
    for index in order:
        if len(kept) == keep:
            return kept
        mine = {normal_tag(tag) for tag in tags[index]}
        if mine - covered:
            kept.append(index)
            covered |= mine
    chosen = set(kept)
    return kept + [i for i in order if i not in chosen][: keep - len(kept)]


def normal_tag(tag: str) -> str:
    return " ".join(str(tag).lower().split())


def by_distance(scores: list[float], embeddings: np.ndarray, keep: int, min_distance: float, block: int = 256):
    """deita's rule (see the module doc): indices kept, highest score first, and how many were too close.

    Candidates are compared with what was kept before their block in one product, then with what their block
    kept, one by one: the kept set is the one a record-by-record pass gives. The cost is candidates x kept
    products (not linear, as deita's is not), made as matrix products a block at a time rather than one by one."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    unit = unit.astype(np.float32)
    most_similar = 1.0 - min_distance
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    kept_vectors = np.empty((0, unit.shape[1]), dtype=np.float32)
    too_close = 0
    for start in range(0, len(order), block):
        if len(kept) == keep:
            break
        candidates = order[start : start + block]
        before = (unit[candidates] @ kept_vectors.T).max(axis=1) if len(kept) else np.full(len(candidates), -1.0)
        added: list[int] = []
        for candidate, similarity in zip(candidates, before):
            if len(kept) + len(added) == keep:
                break
            if similarity >= most_similar or (added and (unit[added] @ unit[candidate]).max() >= most_similar):
                too_close += 1
                continue
            added.append(candidate)
        kept += added
        kept_vectors = np.concatenate([kept_vectors, unit[added]])
    return kept, too_close


def by_random(records: int, keep: int, seed: int) -> list[int]:
    return random.Random(seed).sample(range(records), keep)


# ----- choosing ---------------------------------------------------------------------------------------------------


def choose(records: list[CurateRecord], settings: SelectSettings, scorer: SignalScorer | None = None) -> Selection:
    """Apply `settings.by` to `records`; `scorer` gives a run's answer losses and embeddings where the rule asks for
    them (None: there is no run, the records' fields must do)."""
    count = keep_count(settings.keep, len(records))
    by = settings.by
    if by in NEEDS_A_RUN and scorer is None:
        raise ValueError(f"--by {by} needs --model RUN (the embeddings are the run's hidden states)")
    if by == "random":
        return Selection(by_random(len(records), count, settings.seed))
    if by == "loss":
        losses = _losses(records, scorer)
        return Selection(lowest(losses, count), {"answer_loss": losses})
    if by == "ifd":
        values = _ifds(records, scorer)
        kept = highest(values, count, eligible=lambda v: v < 1)
        at_or_above = sum(1 for v in values if v is None or v >= 1)
        return Selection(kept, {"ifd": values}, [f"ifd at or above 1 (never kept): {at_or_above}"])
    if by == "quality":
        quality = numbers(records, "quality", "--by quality needs `quality` on every record (data rate --scorer)")
        return Selection(highest(quality, count), {"quality": quality})
    if by == "instag":
        tags = [_tags(record) for record in records]
        complexity = [_complexity(record, mine) for record, mine in zip(records, tags)]
        return Selection(by_instag(tags, complexity, count), {"complexity": complexity})
    return _diverse(records, settings, count, scorer)


def _diverse(records: list[CurateRecord], settings: SelectSettings, count: int, scorer: SignalScorer) -> Selection:
    signals = scorer.answer_losses([r.conversation for r in records], embeddings=True, desc="answer loss, embedding")
    embeddings = np.stack([s.embedding for s in signals])
    name = next((n for n in ("quality", "complexity") if all(_number(r.raw.get(n)) for r in records)), None)
    if name is None:
        name, scores = "answer_loss", [-s.loss for s in signals]
        shown = [s.loss for s in signals]
    else:
        scores = shown = [float(r.raw[name]) for r in records]
    kept, too_close = by_distance(scores, embeddings, count, settings.min_distance)
    note = f"diverse: ranked by {'minus ' if name == 'answer_loss' else ''}{name}; {too_close} too close to a kept one"
    return Selection(kept, {name: shown}, [note])


def _losses(records: list[CurateRecord], scorer: SignalScorer | None) -> list[float]:
    if scorer is not None:
        return [s.loss for s in scorer.answer_losses([r.conversation for r in records])]
    return numbers(records, "answer_loss", "--by loss needs --model RUN or `data rate --model` first")


def _ifds(records: list[CurateRecord], scorer: SignalScorer | None) -> list[float | None]:
    if scorer is None:
        missing = next((r for r in records if "ifd" not in r.raw), None)
        if missing is not None:
            raise ValueError(
                f"{missing.conversation.source}: no `ifd`; --by ifd needs --model RUN or `data rate --model` first"
            )
        return [r.raw["ifd"] if _number(r.raw["ifd"]) else None for r in records]
    from llava_lite.curate.rate import model_scores

    return model_scores(records, scorer)["ifd"]


def numbers(records: list[CurateRecord], name: str, hint: str) -> list[float]:
    """Every record's numeric field `name`; the first record without one stops with its source and `hint`."""
    for record in records:
        if not _number(record.raw.get(name)):
            raise ValueError(f"{record.conversation.source}: no number in `{name}`; {hint}")
    return [float(record.raw[name]) for record in records]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _tags(record: CurateRecord) -> list[str]:
    tags = record.raw.get("tags")
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise ValueError(f"{record.conversation.source}: no `tags` list; --by instag needs `data tag` first")
    return tags


def _complexity(record: CurateRecord, tags: list[str]) -> float:
    value = record.raw.get("complexity")
    return float(value) if _number(value) else float(len({normal_tag(tag) for tag in tags}))


# ----- the command ------------------------------------------------------------------------------------------------


def summary_path(out: str | Path) -> Path:
    """Where the summary's JSON goes: beside OUT, `OUT_STEM.summary.json`."""
    out = Path(out)
    return out.with_name(f"{out.stem}.summary.json")


def select_file(
    input_path: str | Path,
    out: str | Path,
    settings: SelectSettings,
    model=None,
    image_folder: str | Path | None = None,
    tokenizer=None,
) -> SelectionSummary:
    """Read, choose, write the kept records (file order) and the summary's JSON beside them; `model` is a loaded
    run (see `llava_lite.curate.rate.load_run`) or None; `tokenizer` counts tokens for the diversity figures
    (default: the run's, else the tiny one)."""
    import json

    records = read_curate_records(input_path, image_folder, check_images=model is not None)  # a run reads them
    scorer = None if model is None else SignalScorer(model, settings.batch_size, settings.packed, progress=True)
    selection = choose(records, settings, scorer)
    kept = sorted(selection.kept)
    write_records(out, [records[i].raw for i in kept])
    summary = summarize(records, selection, settings, _tokenizer(tokenizer, model))
    write_lines_atomically(summary_path(out), [json.dumps(summary.as_dict(), indent=1)])
    return summary


def _tokenizer(tokenizer, model):
    if tokenizer is not None:
        return tokenizer
    if model is not None:
        return model.tokenizer
    from llava_lite.model.config import LanguageModelConfig
    from llava_lite.model.language_model import load_tokenizer

    return load_tokenizer(LanguageModelConfig(name="tiny"))
