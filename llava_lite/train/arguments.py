"""transformers' TrainingArguments of a run, from its resolved config: the settings every recipe shares (batch,
schedule, precision, checkpoints, logging, the process group on CPUs or accelerators)."""

from __future__ import annotations

import importlib.util
import os

import torch
from transformers import TrainingArguments

from llava_lite.train.config import TrainConfig
from llava_lite.train.precision import mixed_precision


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


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch 2.6 and later: CUDA, MPS, XPU, ...
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def pad_multiple() -> int | None:
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
