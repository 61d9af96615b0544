"""The loop's steps, one call each from their settings: what `data sample`, `data score` and `data pairs` run, and
what `improve` runs for them in every round - so that a step run by hand and a step run by the loop are the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from llava_lite.data.writing import write_lines_atomically, write_records
from llava_lite.improve.config import ScoreSettings
from llava_lite.improve.judges import judge_for
from llava_lite.improve.pairs import PairSettings, PairSummary, build_pairs
from llava_lite.improve.sample import SampleReport, SampleSettings, check_output, journal_path, sample_file
from llava_lite.improve.score import (
    ScoreReport,
    score_by_judge,
    score_by_reference,
    score_by_reward_model,
    settings_for_journal,
)
from llava_lite.inference.generator import Generator
from llava_lite.model.config import LanguageModelConfig
from llava_lite.model.language_model import load_tokenizer


def sample_step(
    run: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    settings: SampleSettings,
    image_folder: str | Path | None = None,
    overwrite: bool = False,
    device: str = "auto",
    dtype: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> SampleReport:
    """`settings.samples` answers per prompt of `input_path` from the run folder `run`, into `output_path`."""
    check_output(Path(input_path), Path(output_path), overwrite)  # before the model loads
    if log is not None and journal_path(output_path).exists() and not overwrite:
        log(f"resuming from {journal_path(output_path)}")
    generator = Generator.from_folder(run, device, dtype, trust_remote_code)
    return sample_file(generator, input_path, output_path, settings, image_folder, overwrite, progress)


def score_step(
    input_path: str | Path,
    output_path: str | Path,
    settings: ScoreSettings,
    image_folder: str | Path | None = None,
    device: str = "auto",
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> ScoreReport:
    """A score for every candidate of a sampled file by `settings.scorer`; the judged scorers journaled (a rerun
    asks only for what is missing or failed). `image_folder` (the self and reward-model scorers' images) defaults to
    the input's."""
    if settings.scorer == "reference":
        return score_by_reference(input_path, output_path, settings.match)
    check_output(Path(input_path), Path(output_path), overwrite)  # before a judge loads for minutes
    folder = image_folder or str(Path(input_path).parent)
    if settings.scorer == "reward-model":
        if not settings.model:
            raise ValueError("score.scorer reward-model needs score.model: a run of recipe: reward")
        from llava_lite.eval.reward_model import load_reward_model

        reward_model = load_reward_model(settings.model, device, None, settings.batch_size, trust_remote_code)
        return score_by_reward_model(input_path, output_path, reward_model, folder)
    backend, messages_for = judge_for(settings, folder, device, trust_remote_code)
    journal = settings_for_journal(scorer=settings.scorer, model=settings.model, url=settings.base_url)
    return score_by_judge(input_path, output_path, backend, messages_for, journal, overwrite)


def pairs_step(
    input_path: str | Path,
    output_path: str | Path,
    settings: PairSettings,
    sft_path: str | Path | None = None,
    summary_path: str | Path | None = None,
    tokenizer_name: str | None = None,
) -> PairSummary:
    """Preference pairs (and, with `sft_path`, best-answer SFT records) from a scored file; the summary goes to
    `summary_path` last, so that it marks the step as done. `tokenizer_name` counts tokens for the diversity
    figures, left out without one."""
    tokenizer = load_tokenizer(LanguageModelConfig(name=tokenizer_name)) if tokenizer_name else None
    rows, sft, summary = build_pairs(str(input_path), settings, tokenizer)
    write_records(output_path, rows)
    if sft_path:
        write_records(sft_path, sft)
    if summary_path:
        write_lines_atomically(summary_path, [json.dumps(summary.as_dict(), indent=1)])
    return summary
