"""`llava-lite improve`: rounds of sample -> score -> pairs -> train -> evaluate, each round starting from the last
round's run, a table of rounds at the end, stopping early when the metric stops rising.

Every step leaves a file that appears whole when the step is done (`write_records`' temp file and rename), so a
killed loop, run again, skips the finished steps of the round it was in and continues the unfinished one: sampling
and judging from their journals, training from the run's newest checkpoint (`resume: auto`). Nothing of an earlier
round is done again. Round 0 is the start's evaluation.

A round's folder `output_dir/round_N` holds `samples.jsonl`, `scored.jsonl`, `pairs.jsonl`, `sft.jsonl`,
`pairs_summary.json`, the run `run/` (its `train.yaml` beside it) and `eval.json`; `output_dir/improve.json` is the
table. With `curate:` set, the data trained on is curated first (`llava_lite.improve.curate_step`): `deduped.jsonl`,
`curated.jsonl`, `curate_summary.json`.
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
from llava_lite.data.writing import write_lines_atomically
from llava_lite.improve.config import ImproveConfig
from llava_lite.improve.curate_step import curate_step
from llava_lite.improve.sample import SampleSettings, journal_path, sample_file
from llava_lite.improve.score import score_by_reference
from llava_lite.improve.steps import pairs_step, score_step
from llava_lite.inference.generator import Generator
from llava_lite.train.config import TrainConfig
from llava_lite.train.run import prepare_run, run_training

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
        if config.curate is not None:
            data = curate_step(config, number, previous, data, folder, log)
            if data is None:
                log(f"round {number}: curation kept nothing to train on; stopping")
                break
        run = _train(config, number, previous, data, folder, log, callbacks)
        result = _evaluated(
            config, number, previous, run, log, time.monotonic() - started, summary["pairs"], summary["sft_records"]
        )
        rows.append(result)
        log(f"round {number}: {config.eval.metric} {_shown(result.metric)} (round 0: {_shown(rows[0].metric)})")
        _write_summary(out, config, rows)
        previous = run
        if _improved(config, result.metric, best):
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
    if score.scorer == "self" and not score.base_url:
        score = dataclasses.replace(score, model=str(start))  # the run that sampled judges its own answers
    report = score_step(sampled, path, score, config.image_folder or str(Path(config.prompts).parent))
    for line in report.lines():
        log(f"  {line}")
    if report.failed:
        raise ValueError(f"{path}: the judge failed some requests; run the loop again to retry them")
    return path


def _pairs(config: ImproveConfig, scored: Path, folder: Path, log) -> dict:
    summary_path = folder / "pairs_summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text(encoding="utf-8"))
    # The summary is written last: it marks the step as done.
    summary = pairs_step(scored, folder / "pairs.jsonl", config.pairs, folder / "sft.jsonl", summary_path)
    for line in summary.lines()[:4]:
        log(f"  {line}")
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
    run = prepare_run(from_dict(TrainConfig, raw, f"{folder}/train.yaml"))
    if run.finished_at is not None:
        return output
    where = f", continuing from {Path(run.checkpoint).name}" if run.checkpoint else ""
    log(f"round {number}: training ({raw['recipe']}) from {start} on {data.name}{where}")
    return run_training(run, callbacks)


def _evaluated(
    config: ImproveConfig, number: int, start: Path, run: Path, log, seconds: float, pairs: int, sft: int
) -> RoundResult:
    path = (Path(config.output_dir) / f"round_{number}") / "eval.json"
    if path.exists():
        return RoundResult(**json.loads(path.read_text(encoding="utf-8")))
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"round {number}: evaluating {run}")
    results = evaluate(config, run, path.parent, previous=start if number else None)
    result = RoundResult(
        number, str(start), str(run), pairs, sft, metric_value(results, config.eval.metric), results, seconds
    )
    write_lines_atomically(path, [json.dumps(asdict(result), indent=1)])
    return result


def evaluate(config: ImproveConfig, run: Path, folder: Path, previous: Path | None = None) -> dict:
    """The round's numbers: held-out accuracy by the reference scorer, the `eval` suite's results, and with
    `eval.versus` its win rate against `previous` (the run it started from; none for round 0)."""
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
    if step.versus is not None and previous is not None:
        from llava_lite.eval.versus import compare_runs

        results["versus"] = compare_runs(run, previous, step.versus, folder / "versus.json", generator=generator)
    return results


def _improved(config: ImproveConfig, metric: float | None, best: float | None) -> bool:
    """A round improves when its metric beats the best so far by `min_improvement`; a win rate against the round
    before (`eval.versus`) when it is above 0.5 by that much."""
    if metric is None:
        return False
    if config.eval.relative:
        return metric > 0.5 + config.min_improvement
    return best is None or metric > best + config.min_improvement


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
    if metric.startswith("versus.") and "versus" not in results:
        return None  # round 0 has no round before it to be compared with
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
