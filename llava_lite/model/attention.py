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

A packed row can also share prefixes (`segment_prefixes`, one entry per sample: the index of the earlier sample it
continues, or -1): a sample that continues another attends to all of that one's tokens, then to its own causally,
its positions going on from the prefix's end - as if the prefix were written in front of it, without running the
prefix again. RL's update is its user: a prompt once, then each of its G answers after it
(`llava_lite.train.rl_update`). Only `sdpa_varlen` reads `segment_prefixes` (`shares_prefixes`); they reach it as
keyword arguments, as `cu_seq_lens` do, so a layer recomputed under activation checkpointing sees them too.
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
    segment_prefixes: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """sdpa over each `[start, end)` of `cu_seq_lens_q` on its own, causal - after its prefix's keys where
    `segment_prefixes` gives it one; plain sdpa when they are absent. Query, key and value are
    `[1, heads, tokens, head_dim]`; the output is `[1, tokens, heads, head_dim]`."""
    packed = cu_seq_lens_q is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
    if packed and cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q:
        packed = torch.equal(cu_seq_lens_k, cu_seq_lens_q)
    if not packed:
        if segment_prefixes is not None:
            raise RuntimeError(f"{type(module).__name__} got segment_prefixes without a packed row's cu_seq_lens")
        if _by_segments.get() and attention_mask is None:
            raise RuntimeError(
                f"{type(module).__name__} was not handed cu_seq_lens: this LM cannot attend to packed samples "
                "one at a time under sdpa; set data.packing false or language_model.attn_implementation eager"
            )
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    bounds = _read(cu_seq_lens_q)
    if bounds[0] != 0 or bounds[-1] != query.shape[2]:
        raise ValueError(f"cu_seq_lens_q {bounds} do not cover the {query.shape[2]} tokens of the sequence")
    window = kwargs.get("sliding_window")  # a sliding-window layer (Mistral, Qwen2's, Gemma's local layers)
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    prefixes = _prefixes(segment_prefixes, len(lengths))
    # split, not slicing: its backward joins the pieces' gradients in one pass, where each slice's would make a
    # gradient the size of the whole row (a packed row of n samples would cost n full-size tensors per layer).
    keys, values = key.split(lengths, 2), value.split(lengths, 2)
    pieces = []
    for index, (q, length) in enumerate(zip(query.split(lengths, 2), lengths)):
        if length == 0:
            continue
        k, v, prefix = keys[index], values[index], prefixes[index]
        if prefix >= 0:  # the prefix's keys first, then its own
            k, v = torch.cat([keys[prefix], k], dim=2), torch.cat([values[prefix], v], dim=2)
            mask = _causal_after(length, lengths[prefix], window, query.device)
        else:
            mask = _sliding_causal(length, window, query.device) if window and length > window else None
        pieces.append(sdpa_attention_forward(module, q, k, v, mask, dropout, scaling, is_causal=mask is None)[0])
    return torch.cat(pieces, dim=1), None


_last_read: list = []  # (tensor, its values) of the last few index tensors read


def _read(values: torch.Tensor) -> list[int]:
    """An index tensor as a list, read from its device once per forward (every layer is handed the same tensor),
    not once per layer: on a GPU each read waits for the device."""
    for tensor, listed in _last_read:
        if tensor is values:
            return listed
    _last_read[:] = [*_last_read[-3:], (values, values.tolist())]
    return _last_read[-1][1]


def _prefixes(segment_prefixes: torch.Tensor | None, samples: int) -> list[int]:
    """Each sample's prefix (an earlier sample that has none itself), or -1; checked."""
    if segment_prefixes is None:
        return [-1] * samples
    prefixes = _read(segment_prefixes)
    if len(prefixes) != samples:
        raise ValueError(f"segment_prefixes has {len(prefixes)} entries for {samples} samples of cu_seq_lens")
    for index, prefix in enumerate(prefixes):
        if prefix >= index or (prefix >= 0 and prefixes[prefix] != -1):
            raise ValueError(f"sample {index}'s prefix {prefix} is not an earlier sample without a prefix")
    return prefixes


def _causal_after(length: int, prefix: int, window: int | None, device: torch.device) -> torch.Tensor:
    """`[1, 1, length, prefix + length]`: the sample's query i (position prefix + i) sees every key up to its own
    position - the prefix's, then its own causally - within `window` positions where the layer has one."""
    query = torch.arange(prefix, prefix + length, device=device)[:, None]
    key = torch.arange(prefix + length, device=device)[None]
    seen = key <= query
    if window:
        seen &= key > query - window
    return seen[None, None]


def shares_prefixes(language_model) -> bool:
    """Whether `language_model`'s attention reads `segment_prefixes` (it runs `sdpa_varlen`)."""
    return getattr(language_model.config, "_attn_implementation", None) == VARLEN_SDPA


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
