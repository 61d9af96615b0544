"""The recipes `llava-lite train` runs, by the name a config's `recipe:` gives. A recipe is one module here.

Each recipe module says, as data and two functions, everything that makes its stage what it is:
- `SUMMARY`: one line for `llava-lite train --help` and the logs;
- `DEFAULT_METHOD`: `finetune.method` when the config names none (`none` trains the projector alone);
- `SECTION`: the name of its own settings section of `TrainConfig` (`preference`), or None;
- `DATA`: what its data sources hold: `conversations`, `pairs` or `prompts` (what `inspect-data` shows);
- `resolve(config)`: its checks and defaults (learning rates, template, its section), on a config whose shared
  defaults are already filled in;
- `build_trainer(config, callbacks, trust_remote_code)`: reads its data, builds and freezes the model, and returns
  its Trainer with the records skipped while reading.

Adding a recipe is adding a module and a line in `RECIPES`. `run_training` (`llava_lite.train.run`) asks the recipe
and does the rest the same way for all: resolve once, skip a finished run, resume, train, save.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from types import ModuleType
from typing import Protocol

from transformers import Trainer

from llava_lite.config_io import ConfigError
from llava_lite.train.config import TrainConfig
from llava_lite.train.recipes import preference, reward, rl, stage1, stage2


class Recipe(Protocol):
    """What `run_training` asks of a recipe module (see this package's docstring)."""

    SUMMARY: str
    DEFAULT_METHOD: str
    SECTION: str | None
    DATA: str

    def resolve(self, config: TrainConfig) -> TrainConfig: ...

    def build_trainer(
        self, config: TrainConfig, callbacks: list | None, trust_remote_code: bool
    ) -> tuple[Trainer, Counter]: ...


# A plain registry: grep finds every recipe here, and nothing registers itself at import.
RECIPES: dict[str, ModuleType] = {
    "stage1": stage1,
    "stage2": stage2,
    "preference": preference,
    "reward": reward,
    "rl": rl,
}


def recipe_named(name: str) -> Recipe:
    """The recipe module registered as `name`; ConfigError naming the known ones otherwise."""
    if name not in RECIPES:
        raise ConfigError(f"recipe: unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def resolved(config: TrainConfig) -> TrainConfig:
    """The config with every default filled in - the shared ones here, then its recipe's - as it is saved beside
    each checkpoint. Resolving a resolved config changes nothing."""
    recipe = recipe_named(config.recipe)
    for name, other in RECIPES.items():
        section = other.SECTION
        if section is not None and name != config.recipe and getattr(config, section) is not None:
            raise ConfigError(f"the {section} section is for recipe {name}, not {config.recipe}")
    if config.eval_data is not None and config.eval_data.replay is not None:
        raise ConfigError("eval_data: replay text is mixed into training data only")
    train = config.train
    if train.kl_to_base and train.kl_positions == "replay" and config.data.replay is None:
        raise ConfigError("train.kl_positions replay needs replay text (data.replay and a kind: text source)")
    method = config.finetune.method or recipe.DEFAULT_METHOD
    config = dataclasses.replace(config, finetune=dataclasses.replace(config.finetune, method=method))
    return recipe.resolve(config)
