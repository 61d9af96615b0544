"""`llava-lite data score`: a score per candidate of a `data sample` file, by a chosen scorer.

- `reference`: agreement with the line's `reference` answer (or `references` / `answers`, the best of them), after
  VQAv2's normalisation (case, punctuation, articles, number words): `exact` match (1 or 0, the default),
  `contains` (1 when the reference's words appear in order, as a run, in the candidate's) or token `f1` (SQuAD's).
- `judge`: an LLM through `llava_lite.llm`'s backends (`openai`, `hf`) scores the rubric
  (`llava_lite.rewards.rubric`), given the line's captions and boxes; retries are the backend's.
- `self`: the run that sampled judges its own candidates on the same rubric, seeing the image (Self-Rewarding),
  loaded here or served (`llava-lite serve`) behind an OpenAI-compatible URL.
- `reward-model`: a run of `recipe: reward` scores each candidate after its prompt and images
  (`llava_lite.eval.reward_model`); a candidate the model's context leaves no token of is unscored (`too_long`).
A judged candidate's score is the mean of the rubric's two axes; a reply without both is `no_score`, a request
the backend failed after its retries `backend_error`, a reply that is no chat completion `malformed_reply`: each
leaves the candidate unscored (`score: null`). Judged scores go to `OUT.journal` (`llava_lite.llm.journal`) one
batch at a time, so a kill loses nothing; a rerun asks only for what the journal lacks or has as a failure.
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
from llava_lite.improve.sample import check_output, journal_path
from llava_lite.llm.chat import FAILURES, Backend, ChatReply, ChatRequest
from llava_lite.llm.journal import Journal
from llava_lite.rewards import rubric
from llava_lite.rewards.reference import MATCHES as MATCHES  # the scorer's matches, as the improve config reads them
from llava_lite.rewards.reference import line_references, reference_score

logger = logging.getLogger(__name__)

SCORERS = ("reference", "judge", "self", "reward-model")
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

    @property
    def failed(self) -> int:
        """Candidates whose request failed (at the backend, or with a malformed reply): a rerun asks again."""
        return sum(self.unscored[reason] for reason in FAILURES)


# ----- reference -------------------------------------------------------------------------------------------------
# The scorer is the `reference` reward's (`llava_lite.rewards.reference`): one implementation of scoring an answer.


def references_of(row: dict, where: str) -> list[str]:
    """The line's known answers (`llava_lite.rewards.reference.line_references`); ValueError naming the line when
    it has none."""
    values = line_references(row)
    if values is None:
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


# ----- reward model -----------------------------------------------------------------------------------------------


def score_by_reward_model(
    input_path: str | Path, output_path: str | Path, reward_model, image_folder: str | Path
) -> ScoreReport:
    """Every candidate scored by `reward_model` (`llava_lite.eval.reward_model.RewardModel`), after its line's prompt,
    whose images resolve inside `image_folder`; a prompt's candidates go through the model together."""
    lines = list(_sampled_rows(input_path))
    rows = [row for _, row in lines]
    prompts = [row for row in rows for _ in row["candidates"]]
    texts = [candidate["text"] for row in rows for candidate in row["candidates"]]
    names = [where for where, row in lines for _ in row["candidates"]]
    scores = iter(reward_model.score(prompts, texts, image_folder, progress=True, names=names))
    report = ScoreReport()
    for row in rows:
        for candidate in row["candidates"]:
            candidate["score"] = next(scores)
            if candidate["score"] is None:
                candidate["error"] = "too_long"
        _count(report, row)
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
        ChatRequest(key, "judge", messages_for(row, candidate["text"]))
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
                failed += entry["status"] in FAILURES
        _count(report, row)
    write_records(output_path, rows)
    if not failed:
        journal.remove()  # else kept: the next run asks again for what failed
    return report


def _entry(request: ChatRequest, reply: ChatReply) -> dict:
    entry = {
        "key": request.key,
        "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens},
        "retries": dict(reply.retries),
    }
    if reply.failed:
        return {**entry, "status": reply.error, "detail": reply.detail}
    axes = rubric.parse_rubric(reply.text) if reply.error is None else None
    if axes is None:
        return {**entry, "status": NO_SCORE, "reply": reply.text, "detail": reply.error or "no rubric scores"}
    return {**entry, "status": "ok", "axes": axes, "score": sum(axes.values()) / len(axes)}


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
