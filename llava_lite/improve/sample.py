"""`llava-lite data sample`: K answers per prompt from a run, batched, the same answers for the same seed, journaled
so that a kill loses nothing and a rerun samples nothing twice.

Prompts are the lines `generate` reads (`{"id", "image"?, "prompt"}` or `{"id", "messages", "images"?}`), any other
field (a `reference` answer, captions, boxes) carried along. The good lines are cut into batches of `batch_size`
prompts in file order, and batch N is sampled - its prompts each repeated K times - with the seed `seed` and N.
A batch is one journal line (`OUT.journal`, `llava_lite.llm.journal`), written when it is done: after a kill the
journal holds whole batches, the rerun samples only the others, and since a batch's prompts and seed do not depend
on what was done before, the output is the uninterrupted run's. `OUT` is written whole when every batch is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from llava_lite.data.errors import BadRecordError
from llava_lite.data.formats import json_object_line
from llava_lite.data.writing import write_records
from llava_lite.inference.batch import Request, parse_request
from llava_lite.inference.generator import Generator, SamplingSettings
from llava_lite.llm.journal import Journal

logger = logging.getLogger(__name__)

# Batch N's seed: far apart for neighbouring seeds, so that seed 1's batch 0 is not seed 0's batch 1.
SEED_STRIDE = 1_000_003


@dataclass
class SampleSettings:
    samples: int = 4  # K candidates per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    batch_size: int = 8  # prompts per batch: batch_size x samples answers are generated together

    def __post_init__(self) -> None:
        if self.samples < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("samples, batch_size and max_new_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")


@dataclass
class SampleReport:
    prompts: int = 0
    sampled: int = 0  # prompts sampled by this run
    already_done: int = 0  # prompts a killed run had sampled
    bad_lines: list[str] = field(default_factory=list)


@dataclass
class _Prompt:
    row: dict  # the input line as written
    request: Request


def journal_path(output_path: str | Path) -> Path:
    output_path = Path(output_path)
    return output_path.with_name(output_path.name + ".journal")


def sample_file(
    generator: Generator,
    input_path: str | Path,
    output_path: str | Path,
    settings: SampleSettings,
    image_folder: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> SampleReport:
    """Sample `settings.samples` answers for every prompt of `input_path` into `output_path` (see the module doc)."""
    input_path, output_path = Path(input_path), Path(output_path)
    journal_file = journal_path(output_path)
    check_output(input_path, output_path, overwrite)
    folder = Path(image_folder) if image_folder else input_path.parent
    report = SampleReport()
    prompts = list(_prompts(input_path, folder, report))
    report.prompts = len(prompts)
    batches = [prompts[start : start + settings.batch_size] for start in range(0, len(prompts), settings.batch_size)]
    journal = Journal.open(journal_file, _journal_settings(input_path, settings), fresh=overwrite)
    pending = [number for number in range(len(batches)) if f"batch-{number}" not in journal.entries]
    report.already_done = sum(len(batches[n]) for n in range(len(batches)) if n not in set(pending))
    try:
        for number in tqdm(pending, desc="sampling", unit="batch", disable=not progress):
            rows = _sample_batch(generator, batches[number], settings, number)
            journal.append([{"key": f"batch-{number}", "rows": rows}])
            report.sampled += len(rows)
    finally:
        journal.close()
    rows = [row for number in range(len(batches)) for row in journal.entries[f"batch-{number}"]["rows"]]
    write_records(output_path, rows)
    journal.remove()
    return report


def check_output(input_path: Path, output_path: Path, overwrite: bool) -> None:
    """What `sample_file` refuses, found before a model is loaded for it."""
    if not input_path.is_file():
        raise FileNotFoundError(f"the input {input_path} does not exist")
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise ValueError(f"the output {output_path} is the input: write the samples to another file")
    if not output_path.parent.is_dir():
        raise FileNotFoundError(f"the folder of the output {output_path} does not exist")
    if output_path.exists() and not journal_path(output_path).exists() and not overwrite:
        raise FileExistsError(f"{output_path} already exists; pass --overwrite to sample again")


def _sample_batch(generator: Generator, batch: list[_Prompt], settings: SampleSettings, number: int) -> list[dict]:
    k = settings.samples
    conversations = [prompt.request.conversation for prompt in batch for _ in range(k)]
    images = [prompt.request.images for prompt in batch for _ in range(k)]
    sampling = SamplingSettings(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=settings.seed * SEED_STRIDE + number,
    )
    completions = generator.complete(conversations, images, sampling)
    rows = []
    for index, prompt in enumerate(batch):
        candidates = [
            {"text": c.text, "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason}
            for c in completions[index * k : (index + 1) * k]
        ]
        rows.append({**prompt.row, "id": prompt.request.id, "candidates": candidates})
    return rows


def _prompts(path: Path, folder: Path, report: SampleReport) -> Iterator[_Prompt]:
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            request = parse_request(line, where, folder)
            if request.id in seen:
                raise BadRecordError(where, "duplicate_id", f"id {request.id} appears earlier in the file")
        except BadRecordError as err:
            report.bad_lines.append(str(err))
            logger.warning("%s", err)
            continue
        seen.add(request.id)
        yield _Prompt(json_object_line(line, where), request)


def _journal_settings(input_path: Path, settings: SampleSettings) -> dict:
    """What decides the samples: a journal left with other values (or another input) is not resumed."""
    digest = hashlib.sha256(input_path.read_bytes()).hexdigest()
    return json.loads(json.dumps({**asdict(settings), "input_sha256": digest}))
