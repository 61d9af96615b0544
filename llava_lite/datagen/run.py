"""One datagen run from start to summary: `run_datagen(DatagenSettings)`, which `llava-lite datagen` calls.

The steps, in the order that keeps a mistake cheap: refuse a finished output, read the annotations, open the
journal (one left by a run with other settings is refused before a local model loads for minutes), build the
backend (and the judge's), run the tasks the journal still lacks, write the output and rejects. An interrupted or
partly failed run leaves its journal, and the same settings resume it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from llava_lite.data.annotations import InputReport, load_annotations
from llava_lite.datagen.filters import DEFAULT_BOUNDS, Bounds
from llava_lite.datagen.pipeline import Judge, Settings, Summary, TaskRunner, build_tasks, finish, pending_tasks
from llava_lite.datagen.prompts import JUDGE, KINDS, PromptSet, fingerprint, load_prompts
from llava_lite.llm.backends import BackendSettings, build_backend
from llava_lite.llm.chat import Backend
from llava_lite.llm.journal import Journal

TEMPLATE = "template"  # the offline backend: no LLM, replies built from the annotations


@dataclass
class DatagenSettings:
    """What a datagen run is asked for (the command's flags). `llm` None is the offline template backend, which
    cannot judge: `judge` needs an `llm`."""

    annotations: list[str]  # COCO captions or instances JSON, or captions-and-boxes records, in the order given
    out: Path  # .json (a list, like LLaVA's) or .jsonl
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    images_dir: str | None = None  # check every image exists here
    limit: int | None = None  # use only the first N usable images
    prompts_dir: str | None = None  # a folder of KIND.yaml prompt files replacing the built-in ones
    rejects: Path | None = None  # None: OUT_STEM.rejects.jsonl beside `out`
    overwrite: bool = False  # start again even if `out` or an unfinished run's journal exists
    seed: int = 0  # picks template questions and detail instructions
    llm: BackendSettings | None = None
    min_answer_words: int | None = None  # None: each kind's default
    max_answer_words: int | None = None
    near_duplicate: float = 0.7  # word-pair similarity that makes a near copy
    judge: bool = False
    judge_model: str | None = None  # None: the generating model
    judge_threshold: float = 7.0  # the lowest judge score kept, of 10
    max_consecutive_failures: int = 20

    @property
    def rejects_path(self) -> Path:
        return self.rejects if self.rejects is not None else self.out.with_name(f"{self.out.stem}.rejects.jsonl")

    @property
    def journal_path(self) -> Path:
        return self.out.with_name(self.out.name + ".journal")


def run_datagen(settings: DatagenSettings) -> Summary:
    """Generate the records `settings` ask for into `settings.out` and the rejects beside it, printing the inputs'
    report and progress; the summary says what was generated, rejected and failed (a failed task is retried by the
    next run with the same settings)."""
    if settings.judge and settings.llm is None:
        raise ValueError("--judge needs an LLM backend (openai or hf); the template backend cannot judge")
    journal_path = settings.journal_path
    if settings.out.exists() and not journal_path.exists() and not settings.overwrite:
        raise ValueError(f"{settings.out} already exists; pass --overwrite to generate it again")

    images, report = load_annotations(settings.annotations, settings.images_dir, settings.limit)
    _print_inputs(report, len(images), settings.images_dir)
    if not images:
        raise ValueError("no usable image in the annotations (the problems are listed above)")
    prompts = load_prompts([*settings.kinds, *([JUDGE] if settings.judge else [])], settings.prompts_dir)
    runner_settings = Settings(_bounds(settings), settings.max_consecutive_failures)
    # The journal before the backend: one left with other settings is refused before a model loads for minutes.
    identity = _run_identity(settings, prompts, runner_settings)
    journal = Journal.open(journal_path, identity, fresh=settings.overwrite)
    backends: list[Backend] = []
    try:
        backend = _backend(settings, settings.llm, report)
        backends.append(backend)
        judge = None
        if settings.judge:
            judge_backend = backend
            if settings.judge_model not in (None, settings.llm.model):
                judge_backend = _backend(settings, replace(settings.llm, model=settings.judge_model), report)
                backends.append(judge_backend)
            judge = Judge(judge_backend, prompts[JUDGE], settings.judge_threshold)
        tasks = build_tasks(images, settings.kinds, prompts, settings.seed)
        resumed = len(tasks) - len(pending_tasks(tasks, journal))
        if resumed:
            print(f"resuming: {resumed} of {len(tasks)} tasks already done in {journal_path}", file=sys.stderr)
        TaskRunner(backend, prompts, journal, runner_settings, judge).run(tasks, progress=sys.stderr.isatty())
        return finish(tasks, journal, settings.out, settings.rejects_path, settings.near_duplicate)
    except KeyboardInterrupt:
        if journal.entries:
            print(
                f"datagen: stopped; {journal_path} keeps what was done - run the same command to resume",
                file=sys.stderr,
            )
        raise
    finally:
        for each in backends:
            each.close()
        if journal.entries:
            journal.close()  # kept for a rerun to resume (finish() removes it once every task succeeded)
        else:
            journal.remove()  # nothing in it: a rerun with other settings need not pass --overwrite


def _bounds(settings: DatagenSettings) -> dict[str, Bounds]:
    changes = {}
    if settings.min_answer_words is not None:
        changes["min_answer_words"] = settings.min_answer_words
    if settings.max_answer_words is not None:
        changes["max_answer_words"] = settings.max_answer_words
    return {kind: replace(DEFAULT_BOUNDS[kind], **changes) for kind in settings.kinds}


def _backend(settings: DatagenSettings, llm: BackendSettings | None, report: InputReport) -> Backend:
    """The LLM `llm` describes, or the offline template backend when there is none."""
    if llm is None:
        from llava_lite.datagen.template_backend import TemplateBackend

        return TemplateBackend(report.vocabulary, settings.seed)
    return build_backend(llm)


def _run_identity(settings: DatagenSettings, prompts: dict[str, PromptSet], runner_settings: Settings) -> dict:
    """What decides the records: a journal left by a run with other values is not resumed."""
    llm = settings.llm
    data = {
        "inputs": [[str(Path(f).resolve()), Path(f).stat().st_size] for f in settings.annotations],
        "images_dir": settings.images_dir,
        "limit": settings.limit,
        "kinds": settings.kinds,
        "backend": llm.backend if llm is not None else TEMPLATE,
        "model": llm.model if llm is not None else None,
        "sampling": [llm.temperature, llm.max_tokens] if llm is not None else None,
        "seed": settings.seed,
        "prompts": fingerprint(prompts),
        "bounds": {kind: asdict(bounds) for kind, bounds in runner_settings.bounds.items()},
        "judge": [settings.judge_model or llm.model, settings.judge_threshold] if settings.judge else None,
    }
    return json.loads(json.dumps(data))  # tuples to lists: equal to what the journal reads back


def _print_inputs(report: InputReport, usable: int, images_dir: str | None) -> None:
    checked = "checked in " + images_dir if images_dir else "not checked (no --images-dir)"
    print(f"inputs: {report.images_listed} images listed, {usable} used; image files {checked}")
    for line in report.lines():
        print(f"  {line}")
