"""What a curator wants to know about a dataset: size, images, turns, token lengths, kinds, and how varied it is.

Diversity follows the spirit of InsTag and Self-Instruct's analysis, without a parser: each instruction's
leading word (its verb, or its question word) and the first content word after it form a pair; many distinct
pairs, spread evenly, mean varied instructions. Complexity is read from turns and instruction length. Where records
carry `tags` (`llava-lite data tag`), their coverage is reported too: distinct tags, tags per record, the commonest.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from llava_lite.data.conversation import IMAGE_PLACEHOLDER, Conversation

PERCENTILES = (50, 90, 99)
# Politeness and auxiliaries skipped to reach the instruction's real verb ("Could you please describe ...").
LEAD_FILLERS = {"please", "could", "can", "would", "will", "you", "kindly", "now", "also", "and", "so", "then"}
STOPWORDS = {
    "a", "an", "the", "this", "that", "these", "those", "is", "are", "was", "were", "be", "do", "does", "did",
    "of", "in", "on", "at", "to", "for", "with", "by", "from", "it", "its", "me", "my", "your", "you", "i", "we",
    "there", "some", "any", "what", "which", "who", "how", "why", "where", "when", "kind", "type", "sort", "s",
}  # fmt: skip
SHORT_WORDS, LONG_WORDS = 10, 80


@dataclass
class DatasetStats:
    records: int = 0
    skipped: Counter = field(default_factory=Counter)
    images: int = 0  # distinct image files
    with_images: int = 0
    turns: list[int] = field(default_factory=list)  # assistant turns per record
    tokens: list[int] = field(default_factory=list)  # text tokens per record (image tokens not included)
    answer_tokens: list[int] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)  # the record's metadata kind, where datagen wrote one
    answer_lengths: Counter = field(default_factory=Counter)  # short / medium / long answers
    lead_pairs: Counter = field(default_factory=Counter)
    instruction_words: list[int] = field(default_factory=list)
    distinct_bigram_ratio: float = 0.0
    # Tags (`data tag`'s, InsTag-style), where records carry a `tags` list: coverage of tasks and skills.
    tagged: int = 0
    tags: Counter = field(default_factory=Counter)  # tag -> records carrying it
    tags_per_record: list[int] = field(default_factory=list)  # of tagged records

    @property
    def text_only_share(self) -> float:
        return 1 - self.with_images / self.records if self.records else 0.0

    def as_dict(self) -> dict:
        tags = {}
        if self.tagged:
            tags = {
                "tags": {
                    "records_tagged": self.tagged,
                    "distinct": len(self.tags),
                    "per_record": _summary(self.tags_per_record),
                    "top": [[tag, n] for tag, n in self.tags.most_common(10)],
                }
            }
        return {
            "records": self.records,
            "skipped": dict(self.skipped),
            "images": self.images,
            "text_only_share": round(self.text_only_share, 4),
            "turns": _summary(self.turns),
            "tokens": _summary(self.tokens),
            "answer_tokens": _summary(self.answer_tokens),
            "kinds": dict(self.kinds.most_common()),
            "answer_lengths": dict(self.answer_lengths),
            "instructions": {
                "words": _summary(self.instruction_words),
                "distinct_lead_pairs": len(self.lead_pairs),
                "distinct_lead_pair_ratio": round(len(self.lead_pairs) / max(sum(self.lead_pairs.values()), 1), 4),
                "distinct_bigram_ratio": round(self.distinct_bigram_ratio, 4),
                "top_lead_pairs": [[" ".join(pair), n] for pair, n in self.lead_pairs.most_common(10)],
            },
            **tags,
        }


def describe(records: list[tuple[dict, Conversation]], tokenizer, skipped: Counter | None = None) -> DatasetStats:
    """Statistics of (raw record, parsed conversation) pairs; `tokenizer` counts text tokens."""
    stats = DatasetStats(records=len(records), skipped=skipped or Counter())
    images: set[str] = set()
    bigrams: Counter = Counter()
    texts = []  # every message's text, for one batched count
    for raw, conversation in records:
        images.update(conversation.images)
        stats.with_images += bool(conversation.images)
        metadata = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
        stats.kinds[metadata.get("kind", "unmarked")] += 1
        _count_tags(stats, raw.get("tags"))
        stats.turns.append(sum(m.role == "assistant" for m in conversation.messages))
        for message in conversation.messages:
            texts.append(_plain(message.content))
            if message.role == "assistant":
                words = len(message.content.split())
                stats.answer_lengths[
                    "short" if words < SHORT_WORDS else "long" if words > LONG_WORDS else "medium"
                ] += 1
            elif message.role == "user":
                words = _words(_plain(message.content))
                stats.instruction_words.append(len(words))
                pair = lead_pair(words)
                if pair is not None:
                    stats.lead_pairs[pair] += 1
                bigrams.update(zip(words, words[1:]))
    counts = iter(_token_counts(tokenizer, texts))
    for _, conversation in records:
        lengths = [(next(counts), m.role == "assistant") for m in conversation.messages]
        stats.tokens.append(sum(n for n, _ in lengths))
        stats.answer_tokens += [n for n, answer in lengths if answer]
    stats.images = len(images)
    stats.distinct_bigram_ratio = len(bigrams) / max(sum(bigrams.values()), 1)
    return stats


def _count_tags(stats: DatasetStats, tags) -> None:
    if not isinstance(tags, list):
        return
    distinct = {tag for tag in tags if isinstance(tag, str)}
    stats.tagged += 1
    stats.tags.update(distinct)
    stats.tags_per_record.append(len(distinct))


def lead_pair(words: list[str]) -> tuple[str, str] | None:
    """(leading word, first content word after it): `describe image`, `what man`, `how many`... None if empty."""
    rest = list(words)
    while rest and rest[0] in LEAD_FILLERS:
        rest.pop(0)
    if not rest:
        return None
    head, *tail = rest
    target = next((w for w in tail if w not in STOPWORDS and w not in LEAD_FILLERS), "-")
    return head, target


def table(stats: DatasetStats) -> str:
    data = stats.as_dict()
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(stats.skipped.items())) or "none"
    instructions = data["instructions"]
    rows = [
        ("records", f"{stats.records} (skipped: {skipped})"),
        ("images", f"{stats.images} distinct; text-only records {stats.text_only_share:.1%}"),
        ("turns per record", _format(data["turns"])),
        ("tokens per record", _format(data["tokens"]) + " (text only)"),
        ("tokens per answer", _format(data["answer_tokens"])),
        ("record kinds", ", ".join(f"{k} {v}" for k, v in data["kinds"].items()) or "-"),
        ("answers", ", ".join(f"{k} {stats.answer_lengths[k]}" for k in ("short", "medium", "long"))),
        ("instruction words", _format(instructions["words"])),
        (
            "lead word pairs",
            f"{instructions['distinct_lead_pairs']} distinct ({instructions['distinct_lead_pair_ratio']:.1%} of "
            f"instructions); distinct bigrams {instructions['distinct_bigram_ratio']:.1%}",
        ),
        ("top pairs", ", ".join(f"{pair} {n}" for pair, n in instructions["top_lead_pairs"]) or "-"),
    ]
    if stats.tagged:
        tags = data["tags"]
        rows += [
            (
                "tags",
                f"{tags['distinct']} distinct on {stats.tagged} tagged records ({stats.tagged / stats.records:.1%}); "
                f"per record {_format(tags['per_record'])}",
            ),
            ("top tags", ", ".join(f"{tag} {n}" for tag, n in tags["top"])),
        ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def plot(stats: DatasetStats, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'llava_lite[plot]'") from None
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].hist(stats.tokens, bins=40, color="tab:blue")
    axes[0].set(title="tokens per record", xlabel="tokens", ylabel="records")
    axes[1].hist(stats.turns, bins=range(1, max(stats.turns, default=1) + 2), color="tab:green", align="left")
    axes[1].set(title="turns per record", xlabel="turns", ylabel="records")
    top = stats.lead_pairs.most_common(15)[::-1]
    axes[2].barh([" ".join(pair) for pair, _ in top], [n for _, n in top], color="tab:orange")
    axes[2].set(title="most common lead word pairs", xlabel="instructions")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _plain(text: str) -> str:
    return text.replace(IMAGE_PLACEHOLDER, " ").strip()


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z][a-z']*", text.lower())


def _token_counts(tokenizer, texts: list[str], chunk: int = 4096) -> list[int]:
    counts = []
    for start in tqdm(range(0, len(texts), chunk), desc="tokens", unit="chunk", disable=len(texts) <= chunk):
        ids = tokenizer(texts[start : start + chunk], add_special_tokens=False)["input_ids"]
        counts += [len(row) for row in ids]
    return counts


def _summary(values: list[int]) -> dict:
    if not values:
        return {"mean": 0, **{f"p{p}": 0 for p in PERCENTILES}, "max": 0}
    array = np.asarray(values)
    percentiles = np.percentile(array, PERCENTILES)
    return {
        "mean": round(float(array.mean()), 1),
        **{f"p{p}": round(float(v), 1) for p, v in zip(PERCENTILES, percentiles)},
        "max": int(array.max()),
    }


def _format(summary: dict) -> str:
    parts = [f"mean {summary['mean']:g}"] + [f"p{p} {summary[f'p{p}']:g}" for p in PERCENTILES]
    return ", ".join(parts + [f"max {summary['max']}"])
