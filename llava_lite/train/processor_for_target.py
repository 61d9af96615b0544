"""The processor and data config that `inspect-data` looks through: a recipe YAML's, exactly as its run would encode
its data, or a bare data file's under a model of one's choosing - built from configs alone, no model weights.

It sits in `train/` because a recipe's processor is the recipe's business (its templates, whether it truncates);
the inspection itself (`llava_lite.data.inspection`) needs only the processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llava_lite.config_io import ConfigError
from llava_lite.data.config import DataConfig, DataSource
from llava_lite.data.processor import Processor
from llava_lite.model.presets import resolve_model_config
from llava_lite.model.processor_for_config import processor_for_config
from llava_lite.train.config import check_data_paths, load_train_config
from llava_lite.train.recipes import recipe_named, resolved
from llava_lite.train.trainable_model import training_processor


@dataclass
class InspectionTarget:
    processor: Processor
    data_config: DataConfig
    pairs: bool  # the data are preference pairs (stage 3), not conversations


def processor_for_target(
    target: str | Path,
    model: str | None = None,
    template: str | None = None,
    max_length: int | None = None,
    image_folder: str | None = None,
    pairs: bool = False,
    trust_remote_code: bool = False,
) -> InspectionTarget:
    """`target` a recipe .yaml: its data and processor (the model of `model`, else its `init_from` or `model`;
    `template` and `max_length` override the recipe's), pairs when the recipe trains on pairs. Otherwise a data file
    (images in `image_folder`, default its own folder) under `model` (default: the tiny preset); `pairs` says it
    holds preference pairs, which keep every token (they are cut by their own rule)."""
    target = Path(target)
    if target.suffix.lower() in (".yaml", ".yml"):
        recipe = resolved(load_train_config(target))
        data = recipe_named(recipe.recipe).DATA
        if data not in ("conversations", "pairs"):
            raise ConfigError(
                f"{target}: recipe {recipe.recipe} trains on {data}, which inspect-data does not show (it shows "
                "conversations and preference pairs); `llava-lite generate` answers prompt lines as the run samples "
                "them"
            )
        trains_on_pairs = data == "pairs"
        check_data_paths(recipe)
        if template:
            recipe.data_template = template
        if max_length is not None:
            recipe.data.max_length = max_length
        model_config = resolve_model_config(
            model or recipe.init_from or recipe.model, trust_remote_code=trust_remote_code
        )
        processor = training_processor(recipe, model_config, truncate=not trains_on_pairs)
        return InspectionTarget(processor, recipe.data, trains_on_pairs)
    if not target.exists():
        raise ConfigError(f"{target}: no such data file")
    data_config = DataConfig(sources=[DataSource(path=str(target), image_folder=image_folder)])
    if max_length is not None:
        data_config.max_length = max_length
    model_config = resolve_model_config(model or "tiny", trust_remote_code=trust_remote_code)
    processor = processor_for_config(
        model_config,
        template=template,
        max_length=None if pairs else data_config.max_length,  # pairs are cut by their own rule
        overflow=data_config.overflow,
    )
    return InspectionTarget(processor, data_config, pairs)
