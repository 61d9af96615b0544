"""A training run as data: which recipe, which model, which data, and the hyperparameters, with recipe defaults.

Stages are data, not code paths: `recipe: stage1`, `recipe: stage2` and `recipe: preference` (stage 3) differ
in the defaults their modules fill in (`llava_lite.train.recipes`: what is trained, the template, the learning
rate) and, for stage 3, its data (pairs) and loss (the `preference` section). A YAML file under `configs/` is one
run; `key=value` overrides on the command line change any field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llava_lite.config_io import apply_overrides, from_dict, load_yaml
from llava_lite.data.config import DataConfig
from llava_lite.eval.config import EvalConfig

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
    # Weight of the chosen answer's negative log-likelihood (per token) added to the loss, as RPO and MPO do (and
    # orpo's own term); default 1 for every loss. 0 gives TRL's losses alone - which on pairs of a model's own
    # mistakes pulled the chosen answers' log-probs down with the rejected ones (likelihood displacement) and made
    # the model worse (README: "RL against DPO and SFT on the model's own answers").
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
class RewardSettings:
    """`recipe: reward`: a Bradley-Terry reward model's loss, -log sigmoid(r_chosen - r_rejected - margin), with
    TRL's RewardTrainer options."""

    # The record field holding each pair's margin (TRL's `margin` column, e.g. the gap between two ratings): every
    # pair must carry a number there. None: no margin.
    margin_column: str | None = None
    # TRL's center_rewards_coefficient: this times mean((r_chosen + r_rejected)^2) is added to the loss, keeping the
    # rewards centred on 0 (the Bradley-Terry loss alone sees only their differences). 0: not added.
    center_rewards_coefficient: float = 0.0

    def __post_init__(self) -> None:
        if self.center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient must be 0 or more, got {self.center_rewards_coefficient}")
        if self.margin_column is not None and not self.margin_column.strip():
            raise ValueError("margin_column must name a record field, or be left out")


RLLoss = Literal["grpo", "dr_grpo", "dapo", "gspo"]


@dataclass
class RLSettings:
    """Stage 3 as reward maximisation (`recipe: rl`): on-policy sampling, rewards, advantages and the loss, as TRL's
    GRPOTrainer defines them (`llava_lite.train.rl_loss`). Defaults left None are filled in by the recipe."""

    # G: answers sampled per prompt (a group); a group stays on one process.
    num_generations: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    # What is maximised: a list of {kind, weight, ...}, summed by weight (llava_lite.rewards: reference, format,
    # iou, length, judge, reward_model, python).
    rewards: list[dict[str, Any]] = field(default_factory=list)
    # grpo: each answer's token mean, then the batch's mean; dr_grpo: the tokens' sum over answers x max_new_tokens;
    # dapo: every token of the batch counts once (TRL's default); gspo: one importance ratio per answer.
    loss: RLLoss = "dapo"
    # group: the reward less its group's mean (GRPO); rloo: less the mean of the group's other answers.
    advantage: Literal["group", "rloo"] = "group"
    # The advantage divided by the rewards' std: of its group, of the batch, or not at all (Dr. GRPO). Default:
    # group for advantage group, none for rloo (TRL's RLOO); rloo takes none or batch.
    scale_rewards: Literal["group", "batch", "none"] | None = None
    # KL(policy || reference) weight, TRL's k3 estimator per token; 0 needs no reference.
    beta: float = 0.0
    # The importance ratio is clipped to [1 - epsilon, 1 + epsilon_high]. Defaults: 0.2 and epsilon (TRL's); gspo
    # 3e-4 and 4e-4 (its paper's, as TRL's GSPO recipe sets them).
    epsilon: float | None = None
    epsilon_high: float | None = None
    # Updates per generation batch (PPO's mu); above 1 the ratio to the policy that sampled counts.
    num_iterations: int = 1
    # Answers cut at max_new_tokens take no part in the loss.
    mask_truncated_completions: bool = False
    # DAPO: groups whose answers all score the same are dropped and refilled with groups of other prompts.
    dynamic_sampling: bool = False

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be 2 or more (a group is compared), got {self.num_generations}")
        if self.max_new_tokens < 1 or self.num_iterations < 1:
            raise ValueError("max_new_tokens and num_iterations must be 1 or more")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be above 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        if self.beta < 0:
            raise ValueError(f"beta must be 0 or more, got {self.beta}")
        for name in ("epsilon", "epsilon_high"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be 0 or more, got {value}")


@dataclass
class TrainConfig:
    recipe: str  # a name in llava_lite.train.recipes.RECIPES
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
    # recipe reward only: its loss's margin and centring (defaults filled in for recipe reward).
    reward: RewardSettings | None = None
    # recipe rl only: sampling, rewards and the loss (defaults filled in for recipe rl).
    rl: RLSettings | None = None
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


def with_learning_rates(config: TrainConfig, learning_rate: float, projector_lr: float | None) -> TrainConfig:
    """`config` with the learning rates it leaves open set to a recipe's defaults: `learning_rate` for the LM,
    `projector_lr` for the projector (None: the LM's) and the LM's for the tower."""
    train = config.train
    lr = train.learning_rate or learning_rate
    return dataclasses.replace(
        config,
        train=dataclasses.replace(
            train,
            learning_rate=lr,
            projector_lr=train.projector_lr or projector_lr or lr,
            vision_tower_lr=train.vision_tower_lr or lr,
        ),
    )


def check_data_paths(config: TrainConfig) -> None:
    """Every data source that can only be local exists: a typo fails before any model code loads."""
    for data in (config.data, config.eval_data):
        for source in data.sources if data else ():
            source.check_exists()
