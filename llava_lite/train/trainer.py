"""transformers' Trainer, taught our parameter groups, our folder format, atomic checkpoints, batches grouped by
modality and length when asked, logging skipped records, the replay and KL-to-base terms of the loss
(`llava_lite.train.regularizers`), an evaluation loss weighted by tokens as training's is, and two things about
engines: FSDP launch configs shard CPU processes too, and under ZeRO-3 the LM head is gathered with the model. The
loop itself (mixed precision, accumulation, schedulers, DDP/FSDP/DeepSpeed, logging, resume) is the Trainer's own.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
import yaml
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env
from transformers import Trainer

from llava_lite.data.collator import REPLAY_TOKENS
from llava_lite.data.sampler import ModalityLengthSampler
from llava_lite.model.saving import load_trained_weights
from llava_lite.run_folder import STAGING_DIR, TRAIN_CONFIG_FILE, checkpoint_name
from llava_lite.train.checkpoints import rotate_checkpoints
from llava_lite.train.precision import as_loaded_dtype
from llava_lite.train.regularizers import Objective, row_losses

logger = logging.getLogger(__name__)


class LlavaTrainer(Trainer):
    def __init__(
        self,
        *args,
        run_config: dict,
        group_learning_rates: dict[str, float],
        group_by_modality_length: bool = False,
        objective: Objective | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.run_config = run_config
        self.group_learning_rates = group_learning_rates
        self.group_by_modality_length = group_by_modality_length
        self.objective = objective
        self._staging = False
        self._head_registered = False
        self._eval_rows: list[torch.Tensor] = []

    # ----- FSDP on CPU processes, as on GPUs ----------------------------------------------------------------------
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if state.distributed_type == DistributedType.MULTI_CPU and parse_flag_from_env("ACCELERATE_USE_FSDP"):
            # accelerate turns an FSDP launch config on for accelerator devices only: CPU processes (gloo) would
            # silently train as DDP. torch's fully_shard runs over gloo, so the launcher's plugin is used as given.
            # AcceleratorState copies PartialState's fields each time it is made, so both say FSDP.
            PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the FSDP_* variables the launcher set
            self.is_fsdp_enabled = True

    # ----- optimizer: the projector (and tower) learn at their own rates -----------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = model or self.model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[str, bool], list] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            part = name.split(".", 1)[0]
            part = part if part in self.group_learning_rates else "language_model"
            groups.setdefault((part, name in decay), []).append(param)
        param_groups = [
            {
                "params": params,
                "lr": self.group_learning_rates[part],
                "weight_decay": self.args.weight_decay if decays else 0.0,
            }
            for (part, decays), params in sorted(groups.items())
        ]
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # ----- batches of one modality and similar lengths, when asked --------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        lengths, images = dataset.measure()
        group = self.args.per_device_train_batch_size * self.args.world_size
        return ModalityLengthSampler(lengths, images, group, seed=self.args.seed)

    @property
    def shards_weights(self) -> bool:
        """Whether the engine splits the weights themselves over the processes (FSDP, DeepSpeed ZeRO-3): then every
        process takes part in every forward."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return self.is_fsdp_enabled or (self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)

    def _head_gathered_with_the_model(self) -> None:
        """Under ZeRO-3, before the first loss: see `_register_head_with_the_model`."""
        if self.shards_weights and self.is_deepspeed_enabled and not self._head_registered:
            self._register_head_with_the_model()
            self._head_registered = True

    def _register_head_with_the_model(self) -> None:
        """The loss reads the LM head's weight in the model's forward rather than through the head's own forward
        (the head runs only where a label is). ZeRO-3 gathers a weight for its own module's forward, so the head's
        parameters are registered with the model, as DeepSpeed asks for weights used outside their module: they are
        gathered with the model's own, in training, evaluation and generation alike."""
        from deepspeed.runtime.zero import register_external_parameter

        model = self.accelerator.unwrap_model(self.model)
        for param in model.language_model.get_output_embeddings().parameters():
            register_external_parameter(model, param)

    # ----- replay and KL-to-base: the loss with its terms apart ---------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._head_gathered_with_the_model()
        replay_tokens = inputs.pop(REPLAY_TOKENS, None)
        if self.objective is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self.objective(model, inputs, replay_tokens, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As the Trainer's own loss: the token count covers every process and DDP averages the gradients.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, None) if return_outputs else loss

    # ----- evaluation: the loss alone, token-weighted as training's ------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The batch's loss over its target tokens; each row's sums are kept (gathered over processes, repeated
        rows dropped) so that the evaluation's loss weighs every token once, not every batch."""
        inputs = self._prepare_inputs({k: v for k, v in inputs.items() if k != REPLAY_TOKENS})
        with torch.no_grad():
            rows = row_losses(model, inputs)
        self._eval_rows.append(self.accelerator.gather_for_metrics(torch.stack([rows.nll, rows.tokens], dim=1)))
        loss = rows.nll.sum() / rows.tokens.sum().clamp(min=1)
        return loss.float().detach(), None, None

    def evaluation_loop(self, *args, **kwargs):
        self._eval_rows = []
        output = super().evaluation_loop(*args, **kwargs)
        if self._eval_rows:
            nll, tokens = torch.cat(self._eval_rows).sum(0).tolist()
            output.metrics[f"{kwargs.get('metric_key_prefix', 'eval')}_loss"] = nll / max(tokens, 1.0)
        self._eval_rows = []
        return output

    # ----- skipped records and the loss terms in the logs (every rank logs at the same steps) ---------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        skips = getattr(self.train_dataset, "skips", None)
        if skips is not None and "loss" in logs:
            skipped = sum(skips.counts_across_processes().values())
            if skipped:
                logs["skipped_records"] = float(skipped)
        if self.objective is not None and "loss" in logs:
            logs.update(self.objective.take_logs(lambda sums: self.accelerator.reduce(sums, reduction="sum")))
        super().log(logs, start_time)

    # ----- our folder format, with the resolved config beside every save ---------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not self._staging:  # the finished run, not a checkpoint: saved in the dtype it will be loaded in
            state_dict = as_loaded_dtype(unwrapped, state_dict if state_dict is not None else unwrapped.state_dict())
        unwrapped.save_pretrained(output_dir, state_dict=state_dict)
        with open(Path(output_dir) / TRAIN_CONFIG_FILE, "w", encoding="utf-8") as handle:
            yaml.safe_dump(self.run_config, handle, sort_keys=False)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_trained_weights(model or self.model, resume_from_checkpoint)

    # ----- atomic checkpoints: written in a staging folder, then renamed into place -----------------------
    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial)
        name = checkpoint_name(self.state.global_step)
        staging = Path(run_dir) / STAGING_DIR
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # what a killed save left behind
        self.accelerator.wait_for_everyone()  # no rank writes its RNG state or shards into the folder being cleared
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every rank's shards are in the staging folder before the rename
        if self.args.should_save:
            final = Path(run_dir) / name
            if final.exists():  # the same step saved again after a resume
                shutil.rmtree(final)
            os.replace(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            if self.state.best_model_checkpoint:
                self.state.best_model_checkpoint = self.state.best_model_checkpoint.replace(
                    f"{os.sep}{STAGING_DIR}", ""
                )
            # The Trainer's own rotation ran inside the staging folder; rotate the real ones, by step number (each
            # renamed away before it is deleted: see llava_lite.train.checkpoints).
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
