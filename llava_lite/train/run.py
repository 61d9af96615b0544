"""A training run, top to bottom: resolve the config once, see what its folder already holds, ask its recipe for the
trainer, train, save. What differs between stages lives in the recipe (`llava_lite.train.recipes`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from llava_lite.config_io import ConfigError
from llava_lite.data.skips import skips_note
from llava_lite.eval.callback import EvaluationCallback
from llava_lite.run_folder import TRAINER_STATE_FILE
from llava_lite.train.checkpoints import check_resume_files, finish_rotation
from llava_lite.train.config import TrainConfig
from llava_lite.train.launch import is_main_process, sharding_engine
from llava_lite.train.recipes import Recipe, recipe_named, resolved
from llava_lite.train.reference import refuse_a_copied_base_under_sharding
from llava_lite.train.resume import check_same_run, clear_earlier_run, finished_step

logger = logging.getLogger(__name__)


@dataclass
class PreparedRun:
    """A run's config resolved (once) and where its output folder stands: finished at a step, or a checkpoint to
    continue from, or neither (a fresh start)."""

    config: TrainConfig
    recipe: Recipe
    finished_at: int | None
    checkpoint: str | None


def prepare_run(config: TrainConfig) -> PreparedRun:
    """Resolve `config` and read its output folder. ConfigError when the run there was trained with a config that
    differs in a way that matters."""
    config = resolved(config)
    recipe = recipe_named(config.recipe)
    finished_at = finished_step(config)
    checkpoint = resume_checkpoint(config) if finished_at is None else None
    return PreparedRun(config, recipe, finished_at, checkpoint)


def run_training(
    config: TrainConfig | PreparedRun, callbacks: list | None = None, trust_remote_code: bool = False
) -> Path:
    """Train as `config` says (a config, or a run `prepare_run` made of one); returns the output folder, which then
    holds the final model and, in `trainer_state.json`, the loss history. `callbacks` are transformers
    TrainerCallbacks. `trust_remote_code` (the command line's) lets code that came with a saved model folder
    (`init_from`, `model: FOLDER`) run."""
    run = config if isinstance(config, PreparedRun) else prepare_run(config)
    config, checkpoint = run.config, run.checkpoint
    _check_one_device_per_process()
    output_dir = Path(config.output_dir)
    if run.finished_at is not None:
        logger.info("%s holds this run, finished at step %d: nothing to train", output_dir, run.finished_at)
        return output_dir
    check_same_run(config, checkpoint)
    refuse_a_copied_base_under_sharding(config.finetune.method, config.train.kl_to_base, sharding_engine())
    check_resume_files(checkpoint)
    trainer, skipped_at_load = run.recipe.build_trainer(config, callbacks, trust_remote_code)
    return _train(trainer, config, checkpoint, skipped_at_load)


def _train(trainer: Trainer, config: TrainConfig, checkpoint: str | None, skipped_at_load) -> Path:
    """Train (from `checkpoint`, or afresh with an earlier run's leftovers cleared), save, sum up the skips, leave."""
    output_dir = Path(config.output_dir)
    if config.eval is not None:
        trainer.add_callback(EvaluationCallback(config.eval, trainer))
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    elif trainer.args.should_save:
        clear_earlier_run(output_dir)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(str(output_dir))
    if trainer.args.should_save:
        trainer.state.save_to_json(str(output_dir / TRAINER_STATE_FILE))
    # Records skipped while samples were built, by any process (DataLoader workers and ranks), each once.
    skipped = skipped_at_load + trainer.train_dataset.skips.counts_across_processes()
    logger.info("saved %s%s", output_dir, skips_note(skipped))
    # Every rank waits for the others, then leaves the process group: a rank exiting while gloo's threads still
    # run can abort ("terminate called without an active exception").
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return output_dir


def resume_checkpoint(config: TrainConfig) -> str | None:
    """The checkpoint to continue from: `auto` takes the newest complete one in output_dir, if there is one."""
    if config.resume == "never":
        return None
    if config.resume == "auto":
        folder = Path(config.output_dir)
        if is_main_process():
            finish_rotation(folder, config.train.save_total_limit)  # what a killed rotation left
        return get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if not Path(config.resume).is_dir():
        raise ConfigError(f"resume: no checkpoint folder {config.resume}")
    return config.resume


def _check_one_device_per_process() -> None:
    """One process on several GPUs would get the Trainer's `nn.DataParallel`, which splits a batch's rows and its
    images apart; a run uses one process per GPU instead."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > 1 and "LOCAL_RANK" not in os.environ:
        raise ConfigError(
            f"{gpus} GPUs are visible to one process: start one process per GPU (accelerate launch "
            f"--num_processes {gpus} -m llava_lite train ..., or torchrun --nproc_per_node {gpus}), or choose one "
            "with CUDA_VISIBLE_DEVICES"
        )
