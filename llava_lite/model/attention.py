"""Variable-length attention for packed sequences under sdpa: each sample attends only to itself, at its own cost.

A packed batch (`llava_lite.data.collator`) is one row of samples laid end to end, their boundaries given as
cumulative lengths, `cu_seq_lens` - the form flash attention's variable-length kernels take. Under
`flash_attention_2/3` transformers uses them as they are. Under sdpa, transformers would mask a packed row with
a block-diagonal `[tokens, tokens]` mask and compute every block of it, the masked ones included: a row of
eight 600-token samples costs eight times the attention it needs. `sdpa_varlen` runs sdpa once per sample
instead, causal and unmasked (its fastest kernels; a sliding-window layer gets the window as a mask of the
sample's size), and is plain sdpa for every other call: with a padding mask, with a KV cache, in generation.

It is a transformers attention implementation, registered under `sdpa_varlen` in `AttentionInterface`, so the
LM's attention modules dispatch to it as to any other; `LlavaLiteModel` sets it on an LM that runs sdpa
(`use_varlen_sdpa`). Its mask function is sdpa's, except while the model runs the LM on a packed batch
(`attending_by_segments`): then no `[tokens, tokens]` mask is built at all, and an attention call that did not
receive the boundaries stops with an error rather than let samples see each other.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

logger = logging.getLogger(__name__)

VARLEN_SDPA = "sdpa_varlen"


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """sdpa over each `[start, end)` of `cu_seq_lens_q` on its own, causal; plain sdpa when they are absent.
    Query, key and value are `[1, heads, tokens, head_dim]`; the output is `[1, tokens, heads, head_dim]`."""
    packed = cu_seq_lens_q is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
    if packed and cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q:
        packed = torch.equal(cu_seq_lens_k, cu_seq_lens_q)
    if not packed:
        if _by_segments.get() and attention_mask is None:
            raise RuntimeError(
                f"{type(module).__name__} was not handed cu_seq_lens: this LM cannot attend to packed samples "
                "one at a time under sdpa; set data.packing false or language_model.attn_implementation eager"
            )
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    bounds = _bounds(cu_seq_lens_q)
    if bounds[0] != 0 or bounds[-1] != query.shape[2]:
        raise ValueError(f"cu_seq_lens_q {bounds} do not cover the {query.shape[2]} tokens of the sequence")
    window = kwargs.get("sliding_window")  # a sliding-window layer (Mistral, Qwen2's, Gemma's local layers)
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    pieces = []
    # split, not slicing: its backward joins the pieces' gradients in one pass, where each slice's would make a
    # gradient the size of the whole row (a packed row of n samples would cost n full-size tensors per layer).
    for q, k, v, length in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), lengths):
        if length == 0:
            continue
        mask = _sliding_causal(length, window, query.device) if window and length > window else None
        pieces.append(sdpa_attention_forward(module, q, k, v, mask, dropout, scaling, is_causal=mask is None)[0])
    return torch.cat(pieces, dim=1), None


_last_bounds: list = [None, []]  # the last cu_seq_lens seen, and its values


def _bounds(cu_seq_lens: torch.Tensor) -> list[int]:
    """`cu_seq_lens` as a list, read from its device once per forward (every layer is handed the same tensor),
    not once per layer: on a GPU each read waits for the device."""
    if _last_bounds[0] is not cu_seq_lens:
        _last_bounds[:] = [cu_seq_lens, cu_seq_lens.tolist()]
    return _last_bounds[1]


def _sliding_causal(length: int, window: int, device: torch.device) -> torch.Tensor:
    """`[1, 1, length, length]`: query i sees keys i - window < j <= i (transformers' sliding-window rule)."""
    query = torch.arange(length, device=device)[:, None]
    key = torch.arange(length, device=device)[None]
    return ((key <= query) & (key > query - window))[None, None]


# Set while the model runs the LM on a packed batch whose boundaries reach the attention as cu_seq_lens.
_by_segments: ContextVar[bool] = ContextVar("llava_lite_by_segments", default=False)


@contextmanager
def attending_by_segments() -> Iterator[None]:
    """While the LM runs on a packed batch: no mask is built, each sample is attended alone."""
    token = _by_segments.set(True)
    try:
        yield
    finally:
        _by_segments.reset(token)


def varlen_sdpa_mask(**kwargs) -> torch.Tensor | None:
    """sdpa's mask (a padded batch, a cached generation step), or none on a packed batch, whose samples'
    boundaries the attention takes from cu_seq_lens."""
    if _by_segments.get() and kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(**kwargs)


AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, varlen_sdpa_mask)


def use_varlen_sdpa(language_model) -> None:
    """Run `language_model`'s attention as `sdpa_varlen` when it runs sdpa (a no-op otherwise, e.g. under eager
    or flash attention, or for an LM whose attention transformers cannot switch)."""
    if getattr(language_model.config, "_attn_implementation", None) != "sdpa":
        return
    try:
        language_model.set_attn_implementation(VARLEN_SDPA)
    except (ValueError, ImportError, AttributeError) as error:
        logger.info("%s keeps plain sdpa (%s): packed rows cost their full attention", type(language_model), error)
