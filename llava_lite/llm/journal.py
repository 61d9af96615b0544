"""Files that survive a kill: an append-only journal of finished requests, read back by a rerun.

A journal (`OUT.journal`, beside the file a run writes: datagen's output, `data sample`'s and `data score`'s)
starts with the run's settings, then gets one JSON line per finished task, flushed as it is written. A rerun with
the same settings reads it back, drops a last line cut short by a kill, and does only the tasks it lacks - so
nothing is done twice and nothing is lost. Tasks that failed (at the backend, or with a malformed reply) are in
the journal too, and are tried again by the next run. The final files are written atomically
(`llava_lite.data.writing`), so a reader never sees half a file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from llava_lite.data.writing import write_lines_atomically

JOURNAL_VERSION = 1


class Journal:
    def __init__(self, path: Path, entries: dict[str, dict]) -> None:
        self.path = path
        self.entries = entries  # task key -> its latest entry
        # Open for the whole run: every finished batch is appended and flushed; `close` ends it.
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115

    @classmethod
    def open(cls, path: str | Path, settings: dict, fresh: bool = False) -> Journal:
        """Resume the journal at `path` (settings must match), or start one."""
        path = Path(path)
        if fresh or not path.exists():
            write_lines_atomically(path, [json.dumps({"journal": JOURNAL_VERSION, "settings": settings})])
            return cls(path, {})
        header, entries, good_bytes = _read_journal(path)
        if header.get("journal") != JOURNAL_VERSION or header.get("settings") != settings:
            changed = sorted(
                k
                for k in {**settings, **header.get("settings", {})}
                if header.get("settings", {}).get(k) != settings.get(k)
            )
            raise ValueError(
                f"{path}: left by a run with other settings ({', '.join(changed) or 'journal version'}); "
                "rerun with the same settings to resume it, or pass --overwrite to start again"
            )
        with open(path, "r+b") as handle:  # cut off a last line a kill left half written
            handle.truncate(good_bytes)
        return cls(path, entries)

    def append(self, entries: Iterable[dict]) -> None:
        entries = list(entries)
        lines = [json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries]
        # One write per batch, flushed: after a kill a batch is in the file whole, or cut in its last line.
        self._handle.write("".join(lines))
        self._handle.flush()
        for entry in entries:
            self.entries[entry["key"]] = entry

    def close(self) -> None:
        self._handle.close()

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def _read_journal(path: Path) -> tuple[dict, dict[str, dict], int]:
    """The header, the latest entry per task, and how many bytes of the file are whole lines."""
    entries: dict[str, dict] = {}
    good = 0
    header: dict = {}
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle):
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("a line without its end")
                data = json.loads(raw)
            except ValueError:
                break  # only the last line can be cut short; everything after it is dropped with it
            if number == 0:
                header = data if isinstance(data, dict) else {}
            else:
                entries[data["key"]] = data
            good += len(raw)
    if not header:
        raise ValueError(f"{path}: not a journal (no header line); remove it or pass --overwrite")
    return header, entries, good
