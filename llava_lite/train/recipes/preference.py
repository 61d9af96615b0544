"""Stage 3, `recipe: preference`: preference tuning on pairs with images (DPO and its family), in transformers'
Trainer.

A step: the collator's batch holds each pair's chosen and rejected answer as sequences of their own (padded rows,
or packed into one padding-free row whose samples attend alone) and each pair's images once. The policy pass runs
the tower once per image, scatters the features into both answers' image slots, and takes each answer's summed
log-probability from the chunked LM head at the answer's tokens only. The reference's come from the same model
with its adapters off (reusing the policy pass's tower features), or from the table computed before training
(`llava_lite.train.preference_reference`); simpo and orpo need none. The loss and the logged metrics are
`llava_lite.train.preference_loss`'s, normalised over the whole accumulated batch on every process.

`build_trainer` builds the trainer from a resolved config; `run_training` runs it like any recipe, so the recipe is
`llava-lite train CONFIG.yaml` and, from Python, `run_training(config)`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

import torch
from transformers import TrainerCallback

from llava_lite.config_io import ConfigError, to_dict
from llava_lite.data.packing import PackedDataset, PackingBudget
from llava_lite.data.preference_formats import load_pairs
from llava_lite.data.preference_pairs import COMPLETION_TOKENS, PAIR_INDEX, PreferenceCollator, PreferenceDataset
from llava_lite.data.preflight import NoRecordsError, no_records_message, require_records
from llava_lite.model.pair_log_probs import log_probs_of_pairs, pair_log_probs, split_batch
from llava_lite.run_folder import REFERENCE_LOGPS_FILE
from llava_lite.train.arguments import pad_multiple, training_arguments
from llava_lite.train.config import REFERENCE_FREE, PreferenceSettings, TrainConfig, with_learning_rates
from llava_lite.train.preference_loss import PreferenceMetrics, batch_loss, preference_terms
from llava_lite.train.preference_reference import (
    AdaptersOffReference,
    PrecomputedReference,
    reference_fingerprint,
    starting_model_context,
)
from llava_lite.train.trainable_model import build_training_model, training_processor
from llava_lite.train.trainer import LlavaTrainer

SUMMARY = "stage 3: preference tuning on pairs (DPO, IPO, hinge, robust, SimPO, ORPO)"
DEFAULT_METHOD = "full"
SECTION = "preference"
DATA = "pairs"

logger = logging.getLogger(__name__)


def resolve(config: TrainConfig) -> TrainConfig:
    """Its checks and the defaults of its section; learning rate 5e-7 for every weight, 5e-6 for adapters (TRL's and
    the DPO papers' range: far below SFT's), the projector at the same rate."""
    method = config.finetune.method
    settings = _resolved_settings(config, method)
    config = dataclasses.replace(config, preference=settings)
    return with_learning_rates(config, 5e-7 if method == "full" else 5e-6, projector_lr=None)


def _resolved_settings(config: TrainConfig, method: str) -> PreferenceSettings:
    """What its data and method may be, and its loss's beta, NLL weight and reference."""
    data, settings = config.data, config.preference or PreferenceSettings()
    if method == "none":
        raise ConfigError("recipe preference tunes the LM: finetune.method must not be none")
    if data.replay or data.text_sources or config.train.kl_to_base:
        raise ConfigError(
            "recipe preference trains on pairs alone: no replay text, no kind: text source, no kl_to_base"
        )
    if data.group_by_modality_length:
        raise ConfigError("recipe preference: data.group_by_modality_length is not supported (pack the pairs instead)")
    if config.eval_data is not None:
        raise ConfigError(
            "recipe preference has no eval_data: measure held-out pairs with llava-lite eval --preference"
        )
    reference = settings.reference
    if settings.loss in REFERENCE_FREE:
        if reference not in ("auto", "none"):
            raise ConfigError(f"preference.loss {settings.loss} needs no reference: set preference.reference none")
        reference = "none"
    elif reference == "none":
        raise ConfigError(f"preference.loss {settings.loss} needs a reference (adapters_off or precomputed)")
    elif reference == "auto":
        reference = "adapters_off" if method in ("lora", "qlora", "peft") else "precomputed"
    elif reference == "adapters_off" and method not in ("lora", "qlora", "peft"):
        raise ConfigError(
            f"preference.reference adapters_off needs adapters (finetune.method lora, qlora or peft), not {method}: "
            "use precomputed, which keeps no second copy of the model"
        )
    return dataclasses.replace(
        settings,
        beta=settings.beta or (2.0 if settings.loss == "simpo" else 0.1),
        # An NLL term on the chosen answer unless asked otherwise (RPO's): plain DPO on a model's own mistakes lowers
        # the chosen answers' log-probs with the rejected ones and made the model worse (see the README's RL demo).
        sft_weight=settings.sft_weight if settings.sft_weight is not None else 1.0,
        reference=reference,
    )



class PreferenceTrainer(LlavaTrainer):
    """LlavaTrainer (parameter groups, folder format, atomic checkpoints, skip counts) with the preference loss."""

    # The loss divides by the pairs and chosen tokens of the whole accumulated batch itself.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, preference: PreferenceSettings, reference=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.preference = preference
        self.reference = reference  # AdaptersOffReference, PrecomputedReference, or None (simpo, orpo)
        self.metrics = PreferenceMetrics()

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """[pairs, chosen answer tokens] of the accumulated micro-batches, over every process."""
        if not batch_samples:
            return None
        counts = torch.tensor(
            [[len(batch[PAIR_INDEX]), int(batch[COMPLETION_TOKENS][0::2].sum())] for batch in batch_samples]
        ).sum(0)
        counts = counts.to(device)
        if self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(0)
        return counts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._head_gathered_with_the_model()
        inputs, pair_index, completion_tokens = split_batch(inputs)
        policy, image_features = pair_log_probs(model, inputs, completion_tokens)
        reference = None
        if self.reference is not None:
            unwrapped = self.accelerator.unwrap_model(model)
            with self.accelerator.autocast():  # the reference pass runs outside the wrapped (autocast) forward
                reference = self.reference.log_probs(unwrapped, inputs, completion_tokens, image_features, pair_index)
        terms = preference_terms(self.preference, policy, reference)
        if num_items_in_batch is None:  # evaluation, or a batch on its own
            num_items_in_batch = torch.stack([torch.tensor(len(pair_index)), completion_tokens[0::2].sum()])
        counts = num_items_in_batch.to(policy.chosen.device).to(policy.chosen.dtype)
        loss = batch_loss(self.preference, terms, policy, counts[0], counts[1].clamp(min=1))
        # DDP averages the gradients over the processes; the counts already cover all of them.
        loss = loss * self.accelerator.num_processes
        if model.training:
            self.metrics.add(terms, policy)
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            settings = self.preference
            logs.update(
                self.metrics.take(
                    lambda sums: self.accelerator.reduce(sums, reduction="sum"),
                    with_nll=bool(settings.sft_weight),
                    with_odds=settings.loss == "orpo",
                )
            )
        super().log(logs, start_time)


def build_trainer(
    config: TrainConfig, callbacks: list | None, trust_remote_code: bool
) -> tuple[PreferenceTrainer, Counter]:
    """The trainer of a resolved `recipe: preference` config, its reference ready (computed or loaded when
    precomputed), and the pairs skipped while the data was read. `trust_remote_code` is `run_training`'s."""
    args = training_arguments(config)
    # The pairs are read before the model is built, so a bad record or a missing file fails in seconds.
    pairs, skipped_at_load = load_pairs(config.data)
    require_records(config.data, pairs, skipped_at_load)
    model = build_training_model(config, trust_remote_code)
    processor = training_processor(config, model.config, model.tokenizer, truncate=False)
    data = config.data
    dataset = PreferenceDataset(pairs, processor, data.max_length, data.overflow, data.on_bad_record)
    dataset.measure()  # every pair encoded once: bad pairs found now, lengths for packing, the data's fingerprint
    if dataset.first_good() is None:
        raise NoRecordsError(no_records_message(data, skipped_at_load + dataset.skips.counts(), "data"))
    train_dataset = (
        PackedDataset(dataset, PackingBudget.of(data), data.pack_window, config.seed) if data.packing else dataset
    )
    settings = config.preference
    logger.info(
        "preference tuning (%s, beta %g%s) on %d pairs%s", settings.loss, settings.beta,
        f", sft_weight {settings.sft_weight:g}" if settings.sft_weight else "", len(pairs),
        f"; reference: {settings.reference}",
    )  # fmt: skip
    train = config.train
    trainer = PreferenceTrainer(
        model=model,
        args=args,
        data_collator=PreferenceCollator(model.tokenizer.pad_token_id, pad_multiple()),
        train_dataset=train_dataset,
        run_config=to_dict(config),
        group_learning_rates=train.part_learning_rates,
        callbacks=callbacks,
        preference=settings,
        reference=AdaptersOffReference(model) if settings.reference == "adapters_off" else None,
    )
    if settings.reference == "precomputed" and trainer.shards_weights:
        trainer.add_callback(ReferenceAtTrainBegin(trainer, config, dataset, train_dataset))
    elif settings.reference == "precomputed":
        trainer.reference = precomputed_reference(trainer, config, dataset, train_dataset)
    return trainer, skipped_at_load


class ReferenceAtTrainBegin(TrainerCallback):
    """Under ZeRO-3 and FSDP the reference pass waits for the engine: ZeRO-3 splits the weights as the model is
    built and gathers them only for its engine's forward, FSDP shards them when the Trainer prepares the model. At
    the start of training (and of a resumed run, before its first step) every process runs it on its engine."""

    def __init__(self, trainer: PreferenceTrainer, config: TrainConfig, dataset: PreferenceDataset, items) -> None:
        self.trainer, self.config, self.dataset, self.items = trainer, config, dataset, items

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.reference is None:
            self.trainer._head_gathered_with_the_model()  # before the first forward reads the head
            # A resumed run's engine holds the checkpoint's weights by now, not the starting model's.
            self.trainer.reference = precomputed_reference(
                self.trainer, self.config, self.dataset, self.items, may_compute=state.global_step == 0
            )


def precomputed_reference(
    trainer: PreferenceTrainer, config: TrainConfig, dataset: PreferenceDataset, items, may_compute: bool = True
) -> PrecomputedReference:
    """The run folder's stored reference log-probabilities when they fit this data and base; else computed now, by
    the model as it starts, each process taking every N-th item, and stored by rank 0. Without `may_compute` (the
    model no longer is the starting one) a missing or stale table is an error."""
    fingerprint = reference_fingerprint(config, dataset.fingerprint)
    path = Path(config.output_dir) / REFERENCE_LOGPS_FILE
    stored = PrecomputedReference.load(path, fingerprint)
    if stored is not None:
        logger.info("reusing the reference log-probs in %s", path)
        return stored
    if not may_compute:
        raise ValueError(
            f"{path}: missing, or made for other data or another base, and a resumed run cannot compute it "
            "again from its starting model; start the run afresh (resume: never)"
        )
    args, accelerator = trainer.args, trainer.accelerator
    model = trainer.model
    mine = [items[i] for i in range(args.process_index, len(items), args.world_size)]
    logger.info("computing the reference log-probs of %d pairs (stored in %s)", len(dataset), path)
    if trainer.shards_weights:  # every forward gathers weights from every process: all run as many batches
        mine += [items[0]] * (-(-len(items) // args.world_size) - len(mine))  # met twice: averaged below
    indices, chosen, rejected = log_probs_of_pairs(
        model,
        mine,
        trainer.data_collator,
        config.train.batch_size,
        args.device,
        starting_model_context(model, accelerator.autocast),
        total=len(mine),
        progress=args.process_index == 0,
    )
    # Summed over the processes, with how often each pair was met (a skipped item stands in for the next good one).
    table = torch.zeros(3, len(dataset), dtype=torch.float64)
    table[0].index_add_(0, indices, chosen.double())
    table[1].index_add_(0, indices, rejected.double())
    table[2].index_add_(0, indices, torch.ones_like(chosen, dtype=torch.float64))
    if args.world_size > 1:
        table = accelerator.reduce(table.to(args.device), reduction="sum").cpu()
    met = table[2].clamp(min=1)
    reference = PrecomputedReference(table[0] / met, table[1] / met)
    if args.should_save:
        reference.save(path, fingerprint)
    accelerator.wait_for_everyone()
    return reference
