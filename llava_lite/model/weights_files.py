"""Weights on disk are safetensors, never a pickle: a pickle where safetensors belong (a folder's
`pytorch_model.bin`, an open_clip `pretrained` checkpoint, `adapter_model.bin`) is refused in one line naming the
file, before any library would unpickle it; so is a `.safetensors` file that is not one.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

# Suffixes of torch.save / pickle files that libraries load as weights when no safetensors file is there.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_SAFETENSORS = ".safetensors"


class UnsafeWeightsError(ValueError):
    """Weights in a pickle, or a file that claims to be safetensors and is not."""


def require_safetensors_folder(folder: str | Path, what: str) -> None:
    """A local weights folder (transformers' layout, a peft adapter, an open_clip `local-dir:`) that holds
    safetensors; one with only pickled weights is refused naming the pickle. Hub names (not folders) pass."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    if any(folder.glob(f"*{_SAFETENSORS}")):
        return
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin")
    if pickles:
        raise UnsafeWeightsError(
            f"{pickles[0]}: the {what} weights are a pickle, which llava_lite never loads; save them as safetensors "
            "(e.g. save_pretrained(..., safe_serialization=True))"
        )


def require_safetensors_file(path: str | Path, what: str) -> None:
    """A local weights file that really is safetensors: named so (libraries choose the loader by the name) and with
    a safetensors header (a length, then that much JSON)."""
    path = Path(path)
    if path.suffix != _SAFETENSORS:
        raise UnsafeWeightsError(
            f"{path}: the {what} must be a .safetensors file; llava_lite never loads pickled weights ({path.suffix})"
        )
    if not _has_safetensors_header(path):
        raise UnsafeWeightsError(f"{path}: the {what} is not a safetensors file (its header does not read as one)")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file`, with a file that is not safetensors (or is missing) as one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise UnsafeWeightsError(f"{path}: not a readable safetensors file ({err})") from None


def _has_safetensors_header(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            return False
        (length,) = struct.unpack("<Q", head)
        if not 2 <= length <= min(100_000_000, path.stat().st_size - 8):
            return False
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False
    return isinstance(header, dict)
