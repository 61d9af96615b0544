"""`llava-lite data score`: a score per candidate of a `data sample` file, by a chosen scorer.

- `reference`: agreement with the line's `reference` answer (or `references` / `answers`, the best of them), after
  VQAv2's normalisation (case, punctuation, articles, number words): `exact` match (1 or 0, the default),
  `contains` (1 when the reference's words appear in order, as a run, in the candidate's) or token `f1` (SQuAD's).
- `judge`: an LLM through datagen's backends (`openai`, `hf`) scores the rubric (`llava_lite.improve.rubric`),
  given the line's captions and boxes; retries are the backend's.
- `self`: the run that sampled judges its own candidates on the same rubric, seeing the image (Self-Rewarding),
  loaded here or served (`llava-lite serve`) behind an OpenAI-compatible URL.
A judged candidate's score is the mean of the rubric's two axes; a reply without both is `no_score`, a request
the backend failed after its retries `backend_error`: both leave the candidate unscored (`score: null`). Judged
scores go to `OUT.journal` (datagen's journal) one batch at a time, so a kill loses nothing; a rerun asks only for
what the journal lacks or has as a backend error.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from llava_lite.data.formats import read_json_objects
from llava_lite.data.writing import write_records
from llava_lite.datagen.backends import BACKEND_ERROR, Backend, Request
from llava_lite.datagen.writer import Journal
from llava_lite.eval.vqa import normalize_answer
from llava_lite.improve import rubric
from llava_lite.improve.sample import check_output, journal_path

logger = logging.getLogger(__name__)

SCORERS = ("reference", "judge", "self")
MATCHES = ("exact", "contains", "f1")
NO_SCORE = "no_score"


@dataclass
class ScoreReport:
    prompts: int = 0
    candidates: int = 0
    scored: int = 0
    unscored: Counter = field(default_factory=Counter)  # by reason
    judged_now: int = 0  # requests this run sent (a resumed run sends only what was missing)
    tokens: Counter = field(default_factory=Counter)
    retries: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.unscored.items())) or "none"
        lines = [
            f"prompts: {self.prompts}, candidates: {self.candidates}, scored: {self.scored}",
            f"unscored: {sum(self.unscored.values())} ({reasons})",
        ]
        if self.tokens or self.judged_now:
            causes = ", ".join(f"{k} {v}" for k, v in sorted(self.retries.items()))
            lines.append(
                f"judge: {self.judged_now} requests now, tokens {self.tokens['prompt_tokens']} prompt, "
                f"{self.tokens['completion_tokens']} completion; retries {sum(self.retries.values())}"
                + (f" ({causes})" if causes else "")
            )
        return lines


# ----- reference -------------------------------------------------------------------------------------------------


def reference_score(candidate: str, references: list[str], match: str = "exact") -> float:
    """The candidate's agreement with its best reference, from 0 to 1 (see the module doc for `match`)."""
    if match not in MATCHES:
        raise ValueError(f"unknown match {match!r}; choose from {', '.join(MATCHES)}")
    words = normalize_answer(candidate).split()
    best = 0.0
    for reference in references:
        wanted = normalize_answer(reference).split()
        if match == "exact":
            value = float(words == wanted)
        elif match == "contains":
            size = len(wanted)
            value = float(any(words[i : i + size] == wanted for i in range(len(words) - size + 1)) and size > 0)
        else:
            value = _token_f1(words, wanted)
        best = max(best, value)
    return best


def _token_f1(words: list[str], wanted: list[str]) -> float:
    common = sum((Counter(words) & Counter(wanted)).values())
    if not words or not wanted or not common:
        return float(words == wanted)
    precision, recall = common / len(words), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def references_of(row: dict, where: str) -> list[str]:
    value = row.get("reference", row.get("references", row.get("answers")))
    values = value if isinstance(value, list) else [value]
    values = [v.get("answer") if isinstance(v, dict) else v for v in values]
    if not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}: the reference scorer needs a `reference` answer (or `references`) on every line")
    return values


def score_by_reference(input_path: str | Path, output_path: str | Path, match: str = "exact") -> ScoreReport:
    report = ScoreReport()
    rows = []
    for where, row in _sampled_rows(input_path):
        references = references_of(row, where)
        for candidate in row["candidates"]:
            candidate["score"] = reference_score(candidate["text"], references, match)
        _count(report, row)
        rows.append(row)
    write_records(output_path, rows)
    return report


# ----- judge and self ---------------------------------------------------------------------------------------------


MessagesFor = Callable[[dict, str], list[dict]]  # (row, candidate text) -> the judge's chat messages


def score_by_judge(
    input_path: str | Path,
    output_path: str | Path,
    backend: Backend,
    messages_for: MessagesFor,
    settings: dict,
    overwrite: bool = False,
) -> ScoreReport:
    """Every candidate judged through `backend` (requests built by `messages_for`), journaled; see the module doc.
    `settings` say what decides the scores (scorer, judge model): a journal left with others is not resumed."""
    input_path, output_path = Path(input_path), Path(output_path)
    check_output(input_path, output_path, overwrite)
    rows = [row for _, row in _sampled_rows(input_path)]
    journal = Journal.open(journal_path(output_path), settings, fresh=overwrite)
    report = ScoreReport()
    todo = [
        Request(key, "judge", messages_for(row, candidate["text"]), None)
        for row in rows
        for key, candidate in _keyed(row)
        if journal.entries.get(key, {}).get("status") not in ("ok", NO_SCORE)
    ]
    chunks = [todo[start : start + backend.batch_size] for start in range(0, len(todo), backend.batch_size)]
    try:
        with ThreadPoolExecutor(max_workers=max(1, backend.concurrency), thread_name_prefix="judge") as pool:
            for requests, replies in zip(chunks, pool.map(backend.complete, chunks)):
                journal.append(_entry(request, reply) for request, reply in zip(requests, replies))
                report.judged_now += len(requests)
    finally:
        journal.close()
        backend.close()
    failed = 0
    for row in rows:
        for key, candidate in _keyed(row):
            entry = journal.entries[key]
            report.tokens.update(entry["usage"])
            report.retries.update(entry["retries"])
            candidate["score"] = entry.get("score")
            if entry["status"] == "ok":
                candidate["axes"] = entry["axes"]
            else:
                candidate["error"] = entry["status"]
                failed += entry["status"] == BACKEND_ERROR
        _count(report, row)
    write_records(output_path, rows)
    if not failed:
        journal.remove()  # else kept: the next run asks again for what failed
    return report


def _entry(request: Request, reply) -> dict:
    entry = {
        "key": request.key,
        "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens},
        "retries": dict(reply.retries),
    }
    if reply.error == BACKEND_ERROR:
        return {**entry, "status": BACKEND_ERROR, "detail": reply.detail}
    axes = rubric.parse_rubric(reply.text) if reply.error is None else None
    if axes is None:
        return {**entry, "status": NO_SCORE, "reply": reply.text, "detail": reply.error or "no rubric scores"}
    return {**entry, "status": "ok", "axes": axes, "score": sum(axes.values()) / len(axes)}


def judge_messages(row: dict, answer: str) -> list[dict]:
    """A text-only judge's request: the rubric, what the line says about its image, the question, the answer."""
    text = rubric.judge_text(last_question(row), answer, rubric.context_of(row), sees_image=False)
    return [{"role": "system", "content": rubric.SYSTEM}, {"role": "user", "content": text}]


def last_question(row: dict) -> str:
    """The prompt's last user turn as text (its image parts left out)."""
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    for message in reversed(row.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content)
    return ""


# ----- shared -----------------------------------------------------------------------------------------------------


def _sampled_rows(path: str | Path) -> Iterator[tuple[str, dict]]:
    for where, row in read_json_objects(path, "samples"):
        candidates = row.get("candidates")
        if not isinstance(candidates, list) or not all(isinstance(c, dict) and "text" in c for c in candidates):
            raise ValueError(f"{where}: not a `data sample` line (needs `candidates`, each with `text`)")
        yield where, row


def _keyed(row: dict) -> Iterator[tuple[str, dict]]:
    for index, candidate in enumerate(row["candidates"]):
        yield f"{row['id']}#{index}", candidate


def _count(report: ScoreReport, row: dict) -> None:
    report.prompts += 1
    for candidate in row["candidates"]:
        report.candidates += 1
        if candidate.get("score") is None:
            report.unscored[candidate.get("error", NO_SCORE)] += 1
        else:
            report.scored += 1


def settings_for_journal(**values) -> dict:
    return json.loads(json.dumps(values))
