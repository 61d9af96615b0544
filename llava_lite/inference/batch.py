"""Batch answers for a JSONL file of questions, resumable, never losing or half-writing what was answered.

Answers are appended to `OUT.partial` as each batch finishes (flushed); when every line is done the file
is renamed to `OUT`. A run that is stopped leaves `OUT.partial`, and the next run continues from it.
A bad input line is reported and counted, and the run goes on.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from llava_lite.data.conversation import IMAGE_PLACEHOLDER, Conversation, Message, images_first
from llava_lite.data.errors import BadRecordError
from llava_lite.data.formats import json_object_line, parse_record
from llava_lite.data.images import load_image, resolve_image_path
from llava_lite.inference.generator import Generator, SamplingSettings

logger = logging.getLogger(__name__)


@dataclass
class Request:
    id: str
    conversation: Conversation
    images: list[Image.Image]
    echo: dict  # the input's other fields, written back beside the answer


@dataclass
class BatchReport:
    answered: int = 0
    already_done: int = 0
    bad_lines: list[str] = field(default_factory=list)


def generate_file(
    generator: Generator,
    input_path: str | Path,
    output_path: str | Path,
    settings: SamplingSettings,
    image_folder: str | Path | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    resume: bool = False,
) -> BatchReport:
    check_paths(input_path, output_path, image_folder, overwrite, resume)
    input_path, output_path = Path(input_path), Path(output_path)
    partial = output_path.with_name(output_path.name + ".partial")
    if overwrite:
        partial.unlink(missing_ok=True)
    report = BatchReport()
    done = _answered_ids(partial, output_path if resume else None)
    report.already_done = len(done)
    folder = Path(image_folder) if image_folder else input_path.parent

    lines = input_path.read_text(encoding="utf-8").splitlines()
    pending: list[Request] = []
    with open(partial, "a", encoding="utf-8") as out, tqdm(total=len(lines), desc="answering", unit="line") as bar:
        for request in _requests(lines, input_path, folder, done, report):
            pending.append(request)
            if len(pending) == batch_size:
                _answer(generator, pending, settings, out, report)
                bar.update(len(pending))
                pending = []
        if pending:
            _answer(generator, pending, settings, out, report)
        bar.update(bar.total - bar.n)
    os.replace(partial, output_path)
    return report


def check_paths(
    input_path: str | Path,
    output_path: str | Path,
    image_folder: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
) -> None:
    """What `generate_file` would refuse, found before a model is loaded for it."""
    if not Path(input_path).is_file():
        raise FileNotFoundError(f"the input {input_path} does not exist")
    output = Path(output_path)
    for written in (output, output.with_name(output.name + ".partial")):
        if _same_file(written, Path(input_path)):
            # --overwrite would replace the questions with the answers; no flag allows it.
            raise ValueError(f"the output {written} is the input {input_path}: write the answers to another file")
    if image_folder is not None and not Path(image_folder).is_dir():
        raise FileNotFoundError(f"the image folder {image_folder} does not exist")
    if not Path(output_path).parent.is_dir():
        raise FileNotFoundError(f"the folder of the output {output_path} does not exist")
    if Path(output_path).exists() and not (overwrite or resume):
        raise FileExistsError(f"{output_path} exists; use --resume to answer what is missing, or --overwrite")


def _same_file(a: Path, b: Path) -> bool:
    """The same file, by its resolved path (symlinks followed) or, when both exist, by device and inode (hard
    links too)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _answer(generator: Generator, batch: list[Request], settings: SamplingSettings, out, report) -> None:
    answers = generator.generate([r.conversation for r in batch], [r.images for r in batch], settings)
    for request, answer in zip(batch, answers):
        out.write(json.dumps({**request.echo, "id": request.id, "answer": answer}, ensure_ascii=False) + "\n")
    out.flush()
    os.fsync(out.fileno())
    report.answered += len(batch)


def _requests(lines: list[str], path: Path, folder: Path, done: set[str], report: BatchReport) -> Iterator[Request]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            request = parse_request(line, where, folder)
        except BadRecordError as err:
            report.bad_lines.append(str(err))
            logger.warning("%s", err)
            continue
        if request.id in done:
            continue
        yield request


def parse_request(line: str, where: str, folder: Path) -> Request:
    """`{"id", "image"?, "prompt"}` or `{"id", "messages", "images"?}`: the prompt and its loaded images."""
    row = json_object_line(line, where)
    request_id = str(row.get("id", where.rsplit(" ", 1)[-1]))
    if "messages" in row:
        conversation = parse_record(row, where, require_answer=False)
    elif isinstance(row.get("prompt"), str):
        conversation = conversation_from_prompt_line(row)
    else:
        raise BadRecordError(where, "malformed", "needs a string `prompt` or a `messages` list")
    if conversation.messages[-1].role != "user":
        raise BadRecordError(where, "malformed", "the last message must be the user's")
    if conversation.placeholder_count() != len(conversation.images):
        raise BadRecordError(
            where,
            "image_count_mismatch",
            f"{conversation.placeholder_count()} <image> placeholder(s) but {len(conversation.images)} image(s)",
        )
    images = [load_image(resolve_image_path(folder, name, where), where) for name in conversation.images]
    echo = {k: v for k, v in row.items() if k not in ("messages", "images", "image")}
    return Request(request_id, conversation, images, echo)


def conversation_from_prompt_line(row: dict) -> Conversation:
    """A prompt line `{"prompt", "image"?, "system"?}` (`image` one path or a list; `images` too) as a conversation
    to answer: the images before the text when it holds no `<image>` placeholder (LLaVA's layout)."""
    images = row.get("image", row.get("images")) or []
    images = [images] if isinstance(images, str) else list(images)
    prompt = row["prompt"]
    if IMAGE_PLACEHOLDER not in prompt:
        prompt = images_first(prompt, len(images))
    messages = [Message("system", row["system"])] if isinstance(row.get("system"), str) else []
    return Conversation([*messages, Message("user", prompt)], images)


def _answered_ids(partial: Path, finished: Path | None) -> set[str]:
    """Ids already answered: complete lines of the partial file (a torn last line is cut off), and of a
    finished output being resumed, whose lines then move into the partial file."""
    done: set[str] = set()
    if partial.exists():
        text = partial.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
            partial.write_text(text, encoding="utf-8")
        done.update(answer_id for answer_id, _ in _answer_lines(partial, text))
    if finished is not None and finished.exists():
        new = [
            (answer_id, line)
            for answer_id, line in _answer_lines(finished, finished.read_text(encoding="utf-8"))
            if answer_id not in done
        ]
        with open(partial, "a", encoding="utf-8") as handle:
            handle.writelines(line + "\n" for _, line in new)
        done.update(answer_id for answer_id, _ in new)
    return done


def _answer_lines(path: Path, text: str) -> list[tuple[str, str]]:
    """(id, line) for each line of answers written earlier; a line that is not one is an error naming it."""
    answers = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        row = json_object_line(line, where)
        if "id" not in row:
            raise BadRecordError(where, "malformed", "an answer without an `id`; fix the line, or use --overwrite")
        answers.append((str(row["id"]), line))
    return answers
