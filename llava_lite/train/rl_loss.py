"""The GRPO family's advantages and losses, as TRL defines them (GRPOTrainer's `_compute_loss`, RLOOTrainer's
advantages), on per-token log-probabilities already taken at the completions' tokens.

Layout: `N` completions, each a row of `T` token slots (right-padded); `mask` marks the tokens that count (a
completion's tokens through its stop token; none of a truncated one under `mask_truncated_completions`).

Advantages, from the rewards `[prompts, G]` (NaN: no reward applied to that completion):
- `group` (GRPO): reward less its group's mean, divided by the std (`scale_rewards`: its group's, the batch's, or
  none) plus 1e-4;
- `rloo`: reward less the mean of the group's other scorable answers (the leave-one-out baseline), optionally
  standardised over the batch (`scale_rewards: batch`, TRL's `normalize_advantages`).
A completion without a reward gets advantage 0; NaNs are left out of every mean and std (Bessel-corrected).

The per-token loss is PPO's clipped objective, -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A), r the
importance ratio to the policy that sampled (exactly 1 in the first pass over a generation batch): per token, or per
completion for `gspo` (exp of the mean log-ratio over its tokens). `beta` adds beta x KL per token, TRL's k3
estimator exp(ref - logp) - (ref - logp) - 1. Normalised as:
- `grpo`, `gspo`: each completion's token mean, then the mean over completions;
- `dr_grpo`: the sum over tokens divided by completions x max_new_tokens;
- `dapo`: the sum over tokens divided by the tokens (every token of the batch counts once).
`sequences` and `tokens` are those counts over the whole accumulated batch on every process (the trainer's), so
that accumulation and processes change nothing; by default, this batch's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_EPSILON = 1e-4  # TRL's: advantages are divided by std + 1e-4


@dataclass(frozen=True)
class LossSettings:
    loss: str  # grpo, dr_grpo, dapo, gspo
    epsilon: float
    epsilon_high: float
    beta: float = 0.0
    max_new_tokens: int = 256  # dr_grpo's normaliser


# ----- advantages -------------------------------------------------------------------------------------------------
def nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The std of the values that are not NaN, Bessel-corrected; NaN where fewer than two are."""
    mean = values.nanmean(dim=dim, keepdim=True) if dim is not None else values.nanmean()
    count = (~values.isnan()).sum(dim=dim) if dim is not None else (~values.isnan()).sum()
    squares = ((values - mean) ** 2).nansum(dim=dim) if dim is not None else ((values - mean) ** 2).nansum()
    variance = squares / (count - 1).clamp(min=1)
    return torch.where(count > 1, variance.sqrt(), torch.full_like(variance, float("nan")))


def group_advantages(rewards: torch.Tensor, scale: str = "group", batch: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO's advantages of `rewards` `[prompts, G]`; `batch` holds every process's rewards when `scale` is batch
    (default: `rewards`)."""
    advantages = rewards - rewards.nanmean(dim=1, keepdim=True)
    if scale == "group":
        advantages = advantages / (nanstd(rewards, dim=1)[:, None] + SCALE_EPSILON)
    elif scale == "batch":
        advantages = advantages / (nanstd((rewards if batch is None else batch).flatten()) + SCALE_EPSILON)
    elif scale != "none":
        raise ValueError(f"unknown scale_rewards {scale!r}")
    return advantages.nan_to_num(nan=0.0)


def rloo_advantages(rewards: torch.Tensor, scale: str = "none", batch: torch.Tensor | None = None) -> torch.Tensor:
    """RLOO's advantages: each reward less the mean of its group's other scorable rewards; with `scale` batch,
    standardised over the batch (`batch`: every process's leave-one-out advantages, default these)."""
    scorable = (~rewards.isnan()).sum(dim=1, keepdim=True)
    baseline = (rewards.nansum(dim=1, keepdim=True) - rewards) / (scorable - 1)
    advantages = rewards - baseline
    if scale == "batch":
        reference = (advantages if batch is None else batch).flatten()
        advantages = (advantages - reference.nanmean()) / (nanstd(reference) + SCALE_EPSILON)
    elif scale != "none":
        raise ValueError(f"advantage rloo takes scale_rewards none or batch, not {scale!r}")
    return advantages.nan_to_num(nan=0.0)


def zero_std_groups(rewards: torch.Tensor) -> torch.Tensor:
    """Per group: whether its scorable rewards are all the same (no signal: every advantage 0)."""
    spread = nanstd(rewards, dim=1).nan_to_num(nan=0.0)
    return torch.isclose(spread, torch.zeros_like(spread))


# ----- the loss ---------------------------------------------------------------------------------------------------
@dataclass
class LossStats:
    """Sums behind the logged means, with what they are averaged over: `tokens` (mask) for kl and the clip ratios,
    or completions for gspo's clip ratios (one ratio per completion)."""

    kl: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor
    clipped: torch.Tensor
    clip_count: torch.Tensor
    tokens: torch.Tensor


def per_token_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """TRL's k3 estimator of KL(policy || reference) at each sampled token."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def policy_loss(
    settings: LossSettings,
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    sequences: torch.Tensor | float | None = None,
    tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """The loss of `logps` `[N, T]` (differentiable) given the sampling policy's `old_logps` (None: these, detached -
    the first pass over a generation batch), `advantages` `[N]` and `mask` `[N, T]`; and the sums behind its
    logged metrics. See the module doc for the normalisations."""
    mask = mask.to(logps.dtype)
    old_logps = logps.detach() if old_logps is None else old_logps
    advantages = advantages[:, None].to(logps.dtype)
    log_ratio = logps - old_logps
    if settings.loss == "gspo":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1 - settings.epsilon, 1 + settings.epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped_ratio * advantages)
    kl = None
    if settings.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference's log-probabilities")
        kl = per_token_kl(logps, ref_logps)
        per_token = per_token + settings.beta * kl
    per_token = per_token.expand_as(mask)
    sequences = torch.as_tensor(len(mask) if sequences is None else sequences, dtype=logps.dtype)
    tokens = torch.as_tensor(mask.sum() if tokens is None else tokens, dtype=logps.dtype)
    if settings.loss in ("grpo", "gspo"):
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / sequences
    elif settings.loss == "dr_grpo":
        loss = (per_token * mask).sum() / (sequences * settings.max_new_tokens)
    elif settings.loss == "dapo":
        loss = (per_token * mask).sum() / tokens.clamp(min=1.0)
    else:
        raise ValueError(f"unknown loss {settings.loss!r}")
    return loss, _stats(settings, ratio.detach(), advantages, mask, None if kl is None else kl.detach())


def _stats(settings: LossSettings, ratio, advantages, mask, kl) -> LossStats:
    low = ((ratio < 1 - settings.epsilon) & (advantages < 0)).to(mask.dtype)
    high = ((ratio > 1 + settings.epsilon_high) & (advantages > 0)).to(mask.dtype)
    if ratio.shape[1] == 1:  # gspo: one ratio per completion, counted once each
        weights, count = torch.ones_like(low), torch.tensor(float(len(mask)))
    else:
        weights, count = mask, mask.sum()
    kl_sum = (kl * mask).sum() if kl is not None else mask.new_zeros(())
    return LossStats(
        kl=kl_sum,
        clipped_low=(low * weights).sum(),
        clipped_high=(high * weights).sum(),
        clipped=(((low + high) > 0).to(mask.dtype) * weights).sum(),
        clip_count=count.to(mask.dtype),
        tokens=mask.sum(),
    )
