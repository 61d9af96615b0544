"""A training run, top to bottom: resolve the config, build the model for the stage, load data, train, save."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from llava_lite.config_io import ConfigError, to_dict
from llava_lite.data.collator import Collator
from llava_lite.data.dataset import ConversationDataset, load_conversations
from llava_lite.data.packing import PackedDataset, PackingBudget
from llava_lite.data.preflight import require_a_sample, require_records
from llava_lite.data.replay import ReplayMix, cached_text_windows, read_replay_text
from llava_lite.eval.callback import EvaluationCallback
from llava_lite.train.checkpoints import check_resume_files, finish_rotation
from llava_lite.train.config import TrainConfig, resolved
from llava_lite.train.launch import is_main_process, sharding_engine
from llava_lite.train.precision import mixed_precision
from llava_lite.train.preference import preference_trainer
from llava_lite.train.recipe import build_training_model, training_processor
from llava_lite.train.reference import refuse_a_copied_base_under_sharding
from llava_lite.train.regularizers import Objective
from llava_lite.train.resume import STATE_FILE, check_same_run, clear_earlier_run, finished_step
from llava_lite.train.trainer import LlavaTrainer

logger = logging.getLogger(__name__)


def run_training(config: TrainConfig, callbacks: list | None = None, trust_remote_code: bool = False) -> Path:
    """Train as `config` says; returns the output folder, which then holds the final model and, in
    `trainer_state.json`, the loss history. `callbacks` are transformers TrainerCallbacks. `trust_remote_code`
    (the command line's) lets code that came with a saved model folder (`init_from`, `model: FOLDER`) run."""
    config = resolved(config)
    _check_one_device_per_process()
    output_dir = Path(config.output_dir)
    if (step := finished_step(config)) is not None:
        logger.info("%s holds this run, finished at step %d: nothing to train", output_dir, step)
        return output_dir
    checkpoint = resume_checkpoint(config)
    check_same_run(config, checkpoint)
    refuse_a_copied_base_under_sharding(config.finetune.method, config.train.kl_to_base, sharding_engine())
    check_resume_files(checkpoint)
    if config.recipe == "preference":
        args = training_arguments(config)
        trainer, skipped_at_load = preference_trainer(config, args, _pad_multiple(), callbacks, trust_remote_code)
        return _train(trainer, config, checkpoint, skipped_at_load)
    # The data is read before the model is built, so a bad record or a missing file fails in seconds.
    train_records, skipped_at_load = load_conversations(config.data)
    require_records(config.data, train_records, skipped_at_load)
    eval_records, eval_skipped = load_conversations(config.eval_data) if config.eval_data else (None, None)
    if config.eval_data:
        require_records(config.eval_data, eval_records, eval_skipped, "eval_data")
    replay_text = read_replay_text(config.data) if config.data.replay else None

    model = build_training_model(config, trust_remote_code)
    # The arguments start the process group, which measuring the data shares its work over.
    args = training_arguments(config, has_eval=eval_records is not None)
    processor = training_processor(config, model.config, model.tokenizer)
    samples = ConversationDataset(train_records, processor, config.data.on_bad_record, measure_cache=output_dir)
    require_a_sample(config.data, samples, skipped_at_load)
    train_dataset = training_dataset(config, samples)
    if replay_text is not None:
        replay = config.data.replay
        with args.main_process_first(local=False, desc="replay windows"):  # made once, then read by the others
            window = replay.window or config.data.max_length
            windows = cached_text_windows(model.tokenizer, replay_text, window, output_dir)
        train_dataset = ReplayMix(train_dataset, windows, replay, config.seed)
    eval_dataset = None
    if eval_records is not None:
        eval_dataset = ConversationDataset(eval_records, processor, config.eval_data.on_bad_record)
        require_a_sample(config.eval_data, eval_dataset, eval_skipped, "eval_data")
    logger.info("training on %d records%s", len(train_records), _skips(skipped_at_load))

    settings = config.train
    trainer = LlavaTrainer(
        model=model,
        args=args,
        data_collator=Collator(model.tokenizer.pad_token_id, "right", pad_to_multiple_of=_pad_multiple()),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        run_config=to_dict(config),
        group_learning_rates=settings.part_learning_rates,
        callbacks=callbacks,
        group_by_modality_length=config.data.group_by_modality_length,
        objective=_objective(config, model),
    )
    return _train(trainer, config, checkpoint, skipped_at_load)


def _train(trainer: LlavaTrainer, config: TrainConfig, checkpoint: str | None, skipped_at_load) -> Path:
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
        trainer.state.save_to_json(str(output_dir / STATE_FILE))
    # Records skipped while samples were built, by any process (DataLoader workers and ranks), each once.
    skipped = skipped_at_load + trainer.train_dataset.skips.counts_across_processes()
    logger.info("saved %s%s", output_dir, _skips(skipped))
    # Every rank waits for the others, then leaves the process group: a rank exiting while gloo's threads still
    # run can abort ("terminate called without an active exception").
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return output_dir


def training_dataset(config: TrainConfig, samples: ConversationDataset) -> ConversationDataset | PackedDataset:
    """The samples, or with `data.packing` the rows they are packed into (`train.batch_size` rows per step)."""
    data = config.data
    if not data.packing:
        return samples
    return PackedDataset(samples, PackingBudget.of(data), data.pack_window, config.seed)


def _objective(config: TrainConfig, model) -> Objective | None:
    """The loss with its terms apart, when replay text is logged on its own or a KL to the base is added."""
    if config.data.replay is None and not config.train.kl_to_base:
        return None
    return Objective(model, config.train.kl_to_base, config.train.kl_positions)


def training_arguments(config: TrainConfig, has_eval: bool = False) -> TrainingArguments:
    settings = config.train
    bf16, fp16 = mixed_precision(settings.precision)
    return TrainingArguments(
        output_dir=config.output_dir,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_ratio,
        lr_scheduler_type=settings.scheduler,
        max_grad_norm=settings.max_grad_norm,
        optim=settings.optimizer,
        bf16=bf16,
        fp16=fp16,
        activation_checkpointing=settings.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if settings.gradient_checkpointing else None,
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(settings.eval_steps or settings.save_steps) if has_eval else None,
        prediction_loss_only=True,  # evaluation keeps the loss alone, gathering no logits or labels
        report_to=_report_to(settings.report_to),
        dataloader_num_workers=settings.num_workers,
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without an accelerator the Trainer must be told, or under torchrun / accelerate launch accelerate sees no
        # distributed run and every process trains alone; told, the processes are ranks over gloo.
        use_cpu=not _has_accelerator(),
        # Every rank runs the same modules every step (a text-only batch runs the projector on a blank image, see
        # LlavaLiteModel), so DDP needs no search for unused parameters - and fails loudly if one ever appears.
        ddp_find_unused_parameters=False,
        seed=config.seed,
        # The data's own order (a curriculum mix, a benchmark) or a new shuffle each epoch; grouping has its sampler.
        train_sampling_strategy="random" if config.data.shuffle else "sequential",
        # transformers hides its progress bar whenever its logging is quieter than warnings (as our CLI sets it).
        disable_tqdm=False,
    )


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


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch 2.6 and later: CUDA, MPS, XPU, ...
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available() or torch.backends.mps.is_available()


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


def _pad_multiple() -> int | None:
    return 8 if torch.cuda.is_available() else None  # tensor-core friendly shapes on GPUs


def _report_to(choice: list[str] | str) -> list[str] | str:
    if choice != "auto":
        return choice
    chosen = []
    if importlib.util.find_spec("tensorboard") is not None:
        chosen.append("tensorboard")
    # wandb asks for a login when it is not configured; only report there when it is.
    if importlib.util.find_spec("wandb") is not None and (
        os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")
    ):
        chosen.append("wandb")
    return chosen or "none"


def _skips(skipped) -> str:
    if not skipped:
        return ""
    return "; skipped records: " + ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items()))
