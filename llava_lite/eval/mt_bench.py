"""MT-Bench-style multi-turn judged scores (single-answer grading): every turn of every question answered by the
model in the context of its own earlier answers, each answer scored 1-10 by a judge model; means per turn, per
category and overall.

The judge sees the question (for a later turn, the whole conversation so far, and is asked about the last answer),
and, for the categories whose answers are right or wrong (`REFERENCE_CATEGORIES`: math, reasoning, coding), the
question's reference answers. Its reply must end with the score as `[[N]]` (N from 1 to 10, a decimal allowed). A
reply without one, or with two different ones, is counted as `unparsable` and left out of the means - never read
as a 0 - and is asked again by the next run. A turn the model could not be asked (`llava_lite.eval.turns`) is
counted as `unanswered`. The rubric is MT-Bench's, in our words.

Beside the results (`--out RESULTS.json`) the evaluation keeps `RESULTS.mt_bench.answers.journal` and
`RESULTS.mt_bench.judgements.journal` (see `llava_lite.eval.turns` and `llava_lite.eval.judge_calls`: a rerun
reuses what they hold), and writes for people `RESULTS.mt_bench.answers.jsonl` (each question's turns and
answers) and `RESULTS.mt_bench.judgements.jsonl` (each judge prompt as sent, the reply, the score).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from llava_lite.data.writing import write_records
from llava_lite.eval.judge_calls import OK, UNPARSABLE, JudgeSettings, JudgeTask, ask_judge, judged_files, user_message
from llava_lite.eval.prompt_files import MtBenchQuestion
from llava_lite.eval.turns import Dialogue, LazyGenerator, answer_dialogues
from llava_lite.llm.journal import Journal

REFERENCE_CATEGORIES = ("math", "reasoning", "coding")
UNANSWERED = "unanswered"
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")

SYSTEM = "You are a fair and careful judge of the answers AI assistants give."
_WHAT_COUNTS = (
    "Weigh how helpful, relevant, correct, thorough and clear the answer is, and how well it does what the user "
    "asked; length by itself earns nothing."
)
_REFERENCE_NOTE = (
    " A reference answer is shown too: check the assistant's answer against it and find its mistakes. For a "
    "question with a right answer, a wrong result outweighs everything else."
)
_VERDICT_FORMAT = (
    "First explain your judgement in a few sentences, staying objective. Then, on the last line, give the score "
    "from 1 (useless) to 10 (excellent) in double square brackets, exactly in this form: Score: [[7]]"
)


def run_mt_bench(
    questions: list[MtBenchQuestion],
    load_generator: Callable[[], object],
    model: str,
    judge: JudgeSettings,
    results_path: str | Path,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Answer (what the journal lacks), judge (what has no score yet), summarise. `load_generator` is called only
    when an answer has to be generated; `model` is the model's identity (`llava_lite.eval.turns.model_identity`)."""
    files = judged_files(results_path, "mt_bench")
    dialogues = [Dialogue(q.question_id, q.turns, q.images, f"MT-Bench question {q.question_id}") for q in questions]
    answers_journal = Journal.open(files["answers_journal"], {"evaluation": "mt_bench", "kept": "answers"})
    try:
        answers, answered = answer_dialogues(
            LazyGenerator(load_generator), dialogues, answers_journal, model, max_new_tokens, batch_size, progress
        )
    finally:
        answers_journal.close()
    write_records(files["answers"], [_answers_record(q, answers, answered.unanswered) for q in questions])
    tasks, asked = [], {}
    for question in questions:
        for turn in range(len(answers[question.question_id])):
            key = f"{question.question_id}#{turn + 1}"
            tasks.append(JudgeTask(key, grading_messages(question, answers[question.question_id], turn, judge.images)))
            asked[key] = (question, turn)
    judgements_journal = Journal.open(files["judgements_journal"], {"evaluation": "mt_bench", "kept": "judgements"})
    try:
        entries, judged = ask_judge(tasks, judge, judgements_journal, parse_rating, progress)
    finally:
        judgements_journal.close()
    rows = [_judgement_record(task, *asked[task.key], entries[task.key], judge.images) for task in tasks]
    write_records(files["judgements"], rows)
    for question in questions:  # turns never asked: in the counts, beside the turns judged
        for turn in range(len(answers[question.question_id]), len(question.turns)):
            rows.append({"category": question.category, "turn": turn + 1, "score": None, "status": UNANSWERED})
    summary = summarize_ratings(rows)
    summary["questions"] = len(questions)
    summary["answers"] = {"generated": answered.generated, "reused": answered.reused}
    summary["judge"] = judged.as_dict()
    summary["files"] = {name: str(path) for name, path in files.items()}
    return summary


def _answers_record(question: MtBenchQuestion, answers: dict[str, list[str]], unanswered: dict[str, str]) -> dict:
    prefix = f"{question.question_id}#"
    return {
        "question_id": question.question_id,
        "category": question.category,
        "turns": question.turns,
        "answers": answers[question.question_id],
        "unanswered": {key: why for key, why in unanswered.items() if key.startswith(prefix)},
    }


def _judgement_record(task: JudgeTask, question: MtBenchQuestion, turn: int, entry: dict, sent_images: bool) -> dict:
    return {
        "question_id": question.question_id,
        "category": question.category,
        "turn": turn + 1,
        "score": entry["verdict"],
        "status": entry["status"],
        "prompt": text_of(task.messages),
        "images_sent": question.images if sent_images else [],
        "reply": entry.get("reply"),
    }


def grading_messages(question: MtBenchQuestion, answers: list[str], turn: int, send_images: bool = False) -> list[dict]:
    """The judge's request for the answer to turn `turn` (0-based): the rubric, the question or the conversation
    up to that answer, and the reference answers where the category needs them."""
    references = question.references if question.category in REFERENCE_CATEGORIES else []
    if turn == 0:
        task = "Judge the answer an AI assistant gave to the user's question below."
        shown = f"[Question]\n{question.turns[0]}\n[End of question]\n\n"
        if references:
            shown += f"[Reference answer]\n{references[0]}\n[End of reference answer]\n\n"
        shown += f"[The assistant's answer]\n{answers[0]}\n[End of the assistant's answer]"
    else:
        task = (
            "Below is a conversation between a user and an AI assistant. Judge only the assistant's last answer, "
            f"to question {turn + 1}, in the light of the conversation before it."
        )
        lines = []
        for index in range(turn + 1):
            lines += [f"User (question {index + 1}):\n{question.turns[index]}", f"Assistant:\n{answers[index]}"]
        shown = "[Conversation]\n" + "\n\n".join(lines) + "\n[End of conversation]"
        if references:
            given = [f"To question {i + 1}:\n{r}" for i, r in enumerate(references[: turn + 1])]
            shown += "\n\n[Reference answers]\n" + "\n\n".join(given) + "\n[End of reference answers]"
    instruction = f"{task} {_WHAT_COUNTS}{_REFERENCE_NOTE if references else ''} {_VERDICT_FORMAT}"
    text = f"{instruction}\n\n{shown}{_images_note(question, send_images)}"
    return [{"role": "system", "content": SYSTEM}, user_message(text, question.images, send_images)]


def parse_rating(reply: str) -> float | None:
    """The score in `[[N]]`, 1 <= N <= 10; None when there is none, when two differ, or when it is out of range."""
    found = {float(value) for value in _RATING.findall(reply)}
    if len(found) != 1:
        return None
    (score,) = found
    return score if 1 <= score <= 10 else None


def summarize_ratings(rows: list[dict]) -> dict:
    """Rows with `category`, `turn`, `score` (None when not judged) and `status`: mean scores overall, per turn,
    per category (and its turns); counts of what was judged, unparsable, unanswered (the model could not be asked
    the turn) and failed (the judge's request failed or was refused)."""
    scored = [row for row in rows if row["score"] is not None]
    by_turn: dict[int, list[float]] = defaultdict(list)
    by_category: dict[str, list[dict]] = defaultdict(list)
    for row in scored:
        by_turn[row["turn"]].append(row["score"])
        by_category[row["category"]].append(row)
    categories = {}
    for name, group in sorted(by_category.items()):
        turns: dict[int, list[float]] = defaultdict(list)
        for row in group:
            turns[row["turn"]].append(row["score"])
        categories[name] = {
            "score": _mean([row["score"] for row in group]),
            "turns": {str(turn): _mean(values) for turn, values in sorted(turns.items())},
            "count": len(group),
        }
    return {
        "score": _mean([row["score"] for row in scored]),
        "turns": {str(turn): _mean(values) for turn, values in sorted(by_turn.items())},
        "by_category": categories,
        "judged": len(scored),
        "unparsable": sum(1 for row in rows if row["status"] == UNPARSABLE),
        "unanswered": sum(1 for row in rows if row["status"] == UNANSWERED),
        "failed": sum(1 for row in rows if row["score"] is None and row["status"] not in (OK, UNPARSABLE, UNANSWERED)),
    }


def table_rows(summary: dict) -> list[tuple[str, str]]:
    """Lines of the `eval` table: the overall score, per turn, per category."""
    rows = [
        (
            "MT-Bench score",
            f"{_shown(summary['score'])} / 10  ({summary['judged']} judged, {summary['unparsable']} unparsable, "
            f"{summary['unanswered']} unanswered, {summary['failed']} failed)",
        )
    ]
    rows += [(f"  turn {turn}", _shown(score)) for turn, score in summary["turns"].items()]
    rows += [(f"  {name}", f"{_shown(c['score'])}  ({c['count']})") for name, c in summary["by_category"].items()]
    return rows


def text_of(messages: list[dict]) -> str:
    """A request's messages as text, for people (images named by the prompt, not inlined)."""
    parts = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = "\n".join(part["text"] for part in content if part.get("type") == "text")
        parts.append(f"<{message['role']}>\n{content}")
    return "\n\n".join(parts)


def _images_note(question: MtBenchQuestion, sent: bool) -> str:
    if not question.images:
        return ""
    count = len(question.images)
    if sent:
        return f"\n\nThe user's first question came with the {count} image(s) shown above."
    return (
        f"\n\nThe user's first question came with {count} image(s), which you cannot see: judge the answer as far "
        "as the text allows."
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
