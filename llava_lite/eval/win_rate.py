"""The numbers of a pairwise comparison: outcomes per prompt from the judge's two verdicts, the win rate, the
length-controlled win rate and bootstrap intervals.

Each prompt is judged twice, our answer shown first (`A`) and then second (`B`), so that a judge's liking for one
position cancels out. The two verdicts combine by MT-Bench's conservative rule: a **win** when both orders prefer
our answer, a **loss** when both prefer the baseline's, a **tie** otherwise (the orders disagree, or either says
tie). A prompt scores 1, 0.5 or 0, and the **win rate** is the mean score (ties count half, as AlpacaEval counts
them); the tie rate is the share of ties.

Judges favour longer answers. The **length-controlled win rate** (AlpacaEval 2's idea, without its per-instruction
term, which needs many models) fits a logistic regression of the prompt's score on the length difference,

    P(win) = sigmoid(b0 + b1 * tanh((len_ours - len_baseline) / std))

(lengths in characters, `std` the standard deviation of the differences over the prompts compared), and reads the
win probability where the lengths are equal: sigmoid(b0). A small ridge penalty on b1 (`SLOPE_PENALTY`, against the
mean log-loss) keeps the slope finite when length separates wins from losses perfectly, which small sets often do.
The intervals are percentile bootstraps over prompts (resampled with replacement), seeded, all refits at once.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

WIN, TIE, LOSS = "win", "tie", "loss"
POINTS = {WIN: 1.0, TIE: 0.5, LOSS: 0.0}
SLOPE_PENALTY = 1e-4
NEWTON_STEPS = 50
BOOTSTRAP_SAMPLES = 1000


def outcome_of(ours_first: str, ours_second: str) -> str:
    """Our outcome on one prompt from the verdicts (`A`, `B` or `C`) of the order showing our answer as A and of
    the order showing it as B."""
    prefers_ours = (ours_first == "A", ours_second == "B")
    prefers_theirs = (ours_first == "B", ours_second == "A")
    if all(prefers_ours):
        return WIN
    if all(prefers_theirs):
        return LOSS
    return TIE


def length_feature(differences: list[float]) -> list[float]:
    """tanh(difference / its standard deviation): bounded, so that one very long answer does not set the slope."""
    if not differences:
        return []
    mean = sum(differences) / len(differences)
    spread = math.sqrt(sum((d - mean) ** 2 for d in differences) / len(differences))
    if spread == 0:  # every difference the same: length cannot explain anything, the fit is the plain mean
        return [0.0] * len(differences)
    return [math.tanh(d / spread) for d in differences]


def fit_length_model(scores: torch.Tensor, feature: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(b0, b1) per row of `weights` ([R, N] prompt counts: 1s, or a bootstrap's draw counts) by Newton's method on
    the weighted mean log-loss of `scores` ([N] in [0, 1]) against sigmoid(b0 + b1 * feature), plus
    SLOPE_PENALTY / 2 * b1^2. The problem is convex and two-dimensional: a few dozen steps reach it exactly."""
    design = torch.stack([torch.ones_like(feature), feature], dim=1)  # [N, 2]
    weights = weights / weights.sum(dim=1, keepdim=True)
    penalty = torch.diag(torch.tensor([0.0, SLOPE_PENALTY], dtype=design.dtype))
    coefficients = torch.zeros(weights.shape[0], 2, dtype=design.dtype)
    for _ in range(NEWTON_STEPS):
        probability = torch.sigmoid(coefficients @ design.T)  # [R, N]
        gradient = (weights * (probability - scores)) @ design + coefficients @ penalty
        curvature = weights * probability * (1 - probability)
        hessian = torch.einsum("rn,ni,nj->rij", curvature, design, design) + penalty
        # A row where every weighted prompt has the same score and the same length is flat in b1 without the
        # penalty and unbounded in b0: a tiny ridge on both keeps the solve defined; its bias is far below 1e-6.
        hessian = hessian + 1e-9 * torch.eye(2, dtype=design.dtype)
        step = torch.linalg.solve(hessian, gradient.unsqueeze(-1)).squeeze(-1)
        coefficients = coefficients - step
        if float(step.abs().max()) < 1e-12:
            break
    return coefficients


def length_controlled(scores: list[float], differences: list[float]) -> float | None:
    """sigmoid(b0) of the length model fitted to these prompts (see the module doc); None without prompts."""
    if not scores:
        return None
    target = torch.tensor(scores, dtype=torch.float64)
    feature = torch.tensor(length_feature(differences), dtype=torch.float64)
    coefficients = fit_length_model(target, feature, torch.ones(1, len(scores), dtype=torch.float64))
    return float(torch.sigmoid(coefficients[0, 0]))


def bootstrap_intervals(
    scores: list[float], differences: list[float], seed: int, samples: int = BOOTSTRAP_SAMPLES
) -> dict[str, list[float] | None]:
    """95 % percentile intervals of the win rate and of the length-controlled win rate, from `samples` resamples
    of the prompts drawn with a generator seeded by `seed` (the same seed, the same intervals)."""
    if not scores:
        return {"win_rate": None, "length_controlled": None}
    count = len(scores)
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randint(count, (samples, count), generator=generator)
    weights = torch.zeros(samples, count, dtype=torch.float64).scatter_add_(
        1, drawn, torch.ones(samples, count, dtype=torch.float64)
    )
    target = torch.tensor(scores, dtype=torch.float64)
    win_rates = (weights @ target) / count
    # The feature's scale is the full set's: a resample asks how stable the fit is, not a new normalisation.
    feature = torch.tensor(length_feature(differences), dtype=torch.float64)
    controlled = torch.sigmoid(fit_length_model(target, feature, weights)[:, 0])
    return {"win_rate": _percentiles(win_rates), "length_controlled": _percentiles(controlled)}


def summarize_outcomes(rows: list[dict], seed: int = 0) -> dict:
    """Rows with `outcome` (win/tie/loss, or None where a verdict is missing), `category`, and `length_difference`
    (ours minus the baseline's, in characters): the numbers overall and per category."""
    judged = [row for row in rows if row["outcome"] is not None]
    summary = _numbers(judged, seed)
    summary["unjudged"] = len(rows) - len(judged)
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in judged:
        groups[str(row["category"])].append(row)
    summary["by_category"] = {name: _numbers(group, seed) for name, group in sorted(groups.items())}
    return summary


def _numbers(rows: list[dict], seed: int) -> dict:
    scores = [POINTS[row["outcome"]] for row in rows]
    differences = [float(row["length_difference"]) for row in rows]
    count = len(rows)
    tally = {kind: sum(1 for row in rows if row["outcome"] == kind) for kind in (WIN, TIE, LOSS)}
    intervals = bootstrap_intervals(scores, differences, seed)
    return {
        "win_rate": sum(scores) / count if count else None,
        "length_controlled_win_rate": length_controlled(scores, differences),
        "tie_rate": tally[TIE] / count if count else None,
        "wins": tally[WIN],
        "ties": tally[TIE],
        "losses": tally[LOSS],
        "judged": count,
        "win_rate_ci95": intervals["win_rate"],
        "length_controlled_ci95": intervals["length_controlled"],
        "mean_length_difference": sum(differences) / count if count else None,
    }


def _percentiles(values: torch.Tensor) -> list[float]:
    low, high = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=values.dtype)).tolist()
    return [low, high]
