"""What a `data select` choice kept and dropped: counts by source and kind, the scores of each side, and `data
stats`' diversity figures of the records before and after."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from llava_lite.curate.rate import distribution
from llava_lite.curate.records import CurateRecord
from llava_lite.data.stats import describe

# The fields `data rate` and `data tag` add: their spread on each side is shown whenever every record has them.
RECORD_SCORES = ("answer_loss", "unconditioned_loss", "ifd", "quality", "complexity")


@dataclass
class SelectionSummary:
    by: str
    keep: str
    records: int
    kept: int
    groups: dict[str, dict[str, int]] = field(default_factory=dict)  # "source / kind" -> {"kept", "of"}
    scores: dict[str, dict[str, dict]] = field(default_factory=dict)  # name -> {"kept": ..., "dropped": ...}
    diversity: dict[str, dict] = field(default_factory=dict)  # "before" / "after" -> figures
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "by": self.by,
            "keep": self.keep,
            "records": self.records,
            "kept": self.kept,
            "dropped": self.records - self.kept,
            "by_source_and_kind": self.groups,
            "scores": self.scores,
            "diversity": self.diversity,
            "notes": self.notes,
        }

    def lines(self) -> list[str]:
        lines = [f"--by {self.by}: kept {self.kept} of {self.records} records (--keep {self.keep})"]
        for group, counts in self.groups.items():
            lines.append(f"  {group}: {counts['kept']} of {counts['of']}")
        for name, sides in self.scores.items():
            lines.append(f"  {name} kept: {_shown(sides['kept'])}; dropped: {_shown(sides['dropped'])}")
        before, after = self.diversity["before"], self.diversity["after"]
        for name, value in before.items():
            lines.append(f"  {name.replace('_', ' ')}: {value:g} before, {after.get(name, 0):g} after")
        return lines + [f"  {note}" for note in self.notes]


def summarize(records: list[CurateRecord], selection, settings, tokenizer) -> SelectionSummary:
    """The summary of `selection` (a `llava_lite.curate.select.Selection`) over `records`."""
    chosen = set(selection.kept)
    summary = SelectionSummary(settings.by, str(settings.keep), len(records), len(chosen), notes=list(selection.notes))
    everything, kept = Counter(), Counter()
    for index, record in enumerate(records):
        group = f"{record.source} / {record.kind}"
        everything[group] += 1
        kept[group] += index in chosen
    summary.groups = {group: {"kept": kept[group], "of": everything[group]} for group in sorted(everything)}
    scores = dict(selection.scores)
    for name in RECORD_SCORES:
        values = [record.raw.get(name) for record in records]
        if name not in scores and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            scores[name] = values
    for name, values in scores.items():
        sides = {"kept": [], "dropped": []}
        for index, value in enumerate(values):
            if value is not None:
                sides["kept" if index in chosen else "dropped"].append(float(value))
        summary.scores[name] = {side: distribution(found) for side, found in sides.items()}
    summary.diversity = {
        "before": diversity(records, tokenizer),
        "after": diversity([records[i] for i in sorted(chosen)], tokenizer),
    }
    return summary


def diversity(records: list[CurateRecord], tokenizer) -> dict:
    """`data stats`' diversity figures of `records`: its instructions' lead word pairs and bigrams, and where records
    carry `tags` (`data tag`), the distinct tags."""
    stats = describe([(record.raw, record.conversation) for record in records], tokenizer).as_dict()
    instructions = stats["instructions"]
    figures = {
        "distinct_lead_pairs": instructions["distinct_lead_pairs"],
        "distinct_lead_pair_ratio": instructions["distinct_lead_pair_ratio"],
        "distinct_bigram_ratio": instructions["distinct_bigram_ratio"],
    }
    if any(isinstance(record.raw.get("tags"), list) for record in records):
        figures["distinct_tags"] = stats.get("tags", {}).get("distinct", 0)
    return figures


def _shown(figures: dict) -> str:
    if not figures["count"]:
        return "-"
    return ", ".join(f"{name} {figures[name]:.4g}" for name in ("mean", "p10", "p50", "p90"))
