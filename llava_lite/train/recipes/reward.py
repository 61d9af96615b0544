"""`recipe: reward`: a Bradley-Terry reward model on preference pairs with images, in transformers' Trainer.

The model is the run's LlavaLiteModel with a scalar head on the LM's last hidden state at each answer's last token
(`llava_lite.model.reward_head`). A step reads the same batches as `recipe: preference`
(`llava_lite.data.preference_pairs`): each pair's chosen and rejected answer as sequences of their own, padded or
packed with isolation, the prompt's images once per pair, so the tower runs once per image and both answers see the
same features. The loss, as TRL's RewardTrainer:

    -log sigmoid(r_chosen - r_rejected - margin) + center_rewards_coefficient * (r_chosen + r_rejected)^2

averaged over the pairs of the whole accumulated batch on every process; `margin` is each pair's `margin_column`
(0 without one). Logged beside the loss (means over the pairs since the last log): `accuracy` (the share of pairs
with r_chosen > r_rejected), `rewards/chosen`, `rewards/rejected`, `rewards/margins`.

The run folder is a run like any other (chat, generate and export read its model) with the head beside it;
`llava_lite.eval.reward_model.load_reward_model` scores with it, `eval --preference` measures its accuracy.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections import Counter

import torch
import torch.nn.functional as F

from llava_lite.config_io import ConfigError, to_dict
from llava_lite.data.config import DataConfig
from llava_lite.data.errors import BadRecordError
from llava_lite.data.formats import read_source, read_sources
from llava_lite.data.packing import PackedDataset, PackingBudget
from llava_lite.data.preference_formats import PreferencePair, load_pairs, parse_pair
from llava_lite.data.preference_pairs import PAIR_INDEX, PreferenceCollator, PreferenceDataset
from llava_lite.data.preflight import NoRecordsError, no_records_message, require_records
from llava_lite.model.pair_log_probs import split_batch
from llava_lite.model.reward_head import add_reward_head, sequence_rewards
from llava_lite.train.arguments import pad_multiple, training_arguments
from llava_lite.train.config import RewardSettings, TrainConfig, with_learning_rates
from llava_lite.train.trainable_model import build_training_model, training_processor
from llava_lite.train.trainer import LlavaTrainer

SUMMARY = "stage 3: a Bradley-Terry reward model on preference pairs (a scalar head on the last answer token)"
DEFAULT_METHOD = "full"
SECTION = "reward"
DATA = "pairs"

logger = logging.getLogger(__name__)

# Running sums of the logged metrics, in this order.
SUMS = ("correct", "chosen", "rejected", "margins", "pairs")


def resolve(config: TrainConfig) -> TrainConfig:
    """Its checks and section; learning rate 1e-5 for every weight (InstructGPT's and TRL's reward models' range),
    1e-4 for adapters and biases, the projector and the head at the LM's rate."""
    data = config.data
    if data.replay or data.text_sources or config.train.kl_to_base:
        raise ConfigError("recipe reward trains on pairs alone: no replay text, no kind: text source, no kl_to_base")
    if data.group_by_modality_length:
        raise ConfigError("recipe reward: data.group_by_modality_length is not supported (pack the pairs instead)")
    if config.eval_data is not None:
        raise ConfigError("recipe reward has no eval_data: measure held-out pairs with llava-lite eval --preference")
    config = dataclasses.replace(config, reward=config.reward or RewardSettings())
    return with_learning_rates(config, 1e-5 if config.finetune.method == "full" else 1e-4, projector_lr=None)


def reward_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float = 0.0,
) -> torch.Tensor:
    """Each pair's loss, `[pairs]`: -log sigmoid(r_chosen - r_rejected - margin), plus the coefficient times
    (r_chosen + r_rejected)^2 (so that its mean over the pairs is TRL's RewardTrainer loss)."""
    difference = chosen - rejected
    if margin is not None:
        difference = difference - margin.to(difference)
    loss = -F.logsigmoid(difference)
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * (chosen + rejected) ** 2
    return loss


class RewardMetrics:
    """Running sums of what a reward model logs, between two logs."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None

    def add(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        chosen, rejected = chosen.detach().double(), rejected.detach().double()
        step = torch.stack(
            [
                (chosen > rejected).double().sum(),
                chosen.sum(),
                rejected.sum(),
                (chosen - rejected).sum(),
                torch.tensor(float(len(chosen)), dtype=torch.float64, device=chosen.device),
            ]
        )
        self.sums = step if self.sums is None else self.sums + step

    def take(self, reduce) -> dict[str, float]:
        """The means since the last call over every process (`reduce` sums a tensor across them; every process calls
        this at the same step); the sums start again."""
        if self.sums is None:
            return {}
        values = dict(zip(SUMS, reduce(self.sums).tolist()))
        self.sums = None
        pairs = max(values["pairs"], 1.0)
        return {
            "accuracy": values["correct"] / pairs,
            "rewards/chosen": values["chosen"] / pairs,
            "rewards/rejected": values["rejected"] / pairs,
            "rewards/margins": values["margins"] / pairs,
        }


class RewardTrainer(LlavaTrainer):
    """LlavaTrainer (parameter groups, folder format, atomic checkpoints, skip counts) with the reward model's loss."""

    # The loss divides by the pairs of the whole accumulated batch itself.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, reward: RewardSettings, margins: torch.Tensor | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reward = reward
        self.margins = margins  # per pair of the data, by its index; None without a margin column
        self.metrics = RewardMetrics()

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """The pairs of the accumulated micro-batches, over every process."""
        if not batch_samples:
            return None
        pairs = torch.tensor(sum(len(batch[PAIR_INDEX]) for batch in batch_samples), device=device)
        if self.args.world_size > 1:
            pairs = self.accelerator.gather(pairs[None]).sum()
        return pairs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs, pair_index, _ = split_batch(inputs)
        pairs = len(pair_index)
        rewards = sequence_rewards(model, inputs)[: 2 * pairs]  # a packed row's trailing padding is one more
        chosen, rejected = rewards[0::2], rewards[1::2]
        margin = None if self.margins is None else self.margins[pair_index.cpu()].to(rewards.device)
        losses = reward_loss(chosen, rejected, margin, self.reward.center_rewards_coefficient)
        if num_items_in_batch is None:  # evaluation, or a batch on its own
            num_items_in_batch = torch.tensor(pairs)
        loss = losses.sum() / num_items_in_batch.to(losses.device).to(losses.dtype)
        # DDP averages the gradients over the processes; the count already covers all of them.
        loss = loss * self.accelerator.num_processes
        if model.training:
            self.metrics.add(chosen, rejected)
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.metrics.take(lambda sums: self.accelerator.reduce(sums, reduction="sum")))
        super().log(logs, start_time)


def build_trainer(
    config: TrainConfig, callbacks: list | None, trust_remote_code: bool
) -> tuple[RewardTrainer, Counter]:
    """The trainer of a resolved `recipe: reward` config, and the pairs skipped while the data was read.
    `trust_remote_code` is `run_training`'s."""
    args = training_arguments(config)
    settings = config.reward
    # The pairs are read before the model is built, so a bad record or a missing file fails in seconds.
    pairs, skipped_at_load = read_scored_pairs(config.data, settings.margin_column)
    require_records(config.data, pairs, skipped_at_load)
    model = build_training_model(config, trust_remote_code)
    head = add_reward_head(model)
    _freeze_unused_output_head(model)
    logger.info("trained %-15s %14s params, stored in float32", "reward_head", f"{head.weight.numel():,}")
    processor = training_processor(config, model.config, model.tokenizer, truncate=False)
    data = config.data
    dataset = PreferenceDataset(pairs, processor, data.max_length, data.overflow, data.on_bad_record)
    dataset.measure()  # every pair encoded once: bad pairs found now, lengths for packing
    if dataset.first_good() is None:
        raise NoRecordsError(no_records_message(data, skipped_at_load + dataset.skips.counts(), "data"))
    train_dataset = (
        PackedDataset(dataset, PackingBudget.of(data), data.pack_window, config.seed) if data.packing else dataset
    )
    margins = None
    if settings.margin_column is not None:
        margins = torch.tensor([pair.margin for pair in pairs], dtype=torch.float32)
    logger.info(
        "reward model on %d pairs%s%s", len(pairs),
        f", margins from `{settings.margin_column}`" if margins is not None else "",
        f", center_rewards_coefficient {settings.center_rewards_coefficient:g}"
        if settings.center_rewards_coefficient else "",
    )  # fmt: skip
    trainer = RewardTrainer(
        model=model,
        args=args,
        data_collator=PreferenceCollator(model.tokenizer.pad_token_id, pad_multiple()),
        train_dataset=train_dataset,
        run_config=to_dict(config),
        group_learning_rates=config.train.part_learning_rates,
        callbacks=callbacks,
        reward=settings,
        margins=margins,
    )
    return trainer, skipped_at_load


def _freeze_unused_output_head(model) -> None:
    """The LM's output head plays no part in a reward: left trainable, DDP would wait for its gradient forever. A
    head tied to the input embeddings is the embeddings, which the model reads, and keeps training."""
    head = model.language_model.get_output_embeddings()
    embeddings = model.language_model.get_input_embeddings()
    tied = {id(p) for p in embeddings.parameters()}
    for param in head.parameters() if head is not None else ():
        if id(param) not in tied:
            param.requires_grad_(False)


# ----- pairs with margins ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class ScoredPair(PreferencePair):
    """A preference pair and the margin its record gives (TRL's `margin` column)."""

    margin: float = 0.0


def read_scored_pairs(data: DataConfig, margin_column: str | None) -> tuple[list[PreferencePair], Counter]:
    """Every source's pairs (`load_pairs`); with `margin_column`, each with the number its record holds there - a
    record without one is a `malformed` bad record, an error or a counted skip as `on_bad_record` says."""
    if margin_column is None:
        return load_pairs(data)
    if not data.sources:
        raise ValueError("data: no sources given")
    parse = functools.partial(_parse_scored_pair, margin_column=margin_column)
    read = functools.partial(read_source, parse=parse)
    return read_sources(data.sources, data.on_bad_record, data.check_images_exist, read=read)


def _parse_scored_pair(row, where: str, roles: dict[str, str], margin_column: str) -> ScoredPair:
    pair = parse_pair(row, where, roles)
    margin = row.get(margin_column)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise BadRecordError(pair.source, "malformed", f"`{margin_column}` must be a number, got {margin!r}")
    return ScoredPair(**vars(pair), margin=float(margin))
