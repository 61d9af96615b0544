"""Model folders: what a run saves, and how a folder loads back with nothing but itself and named sources.

A folder holds what was trained and what exists nowhere else:
- `projector.safetensors` always, and the tokenizer (`tokenizer/`, with `<image>` and template markers);
- the vision tower (`vision_tower/`) when it was trained or built from a config (random weights);
- the LM (`language_model/`, transformers' own format) when it was trained or built from a config;
- peft adapters (`adapter/`) when the LM was trained with them;
- a reward model's scalar head (`recipe: reward`) when the model has one (`llava_lite.model.reward_head`);
- `llava_lite_config.json`, naming the parts that were not saved by their source (a local path or hub name),
  so a stage-1 run of a 7B LM is megabytes, not gigabytes.
Everything is safetensors or JSON; nothing is pickled, and a pickle met where weights belong is refused. A folder
that lacks a part it needs - whose config names no other source for it - is refused naming the missing file,
rather than loaded with random weights. The names are spelled in `llava_lite.run_folder`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from llava_lite.model.config import ModelConfig, load_model_config, save_model_config
from llava_lite.model.language_model import build_language_model, fit_embeddings, load_tokenizer
from llava_lite.model.parts import ModelParts
from llava_lite.model.projector import projector_for
from llava_lite.model.reward_head import REWARD_HEAD, save_reward_head
from llava_lite.model.vision import build_vision_tower
from llava_lite.model.weights_files import read_safetensors, require_safetensors_folder
from llava_lite.run_folder import (
    ADAPTER_DIR,
    ADAPTER_WEIGHTS_FILE,
    LM_DIR,
    PROJECTOR_FILE,
    REWARD_HEAD_FILE,
    TOKENIZER_DIR,
    TOWER_DIR,
    TOWER_WEIGHTS_FILE,
)

logger = logging.getLogger(__name__)


def save_model(model, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write `model` (a LlavaLiteModel) to `folder`; `state_dict` is the full model's, when a trainer gathered it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    config = model.config

    save_file(_part(state, "projector."), str(folder / PROJECTOR_FILE))
    save_reward_head(state, folder)

    tower = model.vision_tower
    tower_config = config.vision_tower
    if _is_trained(tower) or tower_config.name is None:
        (folder / TOWER_DIR).mkdir(exist_ok=True)
        save_file(_part(state, "vision_tower."), str(folder / TOWER_DIR / TOWER_WEIGHTS_FILE))
        tower_config = tower.architecture_config()

    lm = model.language_model
    lm_config = config.language_model
    adapter = None
    # The LM's weights are copied to the CPU only when some of them are written: a frozen LM with a source
    # (stage 1 of a named 7B LM) is not copied at all.
    if model.uses_adapters:
        lm_state = _part(state, "language_model.")
        lm.save_pretrained(folder / ADAPTER_DIR, state_dict=lm_state)
        adapter = ADAPTER_DIR
        if lm_config.name is None:  # a random base exists nowhere else
            base = lm.get_base_model()
            base.save_pretrained(folder / LM_DIR, state_dict=_base_state(lm, lm_state))
            lm_config = dataclasses.replace(lm_config, name=LM_DIR, model_config=None)
    elif _is_trained(lm) or lm_config.name is None:
        lm.save_pretrained(folder / LM_DIR, state_dict=_part(state, "language_model."))
        lm_config = dataclasses.replace(lm_config, name=LM_DIR, model_config=None)

    model.tokenizer.save_pretrained(folder / TOKENIZER_DIR)
    keep_legacy_flag(model.tokenizer, folder / TOKENIZER_DIR)
    lm_config = dataclasses.replace(lm_config, tokenizer=TOKENIZER_DIR, quantization="none")
    save_model_config(
        dataclasses.replace(config, vision_tower=tower_config, language_model=lm_config, adapter=adapter), folder
    )


def load_model(
    folder: str | Path,
    trainable_adapters: bool = False,
    quantization: str | None = None,
    lm_overrides: dict[str, str | None] | None = None,
    trust_remote_code: bool = False,
) -> ModelParts:
    """The parts of a LlavaLiteModel from a folder written by `save_model`; `quantization` (4bit, 8bit) loads the
    LM quantized (QLoRA from a saved run), which a folder never records; `lm_overrides` set the LM config's
    `dtype` or `attn_implementation` (None values are ignored), and the loaded config says so. Code that came with
    the folder runs only with `trust_remote_code`, which the person running the command gives (see
    `load_model_config`)."""
    folder = Path(folder)
    config = load_model_config(folder, trust_remote_code)
    check_parts(folder, config)
    lm_config = config.language_model
    if quantization is not None:
        lm_config.quantization = quantization
    for key, value in (lm_overrides or {}).items():
        if value is not None:
            setattr(lm_config, key, value)
    tokenizer = load_tokenizer(lm_config)
    language_model = build_language_model(lm_config)
    fit_embeddings(language_model, tokenizer)
    if config.adapter:
        from peft import PeftModel

        language_model = PeftModel.from_pretrained(language_model, config.adapter, is_trainable=trainable_adapters)
    vision_tower = build_vision_tower(config.vision_tower)
    if (folder / TOWER_DIR / TOWER_WEIGHTS_FILE).is_file():
        vision_tower.load_weights(folder / TOWER_DIR)
    projector = projector_for(config, vision_tower.hidden_size, _embedding_width(language_model))
    projector.load_state_dict(read_safetensors(folder / PROJECTOR_FILE))
    return ModelParts(config, vision_tower, projector, language_model, tokenizer)


def check_parts(folder: Path, config: ModelConfig) -> None:
    """Every part the folder's config says is inside the folder is there, as safetensors: the projector; the tower
    when the config names no source for its weights (a hub name, a pretrained tag or file); the LM, tokenizer and
    adapter folders it refers to. Else one line naming what is missing."""
    if not (folder / PROJECTOR_FILE).is_file():
        raise FileNotFoundError(f"{folder / PROJECTOR_FILE}: missing (every run folder holds its projector)")
    tower = config.vision_tower
    tower_source = tower.pretrained if tower.type == "open_clip" else tower.name
    tower_weights = folder / TOWER_DIR / TOWER_WEIGHTS_FILE
    if not tower_source and not tower_weights.is_file():
        raise FileNotFoundError(
            f"{tower_weights}: missing, and {folder.name}'s config names no other source for the vision tower's weights"
        )
    lm = config.language_model
    if lm.name is None:
        raise FileNotFoundError(
            f"{folder / LM_DIR}: missing, and {folder.name}'s config names no other source for the language model's "
            "weights"
        )
    for part, name in ((LM_DIR, lm.name), (TOKENIZER_DIR, lm.tokenizer), (ADAPTER_DIR, config.adapter)):
        if name == part:  # the config says it is inside the folder, and it is not (else it would be a path)
            raise FileNotFoundError(f"{folder / part}: missing (the folder's config says the {part} is there)")
    if config.adapter:
        adapter = Path(config.adapter)
        if adapter.is_dir() and not (adapter / ADAPTER_WEIGHTS_FILE).is_file():
            require_safetensors_folder(adapter, "adapter")
            raise FileNotFoundError(f"{adapter / ADAPTER_WEIGHTS_FILE}: missing")
    require_safetensors_folder(lm.name, "language model")


def load_trained_weights(model, folder: str | Path) -> None:
    """Put a checkpoint's saved weights into a model built from the same config (resuming a run), also when its
    weights are sharded across processes (FSDP2)."""
    folder = Path(folder)
    if _is_sharded(model):
        _load_sharded(model, folder)
        return
    model.projector.load_state_dict(read_safetensors(folder / PROJECTOR_FILE))
    if (folder / TOWER_DIR / TOWER_WEIGHTS_FILE).is_file():
        model.vision_tower.load_weights(folder / TOWER_DIR)
    lm = model.language_model
    if model.uses_adapters:
        from peft import set_peft_model_state_dict

        require_safetensors_folder(folder / ADAPTER_DIR, "adapter")
        set_peft_model_state_dict(lm, read_safetensors(folder / ADAPTER_DIR / ADAPTER_WEIGHTS_FILE))
    elif (folder / LM_DIR).is_dir():
        _load_safetensors_folder(lm, folder / LM_DIR)
    reward_head = getattr(model, REWARD_HEAD, None)
    if reward_head is not None:
        reward_head.load_state_dict(read_safetensors(folder / REWARD_HEAD_FILE))


def _is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch before 2.5 has no public DTensor, and we shard with FSDP2 alone
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _load_sharded(model, folder: Path) -> None:
    """The checkpoint's tensors as one full state dict, which every process cuts its own shards from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if model.uses_adapters:
        raise ValueError(f"{folder}: resuming adapters with sharded weights (FSDP) is not supported; use DDP or ZeRO")
    state = {f"projector.{k}": v for k, v in read_safetensors(folder / PROJECTOR_FILE).items()}
    tower_weights = folder / TOWER_DIR / TOWER_WEIGHTS_FILE
    if tower_weights.is_file():
        state.update({f"vision_tower.{k}": v for k, v in read_safetensors(tower_weights).items()})
    for shard in sorted((folder / LM_DIR).glob("*.safetensors")):
        state.update({f"language_model.{k}": v for k, v in read_safetensors(shard).items()})
    if (folder / REWARD_HEAD_FILE).is_file():
        state.update({f"{REWARD_HEAD}.{k}": v for k, v in read_safetensors(folder / REWARD_HEAD_FILE).items()})
    expected = set(model.state_dict())
    unknown = set(state) - expected
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = {name for name in trained - set(state) if not _is_tied(model.language_model, name.split(".", 1)[1])}
    if unknown or missing:
        name = sorted(unknown or missing)[0]
        raise ValueError(f"{folder}: checkpoint does not fit the model ({'unknown' if unknown else 'lacks'} {name})")
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def _load_safetensors_folder(module: nn.Module, folder: Path) -> None:
    """All `*.safetensors` shards of a transformers folder into `module`; only tied weights may be missing."""
    expected = set(module.state_dict())
    seen: set[str] = set()
    require_safetensors_folder(folder, "language model")
    for shard in sorted(folder.glob("*.safetensors")):
        weights = read_safetensors(shard)
        module.load_state_dict(weights, strict=False)
        seen.update(weights)
    tied = {name for name in expected if _is_tied(module, name)}
    missing = expected - seen - tied
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[0]}")


def _is_tied(module: nn.Module, name: str) -> bool:
    return name.endswith("lm_head.weight") and getattr(getattr(module, "config", None), "tie_word_embeddings", False)


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v.detach().contiguous().cpu() for k, v in state.items() if k.startswith(prefix)}


def _base_state(peft_model, lm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's own weights out of a peft-wrapped state dict: adapter tensors dropped, names unwrapped.

    The base model sits at `base_model.model` under a tuner (LoRA, IA3 ...) and at `base_model` under prompt
    learning, whose prompt encoder and word-embedding reference lie outside it. Every tuner keeps its tensors
    under the adapter's name ("lora_A.default.weight") and moves the wrapped layer to `base_layer` (or
    `original_module` for modules_to_save).
    """
    base = peft_model.get_base_model()
    prefix = next(name for name, module in peft_model.named_modules() if module is base) + "."
    adapters = list(peft_model.peft_config)
    state = {}
    for name, tensor in lm_state.items():
        if not name.startswith(prefix):
            continue
        plain = name.removeprefix(prefix)
        if any(f".{a}." in plain or plain.endswith(f".{a}") for a in adapters):
            continue
        state[plain.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return state


def _is_trained(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _embedding_width(language_model) -> int:
    return language_model.get_input_embeddings().embedding_dim


def keep_legacy_flag(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """transformers 5 drops Llama tokenizers' `legacy` flag on save, and the reloaded copy then tokenizes
    text after special tokens differently; write it back so a saved run tokenizes as it trained."""
    legacy = getattr(tokenizer, "legacy", None)
    path = folder / "tokenizer_config.json"
    if legacy is None or not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("legacy") != legacy:
        config["legacy"] = legacy
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


__all__ = ["ModelConfig", "load_model", "load_trained_weights", "save_model"]
