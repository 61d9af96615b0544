"""`data rate --scorer judge|self`: each record's `quality`, the judge rubric's score (`llava_lite.rewards.rubric`:
helpfulness and faithfulness, 1-10 each, their mean), through the same judges and journal as `data score`.

A record is one request: its question and its answer - for a record of several turns, the user turns and the
assistant turns each written out as "Turn 1: ...", so the judge sees every answer beside what it answers. The
`judge` scorer (an LLM through `llava_lite.llm`) sees what the record says about its image (`captions`,
`instances`), the `self` scorer (the run) sees the images themselves. The requests go through `data score`'s
judging (`llava_lite.improve.score.score_by_judge`) as one-candidate lines, so the replies are journaled beside OUT
(`OUT_STEM.judged.jsonl.journal`) one batch at a time: a killed or failed run, run again, asks only for what the
journal lacks or has as a failure. A request's key holds a hash of its text, so a changed record is asked again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llava_lite.curate.records import CurateRecord
from llava_lite.data.conversation import IMAGE_PLACEHOLDER
from llava_lite.data.writing import write_lines_atomically


def question_and_answer(record: CurateRecord) -> tuple[str, str]:
    """The record's instruction and its answer as the judge reads them (see the module doc)."""
    turns = [m for m in record.conversation.messages if m.role != "system"]
    questions = [m.content.replace(IMAGE_PLACEHOLDER, "").strip() for m in turns if m.role == "user"]
    answers = [m.content.strip() for m in turns if m.role == "assistant"]
    if len(questions) <= 1 and len(answers) == 1:
        return (questions[0] if questions else ""), answers[0]
    return _numbered(questions), _numbered(answers)


def _numbered(texts: list[str]) -> str:
    return "\n".join(f"Turn {number}: {text}" for number, text in enumerate(texts, 1))


def judge_line(number: int, record: CurateRecord) -> dict:
    """The record as a one-candidate `data sample` line: what the judges' request builders read."""
    question, answer = question_and_answer(record)
    key = hashlib.sha1(json.dumps([question, answer, record.conversation.images]).encode()).hexdigest()[:12]
    line = {"id": f"{number}:{key}", "prompt": question, "images": record.conversation.images}
    line |= {field: record.raw[field] for field in ("captions", "instances") if field in record.raw}
    return {**line, "candidates": [{"text": answer}]}


def judged_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.judged.jsonl")


def rate_quality(
    records: list[CurateRecord],
    settings,
    out: str | Path,
    image_folder: str | Path,
    device: str = "auto",
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> tuple[int, list[str]]:
    """Adds `quality` (None where the judge gave no score) to every record's fields; `settings` is the scorer's
    `llava_lite.improve.config.ScoreSettings` (for `self`, its model is the run). Returns how many requests failed
    (a rerun asks them again) and the judging report's lines."""
    from llava_lite.improve.judges import judge_for
    from llava_lite.improve.score import score_by_judge, settings_for_journal

    judged = judged_path(out)
    requests = judged.with_name(f"{Path(out).stem}.judge_requests.jsonl")
    if judged.exists() and not Path(f"{judged}.journal").exists():
        judged.unlink()  # a finished judging's output, left by a run stopped before it cleaned up
    write_lines_atomically(requests, [json.dumps(judge_line(n, r)) for n, r in enumerate(records)])
    backend, messages_for = judge_for(settings, image_folder, device, trust_remote_code)
    journal = settings_for_journal(scorer=settings.scorer, model=settings.model, url=settings.base_url)
    report = score_by_judge(requests, judged, backend, messages_for, journal, overwrite)
    lines = [json.loads(line) for line in judged.read_text(encoding="utf-8").splitlines() if line.strip()]
    for record, line in zip(records, lines):
        record.raw["quality"] = line["candidates"][0].get("score")
    requests.unlink()
    if not report.failed:
        judged.unlink()  # the journal is gone too: everything is in OUT now
    return report.failed, report.lines()
