"""The causal LM and its tokenizer: loading, the special tokens we add, and their embedding rows."""

from __future__ import annotations

import contextlib
import logging

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llava_lite.data.templates import template_special_tokens
from llava_lite.model.config import LanguageModelConfig, ModelConfig
from llava_lite.model.tiny_tokenizer import TINY_TOKENIZER_DIR

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_tokenizer(config: LanguageModelConfig) -> PreTrainedTokenizerBase:
    name = config.tokenizer or config.name
    if name == "tiny":
        name = str(TINY_TOKENIZER_DIR)
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=config.trust_remote_code)
    if not tokenizer.is_fast:
        raise ValueError(f"tokenizer {name}: llava_lite needs a fast tokenizer (for offset mappings)")
    if tokenizer.pad_token is None:
        # Padding is masked by attention and labels alike, so reusing EOS is safe: labels come from
        # assistant spans, never from comparing ids with pad_token_id.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prepare_tokenizer(
    config: ModelConfig, data_template: str | None = None
) -> tuple[PreTrainedTokenizerBase, list[int]]:
    """The LM's tokenizer with `<image>` and the chat template's markers added (and those of `data_template`, the
    template training data is rendered with, when it differs); also the ids it added."""
    tokenizer = load_tokenizer(config.language_model)
    needed = [config.image_token, *template_special_tokens(config.chat_template, tokenizer)]
    if data_template:
        needed += template_special_tokens(data_template, tokenizer)
    return tokenizer, add_special_tokens(tokenizer, needed)


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> list[int]:
    """Add the tokens the tokenizer lacks as special tokens; return the ids of those newly added."""
    missing = [t for t in dict.fromkeys(tokens) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return [tokenizer.convert_tokens_to_ids(t) for t in missing]


def build_language_model(config: LanguageModelConfig) -> PreTrainedModel:
    dtype = DTYPES[config.dtype]
    kwargs = {"trust_remote_code": config.trust_remote_code}
    attention = attention_implementation(config.attn_implementation)
    if attention:
        kwargs["attn_implementation"] = attention
    if config.model_config is not None:
        if config.quantization != "none":
            raise ValueError(
                f"language_model.quantization {config.quantization} quantizes pretrained weights, and a model built "
                "from model_config has none: save it and name its folder in language_model.name"
            )
        model_config = dict(config.model_config)
        model_type = model_config.pop("model_type", None)
        if model_type is None:
            raise ValueError("language_model.model_config needs a model_type, e.g. llama or qwen2")
        hf_config = AutoConfig.for_model(model_type, **model_config)
        return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32 if dtype == "auto" else dtype, **kwargs)
    if config.quantization != "none":
        kwargs["quantization_config"] = _quantization_config(config)
        # transformers' quantized loading places the weights where device_map says; without one every process of a
        # multi-GPU run would put its copy on the first GPU.
        kwargs["device_map"] = process_device_map()
    return AutoModelForCausalLM.from_pretrained(config.name, dtype=dtype, **kwargs)


def attention_implementation(choice: str | None) -> str | None:
    """The attention a config's `attn_implementation` asks for: `auto` is flash attention 2 on a CUDA GPU where the
    flash-attn package is installed, else transformers' default (sdpa, which packing runs per sample)."""
    if choice != "auto":
        return choice
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def process_device_map(environ: dict[str, str] | None = None) -> dict[str, str | int]:
    """A device map that puts the whole model on this process's own device: its GPU (`LOCAL_RANK` of a torchrun or
    `accelerate launch` process, else the first) or the CPU."""
    import os

    environ = os.environ if environ is None else environ
    if not torch.cuda.is_available():
        return {"": "cpu"}
    local_rank = environ.get("LOCAL_RANK", "0")
    return {"": int(local_rank) if local_rank.isdigit() else 0}


def _quantization_config(config: LanguageModelConfig):
    """QLoRA's 4-bit NF4 with double quantization (or 8-bit) loading, by bitsandbytes: on CUDA GPUs, and on CPUs
    with bitsandbytes' CPU backend (0.48 and later)."""
    import importlib.util

    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"language_model.quantization {config.quantization} needs the bitsandbytes package: "
            'pip install -e ".[qlora]" (or pip install bitsandbytes)'
        )
    if config.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if config.dtype in ("auto", "bfloat16") else DTYPES[config.dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def fit_embeddings(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, new_token_ids: list[int] | None = None
) -> None:
    """Grow the embeddings to the tokenizer when needed; new tokens' rows start at the mean of the old rows.

    The mean keeps a new token's logit and input statistics typical of the vocabulary, instead of the
    large or arbitrary values a random row gives at the start of training. Without `new_token_ids`, the
    new tokens are those beyond the model's current rows (a saved tokenizer meeting its base LM again).
    """
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 splits a weight as it is built: its full shape
    if new_token_ids is None:
        new_token_ids = list(range(rows, len(tokenizer)))
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if not new_token_ids:
        return
    old_rows = min(new_token_ids)
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is None:
            continue
        with torch.no_grad(), _whole(module.weight, getattr(module, "bias", None)):
            weight = module.weight
            mean = weight[:old_rows].float().mean(dim=0).to(weight.dtype)
            weight[new_token_ids] = mean
            bias = getattr(module, "bias", None)
            if bias is not None:
                bias[new_token_ids] = bias[:old_rows].float().mean().to(bias.dtype)


def _whole(*params: torch.Tensor | None) -> contextlib.AbstractContextManager:
    """`params` whole on every process while inside, changes kept: ZeRO-3 splits weights as a model is built
    (`zero.Init`), leaving each process an empty placeholder; elsewhere nothing to do."""
    split = [param for param in params if param is not None and hasattr(param, "ds_id")]
    if not split:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(split, modifier_rank=0)
