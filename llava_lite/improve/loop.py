"""`llava-lite improve`: rounds of sample -> score -> pairs -> train -> evaluate, each round starting from the last
round's run, a table of rounds at the end, stopping early when the metric stops rising.

Every step leaves a file that appears whole when the step is done (`write_records`' temp file and rename), so a
killed loop, run again, skips the finished steps of the round it was in and continues the unfinished one: sampling
and judging from their journals, training from the run's newest checkpoint (`resume: auto`). Nothing of an earlier
round is done again. Round 0 is the start's evaluation.

A round's folder `output_dir/round_N` holds `samples.jsonl`, `scored.jsonl`, `pairs.jsonl`, `sft.jsonl`,
`pairs_summary.json`, the run `run/` (its `train.yaml` beside it) and `eval.json`; `output_dir/improve.json` is the
table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from llava_lite.config_io import ConfigError, from_dict, load_yaml
from llava_lite.data.writing import write_lines_atomically, write_records
from llava_lite.improve.config import ImproveConfig
from llava_lite.improve.pairs import build_pairs
from llava_lite.improve.sample import SampleSettings, journal_path, sample_file
from llava_lite.improve.score import score_by_judge, score_by_reference, settings_for_journal
from llava_lite.inference.generator import Generator
from llava_lite.train.config import TrainConfig, resolved
from llava_lite.train.resume import finished_step
from llava_lite.train.run import resume_checkpoint, run_training

logger = logging.getLogger(__name__)
SUMMARY_FILE = "improve.json"


@dataclass
class RoundResult:
    round: int
    start: str  # the run this round sampled from (round 0: the run evaluated)
    run: str
    pairs: int
    sft_records: int
    metric: float | None
    results: dict  # the evaluation's numbers, minus per-answer lists
    seconds: float


def load_improve_config(path: str | Path, overrides: list[str] | None = None) -> ImproveConfig:
    from llava_lite.config_io import apply_overrides

    return from_dict(ImproveConfig, apply_overrides(load_yaml(path), overrides or []), str(path))


def run_improve(config: ImproveConfig, log=print, callbacks: list | None = None) -> list[RoundResult]:
    """The loop (see the module doc); `callbacks` go to every round's training (transformers TrainerCallbacks)."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_inputs(config)
    rows = [_evaluated(config, 0, Path(config.start), Path(config.start), log, 0.0, 0, 0)]
    log(f"round 0 ({config.start}): {config.eval.metric} {_shown(rows[0].metric)}")
    best, stale = rows[0].metric, 0
    previous = Path(config.start)
    for number in range(1, config.rounds + 1):
        started = time.monotonic()
        folder = out / f"round_{number}"
        folder.mkdir(exist_ok=True)
        sampled = _sample(config, number, previous, folder, log)
        scored = _score(config, previous, sampled, folder, log)
        summary = _pairs(config, scored, folder, log)
        data = folder / ("pairs.jsonl" if config.train["recipe"] == "preference" else "sft.jsonl")
        if not summary["pairs" if config.train["recipe"] == "preference" else "sft_records"]:
            log(f"round {number}: nothing to train on ({data.name} is empty); stopping")
            break
        run = _train(config, number, previous, data, folder, log, callbacks)
        result = _evaluated(
            config, number, previous, run, log, time.monotonic() - started, summary["pairs"], summary["sft_records"]
        )
        rows.append(result)
        log(f"round {number}: {config.eval.metric} {_shown(result.metric)} (round 0: {_shown(rows[0].metric)})")
        _write_summary(out, config, rows)
        previous = run
        if result.metric is not None and (best is None or result.metric > best + config.min_improvement):
            best, stale = result.metric, 0
        else:
            stale += 1
            if stale >= config.patience:
                log(f"round {number}: {config.eval.metric} did not rise for {stale} round(s); stopping")
                break
    _write_summary(out, config, rows)
    log(table(rows, config.eval.metric))
    return rows


# ----- the steps -------------------------------------------------------------------------------------------------


def _sample(config: ImproveConfig, number: int, start: Path, folder: Path, log) -> Path:
    path = folder / "samples.jsonl"
    if path.exists() and not journal_path(path).exists():
        return path
    # Each round its own draws: the same seed every round would only re-ask what the last round settled.
    settings = SampleSettings(**{**asdict(config.sample), "seed": config.sample.seed + number})
    resumed = " (resuming from its journal)" if journal_path(path).exists() else ""
    log(f"round {number}: sampling {settings.samples} answers per prompt from {start}{resumed}")
    report = sample_file(_generator(start), config.prompts, path, settings, config.image_folder)
    if report.bad_lines:
        raise ValueError(f"{config.prompts}: {len(report.bad_lines)} bad line(s); first: {report.bad_lines[0]}")
    return path


def _score(config: ImproveConfig, start: Path, sampled: Path, folder: Path, log) -> Path:
    path = folder / "scored.jsonl"
    if path.exists() and not journal_path(path).exists():
        return path
    score = config.score
    log(f"{folder.name}: scoring with the {score.scorer} scorer")
    if score.scorer == "reference":
        report = score_by_reference(sampled, path, score.match)
    else:
        from llava_lite.improve.judges import judge_for

        if score.scorer == "self" and not score.base_url:
            score = dataclasses.replace(score, model=str(start))  # the run that sampled judges its own answers
        backend, messages_for = judge_for(score, config.image_folder or str(Path(config.prompts).parent))
        settings = settings_for_journal(scorer=score.scorer, model=score.model, url=score.base_url)
        report = score_by_judge(sampled, path, backend, messages_for, settings)
    for line in report.lines():
        log(f"  {line}")
    if report.unscored.get("backend_error"):
        raise ValueError(f"{path}: the judge failed some requests; run the loop again to retry them")
    return path


def _pairs(config: ImproveConfig, scored: Path, folder: Path, log) -> dict:
    summary_path = folder / "pairs_summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text(encoding="utf-8"))
    rows, sft, summary = build_pairs(str(scored), config.pairs)
    write_records(folder / "pairs.jsonl", rows)
    write_records(folder / "sft.jsonl", sft)
    for line in summary.lines()[:4]:
        log(f"  {line}")
    write_lines_atomically(summary_path, [json.dumps(summary.as_dict(), indent=1)])  # last: the step's mark
    return summary.as_dict()


def round_train_config(config: ImproveConfig, start: Path, data: Path, output: Path) -> dict:
    """The round's training config: the loop's `train` from `start` on the round's pairs (or SFT records)."""
    raw = json.loads(json.dumps(config.train))
    images = config.image_folder or str(Path(config.prompts).parent)
    raw["data"] = {**raw.get("data", {}), "sources": [{"path": str(data), "image_folder": images}]}
    return {**raw, "init_from": str(start), "output_dir": str(output), "resume": "auto"}


def _train(config: ImproveConfig, number: int, start: Path, data: Path, folder: Path, log, callbacks) -> Path:
    output = folder / "run"
    raw = round_train_config(config, start, data, output)
    text = yaml.safe_dump(raw, sort_keys=False)
    config_file = folder / "train.yaml"
    if not config_file.exists() or config_file.read_text(encoding="utf-8") != text + "\n":
        write_lines_atomically(config_file, [text])  # beside the run, for `llava-lite train` to rerun it
    train_config = from_dict(TrainConfig, raw, f"{folder}/train.yaml")
    if finished_step(resolved(train_config)) is not None:
        return output
    checkpoint = resume_checkpoint(train_config) if output.is_dir() else None
    where = f", continuing from {Path(checkpoint).name}" if checkpoint else ""
    log(f"round {number}: training ({raw['recipe']}) from {start} on {data.name}{where}")
    return run_training(train_config, callbacks)


def _evaluated(
    config: ImproveConfig, number: int, start: Path, run: Path, log, seconds: float, pairs: int, sft: int
) -> RoundResult:
    path = (Path(config.output_dir) / f"round_{number}") / "eval.json"
    if path.exists():
        return RoundResult(**json.loads(path.read_text(encoding="utf-8")))
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"round {number}: evaluating {run}")
    results = evaluate(config, run, path.parent)
    result = RoundResult(
        number, str(start), str(run), pairs, sft, metric_value(results, config.eval.metric), results, seconds
    )
    write_lines_atomically(path, [json.dumps(asdict(result), indent=1)])
    return result


def evaluate(config: ImproveConfig, run: Path, folder: Path) -> dict:
    """The round's numbers: held-out accuracy by the reference scorer, and the `eval` suite's results."""
    step = config.eval
    results: dict = {}
    generator = _generator(run)
    if step.held_out:
        greedy = SampleSettings(1, 0.0, 1.0, step.max_new_tokens, 0, step.batch_size)
        answers = folder / "held_out_answers.jsonl"
        images = step.image_folder or config.image_folder
        sample_file(generator, step.held_out, answers, greedy, images, overwrite=True)
        scored = folder / "held_out_scored.jsonl"
        score_by_reference(answers, scored, step.match)
        results["held_out"] = held_out_accuracy(scored, step.group_by)
    if step.suite is not None and step.suite.anything:
        from llava_lite.eval.suite import run_suite

        suite = run_suite(generator.model, step.suite, progress=False, generator=generator)
        results.update(_without_answer_lists(suite))
    return results


def held_out_accuracy(scored: Path, group_by: str) -> dict:
    """Mean score of the greedy answers, overall and by the lines' `group_by` field."""
    groups: dict[str, list[float]] = defaultdict(list)
    everything = []
    for line in scored.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        value = float(row["candidates"][0]["score"])
        everything.append(value)
        if row.get(group_by) is not None:
            groups[str(row[group_by])].append(value)
    return {
        "accuracy": sum(everything) / max(len(everything), 1),
        "count": len(everything),
        "by_category": {name: sum(v) / len(v) for name, v in sorted(groups.items())},
    }


def metric_value(results: dict, metric: str) -> float | None:
    """`results` at the dotted path `metric` ("held_out.accuracy", "vqa.by_category.corner.accuracy")."""
    value = results
    for key in metric.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ConfigError(f"eval.metric {metric!r}: the results have no {key!r} (they have {sorted(results)})")
        value = value[key]
    return float(value) if isinstance(value, (int, float)) else None


def table(rows: list[RoundResult], metric: str) -> str:
    lines = [f"{'round':>5}  {'pairs':>6}  {'sft':>5}  {metric:>20}  {'seconds':>8}  run"]
    for row in rows:
        lines.append(
            f"{row.round:>5}  {row.pairs:>6}  {row.sft_records:>5}  {_shown(row.metric):>20}  {row.seconds:>8.0f}  "
            f"{row.run}"
        )
    return "\n".join(lines)


# ----- helpers ----------------------------------------------------------------------------------------------------


def _check_inputs(config: ImproveConfig) -> None:
    for name, path in (("start", config.start), ("prompts", config.prompts), ("eval.held_out", config.eval.held_out)):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{name}: {path} does not exist")


def _generator(run: Path) -> Generator:
    return Generator.from_folder(run, device="auto")


def _without_answer_lists(results: dict) -> dict:
    cleaned = {}
    for name, value in results.items():
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in ("answers", "reviews")}
        cleaned[name] = value
    return cleaned


def _write_summary(out: Path, config: ImproveConfig, rows: list[RoundResult]) -> None:
    data = {"metric": config.eval.metric, "rounds": [asdict(row) for row in rows]}
    write_lines_atomically(out / SUMMARY_FILE, [json.dumps(data, indent=1)])


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
