"""A LlavaLiteModel from a folder in transformers' Llava format (a downloaded llava-hf model, or our export).

`LlavaLiteModel.from_pretrained` takes such a folder as it takes a run folder, so `init_from: PATH` in a
training config, and `--model PATH` for chat, generate and eval, accept it too. transformers reads the
weights (whatever key layout the folder uses); the vision model and the language model are then moved, not
copied, into our parts, in the folder's dtype (the small projector is copied into a float32 one):
- the CLIP or SigLIP vision model becomes an `hf_clip` / `hf_siglip` tower with the same architecture and
  image processor settings (`do_pad` becomes `image_aspect: pad`), `vision_feature_layer` its
  `feature_layer`, and the `default` select strategy `cls_token: drop`, `full` `keep`;
- `linear_1 -> gelu -> linear_2` becomes an `mlp2x_gelu` projector (an identity activation with an identity
  `linear_2` a `linear` one; a projector without biases gets zero biases);
- the language model and its head become a causal LM of the text config's type, built from its config;
- the tokenizer comes with the folder, with the processor's chat template when the tokenizer has none;
- a LlavaNext folder (`LlavaNextForConditionalGeneration`) becomes the AnyRes layout: `image_grid_pinpoints` our
  `grid_pinpoints`, `image_newline` the projector's newline. Refused: CLIP under the `full` strategy (the CLS
  token cannot sit in a grid of tiles) and pinpoints that are not whole tiles.
Saving the model then writes a complete, self-contained run folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

from llava_lite.model.config import LanguageModelConfig, ModelConfig, ProjectorConfig, VisionTowerConfig
from llava_lite.model.parts import ModelParts
from llava_lite.model.projector import Projector
from llava_lite.model.vision import build_vision_tower
from llava_lite.model.vision.hf_tower import processor_settings
from llava_lite.model.weights_files import require_safetensors_folder
from llava_lite.run_folder import MODEL_CONFIG_FILE

logger = logging.getLogger(__name__)

_TOWER_TYPES = {"clip_vision_model": "hf_clip", "siglip_vision_model": "hf_siglip"}
_MODEL_CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}


def is_hf_llava_folder(folder: str | Path) -> bool:
    """A folder with transformers' `config.json` of a Llava or LlavaNext model, and not one of our run folders."""
    folder = Path(folder)
    if (folder / MODEL_CONFIG_FILE).is_file() or not (folder / "config.json").is_file():
        return False
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and config.get("model_type") in _MODEL_CLASSES


def load_hf_llava(folder: str | Path) -> ModelParts:
    """The parts of a LlavaLiteModel holding the weights of the transformers Llava model in `folder`."""
    folder = Path(folder)
    require_safetensors_folder(folder, "Llava model")
    model_type = json.loads((folder / "config.json").read_text(encoding="utf-8"))["model_type"]
    hf_model = _MODEL_CLASSES[model_type].from_pretrained(folder, dtype="auto")
    hf_config: LlavaConfig = hf_model.config
    # One load gives the tokenizer, the image processor and the processor's chat template and image token.
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=False)  # no code from the folder
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise ValueError(f"{folder}: no image processor (preprocessor_config.json) beside the model")
    tokenizer = processor.tokenizer
    if not tokenizer.is_fast:
        raise ValueError(f"{folder}: llava_lite needs a fast tokenizer (tokenizer.json) for offset mappings")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as load_tokenizer does: padding is masked everywhere
    if not getattr(tokenizer, "chat_template", None) and getattr(processor, "chat_template", None):
        tokenizer.chat_template = processor.chat_template
    _warn_if_template_needs_parts(folder, tokenizer)
    image_token = getattr(processor, "image_token", None) or "<image>"
    if tokenizer.convert_tokens_to_ids(image_token) != hf_config.image_token_id:
        raise ValueError(
            f"{folder}: the tokenizer's {image_token} is id {tokenizer.convert_tokens_to_ids(image_token)}, "
            f"but config.json says image_token_id {hf_config.image_token_id}"
        )

    tower_config = _tower_config(folder, hf_config, image_processor)
    tower = _tower(tower_config, hf_model.model.vision_tower)
    language_model = _causal_lm(hf_model)
    projector_type, projector = _projector(folder, hf_model)
    text_config = hf_config.text_config.to_diff_dict()
    text_config.pop("transformers_version", None)
    config = ModelConfig(
        vision_tower=tower_config,
        language_model=LanguageModelConfig(
            model_config=text_config, tokenizer=str(folder), dtype="auto", trust_remote_code=False
        ),
        projector=ProjectorConfig(projector_type),
        chat_template="tokenizer" if getattr(tokenizer, "chat_template", None) else "auto",
        image_token=image_token,
    )
    return ModelParts(config, tower, projector, language_model, tokenizer)


def _warn_if_template_needs_parts(folder: Path, tokenizer) -> None:
    """llava-hf templates often read only `{"type": "text"}` parts; our data gives strings, which they drop."""
    from llava_lite.data.templates import TemplateError, get_template

    if not getattr(tokenizer, "chat_template", None):
        return
    try:
        get_template("tokenizer", tokenizer)
    except TemplateError as err:
        logger.warning(
            "%s: its chat template cannot render plain-string messages (%s); choose a built-in one, e.g. "
            "model: {chat_template: vicuna_v1} for LLaVA-1.5",
            folder,
            err,
        )


def _tower_config(folder: Path, hf_config: LlavaConfig, image_processor) -> VisionTowerConfig:
    vision = hf_config.vision_config
    tower_type = _TOWER_TYPES.get(vision.model_type)
    if tower_type is None:
        raise ValueError(f"{folder}: vision tower {vision.model_type} is not one llava_lite runs (CLIP or SigLIP)")
    layer = hf_config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"{folder}: vision_feature_layer {layer} concatenates layers; llava_lite takes one layer")
    strategy = hf_config.vision_feature_select_strategy
    if tower_type == "hf_siglip" and strategy == "default":
        raise ValueError(
            f"{folder}: the `default` select strategy drops SigLIP's first patch (it has no CLS token); "
            "llava_lite keeps every patch of a SigLIP tower"
        )
    model_config = vision.to_diff_dict()
    for key in ("model_type", "transformers_version"):
        model_config.pop(key, None)
    if hf_config.model_type == "llava_next":
        if tower_type == "hf_clip" and strategy == "full":
            raise ValueError(
                f"{folder}: LlavaNext under the `full` strategy keeps CLIP's CLS token, which cannot sit in a grid "
                "of tiles; llava_lite's anyres layout drops it"
            )
        return VisionTowerConfig(
            type=tower_type,
            model_config=model_config,
            preprocess=processor_settings(image_processor),
            feature_layer=layer,
            cls_token="drop",
            image_layout="anyres",
            grid_pinpoints=[list(p) for p in hf_config.image_grid_pinpoints],
        )
    return VisionTowerConfig(
        type=tower_type,
        model_config=model_config,
        preprocess=processor_settings(image_processor),
        feature_layer=layer,
        # SigLIP has no CLS token: `full` keeps every patch, which is our `drop` (nothing to drop).
        cls_token="keep" if strategy == "full" and tower_type == "hf_clip" else "drop",
        image_aspect="pad" if getattr(image_processor, "do_pad", False) else "crop",
    )


def _tower(tower_config: VisionTowerConfig, loaded: torch.nn.Module):
    """Our tower around the loaded vision model itself: built on the meta device, so nothing is initialised, and
    handed the loaded module (non-persistent buffers included), so nothing is copied."""
    with torch.device("meta"):
        tower = build_vision_tower(tower_config)
    if type(loaded) is not type(tower.model):
        raise ValueError(
            f"the vision tower is a {type(loaded).__name__}, not the {type(tower.model).__name__} expected"
        )
    tower.model = loaded
    tower.freeze_if_configured()
    return tower


def _projector(folder: Path, hf_model) -> tuple[str, Projector]:
    """Our projector type and module holding Llava's projector weights (and LlavaNext's newline)."""
    config = hf_model.config
    source = hf_model.model.multi_modal_projector
    state = {k: v.detach() for k, v in source.state_dict().items()}
    newline = getattr(hf_model.model, "image_newline", None)
    if newline is not None:
        state["image_newline"] = newline.detach()
    for layer in ("linear_1", "linear_2"):
        # A projector built without biases computes what ours computes with zero biases.
        weight = state[f"{layer}.weight"]
        state.setdefault(f"{layer}.bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
    width = state["linear_1.weight"].shape[0]
    vision_width = state["linear_1.weight"].shape[1]
    act = config.projector_hidden_act
    if act == "gelu":
        projector = Projector("mlp2x_gelu", vision_width, width, image_newline=newline is not None)
        projector.load_state_dict(state, strict=True)
        return "mlp2x_gelu", projector
    identity = torch.eye(width, dtype=state["linear_2.weight"].dtype)
    if act == "linear" and torch.equal(state["linear_2.weight"], identity) and not state["linear_2.bias"].any():
        projector = Projector("linear", vision_width, width, image_newline=newline is not None)
        kept = {k: v for k, v in state.items() if not k.startswith("linear_2.")}
        projector.load_state_dict(kept, strict=True)
        return "linear", projector
    raise ValueError(
        f"{folder}: a projector with activation {act!r} is not one llava_lite has (mlp2x_gelu, or linear "
        "written with an identity second layer)"
    )


def _causal_lm(hf_model: LlavaForConditionalGeneration):
    """The causal LM class of the text config, holding Llava's language model and head themselves.

    It is built on the meta device, and then given the loaded modules, so no weights are initialised or copied.
    """
    text_config = hf_model.config.text_config
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(text_config)
    setattr(lm, lm.base_model_prefix, hf_model.model.language_model)
    lm.lm_head = hf_model.lm_head
    left = [name for name, p in [*lm.named_parameters(), *lm.named_buffers()] if p.device.type == "meta"]
    if left:
        raise ValueError(f"{type(lm).__name__} has parts outside its base model and head, e.g. {left[0]}")
    if getattr(text_config, "tie_word_embeddings", False):
        lm.tie_weights()
    return lm.eval()
