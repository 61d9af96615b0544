"""Checkpoint folders on disk: a rotation that a kill cannot leave half done, and the pickled files a resume would
load, checked before anything loads them.

Rotation renames each checkpoint it removes to `.rotated-checkpoint-N` (one atomic step), then deletes it; a run
killed in between leaves only such folders, which the next start deletes, and it removes there too what a
rotation never got to. So a run folder never holds a half-deleted `checkpoint-N`.

The optimizer, scheduler, scaler and RNG states are `torch.save` pickles by nature (the Trainer writes them so).
transformers loads them with `weights_only=True`, which refuses anything but plain data with a traceback; here each
is read first for the globals its pickle would call (without loading its tensors), and one that calls anything
else is refused in one line naming the file.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from transformers.trainer import OPTIMIZER_NAME, SCALER_NAME, SCHEDULER_NAME
from transformers.trainer_pt_utils import safe_globals

from llava_lite.run_folder import ROTATED_PREFIX, checkpoints

logger = logging.getLogger(__name__)


def rotate_checkpoints(run_dir: str | Path, limit: int | None, best: str | None = None) -> None:
    """Keep the newest `limit` checkpoints (the newest and `best` always), as transformers' rotation chooses them;
    each one removed is renamed away before it is deleted."""
    if not limit or limit <= 0:
        return
    found = checkpoints(run_dir)
    protected = {found[-1]} if found else set()
    if best is not None:
        protected.add(Path(best))
    remaining = len(found)
    for checkpoint in found:
        if remaining <= max(limit, len(protected)):
            break
        if checkpoint not in protected:
            _remove(checkpoint)
            remaining -= 1


def finish_rotation(run_dir: str | Path, limit: int | None) -> None:
    """At a start: delete what an interrupted rotation renamed away, and rotate what it never got to."""
    folder = Path(run_dir)
    if not folder.is_dir():
        return
    for leftover in sorted(folder.glob(f"{ROTATED_PREFIX}*")):
        shutil.rmtree(leftover, ignore_errors=True)
        logger.info("removed %s, left by an interrupted checkpoint rotation", leftover.name)
    rotate_checkpoints(folder, limit)


def _remove(checkpoint: Path) -> None:
    trash = checkpoint.with_name(ROTATED_PREFIX + checkpoint.name)
    os.replace(checkpoint, trash)
    _delete(trash)


def _delete(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def check_resume_files(checkpoint: str | Path | None) -> None:
    """ValueError naming the first state file of `checkpoint` whose pickle would call anything but the plain data
    the Trainer writes (torch's own list, and transformers' additions for its RNG state), or is not a file that
    `torch.save` wrote."""
    if checkpoint is None:
        return
    folder = Path(checkpoint)
    names = (OPTIMIZER_NAME, SCHEDULER_NAME, SCALER_NAME)
    files = [folder / name for name in names if (folder / name).is_file()] + sorted(folder.glob("rng_state*.pth"))
    for path in files:
        with safe_globals():
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            except (ValueError, RuntimeError, OSError):
                raise ValueError(f"{path}: not a file torch.save wrote (a bare pickle?); refusing to load it") from None
        if unsafe:
            raise ValueError(f"{path}: its pickle would call {unsafe[0]}, not only plain data; refusing to load it")
