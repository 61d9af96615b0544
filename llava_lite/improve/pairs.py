"""`llava-lite data pairs`: preference pairs and best-answer SFT records from a scored `data sample` file.

Per prompt, candidates without a score or without text (`empty_candidate`) are left out, and identical ones
(after VQAv2's normalisation) count once; a prompt with fewer than two distinct scored candidates gives no pair
(`too_few_scored`, `identical_candidates`). `best_worst` pairs the best candidate with the worst; `all` pairs every
two whose scores differ by at least the gap. RLAIF-V's filters follow: a pair needs a score gap above 0 (`tied`)
and at least `min_gap` (`small_gap`); the chosen answers must not simply be the longer ones - the length ratio
(chosen / rejected words) is reported, and `balance_length` drops pairs whose chosen answer is the longer one, the
longest-chosen first, until such pairs are no more than those whose chosen is the shorter (`length_balance`).
Pairs are TRL's conversational preference rows, which stage 3 reads; SFT records (rejection sampling) are
`{"id", "messages", "images"}` with each prompt's best candidate as the answer, when its score is at least
`sft_min_score`.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

from llava_lite.data.conversation import IMAGE_PLACEHOLDER, images_first
from llava_lite.data.formats import parse_record, read_json_objects
from llava_lite.data.stats import describe
from llava_lite.eval.vqa import normalize_answer

MODES = ("best_worst", "all")


@dataclass
class PairSettings:
    mode: str = "best_worst"
    min_gap: float = 0.0
    balance_length: bool = False
    sft_min_score: float | None = None  # None: every prompt's best, whatever its score

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown pairs mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.min_gap < 0:
            raise ValueError("min_gap must be 0 or more")


@dataclass
class PairSummary:
    prompts: int = 0
    pairs: int = 0
    sft_records: int = 0
    dropped: Counter = field(default_factory=Counter)  # by reason (prompts or pairs)
    candidates: int = 0
    distinct_candidates: int = 0
    score_mean: float | None = None
    score_spread: float | None = None  # mean over prompts of best minus worst
    length_ratio: float | None = None  # mean words of chosen / of rejected answers, over the kept pairs
    chosen_longer_share: float | None = None
    diversity: dict = field(default_factory=dict)  # `data stats`' instruction figures, and the chosen answers'

    def as_dict(self) -> dict:
        return {k: (dict(v) if isinstance(v, Counter) else v) for k, v in self.__dict__.items()}

    def lines(self) -> list[str]:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        spread = "-" if self.score_spread is None else f"{self.score_spread:.3f}"
        mean = "-" if self.score_mean is None else f"{self.score_mean:.3f}"
        ratio = "-" if self.length_ratio is None else f"{self.length_ratio:.2f}"
        longer = "-" if self.chosen_longer_share is None else f"{self.chosen_longer_share:.0%}"
        return [
            f"prompts: {self.prompts}, pairs kept: {self.pairs}, SFT records: {self.sft_records}",
            f"dropped: {sum(self.dropped.values())} ({dropped})",
            f"scores: mean {mean}, spread (best - worst, per prompt) {spread}",
            f"length: chosen / rejected words {ratio}, chosen the longer in {longer} of pairs",
            f"candidates: {self.candidates}, distinct {self.distinct_candidates} "
            f"({self.distinct_candidates / max(self.candidates, 1):.0%})",
            "diversity: " + ", ".join(f"{k} {v}" for k, v in self.diversity.items()),
        ]


def build_pairs(scored_path: str, settings: PairSettings, tokenizer=None) -> tuple[list[dict], list[dict], PairSummary]:
    """(TRL preference rows, SFT records, summary) from a scored file; `tokenizer` counts tokens for the
    diversity figures (`data stats`' describe), left out without one."""
    summary = PairSummary()
    pairs: list[tuple[dict, str, str, int]] = []  # (row, chosen, rejected, chosen minus rejected words)
    sft: list[dict] = []
    spreads, scores = [], []
    for where, row in read_json_objects(scored_path, "scored samples"):
        summary.prompts += 1
        candidates = _distinct_scored(row, where, summary)
        if candidates is None:
            continue
        scores += [score for _, score in candidates]
        ranked = sorted(candidates, key=lambda c: -c[1])  # stable: the first sampled of equals wins
        spreads.append(ranked[0][1] - ranked[-1][1])
        if settings.sft_min_score is None or ranked[0][1] >= settings.sft_min_score:
            sft.append(sft_record(row, ranked[0][0]))
        if len(candidates) < 2:
            continue
        chosen_rejected = [(ranked[0], ranked[-1])]
        if settings.mode == "all":
            chosen_rejected = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1 :]]
        for (chosen, high), (rejected, low) in chosen_rejected:
            gap = high - low
            if gap <= 0:
                summary.dropped["tied"] += 1
            elif gap < settings.min_gap:
                summary.dropped["small_gap"] += 1
            else:
                pairs.append((row, chosen, rejected, len(chosen.split()) - len(rejected.split())))
    if settings.balance_length:
        pairs = _balanced(pairs, summary)
    rows = [preference_row(row, chosen, rejected) for row, chosen, rejected, _ in pairs]
    summary.pairs, summary.sft_records = len(rows), len(sft)
    if scores:
        summary.score_mean = statistics.fmean(scores)
        summary.score_spread = statistics.fmean(spreads)
    if pairs:
        chosen_words = statistics.fmean(len(c.split()) for _, c, _, _ in pairs)
        rejected_words = statistics.fmean(len(r.split()) for _, _, r, _ in pairs)
        summary.length_ratio = chosen_words / rejected_words if rejected_words else None
        summary.chosen_longer_share = sum(d > 0 for *_, d in pairs) / len(pairs)
    if tokenizer is not None and sft:
        summary.diversity = _diversity(sft, tokenizer)
    return rows, sft, summary


def _distinct_scored(row: dict, where: str, summary: PairSummary) -> list[tuple[str, float]] | None:
    candidates = row.get("candidates")
    if not isinstance(candidates, list) or "id" not in row:
        raise ValueError(f"{where}: not a scored `data sample` line (needs `id` and `candidates`)")
    summary.candidates += len(candidates)
    summary.distinct_candidates += len({normalize_answer(str(c.get("text", ""))) for c in candidates})
    scored = [c for c in candidates if isinstance(c.get("score"), (int, float))]
    empty = [c for c in scored if not str(c.get("text", "")).strip()]
    if empty:  # stage 3 refuses an empty answer: left out, counted
        summary.dropped["empty_candidate"] += len(empty)
        scored = [c for c in scored if c not in empty]
    if not scored:
        summary.dropped["too_few_scored"] += 1
        return None
    if len(scored) == 1:
        summary.dropped["too_few_scored"] += 1
        return [(scored[0]["text"], float(scored[0]["score"]))]  # no pair, but still the prompt's best for SFT
    seen: dict[str, tuple[str, float]] = {}
    for candidate in scored:
        seen.setdefault(normalize_answer(candidate["text"]), (candidate["text"], float(candidate["score"])))
    if len(seen) < 2:
        summary.dropped["identical_candidates"] += 1
        # every candidate says the same: still the prompt's best answer for SFT, but no pair
        return [next(iter(seen.values()))]
    return list(seen.values())


def _balanced(pairs: list, summary: PairSummary) -> list:
    """Drop chosen-is-longer pairs, the most lopsided first, until they are no more than chosen-is-shorter ones."""
    shorter = sum(d < 0 for *_, d in pairs)
    longer = sorted((i for i, p in enumerate(pairs) if p[3] > 0), key=lambda i: -pairs[i][3])
    excess = max(0, len(longer) - shorter)
    drop = set(longer[:excess])
    summary.dropped["length_balance"] += len(drop)
    return [p for i, p in enumerate(pairs) if i not in drop]


def prompt_messages(row: dict) -> tuple[list[dict], list[str]]:
    """The line's prompt as chat messages ending on the user's turn (images as placeholders), and its images."""
    images = row.get("images", row.get("image")) or []
    images = [images] if isinstance(images, str) else list(images)
    if "messages" in row:
        return [dict(m) for m in row["messages"]], images
    prompt = row["prompt"]
    if IMAGE_PLACEHOLDER not in prompt:
        prompt = images_first(prompt, len(images))
    system = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []
    return [*system, {"role": "user", "content": prompt}], images


def preference_row(row: dict, chosen: str, rejected: str) -> dict:
    """TRL's conversational preference row."""
    prompt, images = prompt_messages(row)
    return {
        "id": str(row["id"]),
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "images": images,
    }


def sft_record(row: dict, answer: str) -> dict:
    prompt, images = prompt_messages(row)
    return {"id": str(row["id"]), "messages": [*prompt, {"role": "assistant", "content": answer}], "images": images}


def _diversity(records: list[dict], tokenizer) -> dict:
    parsed = [(record, parse_record(record, f"sft record {record['id']}")) for record in records]
    instructions = describe(parsed, tokenizer).as_dict()["instructions"]
    answers = [normalize_answer(r["messages"][-1]["content"]).split() for r in records]
    bigrams = Counter(pair for words in answers for pair in zip(words, words[1:]))
    return {
        "distinct_lead_pairs": instructions["distinct_lead_pairs"],
        "instruction_bigram_ratio": instructions["distinct_bigram_ratio"],
        "distinct_best_answers": len({" ".join(w) for w in answers}),
        "answer_bigram_ratio": round(len(bigrams) / max(sum(bigrams.values()), 1), 4),
    }
