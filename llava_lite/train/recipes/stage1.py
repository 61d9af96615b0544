"""Stage 1, `recipe: stage1`: caption alignment. The projector alone learns to map the frozen tower's features
into the frozen LM's input space, on image-caption pairs rendered with the `plain` template (the image, then its
caption; LLaVA's pretraining)."""

from __future__ import annotations

import dataclasses
from collections import Counter

from llava_lite.config_io import ConfigError
from llava_lite.train.config import TrainConfig, with_learning_rates
from llava_lite.train.recipes import stage2
from llava_lite.train.trainer import LlavaTrainer

SUMMARY = "stage 1: the projector on image-caption pairs (tower and LM frozen)"
DEFAULT_METHOD = "none"  # the LM stays frozen
SECTION = None
DATA = "conversations"


def resolve(config: TrainConfig) -> TrainConfig:
    """Stage 1 trains the projector and nothing else; learning rate 1e-3 (LLaVA-1.5's), template `plain`."""
    if config.finetune.method != "none":
        raise ConfigError("recipe stage1 trains the projector alone: finetune.method must be none")
    if not config.finetune.train_projector:
        raise ConfigError("recipe stage1 trains the projector: finetune.train_projector must be true")
    if config.data.replay or config.train.kl_to_base:
        raise ConfigError("replay and kl_to_base keep what the LM knew; stage 1 does not train the LM")
    return dataclasses.replace(
        with_learning_rates(config, 1e-3, projector_lr=None), data_template=config.data_template or "plain"
    )


def build_trainer(
    config: TrainConfig, callbacks: list | None, trust_remote_code: bool
) -> tuple[LlavaTrainer, Counter]:
    """Captions are conversations of one turn: read, encoded, batched and trained as stage 2's are; what differs
    is what `resolve` froze and the template."""
    return stage2.build_trainer(config, callbacks, trust_remote_code)
