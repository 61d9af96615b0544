"""Stage 2, `recipe: stage2`: masked instruction tuning. The projector and the LM (every weight, or adapters: LoRA,
QLoRA, any peft method, BitFit) learn from multimodal and text-only conversations, only the assistant's tokens
trained; optionally general text replayed beside them and a KL term to the starting LM (what the base knew)."""

from __future__ import annotations

import logging
from collections import Counter

from llava_lite.config_io import to_dict
from llava_lite.data.collator import Collator
from llava_lite.data.dataset import ConversationDataset, load_conversations
from llava_lite.data.packing import PackedDataset, PackingBudget
from llava_lite.data.preflight import require_a_sample, require_records
from llava_lite.data.replay import ReplayMix, cached_text_windows, read_replay_text
from llava_lite.data.skips import skips_note
from llava_lite.train.arguments import pad_multiple, training_arguments
from llava_lite.train.config import PARAMETER_EFFICIENT, TrainConfig, with_learning_rates
from llava_lite.train.regularizers import Objective
from llava_lite.train.trainable_model import build_training_model, training_processor
from llava_lite.train.trainer import LlavaTrainer

SUMMARY = "stage 2: the projector and the LM (full or adapters) on instruction conversations"
DEFAULT_METHOD = "full"
SECTION = None
DATA = "conversations"

logger = logging.getLogger(__name__)


def resolve(config: TrainConfig) -> TrainConfig:
    """Learning rates as LLaVA-1.5 trains: 2e-5 for every weight, 2e-4 for adapters and BitFit with the projector
    at 2e-5 beside them (1e-3 when the LM stays frozen, as in stage 1)."""
    method = config.finetune.method
    lr = {"none": 1e-3, "full": 2e-5}.get(method, 2e-4)
    return with_learning_rates(config, lr, projector_lr=2e-5 if method in PARAMETER_EFFICIENT else None)


def build_trainer(
    config: TrainConfig, callbacks: list | None, trust_remote_code: bool
) -> tuple[LlavaTrainer, Counter]:
    """The conversations read first (a bad record or a missing file fails in seconds), then the model, then the
    samples (measured once per run, shared by the processes), packed or padded, with replay text mixed in."""
    output_dir = config.output_dir
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
    logger.info("training on %d records%s", len(train_records), skips_note(skipped_at_load))

    trainer = LlavaTrainer(
        model=model,
        args=args,
        data_collator=Collator(model.tokenizer.pad_token_id, "right", pad_to_multiple_of=pad_multiple()),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        run_config=to_dict(config),
        group_learning_rates=config.train.part_learning_rates,
        callbacks=callbacks,
        group_by_modality_length=config.data.group_by_modality_length,
        objective=_objective(config, model),
    )
    return trainer, skipped_at_load


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
