"""The causal-LM loss computed only where it is trained.

A transformers causal LM computes logits for every position and then ignores most of them: image tokens,
prompts and padding carry no label (in LLaVA-style data about two thirds of the positions). Here the LM's body
runs as usual, but its output head and the cross-entropy run only on the positions whose next token is a
target, in chunks, so the `[tokens, vocab]` logits are never held whole. Each chunk's gradients (to the hidden
states, the head's weight and bias) are worked out in the forward pass, while its logits are at hand, and kept
for the backward pass, which only scales them: three matrix products per chunk, none recomputed (the scheme of
liger-kernel's fused linear cross-entropy, here in plain torch for every device).

The result is the LM's own loss: the sum of the targets' negative log-likelihoods divided by
`num_items_in_batch` (the Trainer's count over accumulated micro-batches and processes), or by their count.

It applies to LMs whose logits are their output head applied to the body's last hidden state; `head_matches`
checks that on a few tokens before it is used, and models that do more (logit soft-capping or scaling, prompt
tuning's virtual tokens) keep their own loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from llava_lite.data.masking import IGNORE_INDEX

# Elements of one chunk of logits: 2**26 floats are 256 MiB in float32 (442 positions of a 152k vocabulary).
CHUNK_ELEMENTS = 2**26


def body_and_head(language_model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The LM's body (embeddings to last hidden state) and output head, or None when it has no such split."""
    if hasattr(language_model, "peft_config"):
        if any(getattr(c, "is_prompt_learning", False) for c in language_model.peft_config.values()):
            return None  # virtual tokens are added by the peft wrapper's own forward
        language_model = language_model.get_base_model()
    if not isinstance(language_model, PreTrainedModel):
        return None
    head = language_model.get_output_embeddings()
    body = getattr(language_model, language_model.base_model_prefix, None)
    if head is None or body is None or not isinstance(head, torch.nn.Linear):
        return None
    return body, head


@torch.no_grad()
def head_matches(language_model, body: torch.nn.Module, head: torch.nn.Module, vocab_rows: int = 8) -> bool:
    """Whether the LM's logits are `head(body(...))` exactly, checked on a few tokens."""
    embeddings = language_model.get_input_embeddings()
    ids = torch.arange(min(vocab_rows, embeddings.num_embeddings), device=embeddings.weight.device)[None]
    embeds = embeddings(ids)
    was_training = language_model.training
    language_model.eval()
    try:
        full = language_model(inputs_embeds=embeds, use_cache=False).logits
        ours = head(body(inputs_embeds=embeds, use_cache=False).last_hidden_state)
    finally:
        language_model.train(was_training)
    return full.shape == ours.shape and torch.allclose(full.float(), ours.float(), atol=1e-4, rtol=1e-4)


def trained_positions_loss(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    kernel: str = "chunked",
) -> torch.Tensor:
    """The causal-LM loss from the body's hidden states `[batch, length, width]` and `labels` `[batch, length]`:
    position t predicts label t + 1; only positions with a target reach the head. `kernel` "liger" hands them to
    liger-kernel's fused linear cross-entropy (CUDA) instead of our chunks."""
    selected, chosen = trained_positions(hidden, labels)
    if kernel == "liger":
        total = fused_linear_cross_entropy()(head.weight, selected, chosen, head.bias)
    else:
        total = _chunked_nll_sum(selected, head.weight, head.bias, chosen)
    if num_items_in_batch is None:
        return total / max(int(chosen.numel()), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def trained_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states `[targets, width]` of the positions that predict a label, and those labels: position t of
    `hidden` (`[batch, length, width]`, or the `length - 1` predicting positions) predicts `labels[:, t + 1]`."""
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    return hidden[:, : targets.shape[1]][trained], targets[trained]


def fused_linear_cross_entropy():
    """liger-kernel's fused head + cross-entropy, summing; a clear error where it cannot run."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None or not torch.cuda.is_available():
        raise ValueError("train.loss_kernel liger needs the liger-kernel package and a CUDA GPU")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")


def _chunked_nll_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    # Under no_grad (evaluation) no gradient is made: autograd still marks the inputs as wanting one.
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows, torch.is_grad_enabled())


class _LinearCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of `hidden @ weight.T + bias` against `targets`, a chunk of `rows` positions at
    a time; the gradients are made in the forward pass and scaled by the incoming gradient in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, grads):
        wants_hidden, wants_weight = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        wants_bias = grads and bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wants_bias else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], rows):
            part, part_targets = hidden[start : start + rows], targets[start : start + rows]
            logits = F.linear(part, weight, bias).float()
            log_total = torch.logsumexp(logits, dim=-1)
            total += (log_total - logits.gather(1, part_targets[:, None]).squeeze(1)).sum()
            if not (wants_hidden or wants_weight or wants_bias):
                continue
            # d(nll)/d(logits) = softmax - one-hot, made in place of the logits
            grad_logits = logits.sub_(log_total[:, None]).exp_()
            grad_logits[torch.arange(len(part_targets), device=grad_logits.device), part_targets] -= 1
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            if grad_weight is not None:  # summed over the chunks in float32
                grad_weight.addmm_(grad_logits.t(), part.float())
            if grad_hidden is not None:
                grad_hidden[start : start + rows] = grad_logits.to(weight.dtype) @ weight
        ctx.save_for_backward(
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )
        return total

    @staticmethod
    def backward(ctx, grad_total):
        scaled = [None if grad is None else grad * grad_total.to(grad.dtype) for grad in ctx.saved_tensors]
        return (*scaled, None, None, None)
