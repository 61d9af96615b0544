"""Pairwise win rates, AlpacaEval's and WildVision-Bench's way: our model and a baseline answer the same prompts, a
judge model compares each pair of answers, and we report how often ours is preferred.

The baseline is another run (it answers the prompts too) or a file of reference answers (`instruction`/`output`,
already answered). Each pair is judged twice, our answer shown first as A and then second as B, so that the
judge's liking for a position cancels; the judge ends its reply with `[[A]]`, `[[B]]` or `[[C]]` (a tie). The two
verdicts combine into a win (both prefer ours), a loss (both prefer the baseline's) or a tie (anything else), and
`llava_lite.eval.win_rate` turns the outcomes into the win rate (ties count half), the tie rate, the
length-controlled win rate and 95 % bootstrap intervals, overall and per category. A reply without exactly one of
the three verdicts is `unparsable`: the prompt is left out of the numbers (counted as `unjudged`, as is a prompt
the model could not be asked) and the next run asks again.

Beside the results (`--out RESULTS.json`) the evaluation keeps `RESULTS.versus.answers.journal` and
`RESULTS.versus.judgements.journal` (a rerun reuses them) and writes `RESULTS.versus.answers.jsonl` (each prompt's
two answers and its outcome) and `RESULTS.versus.judgements.jsonl` (each judge prompt as sent, the reply, the
verdict).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llava_lite.data.writing import write_records
from llava_lite.eval.judge_calls import JudgeSettings, JudgeTask, ask_judge, judged_files, user_message
from llava_lite.eval.mt_bench import SYSTEM, text_of
from llava_lite.eval.prompt_files import PairwisePrompt
from llava_lite.eval.turns import AnswerReport, Dialogue, LazyGenerator, answer_dialogues
from llava_lite.eval.win_rate import outcome_of, summarize_outcomes
from llava_lite.llm.journal import Journal

_PREFERENCE = re.compile(r"\[\[\s*([ABC])\s*\]\]")
ORDERS = ("ours_first", "ours_second")

_INSTRUCTION = (
    "Compare the answers two AI assistants, A and B, gave to the user's question below, and decide which is "
    "better. Weigh how helpful, relevant, correct, thorough and clear each answer is, and how well it does what "
    "the user asked. Do not let the order in which the answers appear, their length or the assistants' names "
    "sway you. First explain your comparison in a few sentences. Then, on the last line, give your verdict in "
    "double square brackets, exactly one of: [[A]] if A's answer is better, [[B]] if B's answer is better, "
    "[[C]] if they are equally good."
)


@dataclass
class Contender:
    """Who answers: a model loaded on first use (its identity from `llava_lite.eval.turns.model_identity`), or
    answers given in advance (a reference-answer file)."""

    name: str
    load_generator: Callable[[], object] | None = None
    identity: str = ""
    answers: list[str] | None = None


@dataclass
class VersusSettings:
    """A comparison of two runs as data (`llava-lite improve` can measure round N against round N-1 with it)."""

    prompts: str  # AlpacaEval- or WildVision-shaped prompts (see llava_lite.eval.prompt_files)
    judge: JudgeSettings
    image_folder: str | None = None  # the prompts' images (default: the prompts' folder)
    max_new_tokens: int = 512
    batch_size: int = 8
    limit: int | None = None
    seed: int = 0  # of the bootstrap intervals


def compare_runs(
    run: str | Path,
    baseline_run: str | Path,
    settings: VersusSettings,
    results_path: str | Path,
    device: str = "auto",
    generator=None,
    progress: bool = False,
) -> dict:
    """`run` against `baseline_run` on `settings.prompts`, each loaded only if it has answers to give (one at a
    time); `generator`, an inference Generator of `run` already loaded, is used instead of loading it again.
    Answers and verdicts are kept beside `results_path` (see the module doc)."""
    from llava_lite.eval.prompt_files import read_pairwise_prompts
    from llava_lite.eval.turns import model_identity
    from llava_lite.inference.generator import Generator

    prompts = read_pairwise_prompts(settings.prompts, settings.image_folder, settings.limit)
    ours = Contender(str(run), lambda: generator or Generator.from_folder(run, device), model_identity(run))
    baseline = Contender(
        str(baseline_run), lambda: Generator.from_folder(baseline_run, device), model_identity(baseline_run)
    )
    return run_versus(
        prompts, ours, baseline, settings.judge, results_path, settings.max_new_tokens, settings.batch_size,
        settings.seed, progress,
    )  # fmt: skip


def run_versus(
    prompts: list[PairwisePrompt],
    ours: Contender,
    baseline: Contender,
    judge: JudgeSettings,
    results_path: str | Path,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Answer (what the journal lacks), judge both orders (what has no verdict yet), combine, summarise."""
    files = judged_files(results_path, "versus")
    journal = Journal.open(files["answers_journal"], {"evaluation": "versus", "kept": "answers"})
    try:
        our_answers, mine = _answers(ours, "ours", prompts, journal, max_new_tokens, batch_size, progress)
        their_answers, theirs = _answers(baseline, "baseline", prompts, journal, max_new_tokens, batch_size, progress)
    finally:
        journal.close()
    generated, reused = mine.generated + theirs.generated, mine.reused + theirs.reused
    unanswered = {**mine.unanswered, **theirs.unanswered}
    tasks = []
    for prompt, mine, theirs in zip(prompts, our_answers, their_answers):
        if mine is None or theirs is None:
            continue  # a prompt the model could not be asked: counted as unjudged
        for order, (first, second) in (("ours_first", (mine, theirs)), ("ours_second", (theirs, mine))):
            messages = comparison_messages(prompt, first, second, judge.images)
            tasks.append(JudgeTask(f"{prompt.prompt_id}#{order}", messages))
    journal = Journal.open(files["judgements_journal"], {"evaluation": "versus", "kept": "judgements"})
    try:
        entries, judged = ask_judge(tasks, judge, journal, parse_preference, progress)
    finally:
        journal.close()
    write_records(
        files["judgements"],
        [
            {
                "key": task.key,
                "verdict": entries[task.key]["verdict"],
                "status": entries[task.key]["status"],
                "prompt": text_of(task.messages),
                "reply": entries[task.key].get("reply"),
            }
            for task in tasks
        ],
    )
    rows = []
    for prompt, mine, theirs in zip(prompts, our_answers, their_answers):
        first, second = (entries.get(f"{prompt.prompt_id}#{order}", {}).get("verdict") for order in ORDERS)
        rows.append(
            {
                "id": prompt.prompt_id,
                "category": prompt.category,
                "instruction": prompt.instruction,
                "ours": mine,
                "baseline": theirs,
                "length_difference": len(mine) - len(theirs) if mine is not None and theirs is not None else None,
                "verdict_ours_first": first,
                "verdict_ours_second": second,
                "outcome": outcome_of(first, second) if first and second else None,
            }
        )
    write_records(files["answers"], rows)
    summary = summarize_outcomes(rows, seed)
    both = [row for row in rows if row["outcome"] is not None]
    agreeing = sum(1 for row in both if _same_preference(row["verdict_ours_first"], row["verdict_ours_second"]))
    summary["consistency"] = agreeing / len(both) if both else None
    summary["prompts"] = len(prompts)
    summary["baseline"] = baseline.name
    summary["answers"] = {"generated": generated, "reused": reused, "unanswered": unanswered}
    summary["judge"] = judged.as_dict()
    summary["files"] = {name: str(path) for name, path in files.items()}
    return summary


def comparison_messages(prompt: PairwisePrompt, answer_a: str, answer_b: str, send_images: bool = False) -> list[dict]:
    """The judge's request: the instruction, the question, answer A then answer B."""
    text = (
        f"{_INSTRUCTION}\n\n[Question]\n{prompt.instruction}\n[End of question]\n\n"
        f"[Answer of assistant A]\n{answer_a}\n[End of answer A]\n\n"
        f"[Answer of assistant B]\n{answer_b}\n[End of answer B]"
    )
    if prompt.images:
        count = len(prompt.images)
        text += (
            f"\n\nThe question came with the {count} image(s) shown above."
            if send_images
            else f"\n\nThe question came with {count} image(s), which you cannot see: judge as far as the text allows."
        )
    return [{"role": "system", "content": SYSTEM}, user_message(text, prompt.images, send_images)]


def parse_preference(reply: str) -> str | None:
    """`A`, `B` or `C` from the reply's `[[X]]`; None when there is none or when two different ones appear."""
    found = set(_PREFERENCE.findall(reply))
    return found.pop() if len(found) == 1 else None


def table_rows(summary: dict) -> list[tuple[str, str]]:
    """Lines of the `eval` table: win rate with its interval, LC win rate, ties, per category."""
    rows = [
        (
            f"win rate vs {summary['baseline']}",
            f"{_percent(summary['win_rate'])}  95% CI {_interval(summary['win_rate_ci95'])}  "
            f"({summary['wins']} won, {summary['ties']} tied, {summary['losses']} lost, "
            f"{summary['unjudged']} unjudged)",
        ),
        (
            "  length-controlled",
            f"{_percent(summary['length_controlled_win_rate'])}  95% CI {_interval(summary['length_controlled_ci95'])}",
        ),
        ("  tie rate", _percent(summary["tie_rate"])),
        ("  judge consistency", f"{_percent(summary['consistency'])}  (both orders agree)"),
    ]
    for name, c in summary["by_category"].items():
        rows.append(
            (f"  {name}", f"{_percent(c['win_rate'])}  LC {_percent(c['length_controlled_win_rate'])}  ({c['judged']})")
        )
    return rows


def _answers(
    contender: Contender,
    side: str,
    prompts: list[PairwisePrompt],
    journal: Journal,
    max_new_tokens: int,
    batch_size: int,
    progress: bool,
) -> tuple[list[str | None], AnswerReport]:
    """One side's answers (None for a prompt it could not be asked), and what was generated or reused."""
    if contender.answers is not None:
        return list(contender.answers), AnswerReport()
    dialogues = [Dialogue(f"{side}/{p.prompt_id}", [p.instruction], p.images, f"prompt {p.prompt_id}") for p in prompts]
    generator = LazyGenerator(contender.load_generator)
    answers, report = answer_dialogues(
        generator, dialogues, journal, contender.identity, max_new_tokens, batch_size, progress
    )
    return [answers[d.key][0] if answers[d.key] else None for d in dialogues], report


def _same_preference(ours_first: str, ours_second: str) -> bool:
    """Both orders chose the same answer (A then B, or B then A), or both called it a tie."""
    return (ours_first, ours_second) in (("A", "B"), ("B", "A"), ("C", "C"))


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _interval(bounds: list[float] | None) -> str:
    return "n/a" if bounds is None else f"[{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]"
