"""The records `data rate` and `data select` work on: each as written (what is written back out, fields added or
not) beside its parsed conversation, images resolved inside the image folder.

Every format the training readers take is read: LLaVA `conversations`, `messages` records, anything `datasets`
loads, and preference pairs (TRL's rows, as `data pairs` writes them, and the other formats stage 3 reads), a pair
standing for its prompt followed by its chosen answer - what the pair teaches. A record that cannot be read stops
the command with its file and number: a curated file silently short of records would look like a selection.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from llava_lite.data.config import DataSource
from llava_lite.data.conversation import Conversation
from llava_lite.data.errors import BadRecordError
from llava_lite.data.formats import checked_image_path, iter_rows, parse_record
from llava_lite.data.preference_formats import parse_pair

MULTIMODAL, TEXT_ONLY = "multimodal", "text-only"


@dataclass
class CurateRecord:
    raw: dict  # the record as written
    conversation: Conversation  # parsed; image paths absolute, inside the image folder

    @property
    def kind(self) -> str:
        return MULTIMODAL if self.conversation.images else TEXT_ONLY

    @property
    def source(self) -> str:
        """Where the record says it came from: its `source`, or its metadata's; "unmarked" when it says nothing."""
        metadata = self.raw.get("metadata") if isinstance(self.raw.get("metadata"), dict) else {}
        for value in (self.raw.get("source"), metadata.get("source")):
            if isinstance(value, str) and value:
                return value
        return "unmarked"


def read_curate_records(
    path: str | Path, image_folder: str | Path | None = None, check_images: bool = True
) -> list[CurateRecord]:
    """Every record of `path`, in order; images resolve inside `image_folder` (default: the file's folder)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such data file")
    folder = Path(image_folder) if image_folder else (path.parent if path.is_file() else path)
    if image_folder and not folder.is_dir():
        raise ValueError(f"--image-folder {folder}: no such folder")
    records = [CurateRecord(dict(row), _conversation(row, where, folder, check_images)) for where, row in _rows(path)]
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _rows(path: Path) -> Iterator[tuple[str, object]]:
    rows = iter_rows(DataSource(str(path)))
    for where, row in tqdm(rows, desc=f"reading {path.name}", unit=" records", disable=None, leave=False):
        if isinstance(row, BadRecordError):
            raise row
        yield where, row


def _conversation(row, where: str, folder: Path, check_images: bool) -> Conversation:
    if isinstance(row, dict) and ("chosen" in row or "rejected" in row):
        pair = parse_pair(row, where)
        conversation = pair.conversation(pair.chosen)
    else:
        conversation = parse_record(row, where)
    conversation.images = [checked_image_path(folder, image, where, check_images) for image in conversation.images]
    return conversation
