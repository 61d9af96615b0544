"""The `Processor` (`llava_lite.data.processor`: conversation -> ids, labels, image slots) that a model config
implies: its tokenizer, a chat template and the tower's image geometry - no weights built.

Training, generation, serving, evaluation, `inspect-data` and the benchmarks all get their processor here.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from llava_lite.data.processor import Overflow, Processor
from llava_lite.data.templates import get_template
from llava_lite.model.config import ModelConfig
from llava_lite.model.image_layout import image_geometry
from llava_lite.model.language_model import prepare_tokenizer


def processor_for_config(
    config: ModelConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    template: str | None = None,
    max_length: int | None = None,
    overflow: Overflow = "truncate",
) -> Processor:
    """`template` renders the conversations (default: the model's chat template; stage 1 uses `plain`).

    `tokenizer` is the model's own when a model is at hand; without one, the config's tokenizer is prepared as
    the model prepares it (`<image>` and the templates' markers added)."""
    name = template or config.chat_template
    if tokenizer is None:
        tokenizer, _ = prepare_tokenizer(config, name)
    geometry = image_geometry(config)
    return Processor(tokenizer, get_template(name, tokenizer), geometry, config.image_token, max_length, overflow)
