"""A llava_lite model as a transformers Llava folder: `LlavaForConditionalGeneration` and `AutoProcessor`
load it with no custom code (and so do the servers that read that format).

What maps, and how:
- vision tower: a transformers CLIP or SigLIP model as it is; an OpenAI-style open_clip ViT converted to
  `CLIPVisionModel` (`open_clip_to_hf`); `feature_layer` is `vision_feature_layer` (both count hidden states
  the same way) and `cls_token: drop` is the `default` select strategy, `keep` is `full`.
- projector: transformers' projector is always `linear_1 -> act -> linear_2`. `mlp2x_gelu` is exactly that;
  `linear` is written as `linear_1`, an identity activation (`projector_hidden_act: linear`) and an identity
  `linear_2`, which computes the same thing; deeper MLPs have no equivalent and are refused.
- language model: the causal LM's base model under `model.language_model`, its head as `lm_head`.
- adapters are merged first; the weights are written by transformers' own `save_pretrained`, so the
  folder has the layout the installed transformers writes and reads.
- tokenizer with `<image>`, our chat template as Jinja, the image processor, and a `LlavaProcessor` that
  expands each `<image>` to as many tokens as the tower gives.
- the AnyRes layout is transformers' LlavaNext: `LlavaNextForConditionalGeneration` with our `grid_pinpoints` as
  `image_grid_pinpoints` and the projector's newline as `image_newline`, a `LlavaNextImageProcessor` and a
  `LlavaNextProcessor`. A pixel shuffle has no equivalent in either and is refused.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
)

from llava_lite.data.templates import ChatTemplate, get_template
from llava_lite.inference.generator import stop_token_ids
from llava_lite.interop.chat_template import jinja_chat_template
from llava_lite.interop.folders import check_output_folder, replace_folder_atomically
from llava_lite.interop.image_processor import export_image_processor, open_clip_settings
from llava_lite.interop.merge import merge_adapters
from llava_lite.interop.open_clip_to_hf import NotConvertible, clip_vision_config, clip_vision_state_dict
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.projector import Projector
from llava_lite.model.saving import keep_legacy_flag
from llava_lite.model.vision.hf_tower import processor_settings

logger = logging.getLogger(__name__)


def export_hf_llava(
    model: LlavaLiteModel,
    out: str | Path,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    sources: Iterable[str | Path] = (),
) -> Path:
    """Write `model` to `out` in transformers' Llava format (whole or not at all); adapters are merged first,
    in place. `out` may not be, hold or lie in one of `sources` (the folder `model` came from), and
    `overwrite` replaces only an earlier export (interop/folders.py)."""
    check_output_folder(out, sources, overwrite)  # before the weights are assembled
    hf_model = _assemble_for_saving(model, dtype)
    processor = hf_llava_processor(model)

    def write(folder: Path) -> None:
        hf_model.save_pretrained(folder)
        processor.save_pretrained(folder)
        keep_legacy_flag(processor.tokenizer, folder)

    return replace_folder_atomically(out, write, overwrite, sources)


def _assemble_for_saving(model: LlavaLiteModel, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A `LlavaForConditionalGeneration` (`LlavaNextForConditionalGeneration` under AnyRes) holding `model`'s
    weights (shared, not copied, where dtypes allow), to be saved: it is built on the meta device, so nothing is
    initialised only to be overwritten, and its non-persistent buffers (rotary frequencies, position ids) stay
    there - transformers rebuilds them when the folder is loaded. `model`'s adapters are merged first."""
    if model.projector.pixel_shuffle > 1:
        raise NotConvertible(
            "transformers' Llava and LlavaNext have no pixel shuffle before the projector; "
            "a run with projector.pixel_shuffle > 1 does not export"
        )
    model = merge_adapters(model)
    lm = model.language_model
    dtype = dtype or lm.get_input_embeddings().weight.dtype
    vision_config, vision_state, strategy = vision_part(model)
    projector_act, projector_state = projector_part(model.projector)
    text_config = lm.config  # read only: `to_dict` below copies it
    settings = {
        "vision_config": vision_config.to_dict(),
        "text_config": text_config.to_dict(),
        "image_seq_length": model.vision_tower.num_patches,
        "vision_feature_layer": model.vision_tower.config.feature_layer,
        "vision_feature_select_strategy": strategy,
        "projector_hidden_act": projector_act,
        "multimodal_projector_bias": True,
        "tie_word_embeddings": bool(getattr(text_config, "tie_word_embeddings", False)),
    }
    if model.anyres is not None:
        pinpoints = [list(p) for p in model.anyres.pinpoints]
        config = LlavaNextConfig(**settings, image_token_index=model.image_token_id, image_grid_pinpoints=pinpoints)
        model_class = LlavaNextForConditionalGeneration
    else:
        config = LlavaConfig(**settings, image_token_id=model.image_token_id)
        model_class = LlavaForConditionalGeneration
    for part in (config, config.text_config, config.vision_config):
        part.dtype = dtype
    state = {
        **{f"model.vision_tower.{k}": v for k, v in vision_state.items()},
        **{f"model.multi_modal_projector.{k}": v for k, v in projector_state.items()},
        **language_model_state(lm),
    }
    if model.anyres is not None:
        state["model.image_newline"] = model.projector.image_newline
    with torch.device("meta"):
        hf_model = model_class(config)
    _check_names(hf_model, state)
    hf_model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    hf_model.tie_weights()
    hf_model.generation_config = _generation_config(model)
    return hf_model.eval()


def vision_part(model: LlavaLiteModel) -> tuple:
    """The vision config, the tower's weights under transformers' names, and the feature select strategy."""
    tower = model.vision_tower
    if tower.config.type == "open_clip":
        visual = tower.visual
        return clip_vision_config(visual), clip_vision_state_dict(visual), select_strategy(tower)
    return tower.model.config, dict(tower.model.state_dict()), select_strategy(tower)


def select_strategy(tower) -> str:
    """`default` drops the first token (CLIP's CLS); `full` keeps all. SigLIP has no CLS token, so `default`
    would drop a patch: it is always `full`."""
    if tower.config.cls_token == "keep" or tower.config.type == "hf_siglip":
        return "full"
    return "default"


def projector_part(projector: Projector) -> tuple[str, dict[str, torch.Tensor]]:
    """The activation name and `linear_1`/`linear_2` weights of transformers' two-layer projector."""
    if projector.depth == 2:
        return "gelu", {k: v for k, v in projector.state_dict().items() if k.startswith(("linear_1.", "linear_2."))}
    if projector.depth == 1:
        width = projector.linear_1.out_features
        weight = projector.linear_1.weight
        identity = torch.eye(width, dtype=weight.dtype, device=weight.device)
        return "linear", {
            "linear_1.weight": projector.linear_1.weight,
            "linear_1.bias": projector.linear_1.bias,
            "linear_2.weight": identity,
            "linear_2.bias": torch.zeros(width, dtype=weight.dtype, device=weight.device),
        }
    raise NotConvertible(
        f"a projector of {projector.depth} linear layers has no transformers Llava equivalent "
        "(its projector is linear_1 -> activation -> linear_2); only linear and mlp2x_gelu export"
    )


def language_model_state(lm) -> dict[str, torch.Tensor]:
    """A causal LM's weights as Llava holds them: the base model under `model.language_model.`, `lm_head.`."""
    prefix = lm.base_model_prefix + "."
    state = {}
    for name, tensor in lm.state_dict().items():
        if name.startswith(prefix):
            state["model.language_model." + name[len(prefix) :]] = tensor
        elif name.startswith("lm_head."):
            state[name] = tensor
        else:
            raise NotConvertible(
                f"{type(lm).__name__} has a weight {name} outside its base model and lm_head; Llava cannot hold it"
            )
    return state


def hf_llava_processor(model: LlavaLiteModel) -> LlavaProcessor | LlavaNextProcessor:
    """Tokenizer (with `<image>` and the chat template) and image processor, as one `LlavaProcessor`
    (`LlavaNextProcessor` under AnyRes)."""
    tower = model.vision_tower
    tokenizer = copy.deepcopy(model.tokenizer)
    template = jinja_chat_template(model_template(model), tokenizer, model.config.image_token)
    tokenizer.chat_template = template
    has_cls = tower.config.type != "hf_siglip"
    if model.anyres is not None:
        processor_class, image_processor = LlavaNextProcessor, _llava_next_image_processor(model)
    else:
        processor_class = LlavaProcessor
        image_processor = export_image_processor(tower, tower.config.image_aspect == "pad")
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_patch_size(tower),
        vision_feature_select_strategy=select_strategy(tower),
        chat_template=template,
        image_token=model.config.image_token,
        # The processor counts (grid + extra tokens), minus one under `default`; CLIP-style towers add a CLS.
        num_additional_image_tokens=1 if has_cls else 0,
    )


def _llava_next_image_processor(model: LlavaLiteModel) -> LlavaNextImageProcessor:
    """The tower's resize, crop and normalisation with our pinpoints; LlavaNext's `do_pad` pads the views of a
    batch's images to one count (what our collator's list does), not the image to a square."""
    tower = model.vision_tower
    if tower.config.type == "open_clip":
        settings = open_clip_settings(tower.architecture_config().preprocess or {})
    else:
        settings = processor_settings(tower.processor)
        settings.setdefault("do_center_crop", False)
    pinpoints = [list(p) for p in model.anyres.pinpoints]
    return LlavaNextImageProcessor(**settings, image_grid_pinpoints=pinpoints, do_pad=True)


def model_template(model: LlavaLiteModel) -> ChatTemplate:
    """The chat template the model answers in, as its processor renders it."""
    return get_template(model.config.chat_template, model.tokenizer)


def _patch_size(tower) -> int:
    if tower.config.type == "open_clip":
        return tower.visual.patch_size[0]
    return tower.model.config.patch_size


def _generation_config(model: LlavaLiteModel) -> GenerationConfig:
    """Stop where our generator stops: EOS, or the template's end-of-turn token when that is one token."""
    tokenizer = model.tokenizer
    stop = stop_token_ids(tokenizer, model_template(model))
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop if len(stop) > 1 else stop[0],
        pad_token_id=tokenizer.pad_token_id,
    )


def _check_names(hf_model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every weight of the Llava model gets one of ours and none of ours is left over (tied heads aside)."""
    expected = set(hf_model.state_dict())
    tied = {"lm_head.weight"} if hf_model.config.tie_word_embeddings else set()
    missing = sorted(expected - set(state) - tied)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise NotConvertible(f"the weights do not fit transformers' Llava layout: {detail}")
