"""Which dtype each part of a training run is stored in, trained in and computed in.

A 7B LM is loaded in bf16 to halve its memory, but bf16 keeps 8 significant bits: an update smaller than 1/256 of
the weight it is added to is rounded away, and at a learning rate of 2e-5 most AdamW updates are that small. So
every parameter that trains is kept in float32 (its gradient and AdamW moments with it), while frozen parts - the
tower, a stage-1 LM, a quantized base - stay in the dtype they were loaded in, and the arithmetic runs under
autocast in `train.precision`. DeepSpeed and FSDP2 keep master copies of their own; this holds in every engine,
DDP and one process included. `train.master_weights: as_loaded` keeps trained weights in their loaded dtype
instead (pure bf16, half the optimizer memory), for those who choose it knowingly.

Without autocast (fp32 compute) a module whose own weights are partly trained and partly frozen in 16 bits (BitFit's
biases beside bf16 matrices) is stored in float32 whole, so its operations meet one dtype.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

SIXTEEN_BITS = (torch.bfloat16, torch.float16)


def mixed_precision(choice: str) -> tuple[bool, bool]:
    """(bf16, fp16) autocast for a `train.precision` choice; auto is bf16 on a CUDA GPU that has it, else fp32."""
    if choice == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(), False
    return choice == "bf16", choice == "fp16"


def keep_float32_masters(model: nn.Module, autocast: bool) -> int:
    """Store every trained floating-point parameter of `model` in float32 (in place: the parameter objects, and so
    tied weights, stay the same); returns how many parameters were cast. Without `autocast`, modules that mix a
    trained parameter with frozen 16-bit ones of their own are cast whole."""
    cast = 0
    for module in model.modules():
        own = list(module.named_parameters(recurse=False))
        trained = any(p.requires_grad for _, p in own)
        mixed = trained and not autocast and any(p.dtype in SIXTEEN_BITS for _, p in own)
        for _, param in own:
            if param.dtype in SIXTEEN_BITS and (param.requires_grad or mixed):
                param.data = param.data.float()
                cast += param.numel()
    return cast


def dtype_summary(module: nn.Module) -> str:
    """How a part's parameters are stored, e.g. `float32` or `trained float32, frozen bfloat16 + uint8`."""
    trained = _dtypes(p for p in module.parameters() if p.requires_grad)
    frozen = _dtypes(p for p in module.parameters() if not p.requires_grad)
    if not frozen:
        return trained
    if not trained:
        return frozen
    return trained if trained == frozen else f"trained {trained}, frozen {frozen}"


def compute_summary(bf16: bool, fp16: bool) -> str:
    return "bf16 autocast" if bf16 else "fp16 autocast" if fp16 else "float32"


def _dtypes(params) -> str:
    names = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    return " + ".join(names)


def as_loaded_dtype(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with the LM's floating-point weights back in the dtype the LM was loaded in, when that is 16-bit:
    a finished run is saved as it will be loaded (a 7B LM in bf16 is 14 GB, not 28), while checkpoints keep the
    float32 masters so that a resumed run continues exactly. Adapters keep their own dtype."""
    from llava_lite.model.language_model import DTYPES

    loaded = DTYPES.get(model.config.language_model.dtype)
    if loaded not in SIXTEEN_BITS or model.uses_adapters:
        return state_dict
    return {
        name: tensor.to(loaded) if name.startswith("language_model.") and tensor.is_floating_point() else tensor
        for name, tensor in state_dict.items()
    }
