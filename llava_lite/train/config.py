"""A training run as data: which recipe, which model, which data, and the hyperparameters, with recipe defaults.

Stages are data, not code paths: `recipe: stage1`, `recipe: stage2` and `recipe: preference` (stage 3) differ
only in the defaults below (what is trained, the template, the learning rate) and, for stage 3, its data (pairs)
and loss (the `preference` section). A YAML file under `configs/` is one run; `key=value`
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

Recipe = Literal["stage1", "stage2", "preference"]
PreferenceLoss = Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"]
REFERENCE_FREE = ("simpo", "orpo")
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

    @property
    def part_learning_rates(self) -> dict[str, float]:
        """The learning rate of each part the optimizer groups apart (once the recipe's defaults are filled in)."""
        rates = (self.projector_lr, self.vision_tower_lr, self.learning_rate)
        return dict(zip(("projector", "vision_tower", "language_model"), rates))

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
class PreferenceSettings:
    """Stage 3 (`recipe: preference`): the loss on preference pairs and where the reference's log-probs come from."""

    # sigmoid (DPO), ipo, hinge, robust (DPO unbiased under flipped labels, with label_smoothing); simpo and orpo
    # need no reference model. As TRL defines each (llava_lite.train.preference_loss).
    loss: PreferenceLoss = "sigmoid"
    # DPO's beta (IPO's tau, ORPO's lambda); default 0.1, and 2.0 for simpo (its paper's).
    beta: float | None = None
    # Weight of the chosen answer's negative log-likelihood (per token) added to the loss, as RPO and MPO do;
    # default 0, and 1 for orpo (its own NLL term).
    sft_weight: float | None = None
    # The chance a pair's labels are flipped: conservative DPO for sigmoid, robust's and simpo's smoothing.
    label_smoothing: float = 0.0
    # SimPO's target reward margin (gamma).
    simpo_gamma: float = 0.5
    # auto: the LM with its adapters off under lora/qlora/peft, else log-probs precomputed before training (stored in
    # the run folder); none for simpo and orpo.
    reference: Literal["auto", "adapters_off", "precomputed", "none"] = "auto"

    def __post_init__(self) -> None:
        if self.beta is not None and self.beta <= 0:
            raise ValueError(f"beta must be above 0, got {self.beta}")
        if self.sft_weight is not None and self.sft_weight < 0:
            raise ValueError(f"sft_weight must be 0 or more, got {self.sft_weight}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss not in ("sigmoid", "robust", "simpo"):
            raise ValueError(f"label_smoothing applies to sigmoid, robust and simpo, not {self.loss}")


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
    # Stage 3 only: the preference loss and its reference (defaults filled in for recipe preference).
    preference: PreferenceSettings | None = None
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
    preference = None
    if config.recipe == "preference":
        preference = _resolved_preference(config, method)
        lr = train.learning_rate or (5e-7 if method == "full" else 5e-6)
        projector_lr = train.projector_lr or lr
    else:
        if config.preference is not None:
            raise ConfigError(f"the preference section is for recipe preference, not {config.recipe}")
        lr = train.learning_rate or {"none": 1e-3, "full": 2e-5}.get(method, 2e-4)
        projector_lr = train.projector_lr or (2e-5 if efficient else lr)
    return dataclasses.replace(
        config,
        data_template=config.data_template or ("plain" if config.recipe == "stage1" else None),
        finetune=dataclasses.replace(finetune, method=method),
        preference=preference,
        train=dataclasses.replace(
            train,
            learning_rate=lr,
            projector_lr=projector_lr,
            vision_tower_lr=train.vision_tower_lr or lr,
        ),
    )


def _resolved_preference(config: TrainConfig, method: str) -> PreferenceSettings:
    """Stage 3's checks and defaults: what its data and method may be, and its loss's beta, NLL weight, reference."""
    data, settings = config.data, config.preference or PreferenceSettings()
    if method == "none":
        raise ConfigError("recipe preference tunes the LM: finetune.method must not be none")
    if data.replay or data.text_sources or config.train.kl_to_base:
        raise ConfigError(
            "recipe preference trains on pairs alone: no replay text, no kind: text source, no kl_to_base"
        )
    if data.group_by_modality_length:
        raise ConfigError("recipe preference: data.group_by_modality_length is not supported (pack the pairs instead)")
    if config.eval_data is not None:
        raise ConfigError(
            "recipe preference has no eval_data: measure held-out pairs with llava-lite eval --preference"
        )
    reference = settings.reference
    if settings.loss in REFERENCE_FREE:
        if reference not in ("auto", "none"):
            raise ConfigError(f"preference.loss {settings.loss} needs no reference: set preference.reference none")
        reference = "none"
    elif reference == "none":
        raise ConfigError(f"preference.loss {settings.loss} needs a reference (adapters_off or precomputed)")
    elif reference == "auto":
        reference = "adapters_off" if method in ("lora", "qlora", "peft") else "precomputed"
    elif reference == "adapters_off" and method not in ("lora", "qlora", "peft"):
        raise ConfigError(
            f"preference.reference adapters_off needs adapters (finetune.method lora, qlora or peft), not {method}: "
            "use precomputed, which keeps no second copy of the model"
        )
    return dataclasses.replace(
        settings,
        beta=settings.beta or (2.0 if settings.loss == "simpo" else 0.1),
        sft_weight=settings.sft_weight if settings.sft_weight is not None else float(settings.loss == "orpo"),
        reference=reference,
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
