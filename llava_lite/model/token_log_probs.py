"""Each labelled token's log-probability, one value per token, from the chunked LM head: what on-policy RL's loss
(`llava_lite.train.rl_loss`) weighs token by token, where preference tuning sums them per sequence
(`llava_lite.model.loss.sequence_log_probs`).

The head runs only at the positions that predict a label, through `chunked_head_terms`, never as `[tokens, vocab]`
logits. The loss is not linear in the log-probabilities (a clipped importance ratio), so each token's gradient
weight is known only in the backward pass: the forward computes the log-probabilities alone, and the backward runs
the same kernel again with each token weighed by its incoming gradient, taking that pass's gradients.

`temperature` divides the logits first (TRL scores completions at the temperature they were sampled with): the
hidden states and the head's bias are divided by it, which divides the logits since the head is linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llava_lite.model.loss import chunked_head_terms, trained_positions


def token_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(label) at every labelled position, `[targets]` float32 in `trained_positions` order (row by row,
    position by position), from the body's hidden states `[batch, length, width]` and the head's `weight` and
    `bias`. Differentiable; engines that shard weights hold the head whole only inside the model's forward."""
    selected, targets = trained_positions(hidden, labels)
    if temperature != 1.0:
        selected = selected / temperature
        bias = None if bias is None else bias / temperature
    return _TokenLogProbs.apply(selected, weight, bias, targets)


def token_log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`token_log_probs` from an LM's own logits (one whose logits are more than its head on its hidden states);
    logits longer than the labels are a prompt-tuned LM's, its virtual tokens first."""
    selected, targets = trained_positions(logits[:, -labels.shape[1] :], labels)
    return F.log_softmax(selected.float() / temperature, dim=-1).gather(1, targets[:, None]).squeeze(1)


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        nll = chunked_head_terms(hidden, weight, bias, targets).nll  # autograd is off in here: no gradient made
        ctx.save_for_backward(hidden, weight, bias, targets)
        return nll.neg()

    @staticmethod
    def backward(ctx, grad_log_probs):
        hidden, weight, bias, targets = ctx.saved_tensors
        wants = ctx.needs_input_grad[:3]
        with torch.enable_grad():
            leaves = [
                None if t is None else t.detach().requires_grad_(bool(want))
                for t, want in zip((hidden, weight, bias), wants)
            ]
            total = chunked_head_terms(*leaves, targets, nll_weights=grad_log_probs.float().neg()).total
            asked = [t for t, want in zip(leaves, wants) if want and t is not None]
            made = iter(torch.autograd.grad(total, asked) if asked else ())
        grads = [next(made) if want and t is not None else None for t, want in zip(leaves, wants)]
        return (*grads, None)
