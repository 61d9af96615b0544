"""Stage 3 as reward maximisation, `recipe: rl`: on-policy RL of the GRPO family (GRPO, Dr. GRPO, DAPO, GSPO, RLOO)
with images, from a stage-2 or stage-3 run.

Its data are prompt lines (`llava_lite.train.rl_prompts`), its settings the `rl` section (`RLSettings`). Each step
samples G answers to each of `train.batch_size` prompts per process - the tower once per image, one prefill per
prompt shared by its G answers (`llava_lite.inference.group_sampling`) - scores them with the rewards
(`llava_lite.rewards`), takes advantages within each group and updates on the answers packed with isolation,
log-probabilities from the chunked head at the answers' tokens only (`llava_lite.train.rl_update`), with TRL's losses
(`llava_lite.train.rl_loss`). The loop is `llava_lite.train.rl_trainer`'s; the reference (`beta` > 0) is the LM with
its adapters off, or its starting weights kept beside it (`llava_lite.train.reference.ReferenceLM`) - under ZeRO-3
and FSDP2 a copy of them that the engine splits (`llava_lite.train.sharded_reference`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

from llava_lite.config_io import ConfigError, to_dict
from llava_lite.data.preflight import NoRecordsError, no_records_message, require_records
from llava_lite.model.prompt_learning import prompt_learning_config
from llava_lite.rewards import RewardContext, build_rewards, check_rewards
from llava_lite.train.arguments import training_arguments
from llava_lite.train.config import RLSettings, TrainConfig, with_learning_rates
from llava_lite.train.launch import sharding_engine
from llava_lite.train.reference import ReferenceLM
from llava_lite.train.rl_prompts import PromptDataset, load_prompt_lines
from llava_lite.train.rl_trainer import RLTrainer, keep_items
from llava_lite.train.sharded_reference import ShardedReference
from llava_lite.train.trainable_model import build_training_model, training_processor

SUMMARY = "stage 3: reward maximisation by on-policy RL on prompts (GRPO, Dr. GRPO, DAPO, GSPO, RLOO)"
DEFAULT_METHOD = "full"
SECTION = "rl"
DATA = "prompts"

logger = logging.getLogger(__name__)


def resolve(config: TrainConfig) -> TrainConfig:
    """Its checks and the defaults of its section; learning rate 1e-6 for every weight (TRL's GRPO default), 1e-5
    for adapters, the projector at the same rate."""
    method = config.finetune.method
    _check_data(config)
    if method == "none":
        raise ConfigError("recipe rl tunes the LM: finetune.method must not be none")
    settings = _resolved_settings(config.rl or RLSettings())
    if config.train.save_steps % settings.num_iterations:
        raise ConfigError(
            f"recipe rl: train.save_steps ({config.train.save_steps}) must be a multiple of rl.num_iterations "
            f"({settings.num_iterations}), so that a checkpoint never falls inside a generation batch's updates"
        )
    config = dataclasses.replace(config, rl=settings)
    return with_learning_rates(config, 1e-6 if method == "full" else 1e-5, projector_lr=None)


def _check_data(config: TrainConfig) -> None:
    data = config.data
    if data.replay or data.text_sources or config.train.kl_to_base:
        raise ConfigError("recipe rl samples answers to prompts: no replay text, no kind: text source, no kl_to_base")
    if data.group_by_modality_length:
        raise ConfigError("recipe rl: data.group_by_modality_length is not supported (the update is always packed)")
    if config.eval_data is not None:
        raise ConfigError("recipe rl has no eval_data: measure held-out prompts with llava-lite eval or generate")


def _resolved_settings(settings: RLSettings) -> RLSettings:
    try:
        check_rewards(settings.rewards)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    scale = settings.scale_rewards or ("group" if settings.advantage == "group" else "none")
    if settings.advantage == "rloo" and scale == "group":
        raise ConfigError("rl.advantage rloo takes scale_rewards none or batch (its baseline is the group's own)")
    low, high = (3e-4, 4e-4) if settings.loss == "gspo" else (0.2, None)
    epsilon = settings.epsilon if settings.epsilon is not None else low
    epsilon_high = settings.epsilon_high if settings.epsilon_high is not None else (high or epsilon)
    return dataclasses.replace(settings, scale_rewards=scale, epsilon=epsilon, epsilon_high=epsilon_high)


def build_trainer(config: TrainConfig, callbacks: list | None, trust_remote_code: bool) -> tuple[RLTrainer, Counter]:
    """The trainer of a resolved `recipe: rl` config, and the prompt lines skipped while the data was read."""
    settings = config.rl
    # The prompts and rewards are read before the model is built: a bad line or reward fails in seconds. The
    # arguments come first: they start the process group, and a reward model goes on this process's device.
    args = training_arguments(config)
    lines, skipped_at_load = load_prompt_lines(config.data)
    require_records(config.data, lines, skipped_at_load)
    run_folders = [folder for folder in (config.init_from, config.output_dir) if folder]
    rewards = build_rewards(settings.rewards, RewardContext(settings.max_new_tokens, run_folders, str(args.device)))
    model = build_training_model(config, trust_remote_code)
    if prompt_learning_config(model.language_model) is not None:
        raise ConfigError("recipe rl shares each prompt's KV cache between its answers: no prompt-learning peft method")
    processor = training_processor(config, model.config, model.tokenizer, truncate=False)
    dataset = PromptDataset(lines, processor, config.data.max_length, config.data.on_bad_record)
    if dataset.first_good() is None:
        raise NoRecordsError(no_records_message(config.data, skipped_at_load + dataset.skips.counts(), "data"))
    logger.info(
        "RL (%s, %s advantages, %d answers per prompt, rewards %s%s) on %d prompts",
        settings.loss, settings.advantage, settings.num_generations,
        ", ".join(f"{r.name} x {r.weight:g}" for r in rewards),
        f", beta {settings.beta:g}" if settings.beta else "", len(lines),
    )  # fmt: skip
    trainer = RLTrainer(
        model=model,
        args=args,
        data_collator=keep_items,
        train_dataset=dataset,
        run_config=to_dict(config),
        group_learning_rates=config.train.part_learning_rates,
        callbacks=callbacks,
        rl=settings,
        rewards=rewards,
        prompt_processor=processor,
        tower_trains=config.finetune.train_vision_tower,
        reference=_reference(model) if settings.beta else None,
    )
    return trainer, skipped_at_load


def _reference(model) -> ReferenceLM | ShardedReference:
    """The LM with its adapters off; without adapters its starting weights - kept beside the model, or, where the
    engine splits the weights (ZeRO-3, FSDP2), a copy that the engine splits too."""
    if model.uses_adapters or sharding_engine() is None:
        return ReferenceLM(model)
    logger.info("the reference (the LM's starting weights) is split by %s as the model is", sharding_engine())
    return ShardedReference(model)
