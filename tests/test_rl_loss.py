"""The GRPO family's advantages and losses against hand computations (float32, 1e-6), and our loss against TRL's
GRPOTrainer's own loss computation on the same completions, log-probabilities and advantages."""

from __future__ import annotations

import math
import types

import pytest
import torch

from llava_lite.train.rl_loss import (
    LossSettings,
    group_advantages,
    nanstd,
    per_token_kl,
    policy_loss,
    rloo_advantages,
    zero_std_groups,
)

NAN = float("nan")
# Three completions of up to four tokens: the last one has two.
LOGPS = torch.tensor([[-0.5, -1.0, -0.2, -2.0], [-0.1, -0.3, -0.9, -0.4], [-1.5, -0.7, 0.0, 0.0]])
OLD = torch.tensor([[-0.6, -0.8, -0.2, -1.0], [-0.1, -0.5, -0.6, -0.4], [-1.2, -0.7, 0.0, 0.0]])
REF = torch.tensor([[-0.4, -1.1, -0.3, -1.5], [-0.2, -0.3, -0.8, -0.5], [-1.0, -0.9, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
ADVANTAGES = torch.tensor([1.0, -0.5, 2.0])


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# ----- advantages -------------------------------------------------------------------------------------------------
def test_group_advantages_are_the_reward_less_its_group_mean_over_the_group_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, NAN, 0.0, 1.0]])
    advantages = group_advantages(rewards, "group")
    for row, values in enumerate(rewards.tolist()):
        known = [v for v in values if not math.isnan(v)]
        mean, std = sum(known) / len(known), _std(known)
        for column, value in enumerate(values):
            expected = 0.0 if math.isnan(value) else (value - mean) / (std + 1e-4)
            assert advantages[row, column].item() == pytest.approx(expected, abs=1e-6)
    assert zero_std_groups(rewards).tolist() == [False, True, False]


def test_batch_scaling_divides_by_the_std_of_every_reward_and_none_does_not_divide():
    rewards = torch.tensor([[1.0, 0.0], [3.0, 1.0]])
    std = _std([1.0, 0.0, 3.0, 1.0])
    expected = [[0.5 / (std + 1e-4), -0.5 / (std + 1e-4)], [1.0 / (std + 1e-4), -1.0 / (std + 1e-4)]]
    assert torch.allclose(group_advantages(rewards, "batch"), torch.tensor(expected), atol=1e-6)
    assert group_advantages(rewards, "none").tolist() == [[0.5, -0.5], [1.0, -1.0]]
    # The batch's std may come from every process's rewards.
    wider = torch.tensor([[1.0, 0.0], [3.0, 1.0], [5.0, 5.0]])
    wide_std = _std([1.0, 0.0, 3.0, 1.0, 5.0, 5.0])
    assert group_advantages(rewards, "batch", wider)[0, 0].item() == pytest.approx(0.5 / (wide_std + 1e-4), abs=1e-6)


def test_rloo_advantages_leave_each_answer_out_of_its_baseline():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, NAN, 1.0, 2.0], [1.0, NAN, NAN, NAN]])
    advantages = rloo_advantages(rewards)
    expected = [
        [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3],
        [3 - 1.5, 0.0, 1 - 2.5, 2 - 2.0],
        [0.0, 0.0, 0.0, 0.0],  # one scorable answer: no baseline to compare with
    ]
    assert torch.allclose(advantages, torch.tensor(expected), atol=1e-6)
    # Standardised over the batch's scorable answers (the lone answer of the last group has no baseline: left out).
    scaled = rloo_advantages(rewards, "batch")
    leave_one_out = [1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3, 1.5, -1.5, 0.0]
    mean, std = sum(leave_one_out) / len(leave_one_out), _std(leave_one_out)
    assert scaled[0, 1].item() == pytest.approx((-2 / 3 - mean) / (std + 1e-4), abs=1e-6)
    assert scaled[1, 1].item() == 0.0 and scaled[2, 0].item() == 0.0


def test_nanstd_needs_two_values():
    assert math.isnan(nanstd(torch.tensor([1.0, NAN])).item())
    assert nanstd(torch.tensor([1.0, 3.0, NAN])).item() == pytest.approx(math.sqrt(2.0))


# ----- losses by hand ---------------------------------------------------------------------------------------------
def _token_loss(logp, old, ref, advantage, settings: LossSettings, ratio=None) -> float:
    ratio = math.exp(logp - old) if ratio is None else ratio
    clipped = min(max(ratio, 1 - settings.epsilon), 1 + settings.epsilon_high)
    loss = -min(ratio * advantage, clipped * advantage)
    if settings.beta:
        loss += settings.beta * (math.exp(ref - logp) - (ref - logp) - 1)
    return loss


def _hand(settings: LossSettings) -> float:
    rows = []
    for i in range(3):
        n = int(MASK[i].sum())
        ratio = None
        if settings.loss == "gspo":
            ratio = math.exp(sum(LOGPS[i, t].item() - OLD[i, t].item() for t in range(n)) / n)
        rows.append(
            [_token_loss(LOGPS[i, t].item(), OLD[i, t].item(), REF[i, t].item(), ADVANTAGES[i].item(), settings, ratio)
             for t in range(n)]
        )  # fmt: skip
    if settings.loss in ("grpo", "gspo"):
        return sum(sum(r) / len(r) for r in rows) / 3
    if settings.loss == "dr_grpo":
        return sum(sum(r) for r in rows) / (3 * settings.max_new_tokens)
    return sum(sum(r) for r in rows) / sum(len(r) for r in rows)


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo", "gspo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_each_loss_equals_a_hand_computation(loss, beta):
    settings = LossSettings(loss, epsilon=0.2, epsilon_high=0.28, beta=beta, max_new_tokens=6)
    if loss == "gspo":
        settings = LossSettings(loss, epsilon=0.05, epsilon_high=0.1, beta=beta, max_new_tokens=6)
    value, stats = policy_loss(settings, LOGPS, OLD, ADVANTAGES, MASK, REF if beta else None)
    assert value.item() == pytest.approx(_hand(settings), abs=1e-6)
    if beta:
        kl = sum(
            math.exp(REF[i, t] - LOGPS[i, t]) - (REF[i, t] - LOGPS[i, t]) - 1
            for i in range(3) for t in range(int(MASK[i].sum()))
        )  # fmt: skip
        assert stats.kl.item() == pytest.approx(float(kl), abs=1e-6)
    assert stats.tokens.item() == 9.0


def test_the_first_pass_has_ratio_one_and_the_gradient_is_the_advantage_weighted_log_likelihood():
    logps = LOGPS.clone().requires_grad_(True)
    settings = LossSettings("dapo", epsilon=0.2, epsilon_high=0.2)
    value, stats = policy_loss(settings, logps, None, ADVANTAGES, MASK)
    value.backward()
    expected = -(ADVANTAGES[:, None] * MASK) / MASK.sum()
    assert torch.allclose(logps.grad, expected, atol=1e-7) and stats.clipped.item() == 0.0


def test_clipping_counts_tokens_outside_the_trust_region_on_the_side_that_would_gain():
    settings = LossSettings("grpo", epsilon=0.2, epsilon_high=0.2)
    logps = torch.tensor([[0.5, -0.5, 0.5, -0.5]])
    old = torch.zeros(1, 4)
    _, up = policy_loss(settings, logps, old, torch.tensor([1.0]), torch.ones(1, 4))
    _, down = policy_loss(settings, logps, old, torch.tensor([-1.0]), torch.ones(1, 4))
    # exp(0.5) > 1.2 clips a positive advantage; exp(-0.5) < 0.8 clips a negative one.
    assert (up.clipped_high.item(), up.clipped_low.item()) == (2.0, 0.0)
    assert (down.clipped_high.item(), down.clipped_low.item()) == (0.0, 2.0)


def test_global_counts_replace_the_batchs_own():
    settings = LossSettings("dapo", epsilon=0.2, epsilon_high=0.2)
    alone, _ = policy_loss(settings, LOGPS, OLD, ADVANTAGES, MASK)
    shared, _ = policy_loss(settings, LOGPS, OLD, ADVANTAGES, MASK, tokens=18.0)
    assert shared.item() == pytest.approx(alone.item() / 2, abs=1e-7)
    assert per_token_kl(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0.0


# ----- against TRL ------------------------------------------------------------------------------------------------
def _trl_loss(loss_type: str, logps: torch.Tensor, settings: LossSettings, sequence_level: bool = False):
    """TRL's GRPOTrainer._compute_loss itself, run on a stand-in trainer whose model pass returns `logps`."""
    from trl import GRPOTrainer

    accelerator = types.SimpleNamespace(
        num_processes=1, reduce=lambda t, reduction="sum": t, gather=lambda t: t, gather_for_metrics=lambda t: t
    )
    stand_in = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="sequence" if sequence_level else "token",
        beta=settings.beta,
        loss_type=loss_type,
        epsilon_low=settings.epsilon,
        epsilon_high=settings.epsilon_high,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        use_vllm=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=settings.max_new_tokens,
        accelerator=accelerator,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": __import__("collections").defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.ones(3, 2, dtype=torch.long),
        "prompt_mask": torch.ones(3, 2, dtype=torch.long),
        "completion_ids": torch.ones(3, 4, dtype=torch.long),
        "completion_mask": MASK.long(),
        "advantages": ADVANTAGES,
        "old_per_token_logps": OLD,
        "num_items_in_batch": MASK.sum(),
    }
    if settings.beta:
        inputs["ref_per_token_logps"] = REF
    return GRPOTrainer._compute_loss(stand_in, None, inputs), stand_in._metrics["train"]


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_our_losses_equal_trls_grpo_trainer_on_the_same_log_probs_and_advantages(loss):
    settings = LossSettings(loss, epsilon=0.2, epsilon_high=0.28, beta=0.04, max_new_tokens=6)
    ours_logps = LOGPS.clone().requires_grad_(True)
    trl_logps = LOGPS.clone().requires_grad_(True)
    ours, stats = policy_loss(settings, ours_logps, OLD, ADVANTAGES, MASK, REF)
    # GSPO is TRL's grpo loss with importance_sampling_level sequence.
    theirs, metrics = _trl_loss("grpo" if loss == "gspo" else loss, trl_logps, settings, sequence_level=loss == "gspo")
    ours.backward()
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(ours_logps.grad, trl_logps.grad, rtol=1e-6, atol=1e-8)
    assert stats.kl.item() / stats.tokens.item() == pytest.approx(metrics["kl"][0], rel=1e-6)
    region = stats.clipped.item() / stats.clip_count.item()
    assert region == pytest.approx(metrics["clip_ratio/region_mean"][0], rel=1e-6, abs=1e-9)
