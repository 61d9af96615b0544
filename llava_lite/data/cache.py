"""Tensors computed from a run's data and kept beside the run, keyed by what they were computed from.

A rerun or a resumed run finds them again in its output folder and skips the work when the key matches (the data's
content and the processor, see `llava_lite.data.measure`); anything else - another key, a damaged file - is
computed anew. Written whole or not at all (a temporary file, then a rename), as safetensors: nothing is pickled.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


def read_cached(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The tensors saved at `path` under `key`; None when there are none, or under another key."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as handle:
            if (handle.metadata() or {}).get("key") != key:
                return None
        return load_file(str(path))
    except (OSError, ValueError, RuntimeError, SafetensorError):  # a damaged file is computed again
        return None


def write_cached(path: Path, key: str, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file({name: t.contiguous() for name, t in tensors.items()}, temporary, metadata={"key": key})
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
