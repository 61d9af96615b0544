"""InsTag-style tags of instruction data: what each instruction (each user turn) asks for, as open tags, and each
record's `tags` (its instructions' tags, normalised, without repeats) and `complexity` (how many there are).

Tags come from a tagger - `heuristic` (offline and deterministic: `llava_lite.curate.heuristic_tags`) or an LLM
(`llava_lite.curate.llm_tags`, journaled and resumable) - once per distinct instruction, then are normalised over
the whole data set so that one intention is one tag:
- case, punctuation and separators: `Image-Description` and `image description` are one tag;
- a simple lemma rule, no dictionary: plurals (-s, -es, -ies), -ing and -ed are stripped to compare words, and a tag
  is shown with the form its words take most often, base forms first (`images`, `image` -> `image`);
- synonyms merged by a small map (`SYNONYMS`: `photo`, `picture` -> `image`, `colour` -> `color`, ...); the merges
  made are listed in the summary;
- a frequency floor: a tag given to fewer than `min_count` instructions is dropped (InsTag's long tail of noise).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from llava_lite.data.conversation import IMAGE_PLACEHOLDER, Conversation

TAGGERS = ("heuristic", "openai", "hf")
NONE_FOUND = "none_found"  # an instruction the tagger read and found no tag for
# Words merged into one before tags are compared (stems of the keys match their inflections too: `photos`).
SYNONYMS = {
    "picture": "image",
    "photo": "image",
    "photograph": "image",
    "pic": "image",
    "snapshot": "image",
    "colour": "color",
    "depict": "describe",
    "portray": "describe",
    "quantity": "number",
    "amount": "number",
    "enumerate": "count",
    "recognize": "identify",
    "recognise": "identify",
    "analyse": "analyze",
    "summarise": "summarize",
}
WORD = re.compile(r"[a-z0-9]+")
# Words the lemma rule would misread as inflected.
KEEP_AS_WRITTEN = {"this", "his", "is", "was", "has", "does", "yes", "bus", "gas", "series", "species", "news"}


def stem(word: str) -> str:
    """A crude stem for comparing words: `images`, `image` -> `imag`; `running` -> `run`; `carried` -> `carry`."""
    if len(word) <= 3 or word in KEEP_AS_WRITTEN:
        return word
    for suffix in ("ing", "ed"):
        base = word[: -len(suffix)]
        if word.endswith(suffix) and len(base) >= 3 and re.search("[aeiouy]", base) and not word.endswith("eed"):
            if base[-1] == base[-2] and base[-1] not in "lsz":  # running -> run, stopped -> stop
                base = base[:-1]
            elif suffix == "ed" and base.endswith("i"):  # carried -> carry
                base = base[:-1] + "y"
            return _without_final_e(base)
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes", "zes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    return _without_final_e(word)


def _without_final_e(word: str) -> str:
    # describe / describing / described all meet at `describ`
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


_SYNONYM_STEMS = {stem(word): replacement for word, replacement in SYNONYMS.items()}


def tag_words(tag: str) -> list[tuple[str, str]]:
    """Each word of a tag as written (lowercased, punctuation and separators gone) and after the synonym map."""
    words = []
    for word in WORD.findall(tag.lower().replace("'", "")):
        replacement = _SYNONYM_STEMS.get(stem(word))
        words.append((word, word if replacement is None else replacement))
    return words


def instructions_of(conversation: Conversation) -> list[str]:
    """The record's user turns as text, image placeholders removed; empty turns left out."""
    turns = (m.content.replace(IMAGE_PLACEHOLDER, " ").strip() for m in conversation.messages if m.role == "user")
    return [turn for turn in turns if turn]


class TagVocabulary:
    """Raw tags to normalised ones, over a whole data set: `add` every instruction's tags, then `finish`."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()  # tag key (a tuple of stems) -> instructions given it
        self.forms: dict[str, Counter] = {}  # stem -> the words written for it, counted
        self.merged: Counter = Counter()  # (word, its synonym) -> times merged
        self.raw_distinct: set[str] = set()
        self.kept: dict[tuple, str] = {}  # tag key -> the tag shown, for tags over the floor

    def add(self, tags: list[str], times: int = 1) -> None:
        """One instruction's tags (`times`: how many instructions have this text)."""
        self.raw_distinct.update(tags)
        keys = []
        for tag in tags:
            words = tag_words(tag)
            for written, word in words:
                self.forms.setdefault(stem(word), Counter())[word] += times
                if written != word:
                    self.merged[(written, word)] += times
            keys.append(tuple(stem(word) for _, word in words))
        for key in dict.fromkeys(keys):  # a tag given twice to one instruction counts once
            if key:
                self.counts[key] += times

    def finish(self, min_count: int) -> None:
        self.kept = {key: self._shown(key) for key, count in self.counts.items() if count >= min_count}

    def normalised(self, tags: list[str]) -> list[str]:
        """An instruction's tags as kept: normalised, over the floor, in order, without repeats."""
        shown = (self.kept.get(tuple(stem(word) for _, word in tag_words(tag))) for tag in tags)
        return list(dict.fromkeys(tag for tag in shown if tag is not None))

    def _shown(self, key: tuple[str, ...]) -> str:
        return " ".join(min(self.forms[s].items(), key=lambda item: _form_rank(s, *item))[0] for s in key)


def _form_rank(word_stem: str, word: str, count: int) -> tuple:
    """Base forms first (`image` before `images`), then the most written, then the shortest."""
    inflected = stem(word) == word_stem and word not in (word_stem, word_stem + "e")
    return (inflected and word.endswith(("s", "ing", "ed")), -count, len(word), word)


@dataclass
class TagReport:
    records: int = 0
    instructions: int = 0
    distinct_instructions: int = 0
    untagged: Counter = field(default_factory=Counter)  # instructions without tags, by reason
    raw_tags: int = 0  # distinct tags as the tagger wrote them
    normalised_tags: int = 0  # distinct after normalising, before the floor
    kept_tags: Counter = field(default_factory=Counter)  # tag -> records carrying it
    merged: Counter = field(default_factory=Counter)
    complexity: list[int] = field(default_factory=list)
    min_count: int = 1
    tokens: Counter = field(default_factory=Counter)
    requests_now: int = 0  # LLM requests this run sent (a resumed run sends only what was missing)

    @property
    def to_ask_again(self) -> int:
        """Instructions the tagger failed on (the reply had no tags, the request failed): a rerun asks again."""
        return sum(count for reason, count in self.untagged.items() if reason != NONE_FOUND)

    def lines(self) -> list[str]:
        mean = sum(self.complexity) / len(self.complexity) if self.complexity else 0.0
        untagged = ", ".join(f"{reason} {n}" for reason, n in sorted(self.untagged.items()))
        merges = ", ".join(f"{word} -> {to} ({n})" for (word, to), n in sorted(self.merged.items()) if n)
        top = ", ".join(f"{tag} {n}" for tag, n in self.kept_tags.most_common(10))
        lines = [
            f"records: {self.records}; instructions: {self.instructions} ({self.distinct_instructions} distinct)"
            + (f"; untagged: {untagged}" if untagged else ""),
            f"tags: {self.raw_tags} as written, {self.normalised_tags} after normalising, {len(self.kept_tags)} "
            f"given to at least {self.min_count} instruction(s)",
            f"complexity (tags per record): mean {mean:.2f}, max {max(self.complexity, default=0)}",
            f"synonyms merged: {merges or 'none'}",
            f"top tags: {top or '-'}",
        ]
        if self.tokens or self.requests_now:
            lines.append(
                f"llm: {self.requests_now} requests this run; the replies used took {self.tokens['prompt_tokens']} "
                f"prompt and {self.tokens['completion_tokens']} completion tokens"
            )
        return lines


# Distinct instructions -> their raw tags, and the instructions it could not tag -> why (`no_tags`, ...).
Tagger = Callable[[list[str]], tuple[dict[str, list[str]], dict[str, str]]]


def tag_records(records: list, tagger: Tagger, min_count: int = 1, report: TagReport | None = None) -> TagReport:
    """Add `tags` and `complexity` to each record's `raw` (records with `raw` and `conversation`, as
    `llava_lite.curate.records` reads them); returns the report."""
    if min_count < 1:
        raise ValueError(f"--min-count must be at least 1, got {min_count}")
    report = report or TagReport()
    report.records, report.min_count = len(records), min_count
    per_record = [instructions_of(record.conversation) for record in records]
    occurrences = Counter(text for texts in per_record for text in texts)
    report.instructions, report.distinct_instructions = sum(occurrences.values()), len(occurrences)
    raw, failed = tagger(list(occurrences))
    vocabulary = TagVocabulary()
    for text, times in occurrences.items():
        if text in failed:
            report.untagged[failed[text]] += times
        elif not raw.get(text):
            report.untagged[NONE_FOUND] += times
        else:
            vocabulary.add(raw[text], times)
    vocabulary.finish(min_count)
    for record, texts in zip(records, per_record):
        tags = list(dict.fromkeys(tag for text in texts for tag in vocabulary.normalised(raw.get(text) or [])))
        record.raw["tags"], record.raw["complexity"] = tags, len(tags)
        report.kept_tags.update(tags)
        report.complexity.append(len(tags))
    report.raw_tags, report.normalised_tags = len(vocabulary.raw_distinct), len(vocabulary.counts)
    report.merged = vocabulary.merged
    return report


def heuristic_tagger(texts: list[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    from llava_lite.curate.heuristic_tags import heuristic_tags

    return {text: heuristic_tags(text) for text in texts}, {}
