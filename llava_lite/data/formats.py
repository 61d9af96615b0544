"""Readers: LLaVA JSON/JSONL, `messages` + `images` records, and anything `datasets` loads, to Conversations.

JSON and JSONL are read with the json module so that a broken record is reported by line and index;
every other format goes through `datasets`. Image paths are resolved and checked here, once, so a bad
path is found when the data is loaded rather than hours into training.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llava_lite.data.config import DataSource
from llava_lite.data.conversation import IMAGE_PLACEHOLDER, ROLES, Conversation, Message
from llava_lite.data.errors import BadRecordError
from llava_lite.data.images import resolve_image_path
from llava_lite.data.templates.base import TemplateError, check_roles

logger = logging.getLogger(__name__)

DEFAULT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
}


def read_source(
    source: DataSource,
    on_bad_record: str = "error",
    check_images_exist: bool = True,
    parse: Callable[[Any, str, dict[str, str]], Any] | None = None,
) -> tuple[list[Conversation], Counter]:
    """All records of one source as Conversations with absolute image paths, and the skips by reason. `parse`
    (default `parse_record`) makes each raw record into one with an `images` list (preference pairs: `parse_pair`)."""
    parse = parse or parse_record
    path = Path(source.path)
    image_folder = Path(source.image_folder) if source.image_folder else (path.parent if path.is_file() else path)
    roles = {**DEFAULT_ROLES, **source.roles}
    records: list = []
    skipped: Counter = Counter()
    for where, row in iter_rows(source):
        try:
            if isinstance(row, BadRecordError):
                raise row
            record = parse(rename_columns(row, source.columns), where, roles)
            record.images = [checked_image_path(image_folder, p, where, check_images_exist) for p in record.images]
        except BadRecordError as err:
            if on_bad_record == "error":
                raise
            skipped[err.reason] += 1
            continue
        records.append(record)
    return records, skipped


def read_sources(
    sources: list[DataSource],
    on_bad_record: str = "error",
    check_images_exist: bool = True,
    read: Callable[[DataSource, str, bool], tuple[list, Counter]] = read_source,
) -> tuple[list, Counter]:
    """Every source's records as `read` reads one source (instruction records by default; preference pairs with
    `llava_lite.data.preference_formats.read_pairs`), in order, and the records skipped, by reason."""
    records: list = []
    skipped: Counter = Counter()
    for source in sources:
        found, source_skipped = read(source, on_bad_record, check_images_exist)
        records.extend(found)
        skipped.update(source_skipped)
        if source_skipped:
            logger.warning("%s: skipped %s", source.path, dict(source_skipped))
    return records, skipped


def parse_record(
    row: Any, where: str, roles: dict[str, str] | None = None, require_answer: bool = True
) -> Conversation:
    """One raw record (LLaVA `conversations` or `messages`) to a Conversation; image paths left as given.

    A training record needs an assistant answer; a prompt to answer (`require_answer=False`) may end on the user."""
    roles = roles or DEFAULT_ROLES
    if not isinstance(row, dict):
        raise BadRecordError(where, "malformed", f"a record must be an object, got {type(row).__name__}")
    record_id = row.get("id")
    if record_id is not None:
        where = f"{where} (id {record_id})"
    turns = row.get("conversations", row.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise BadRecordError(where, "malformed", "no `conversations` or `messages` list")
    images = image_list(row.get("images", row.get("image")), where)
    messages = [parse_message(turn, number, where, roles, images) for number, turn in enumerate(turns, 1)]
    try:
        check_roles(messages, where)
    except TemplateError as err:
        raise BadRecordError(where, "malformed", str(err).removeprefix(f"{where}: ")) from None
    if require_answer and not any(m.role == "assistant" and m.content.strip() for m in messages):
        raise BadRecordError(where, "malformed", "no assistant message to train on")
    empty = [n for n, m in enumerate(messages, 1) if m.role == "assistant" and not m.content.strip()]
    if empty:
        raise BadRecordError(where, "malformed", f"assistant message {empty[0]} is empty")
    return Conversation(messages, images, None if record_id is None else str(record_id), where)


def parse_message(turn: Any, number: int, where: str, roles: dict[str, str], images: list[str]) -> Message:
    """One `{from, value}` or `{role, content}` turn; image parts that carry a path append it to `images`."""
    if not isinstance(turn, dict):
        raise BadRecordError(where, "malformed", f"message {number} is not an object")
    role = turn.get("from", turn.get("role"))
    content = turn.get("value", turn.get("content"))
    if role not in roles or roles[role] not in ROLES:
        raise BadRecordError(where, "malformed", f"message {number} has unknown role {role!r}")
    if isinstance(content, list):
        content = _flatten_parts(content, number, where, images)
    if not isinstance(content, str):
        raise BadRecordError(where, "malformed", f"message {number} has no text content")
    return Message(roles[role], content)


def _flatten_parts(parts: list, number: int, where: str, images: list[str]) -> str:
    """OpenAI-style content parts: text is joined; each image part becomes a placeholder, its path appended. A bare
    `{"type": "image"}` (TRL's conversational format) stands for the next of the record's own `images`."""
    pieces = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(str(part.get("text", "")))
        elif kind in ("image", "image_url"):
            value = part.get("image") or part.get("path") or part.get("image_url")
            url = value.get("url") if isinstance(value, dict) else value
            if value is None and kind == "image":  # also as `datasets` reads it back: {"type", "image": None, ...}
                pieces.append(IMAGE_PLACEHOLDER)
                continue
            if not isinstance(url, str):
                raise BadRecordError(where, "malformed", f"message {number} has an image part without a path")
            images.append(url)
            pieces.append(IMAGE_PLACEHOLDER)
        else:
            raise BadRecordError(where, "malformed", f"message {number} has a content part of unknown type {kind!r}")
    return "".join(pieces)


def image_list(images: Any, where: str) -> list[str]:
    """A record's `image` or `images` as a list of paths."""
    if images is None or images == "":
        return []
    if isinstance(images, str):
        return [images]
    if isinstance(images, list) and all(isinstance(i, str) for i in images):
        return list(images)
    raise BadRecordError(where, "malformed", "`image`/`images` must be a path or a list of paths")


def checked_image_path(folder: Path, image: str, where: str, check_exists: bool) -> str:
    """`image` resolved inside `folder` (never outside it), and there unless `check_exists` is false."""
    path = resolve_image_path(folder, image, where)
    if check_exists and not path.is_file():
        raise BadRecordError(where, "missing_image", f"image {image} not found in {folder}")
    return str(path)


def rename_columns(row: Any, columns: dict[str, str]) -> Any:
    """`row` with the dataset's column names (values of `columns`) renamed to ours (its keys)."""
    if not columns or not isinstance(row, dict):
        return row
    renamed = {k: v for k, v in row.items() if k not in columns.values()}
    for ours, theirs in columns.items():
        if theirs in row:
            renamed[ours] = row[theirs]
    return renamed


def iter_rows(source: DataSource) -> Iterator[tuple[str, Any]]:
    """(where, raw record) pairs; `where` names the file and the record for error messages."""
    path = Path(source.path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl" and path.is_file():
        yield from jsonl_rows(path)
    elif suffix == ".json" and path.is_file():
        yield from _json_rows(path)
    else:
        source.check_exists()
        dataset = load_with_datasets(source)
        for index, row in enumerate(dataset):
            yield f"{source.path} record {index}", row


def json_object_line(line: str, where: str) -> dict:
    """One JSONL line that must be an object; anything else is a bad record named by `where`."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadRecordError(where, "malformed", f"not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise BadRecordError(where, "malformed", "each line must be a JSON object")
    return row


def read_json_objects(path: str | Path, what: str = "data") -> Iterator[tuple[str, dict]]:
    """Each non-blank line of a JSONL file as (`FILE line N`, object); a line that is not an object is an error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such {what} file")
    for where, row in jsonl_rows(path):
        if isinstance(row, BadRecordError):
            raise row
        if not isinstance(row, dict):
            raise BadRecordError(where, "malformed", "each line must be a JSON object")
        yield where, row


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BadRecordError(str(path), "malformed", f"not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(data, list):
        raise BadRecordError(str(path), "malformed", "a JSON data file must hold a list of records")
    for index, row in enumerate(data):
        yield f"{path} record {index}", row


def jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(`FILE line N`, value) per non-blank line; a line that is not JSON comes as its BadRecordError."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                # Yielded as its error, so the bad-record policy treats it like any other bad record.
                row = BadRecordError(where, "malformed", f"not valid JSON ({err.msg})")
            yield where, row


def load_with_datasets(source: DataSource):
    """The rows of a source that `datasets` reads: a saved dataset folder, a parquet, arrow or csv file, a hub name."""
    import datasets

    path = Path(source.path)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        return loaded[source.split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if path.is_file():
        builder = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}.get(path.suffix.lower())
        if builder is None:
            hint = " (plain text is replayed with kind: text)" if path.suffix.lower() == ".txt" else ""
            raise BadRecordError(str(path), "malformed", f"cannot read data files of type {path.suffix!r}{hint}")
        return datasets.load_dataset(builder, data_files=str(path), split=source.split)
    if path.exists():
        raise BadRecordError(str(path), "malformed", "a folder that `datasets.save_to_disk` did not write")
    return datasets.load_dataset(source.path, split=source.split)
