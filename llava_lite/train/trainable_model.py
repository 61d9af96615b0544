"""The model a recipe trains: built or loaded, switched to the run's template, frozen and adapted as its
`finetune` section says; and the processor its data is encoded with."""

from __future__ import annotations

import dataclasses
import logging

from transformers import PreTrainedTokenizerBase, set_seed

from llava_lite.config_io import ConfigError
from llava_lite.data.processor import Processor
from llava_lite.data.templates import template_special_tokens
from llava_lite.interop.merge import merge_adapters
from llava_lite.model.config import ModelConfig
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.loss import fused_linear_cross_entropy
from llava_lite.model.presets import resolve_model_config
from llava_lite.model.processor_for_config import processor_for_config
from llava_lite.train.config import TrainConfig, init_from_overrides
from llava_lite.train.precision import (
    compute_summary,
    dtype_summary,
    keep_float32_masters,
    mixed_precision,
)

logger = logging.getLogger(__name__)


def build_training_model(config: TrainConfig, trust_remote_code: bool = False) -> LlavaLiteModel:
    """`config` must be `resolved`. Freezing and adapters follow `config.finetune`; logs what is trained.
    `trust_remote_code` is the command's leave for a saved folder's own code (a model mapping in the config gives
    its own)."""
    set_seed(config.seed)  # random-init parts (tiny presets) come out the same on every start and resume
    method = config.finetune.method
    quantization = "4bit" if method == "qlora" else None
    if config.init_from:
        model = LlavaLiteModel.from_pretrained(
            config.init_from,
            quantization=quantization,
            trust_remote_code=trust_remote_code,
            **init_from_overrides(config),
        )
        if model.uses_adapters:  # a run trained with adapters (stage 2 with LoRA) goes on from its adapted LM
            merge_adapters(model)
    else:
        model_config = resolve_model_config(config.model, trust_remote_code=trust_remote_code)
        if quantization:
            model_config.language_model.quantization = quantization
        model = LlavaLiteModel.from_config(model_config)
    chat_template, data_template = chosen_templates(config, model.config.chat_template)
    if chat_template != model.config.chat_template:
        model.set_chat_template(chat_template)
    model.add_template_tokens(data_template)

    model.requires_grad_(False)
    model.projector.requires_grad_(config.finetune.train_projector)
    if config.finetune.train_vision_tower:
        model.vision_tower.config = dataclasses.replace(model.vision_tower.config, frozen=False)
        model.vision_tower.requires_grad_(True)
    if method == "full":
        model.language_model.requires_grad_(True)
    elif method == "bitfit":
        _train_biases(model.language_model)
    elif method in ("lora", "qlora", "peft"):
        new_rows = _template_token_rows(model, data_template) if config.finetune.train_new_token_rows else []
        model.language_model = _with_adapters(model, config, new_rows)
    model.loss_kernel = config.train.loss_kernel
    if model.loss_kernel == "liger":
        fused_linear_cross_entropy()  # refuses at once where liger-kernel cannot run
    autocast = mixed_precision(config.train.precision)
    if config.train.master_weights == "float32":
        keep_float32_masters(model, autocast=any(autocast))
    log_trainable(model, compute_summary(*autocast))
    return model


def training_processor(
    config: TrainConfig,
    model_config: ModelConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    truncate: bool = True,
) -> Processor:
    """The processor the run's data is encoded with (`config` resolved): the model's tokenizer when the model is
    built, else the config's prepared as training prepares it - no model is needed. Without `truncate` it keeps
    every token (preference pairs are cut by their own rule)."""
    chat_template, data_template = chosen_templates(config, model_config.chat_template)
    return processor_for_config(
        dataclasses.replace(model_config, chat_template=chat_template),
        tokenizer,
        template=data_template,
        max_length=config.data.max_length if truncate else None,
        overflow=config.data.overflow,
    )


def chosen_templates(config: TrainConfig, model_template: str) -> tuple[str, str]:
    """The one place a run's templates are decided (`config` resolved): the chat template the trained model keeps -
    the config's `model: {chat_template}` over `model_template`, the one a loaded run or preset has - and the
    template the training data is rendered with (`data_template`, else that chat template)."""
    chat = model_template
    if isinstance(config.model, dict) and "chat_template" in config.model:
        chat = config.model["chat_template"]
    return chat, config.data_template or chat


def _template_token_rows(model: LlavaLiteModel, data_template: str) -> list[int]:
    """Embedding rows of the marker tokens (`<|im_start|>`...) of the template the data is rendered with,
    which adapters alone leave untrained.

    `<image>` is not among them: its row is always replaced by image features.
    """
    markers = template_special_tokens(data_template, model.tokenizer)
    return sorted(model.tokenizer.convert_tokens_to_ids(t) for t in markers)


def _train_biases(language_model) -> None:
    """BitFit: every bias term of the LM trains, nothing else of it. The embedding rows of new template markers
    stay at their mean start: they are no bias."""
    biases = [p for name, p in language_model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"]
    if not biases:
        kind = language_model.config.model_type
        raise ConfigError(
            f"finetune.method bitfit trains bias terms, but this language model ({kind}) has none: choose an LM "
            "with biases (qwen2, gpt2, ...) or another method"
        )
    for bias in biases:
        bias.requires_grad_(True)


def _with_adapters(model: LlavaLiteModel, config: TrainConfig, new_rows: list[int]):
    import peft

    finetune = config.finetune
    lm = model.language_model
    if finetune.method == "qlora":
        _keep_4bit_weights_trainable_on_cpu(lm)
        lm = peft.prepare_model_for_kbit_training(lm, use_gradient_checkpointing=config.train.gradient_checkpointing)
    if finetune.method == "peft":
        if not finetune.peft:
            raise ValueError("finetune.method peft needs finetune.peft, a peft config mapping with peft_type")
        peft_config = peft.get_peft_config({"task_type": "CAUSAL_LM", **finetune.peft})
        if peft_config.is_prompt_learning and config.data.packing:
            # Virtual tokens (or a prefix cache) come ahead of the whole packed sequence and hide its restarts.
            raise ValueError(
                f"finetune.peft {peft_config.peft_type.value} cannot train on packed rows (its virtual tokens would "
                "let packed samples see each other): set data.packing false"
            )
    else:
        lora = finetune.lora
        peft_config = peft.LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
            trainable_token_indices=new_rows or None,
        )
    return peft.get_peft_model(lm, peft_config)


def _keep_4bit_weights_trainable_on_cpu(language_model) -> None:
    """bitsandbytes' CPU backend repacks a 4-bit weight for its fast inference kernel the first time the layer runs in
    eval mode without gradients - as the loss's probe of the LM and evaluation do - and from then on uses that kernel,
    which has no backward, in training too: the gradient through every frozen 4-bit layer is silently lost (seen with
    bitsandbytes 0.50 on a CPU with AVX512-BF16: the lowest adapters' gradients off by half). So the repacking is
    turned off for a model that trains."""
    for module in language_model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def log_trainable(model: LlavaLiteModel, compute: str | None = None) -> None:
    """One line per part: trained or frozen, with parameter counts and the dtype it is stored in (what prismatic
    calls saying what it froze); then the precision the arithmetic runs in."""
    for name in ("vision_tower", "projector", "language_model"):
        module = getattr(model, name)
        total = sum(p.numel() for p in module.parameters())
        trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
        state = "trained" if trained == total else "frozen " if trained == 0 else "partly "
        detail = "" if trained in (0, total) else f" ({trained:,} trained)"
        adapters = " with adapters" if name == "language_model" and model.uses_adapters else ""
        stored = dtype_summary(module)
        logger.info("%s %-15s %14s params%s%s, stored in %s", state, name, f"{total:,}", detail, adapters, stored)
    if compute is not None:
        logger.info("computing in %s", compute)
