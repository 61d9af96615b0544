"""The `python` reward: a function the person running the command names, `module:function` (an importable module)
or `path/to/file.py:function`, called with TRL's signature `(prompts, completions, **columns)` and returning one
float or None per completion. Only the command line or the config the person gives can name it; a file inside a run
folder (the run trained from, or the one being written) is refused: code never comes with a run folder."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from llava_lite.rewards.base import RewardFunction, check_keys

KEYS = ("function",)


def check(spec: dict, where: str) -> None:
    check_keys(spec, KEYS, where)
    target = spec.get("function")
    if not isinstance(target, str) or ":" not in target or not target.rsplit(":", 1)[1].isidentifier():
        raise ValueError(f"{where}.function: expected module:function or path/to/file.py:function, got {target!r}")


def build(spec: dict, where: str, context) -> RewardFunction:
    check(spec, where)
    return load_function(spec["function"], where, context.run_folders)


def load_function(target: str, where: str, run_folders: list[str] | tuple = ()) -> RewardFunction:
    """The function `target` names; ValueError naming `where` when it cannot be found or is not callable."""
    location, name = target.rsplit(":", 1)
    if location.endswith(".py"):
        module = _module_from_file(Path(location), where, run_folders)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as err:
            raise ValueError(f"{where}.function: cannot import {location} ({err})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"{where}.function: {location} has no function {name}")
    return function


def _module_from_file(path: Path, where: str, run_folders) -> object:
    if not path.is_file():
        raise ValueError(f"{where}.function: no such file {path}")
    resolved = path.resolve()
    for folder in run_folders:
        if folder and resolved.is_relative_to(Path(folder).resolve()):
            raise ValueError(
                f"{where}.function: {path} is inside the run folder {folder}; code from a run folder is never run"
            )
    name = "llava_lite_reward_" + hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    if name in sys.modules:  # one module per file, however many rewards name it
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(name, None)
        raise
    return module
