"""What a run's output folder already holds: a finished run (nothing to do), checkpoints to continue from (only
if they are of the same run), or what is left of an earlier run that a fresh start clears away.

A run is finished when the final `trainer_state.json` beside the final model reached its last step; the Trainer
writes it after the final model, so a run killed before then is continued from its newest checkpoint instead.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from llava_lite.config_io import ConfigError, load_yaml, to_dict
from llava_lite.run_folder import (
    CHECKPOINT_PREFIX,
    ROTATED_PREFIX,
    STAGING_DIR,
    TRAIN_CONFIG_FILE,
    TRAINER_STATE_FILE,
    finished_at,
)
from llava_lite.train.config import TrainConfig

logger = logging.getLogger(__name__)


# Fields that do not change what is trained: a continued run may differ in these. Everything else must match.
NOT_AFFECTING_WEIGHTS = (
    "output_dir",
    "resume",
    "eval",
    "eval_data",
    "data.check_images_exist",
    "train.logging_steps",
    "train.report_to",
    "train.num_workers",
    "train.save_steps",
    "train.eval_steps",
    "train.save_total_limit",
)


def finished_step(config: TrainConfig) -> int | None:
    """The last step of the finished run in `config.output_dir` when `resume` is `auto` and it is there, else
    None. ConfigError when that run was trained with a config that differs from `config` (resolved) in a way that
    matters: rerunning it would not give the same model."""
    if config.resume != "auto":
        return None
    step = finished_at(config.output_dir)
    if step is None:  # not there, or stopped early by a callback: its checkpoints, if any, carry on
        return None
    check_same_run(config, config.output_dir)
    return step


def check_same_run(config: TrainConfig, run_folder: str | Path | None) -> None:
    """ConfigError naming the first difference that matters between `config` (resolved) and the config saved in
    `run_folder` (a checkpoint or a finished run); nothing when there is no folder or no saved config."""
    if run_folder is None or not (Path(run_folder) / TRAIN_CONFIG_FILE).is_file():
        return
    saved = load_yaml(Path(run_folder) / TRAIN_CONFIG_FILE)
    differences = config_differences(saved, to_dict(config))
    if differences:
        key, then, now = differences[0]
        more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
        raise ConfigError(
            f"{run_folder} was trained with {key}: {_shown(then)}, this config has {_shown(now)}{more}; "
            f"to train with the new config, give a new output_dir or resume=never (which starts over there)"
        )


def config_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for each field that differs and matters, in the config's order."""
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    keys = list(flat_current) + [key for key in flat_saved if key not in flat_current]
    return [
        (key, flat_saved.get(key), flat_current.get(key))
        for key in keys
        if not _ignored(key) and flat_saved.get(key) != flat_current.get(key)
    ]


def clear_earlier_run(output_dir: str | Path) -> None:
    """Remove the checkpoints, a torn save and the final state an earlier run left in `output_dir`, so a fresh
    start neither mixes its checkpoints with them (rotation keeps the highest step numbers) nor looks finished.
    The final model files are left: the fresh run overwrites them when it ends."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return
    stale = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))
    for path in stale:
        shutil.rmtree(path)
    for leftover in folder.glob(f"{ROTATED_PREFIX}*"):  # what a killed rotation renamed away
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.rmtree(folder / STAGING_DIR, ignore_errors=True)
    (folder / TRAINER_STATE_FILE).unlink(missing_ok=True)
    if stale:
        logger.info("starting over in %s: removed %s of the earlier run", folder, ", ".join(p.name for p in stale))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """`{"data": {"sources": [{"path": p}]}}` -> `{"data.sources[0].path": p}`."""
    if isinstance(value, dict) and value:
        items = [(f"{prefix}.{key}" if prefix else str(key), item) for key, item in value.items()]
    elif isinstance(value, list) and value:
        items = [(f"{prefix}[{index}]", item) for index, item in enumerate(value)]
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(_flatten(item, key))
    return flat


def _ignored(key: str) -> bool:
    return any(key == field or key.startswith((f"{field}.", f"{field}[")) for field in NOT_AFFECTING_WEIGHTS)


def _shown(value: Any) -> str:
    return "(not set)" if value is None else json.dumps(value) if not isinstance(value, str) else value
