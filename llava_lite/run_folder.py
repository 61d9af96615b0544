"""What a run folder holds, every name spelled here once, and what can be read off one without loading a model:
its checkpoints, the newest of them, whether the run finished.

A run folder (a training run's `output_dir`; the same layout in each of its checkpoints) holds:
- the model (`llava_lite.model.saving`): `llava_lite_config.json` and `projector.safetensors` always; the parts
  that were trained or built from a config: `vision_tower/vision_tower.safetensors`, `language_model/`
  (transformers' format), `adapter/` (peft's, `adapter_model.safetensors`); the tokenizer, `tokenizer/`; a reward
  model's scalar head (`recipe: reward`), `reward_head.safetensors` (`llava_lite.model.reward_head`);
- the training config it ran with, `train_config.yaml`, beside every save (`llava_lite.train.trainer`);
- the Trainer's `trainer_state.json`, written beside the final model after it: a run whose state reached its last
  step is finished (`llava_lite.train.resume`);
- `checkpoint-N` folders, written in `.staging` and renamed into place, and renamed to `.rotated-checkpoint-N`
  before rotation deletes them (`llava_lite.train.checkpoints`);
- what a start-up computes once and reads back on a rerun: `measured.safetensors` (token counts,
  `llava_lite.data.measure`), `replay_windows.safetensors` (`llava_lite.data.replay`) and a preference run's
  `reference_logps.safetensors` (`llava_lite.train.preference_reference`).

It sits at the bottom of the package's layers (imports nothing of llava_lite), so the model, the data, training and
evaluation all read the names from here, and none of them reaches up into another for a file name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# ----- the model ----------------------------------------------------------------------------------------------
MODEL_CONFIG_FILE = "llava_lite_config.json"
PROJECTOR_FILE = "projector.safetensors"
TOWER_DIR = "vision_tower"
TOWER_WEIGHTS_FILE = "vision_tower.safetensors"  # inside TOWER_DIR; a tower saved on its own writes it too
LM_DIR = "language_model"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # peft names it so (SAFETENSORS_WEIGHTS_NAME), inside ADAPTER_DIR
TOKENIZER_DIR = "tokenizer"
REWARD_HEAD_FILE = "reward_head.safetensors"  # a reward model's scalar head, beside the model it reads

# ----- the run ------------------------------------------------------------------------------------------------
TRAIN_CONFIG_FILE = "train_config.yaml"
TRAINER_STATE_FILE = "trainer_state.json"  # transformers names it so (TRAINER_STATE_NAME)
CHECKPOINT_PREFIX = "checkpoint-"  # transformers' PREFIX_CHECKPOINT_DIR and a dash: the Trainer names them so
STAGING_DIR = ".staging"
ROTATED_PREFIX = ".rotated-"

# ----- what a start-up keeps ----------------------------------------------------------------------------------
MEASURED_FILE = "measured.safetensors"
REPLAY_WINDOWS_FILE = "replay_windows.safetensors"
REFERENCE_LOGPS_FILE = "reference_logps.safetensors"

# ----- what a run writes for people to read -------------------------------------------------------------------
COMPLETIONS_FILE = "completions.jsonl"  # recipe rl: sampled answers, rewards, advantages (llava_lite.train.rl_logging)


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint saved at `step`."""
    return f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(folder: str | Path) -> int | None:
    """The step of a `checkpoint-STEP` folder, from its name; None for any other name (`checkpoint-best`,
    `.rotated-checkpoint-3`)."""
    step = Path(folder).name.removeprefix(CHECKPOINT_PREFIX)
    if step == Path(folder).name or not step.isdigit():
        return None
    return int(step)


def checkpoints(run: str | Path) -> list[Path]:
    """The `checkpoint-STEP` folders of `run`, oldest step first; none when `run` is not a folder."""
    run = Path(run)
    if not run.is_dir():
        return []
    by_step = {checkpoint_step(path): path for path in run.glob(f"{CHECKPOINT_PREFIX}*") if path.is_dir()}
    return [by_step[step] for step in sorted(step for step in by_step if step is not None)]


def newest_checkpoint(run: str | Path) -> Path | None:
    """The checkpoint of `run` with the highest step, or None."""
    found = checkpoints(run)
    return found[-1] if found else None


def read_trainer_state(folder: str | Path) -> dict[str, Any] | None:
    """The Trainer's state saved in `folder` (a run or a checkpoint), None when there is none; ValueError naming the
    file when it is not a JSON object."""
    path = Path(folder) / TRAINER_STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a trainer state ({err})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a trainer state (a JSON {type(state).__name__}, not an object)")
    return state


def finished_at(run: str | Path) -> int | None:
    """The last step of the run in `run` when it finished: its final trainer state is there (written after the final
    model) and reached the run's last step. None otherwise, also for a run a callback stopped early."""
    state = read_trainer_state(run)
    if state is None:
        return None
    step, last = state.get("global_step", 0), state.get("max_steps", 0)
    return step if last and step >= last else None
