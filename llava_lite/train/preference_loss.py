"""The preference losses, from the policy's (and the reference's) log-probabilities of each pair's two answers, and
the metrics users watch, under TRL's names.

Each loss is TRL's own definition (DPOTrainer for the reference-based ones, CPOTrainer's simpo, ORPOTrainer's orpo),
so a number here means what it means there. With `delta = (chosen - ref_chosen) - (rejected - ref_rejected)`, the
summed log-probabilities' log-ratios:
- `sigmoid` (DPO): -log sigmoid(beta delta); with label smoothing e, conservative DPO:
  -(1 - e) log sigmoid(beta delta) - e log sigmoid(-beta delta);
- `hinge`: relu(1 - beta delta);
- `ipo`: (delta' - 1 / (2 beta))^2, delta' with each log-ratio averaged over its answer's tokens;
- `robust`: (-(1 - e) log sigmoid(beta delta) + e log sigmoid(-beta delta)) / (1 - 2e);
- `simpo` (no reference): the log-probabilities averaged per token, m = chosen - rejected - gamma / beta, and
  -(1 - e) log sigmoid(beta m) - e log sigmoid(-beta m);
- `orpo` (no reference): per-token averages, log odds = (chosen - rejected) - (log(1 - e^chosen) - log(1 -
  e^rejected)), and -beta log sigmoid(log odds) beside its NLL term (`sft_weight`, 1 by default).
Rewards: beta times the log-ratio for the reference-based losses, beta times the averaged log-probability for simpo
and orpo. `sft_weight` adds the chosen answers' negative log-likelihood per token (RPO's, MPO's and ORPO's term).

The loss of a batch is (the pairs' losses summed) / pairs + sft_weight x (the chosen answers' NLL summed) / their
tokens, the counts being those of the whole accumulated batch on every process, so accumulation and processes do
not change an update (and one batch of P pairs gives the mean, as TRL's does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llava_lite.model.pair_log_probs import PairLogProbs
from llava_lite.train.config import PreferenceSettings

# Sums kept between logs, in this order; the logged means divide by `pairs` (or by `chosen_tokens` for the NLL).
SUMS = (
    "pairs",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "nll",
    "chosen_tokens",
    "log_odds_ratio",
    "log_odds_chosen",
)


@dataclass
class PreferenceTerms:
    losses: torch.Tensor  # [pairs]
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    logged_logps: PairLogProbs  # the log-probabilities TRL logs: summed (DPO family) or per token (simpo, orpo)
    log_odds: torch.Tensor | None = None  # orpo's


def preference_terms(
    settings: PreferenceSettings, policy: PairLogProbs, reference: PairLogProbs | None = None
) -> PreferenceTerms:
    """Per pair: the loss of `settings.loss` (resolved: beta set) and the rewards."""
    beta, smoothing, loss = settings.beta, settings.label_smoothing, settings.loss
    if loss in ("simpo", "orpo"):
        mean = policy.per_token()
        chosen, rejected = mean.chosen, mean.rejected
        log_odds = None
        if loss == "simpo":
            margin = chosen - rejected - settings.simpo_gamma / beta
            losses = -(1 - smoothing) * F.logsigmoid(beta * margin) - smoothing * F.logsigmoid(-beta * margin)
        else:
            log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
            losses = -beta * F.logsigmoid(log_odds)
        return PreferenceTerms(losses, beta * chosen.detach(), beta * rejected.detach(), mean, log_odds)
    if reference is None:
        raise ValueError(f"preference loss {loss} needs the reference's log-probabilities")
    chosen_ratio = policy.chosen - reference.chosen
    rejected_ratio = policy.rejected - reference.rejected
    delta = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -(1 - smoothing) * F.logsigmoid(beta * delta) - smoothing * F.logsigmoid(-beta * delta)
    elif loss == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss == "ipo":
        averaged = chosen_ratio / policy.chosen_tokens.clamp(min=1) - rejected_ratio / policy.rejected_tokens.clamp(
            min=1
        )
        losses = (averaged - 1 / (2 * beta)) ** 2
    elif loss == "robust":
        clean = -(1 - smoothing) * F.logsigmoid(beta * delta)
        flipped = -smoothing * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * smoothing)
    else:
        raise ValueError(f"unknown preference loss {loss!r}")
    return PreferenceTerms(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), policy)


def batch_loss(
    settings: PreferenceSettings,
    terms: PreferenceTerms,
    policy: PairLogProbs,
    pairs: torch.Tensor | float,
    chosen_tokens: torch.Tensor | float,
) -> torch.Tensor:
    """This batch's share of the loss, `pairs` and `chosen_tokens` counted over the whole accumulated batch."""
    loss = terms.losses.sum() / pairs
    if settings.sft_weight:
        loss = loss + settings.sft_weight * (-policy.chosen.sum()) / chosen_tokens
    return loss


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of log 2 (Maechler's note)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class PreferenceMetrics:
    """Sums of the logged metrics since the last log, made means over every process at the next."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None

    def add(self, terms: PreferenceTerms, policy: PairLogProbs) -> None:
        chosen, rejected = terms.chosen_rewards, terms.rejected_rewards
        logged = terms.logged_logps
        log_odds = terms.log_odds.detach() if terms.log_odds is not None else chosen.new_zeros(0)
        values = [
            torch.tensor(float(len(chosen)), device=chosen.device),
            chosen.sum(),
            rejected.sum(),
            (chosen > rejected).sum().to(chosen.dtype),
            (chosen - rejected).sum(),
            logged.chosen.detach().sum(),
            logged.rejected.detach().sum(),
            -policy.chosen.detach().sum(),
            policy.chosen_tokens.sum().to(chosen.dtype),
            F.logsigmoid(log_odds).sum(),
            log_odds.sum(),
        ]
        step = torch.stack([v.float() for v in values]).double()
        self.sums = step if self.sums is None else self.sums + step

    def take(self, reduce=None, with_nll: bool = False, with_odds: bool = False) -> dict[str, float]:
        """The means since the last call (`reduce` sums a tensor over the processes, which must all call this at the
        same step): TRL's `rewards/*` and `logps/*`, `nll_loss` when an NLL term trains, orpo's log odds."""
        if self.sums is None:
            return {}
        sums = dict(zip(SUMS, (reduce(self.sums) if reduce is not None else self.sums).tolist()))
        self.sums = None
        pairs = max(sums["pairs"], 1.0)
        logs = {name: sums[name] / pairs for name in SUMS[1:7]}
        if with_nll:
            logs["nll_loss"] = sums["nll"] / max(sums["chosen_tokens"], 1.0)
        if with_odds:
            logs["log_odds_ratio"] = sums["log_odds_ratio"] / pairs
            logs["log_odds_chosen"] = sums["log_odds_chosen"] / pairs
        return logs
