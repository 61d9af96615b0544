"""An open_clip ViT as transformers' `CLIPVisionModel`: the config and the weights under CLIP's names.

Only OpenAI-style ViTs map: a bias-free patch conv, a class token, learned (or fixed) absolute positions,
`ln_pre`, plain pre-norm blocks with one fused qkv projection, LayerNorm everywhere with one epsilon,
and QuickGELU (OpenAI's weights) or GELU (most LAION models) in the MLP. Anything else - layer scale,
attentional pooling (CoCa), custom blocks (qk-norm, scaled cosine attention), timm trunks - would compute
something `CLIPVisionModel` cannot, so it is refused with the reason rather than converted approximately.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig

from llava_lite.imports import without_module

with without_module("wandb"):  # see llava_lite.imports
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer


class NotConvertible(ValueError):
    """A model that has no exact equivalent in the target format; the message says what stands in the way."""


def clip_vision_config(visual: nn.Module) -> CLIPVisionConfig:
    """The `CLIPVisionConfig` that computes what `visual` computes; refuses towers that differ in kind."""
    _check_convertible(visual)
    blocks = visual.transformer.resblocks
    first = blocks[0]
    width = visual.transformer.width
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=first.mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=first.attn.num_heads,
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        hidden_act=_activation_name(first.mlp.gelu),
        layer_norm_eps=visual.ln_pre.eps,
        # Only the contrastive head uses it; kept so the config describes the original model.
        projection_dim=visual.output_dim,
    )


def clip_vision_state_dict(visual: nn.Module) -> dict[str, torch.Tensor]:
    """`visual`'s weights under `CLIPVisionModel`'s parameter names (the contrastive projection is dropped)."""
    _check_convertible(visual)
    state = {
        "embeddings.class_embedding": visual.class_embedding,
        "embeddings.patch_embedding.weight": visual.conv1.weight,
        "embeddings.position_embedding.weight": visual.positional_embedding,
        "pre_layrnorm.weight": visual.ln_pre.weight,
        "pre_layrnorm.bias": visual.ln_pre.bias,
        "post_layernorm.weight": visual.ln_post.weight,
        "post_layernorm.bias": visual.ln_post.bias,
    }
    for index, block in enumerate(visual.transformer.resblocks):
        prefix = f"encoder.layers.{index}."
        # nn.MultiheadAttention keeps q, k and v stacked in one projection, in that order.
        q, k, v = block.attn.in_proj_weight.chunk(3, dim=0)
        q_bias, k_bias, v_bias = block.attn.in_proj_bias.chunk(3, dim=0)
        state.update(
            {
                prefix + "self_attn.q_proj.weight": q,
                prefix + "self_attn.k_proj.weight": k,
                prefix + "self_attn.v_proj.weight": v,
                prefix + "self_attn.q_proj.bias": q_bias,
                prefix + "self_attn.k_proj.bias": k_bias,
                prefix + "self_attn.v_proj.bias": v_bias,
                prefix + "self_attn.out_proj.weight": block.attn.out_proj.weight,
                prefix + "self_attn.out_proj.bias": block.attn.out_proj.bias,
                prefix + "layer_norm1.weight": block.ln_1.weight,
                prefix + "layer_norm1.bias": block.ln_1.bias,
                prefix + "layer_norm2.weight": block.ln_2.weight,
                prefix + "layer_norm2.bias": block.ln_2.bias,
                prefix + "mlp.fc1.weight": block.mlp.c_fc.weight,
                prefix + "mlp.fc1.bias": block.mlp.c_fc.bias,
                prefix + "mlp.fc2.weight": block.mlp.c_proj.weight,
                prefix + "mlp.fc2.bias": block.mlp.c_proj.bias,
            }
        )
    return {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}


def _activation_name(module: nn.Module) -> str:
    if isinstance(module, QuickGELU):
        return "quick_gelu"
    if type(module) is nn.GELU:
        return "gelu" if module.approximate == "none" else "gelu_pytorch_tanh"
    raise NotConvertible(f"its MLP activation {type(module).__name__} has no transformers CLIP equivalent")


def _check_convertible(visual: nn.Module) -> None:
    reason = _why_not(visual)
    if reason:
        raise NotConvertible(f"this open_clip tower cannot be written as a transformers CLIP vision model: {reason}")


def _why_not(visual: nn.Module) -> str | None:
    if not isinstance(visual, VisionTransformer):
        return f"it is a {type(visual).__name__}, not open_clip's own VisionTransformer (e.g. a timm trunk)"
    if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
        return "its image or patch size is not square"
    if visual.conv1.bias is not None:
        return "its patch embedding has a bias"
    if visual.attn_pool is not None:
        return "it pools with attention (CoCa-style)"
    if not isinstance(visual.ln_pre, nn.LayerNorm):
        return "it has no ln_pre (CLIP normalises the embeddings before the first block)"
    norms = [visual.ln_pre, visual.ln_post]
    for index, block in enumerate(visual.transformer.resblocks):
        if type(block) is not ResidualAttentionBlock:
            return f"block {index} is a {type(block).__name__} (qk-norm, scaled attention or other custom blocks)"
        if not isinstance(block.ls_1, nn.Identity) or not isinstance(block.ls_2, nn.Identity):
            return f"block {index} uses layer scale"
        if hasattr(block, "ln_1_kv") or block.attn.in_proj_weight is None or block.attn.in_proj_bias is None:
            return f"block {index} has an attention layout CLIP does not (separate or bias-free projections)"
        _activation_name(block.mlp.gelu)
        norms += [block.ln_1, block.ln_2]
    if any(not isinstance(norm, nn.LayerNorm) for norm in norms):
        return "some of its norms are not LayerNorm"
    if len({norm.eps for norm in norms}) > 1:
        return "its LayerNorms use different epsilons"
    return None
