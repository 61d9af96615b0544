"""Output folders written whole or not at all: filled under a temporary name beside the target, then renamed.

A command's output folder is never one of its inputs, never inside one and never holds one (symlinks resolved),
whatever the flags say; and `--overwrite` replaces only a folder that the same command wrote before - it carries
a marker file - never a folder of the user's that happens to be named.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

EXPORT_MARKER = ".llava_lite_export"  # in every folder `llava-lite export` writes; --overwrite needs it


def check_output_folder(
    out: str | Path,
    sources: Iterable[str | Path] = (),
    overwrite: bool = False,
    marker: str = EXPORT_MARKER,
    command: str = "llava-lite export",
) -> Path:
    """`out` resolved, once it is known to be writable by `command`: not one of `sources`, not inside one, not
    holding one; and either missing, empty, or (with `overwrite`) an earlier output of `command`, found by its
    `marker`. Otherwise ValueError (an output over the input) or FileExistsError, in one line."""
    target = Path(out).expanduser().resolve()
    for source in sources:
        read = Path(source).expanduser().resolve()
        if target == read:
            raise ValueError(f"--out {out} is the folder this command reads ({source}); choose another --out")
        if target.is_relative_to(read):
            raise ValueError(f"--out {out} is inside {source}, which this command reads; choose another --out")
        if read.is_relative_to(target):
            raise ValueError(f"--out {out} holds {source}, which this command reads; choose another --out")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--out {out} exists and is not empty; choose another --out or pass --overwrite")
        if not (target / marker).is_file():
            raise FileExistsError(
                f"--out {out} is not empty and was not written by {command} (it has no {marker}); only that "
                "command's own earlier output is ever replaced: choose another --out"
            )
    return target


def write_marker(folder: Path, marker: str = EXPORT_MARKER, command: str = "llava-lite export") -> None:
    (folder / marker).write_text(json.dumps({"written_by": command}) + "\n")


def replace_folder_atomically(
    out: str | Path,
    write: Callable[[Path], object],
    overwrite: bool = False,
    sources: Iterable[str | Path] = (),
) -> Path:
    """Call `write(folder)` on a fresh temporary folder, mark it as an export, then move it to `out` (resolved);
    a failed write leaves no trace. `out` must pass `check_output_folder` against `sources`."""
    out = check_output_folder(out, sources, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(staging)
        write_marker(staging)
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _swap_in(staging: Path, out: Path) -> None:
    """Move `staging` to `out`. An earlier `out` is renamed aside first and removed only once the new one is in
    place, so a crash between the two leaves one whole folder under `out`'s name or beside it, never none."""
    if not out.exists():
        os.replace(staging, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, aside / out.name)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(aside / out.name, out)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
