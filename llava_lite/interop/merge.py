"""Adapters folded into the language model: a run trained with LoRA (or another mergeable peft method)
becomes a plain run whose LM is ordinary transformers weights, answering as the adapted model did."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from llava_lite.interop.folders import check_output_folder, replace_folder_atomically
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.reward_head import has_reward_head, load_reward_head

logger = logging.getLogger(__name__)


def merge_adapters(model: LlavaLiteModel) -> LlavaLiteModel:
    """`model` with its adapters merged into the LM weights (in place); a model without adapters is returned as is."""
    if not model.uses_adapters:
        return model
    try:
        merged = model.language_model.merge_and_unload()
    except (AttributeError, NotImplementedError, ValueError) as err:
        method = next(iter(model.language_model.peft_config.values())).peft_type
        raise ValueError(f"the {method} adapters of this run cannot be merged into the weights ({err})") from None
    model.language_model = merged
    # The merged LM exists nowhere else: mark it as built here, so saving writes its weights into the run
    # instead of referring to the base model it started from.
    lm_config = dataclasses.replace(
        model.config.language_model, name=None, model_config={"model_type": merged.config.model_type}
    )
    model.config = dataclasses.replace(model.config, language_model=lm_config, adapter=None)
    return model


def export_merged(run: str | Path, out: str | Path, overwrite: bool = False, trust_remote_code: bool = False) -> Path:
    """Load `run`, merge its adapters, save the result as a normal run folder at `out` (written whole or not at all).
    `out` may not be, hold or lie in `run`, and `overwrite` replaces only an earlier export (interop/folders.py)."""
    check_output_folder(out, [run], overwrite)  # before the model loads
    model = LlavaLiteModel.from_pretrained(run, trust_remote_code=trust_remote_code)
    if not model.uses_adapters:
        logger.warning("%s has no adapters: the merged copy is the same model", run)
    merge_adapters(model)
    if has_reward_head(run):  # a reward model keeps its scalar head: save_pretrained writes it beside the model
        load_reward_head(model, run)
    return replace_folder_atomically(out, model.save_pretrained, overwrite, [run])
