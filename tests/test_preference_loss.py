"""The preference losses against hand computations, and the per-token log-probs of the chunked head against autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llava_lite.model import loss as loss_module
from llava_lite.model.pair_log_probs import PairLogProbs
from llava_lite.train.config import PreferenceSettings
from llava_lite.train.preference_loss import batch_loss, preference_terms

# Two pairs: summed log-probs of the policy and the reference, and the answers' token counts.
POLICY = {"chosen": [-12.0, -30.5], "rejected": [-15.25, -28.0], "chosen_tokens": [4, 10], "rejected_tokens": [5, 8]}
REFERENCE = {"chosen": [-13.0, -30.0], "rejected": [-14.0, -29.5]}
BETA, SMOOTHING, GAMMA = 0.3, 0.2, 0.5


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def hand_losses(loss: str) -> list[float]:
    """Each pair's loss written out from the papers' (and TRL's) formulas."""
    out = []
    for i in range(2):
        pc, pr = POLICY["chosen"][i], POLICY["rejected"][i]
        rc, rr = REFERENCE["chosen"][i], REFERENCE["rejected"][i]
        nc, nr = POLICY["chosen_tokens"][i], POLICY["rejected_tokens"][i]
        delta = (pc - rc) - (pr - rr)
        if loss == "sigmoid":  # with label smoothing: conservative DPO
            out.append(-(1 - SMOOTHING) * log_sigmoid(BETA * delta) - SMOOTHING * log_sigmoid(-BETA * delta))
        elif loss == "hinge":
            out.append(max(0.0, 1 - BETA * delta))
        elif loss == "ipo":
            out.append(((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * BETA)) ** 2)
        elif loss == "robust":
            clean = -(1 - SMOOTHING) * log_sigmoid(BETA * delta)
            flipped = SMOOTHING * log_sigmoid(-BETA * delta)
            out.append((clean + flipped) / (1 - 2 * SMOOTHING))
        elif loss == "simpo":
            margin = pc / nc - pr / nr - GAMMA / BETA
            out.append(-(1 - SMOOTHING) * log_sigmoid(BETA * margin) - SMOOTHING * log_sigmoid(-BETA * margin))
        elif loss == "orpo":
            ac, ar = pc / nc, pr / nr
            odds = (ac - math.log(1 - math.exp(ac))) - (ar - math.log(1 - math.exp(ar)))
            out.append(-BETA * log_sigmoid(odds))
    return out


def log_probs(values: dict) -> PairLogProbs:
    tokens = {k: torch.tensor(values.get(k, POLICY[k])) for k in ("chosen_tokens", "rejected_tokens")}
    return PairLogProbs(torch.tensor(values["chosen"]), torch.tensor(values["rejected"]), **tokens)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"])
def test_each_loss_equals_its_hand_computation(loss):
    smoothing = SMOOTHING if loss in ("sigmoid", "robust", "simpo") else 0.0
    settings = PreferenceSettings(loss=loss, beta=BETA, label_smoothing=smoothing, simpo_gamma=GAMMA)
    reference = None if loss in ("simpo", "orpo") else log_probs(REFERENCE)
    terms = preference_terms(settings, log_probs(POLICY), reference)
    assert terms.losses.dtype == torch.float32
    assert terms.losses.tolist() == pytest.approx(hand_losses(loss), rel=1e-6, abs=1e-6)
    if loss in ("simpo", "orpo"):  # rewards of the reference-free losses: beta x the per-token log-probs
        expected = [BETA * c / n for c, n in zip(POLICY["chosen"], POLICY["chosen_tokens"])]
    else:
        expected = [BETA * (c - r) for c, r in zip(POLICY["chosen"], REFERENCE["chosen"])]
    assert terms.chosen_rewards.tolist() == pytest.approx(expected, rel=1e-6)


def test_sft_weight_adds_the_chosen_answers_nll_per_token():
    settings = PreferenceSettings(loss="sigmoid", beta=BETA, sft_weight=0.7)
    policy = log_probs(POLICY)
    terms = preference_terms(settings, policy, log_probs(REFERENCE))
    got = batch_loss(settings, terms, policy, pairs=2, chosen_tokens=14)
    nll = -(POLICY["chosen"][0] + POLICY["chosen"][1]) / 14
    sigmoid = [-log_sigmoid(BETA * ((pc - rc) - (pr - rr))) for pc, rc, pr, rr in
               zip(POLICY["chosen"], REFERENCE["chosen"], POLICY["rejected"], REFERENCE["rejected"])]  # fmt: skip
    assert float(got) == pytest.approx(sum(sigmoid) / 2 + 0.7 * nll, rel=1e-6)


@pytest.mark.parametrize("head_trains", [True, False], ids=["head trained", "head frozen"])
def test_per_sequence_log_probs_and_their_gradients_equal_autograds(monkeypatch, head_trains):
    """Chunks of a few rows; each sequence's log-prob weighted differently, as a preference loss weighs them."""
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 3 * 50)
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=True).requires_grad_(head_trains)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = labels[1, :5] = -100
    weights = torch.tensor([0.7, -1.3])

    ours = loss_module.sequence_log_probs(hidden, head, labels)
    expected_lp = F.log_softmax(head(hidden)[:, :-1], -1).gather(2, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    expected = (expected_lp * (labels[:, 1:] != -100)).sum(1)
    assert torch.allclose(ours, expected, rtol=1e-6, atol=1e-5)
    params = [hidden, *([head.weight, head.bias] if head_trains else [])]
    got = torch.autograd.grad((ours * weights).sum(), params)
    want = torch.autograd.grad((expected * weights).sum(), params)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_packed_sequences_are_summed_apart():
    torch.manual_seed(1)
    hidden, head = torch.randn(1, 10, 8), torch.nn.Linear(8, 20)
    labels = torch.randint(0, 20, (1, 10))
    labels[0, [0, 4, 5]] = -100  # each sample's first token (positions 0 and 4), and a prompt token
    cu_seq_lens = torch.tensor([0, 4, 10])
    packed = loss_module.sequence_log_probs(hidden, head, labels, cu_seq_lens)
    apart = [loss_module.sequence_log_probs(hidden[:, a:b], head, labels[:, a:b]) for a, b in ((0, 4), (4, 10))]
    assert torch.allclose(packed, torch.cat(apart), atol=1e-6)
