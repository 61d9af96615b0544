"""A training run as data: which recipe, which model, which data, and the hyperparameters, with recipe defaults.

Stages are data, not code paths: `recipe: stage1` and `recipe: stage2` differ only in the defaults below
(what is trained, the template, the learning rate). A YAML file under `configs/` is one run; `key=value`
overrides on the command line change any field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llava_lite.config_io import ConfigError, apply_overrides, from_dict, load_yaml
from llava_lite.data.config import DataConfig
from llava_lite.eval.config import EvalConfig

Recipe = Literal["stage1", "stage2"]
Method = Literal["none", "full", "lora", "qlora", "peft", "bitfit"]
# Methods that train a small part of the LM: their default learning rate is 2e-4, the projector's 2e-5.
PARAMETER_EFFICIENT = ("lora", "qlora", "peft", "bitfit")


@dataclass
class LoraSettings:
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    # Which LM modules get adapters: "all-linear" (every linear layer but the output head) or a list of names.
    target_modules: list[str] | str = "all-linear"


@dataclass
class FinetuneConfig:
    # none: the LM stays frozen (stage 1); full: every LM weight; lora / qlora (4-bit base): adapters;
    # peft: any other peft method, given as a peft config dict in `peft` (prompt or prefix tuning, IA3, ...);
    # bitfit: the LM's bias terms alone (an LM without biases is refused).
    method: Method | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    peft: dict[str, Any] | None = None
    train_vision_tower: bool = False
    # Stage 2 trains the projector beside the LM; false keeps the stage-1 projector as it is.
    train_projector: bool = True
    # Train the embedding rows of tokens added for the chat template (adapters leave them at their mean start).
    train_new_token_rows: bool = True


@dataclass
class TrainingSettings:
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 16  # per device
    gradient_accumulation: int = 1
    learning_rate: float | None = None  # recipe default: 1e-3 (stage 1), 2e-5 (stage 2 full), 2e-4 (adapters, bitfit)
    projector_lr: float | None = None  # default: learning_rate; 2e-5 beside adapters or bitfit (LLaVA-1.5's LoRA)
    vision_tower_lr: float | None = None  # default: learning_rate
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    optimizer: str = "adamw_torch"
    # The compute precision: autocast to bf16 or fp16, or none (fp32). auto: bf16 on GPUs that have it, else fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # The dtype trained weights are kept and updated in (llava_lite.train.precision): float32 masters (AdamW moments
    # float32 too, ~16 bytes per trained parameter) whatever the LM was loaded in; or as_loaded, the dtype they were
    # stored in (pure bf16: ~8 bytes per parameter, but an update under 1/256 of a weight is lost).
    master_weights: Literal["float32", "as_loaded"] = "float32"
    gradient_checkpointing: bool = False
    # The LM head and cross-entropy: only at trained positions, in chunks (chunked), or by liger-kernel's fused
    # kernel on a CUDA GPU (liger); or the LM's own head over every position (full).
    loss_kernel: Literal["chunked", "liger", "full"] = "chunked"
    # BETA of BETA x KL(tuned || base), added to the loss at `kl_positions` (llava_lite.train.regularizers): the
    # base is the LM with its adapters off (peft), or its starting weights kept beside it (full, bitfit).
    kl_to_base: float = 0.0
    # Where the KL is taken: the positions predicting assistant tokens, replay text, or both.
    kl_positions: Literal["assistant", "replay", "both"] = "both"
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    # Held-out loss (eval_data) every eval_steps steps; default: save_steps.
    eval_steps: int | None = None
    # Where metrics go: "auto" picks tensorboard and wandb when installed; "none"; or a list of names.
    report_to: list[str] | str = "auto"
    num_workers: int = 0

    def __post_init__(self) -> None:
        # transformers reads a warmup of 1 or more as a number of steps, so a ratio must stay below 1.
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.kl_to_base < 0:
            raise ValueError(f"kl_to_base must be 0 or more, got {self.kl_to_base}")
        for name in ("save_steps", "eval_steps", "logging_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be 1 or more, got {value}")


@dataclass
class TrainConfig:
    recipe: Recipe
    output_dir: str
    data: DataConfig
    # A preset name, a saved model folder, or a model mapping (`preset:` plus overrides allowed).
    model: Any = None
    # Start from a saved run (stage 2 from a stage-1 run): its model and trained weights. `model` may then set
    # `chat_template` and, under `language_model`, how the LM is loaded: `dtype` and `attn_implementation`.
    init_from: str | None = None
    eval_data: DataConfig | None = None
    # Evaluations run every `eval.every_steps` steps and logged with the losses (see llava_lite.eval.config).
    eval: EvalConfig | None = None
    train: TrainingSettings = field(default_factory=TrainingSettings)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # The template the training data is rendered with; default: `plain` for stage 1 (image, then caption),
    # the model's own chat template for stage 2. The saved model keeps its chat template either way.
    data_template: str | None = None
    # auto: continue from the newest complete checkpoint in output_dir, if any; never; or a checkpoint path.
    resume: str = "auto"
    seed: int = 42

    def __post_init__(self) -> None:
        if self.model is None and self.init_from is None:
            raise ValueError("give `model` (preset, folder or mapping) or `init_from` (a saved run)")
        if self.init_from is not None and self.model is not None:
            _check_init_from_model(self.model)


# What `model` may say beside `init_from`: the rest of the model comes from that run.
INIT_FROM_LM_KEYS = ("dtype", "attn_implementation")


def _check_init_from_model(model: Any) -> None:
    allowed = "`model` may only set chat_template and language_model.{" + ", ".join(INIT_FROM_LM_KEYS) + "}"
    if not isinstance(model, dict) or set(model) - {"chat_template", "language_model"}:
        raise ValueError(f"with `init_from`, the model comes from that run; {allowed}")
    language_model = model.get("language_model", {})
    if not isinstance(language_model, dict) or set(language_model) - set(INIT_FROM_LM_KEYS):
        raise ValueError(f"with `init_from`, the model comes from that run; {allowed}")
    dtypes = ("auto", "float32", "bfloat16", "float16")
    if language_model.get("dtype", "auto") not in dtypes:
        got = language_model["dtype"]
        raise ValueError(f"model.language_model.dtype must be one of {', '.join(dtypes)}, got {got!r}")


def init_from_overrides(config: TrainConfig) -> dict[str, Any]:
    """How `config.model` asks the `init_from` run's LM to be loaded (dtype, attn_implementation), if at all."""
    if config.init_from is None or not isinstance(config.model, dict):
        return {}
    return dict(config.model.get("language_model", {}))


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    data = apply_overrides(load_yaml(path), overrides or [])
    return from_dict(TrainConfig, data, str(path))


def resolved(config: TrainConfig) -> TrainConfig:
    """The config with every recipe default filled in, as it is saved beside each checkpoint."""
    finetune = config.finetune
    method = finetune.method or ("none" if config.recipe == "stage1" else "full")
    efficient = method in PARAMETER_EFFICIENT
    train = config.train
    if config.recipe == "stage1":
        if method != "none":
            raise ConfigError("recipe stage1 trains the projector alone: finetune.method must be none")
        if not finetune.train_projector:
            raise ConfigError("recipe stage1 trains the projector: finetune.train_projector must be true")
        if config.data.replay or train.kl_to_base:
            raise ConfigError("replay and kl_to_base keep what the LM knew; stage 1 does not train the LM")
    if config.eval_data is not None and config.eval_data.replay is not None:
        raise ConfigError("eval_data: replay text is mixed into training data only")
    if train.kl_to_base and train.kl_positions == "replay" and config.data.replay is None:
        raise ConfigError("train.kl_positions replay needs replay text (data.replay and a kind: text source)")
    lr = train.learning_rate or {"none": 1e-3, "full": 2e-5}.get(method, 2e-4)
    projector_lr = train.projector_lr or (2e-5 if efficient else lr)
    return dataclasses.replace(
        config,
        data_template=config.data_template or ("plain" if config.recipe == "stage1" else None),
        finetune=dataclasses.replace(finetune, method=method),
        train=dataclasses.replace(
            train,
            learning_rate=lr,
            projector_lr=projector_lr,
            vision_tower_lr=train.vision_tower_lr or lr,
        ),
    )


def check_data_paths(config: TrainConfig) -> None:
    """Every data source that can only be local exists: a typo fails before any model code loads."""
    for data in (config.data, config.eval_data):
        for source in data.sources if data else ():
            source.check_exists()


def chosen_templates(config: TrainConfig, model_template: str) -> tuple[str, str]:
    """The one place a run's templates are decided (`config` resolved): the chat template the trained model keeps -
    the config's `model: {chat_template}` over `model_template`, the one a loaded run or preset has - and the
    template the training data is rendered with (`data_template`, else that chat template)."""
    chat = model_template
    if isinstance(config.model, dict) and "chat_template" in config.model:
        chat = config.model["chat_template"]
    return chat, config.data_template or chat
