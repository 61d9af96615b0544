"""Data files written whole or not at all: a temporary file in the same folder, synced, then renamed into place."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_records(path: str | Path, records: list[dict]) -> None:
    """`.jsonl`: one record per line; anything else: one JSON list (LLaVA's own files are JSON lists)."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        lines = [json.dumps(record, ensure_ascii=False) for record in records]
    else:
        lines = [json.dumps(records, ensure_ascii=False)]
    write_lines_atomically(path, lines)


def write_lines_atomically(path: str | Path, lines: list[str]) -> None:
    """A reader (or a rerun after a kill) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            for line in lines:
                out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
