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

Preference training needs each sequence's log-probability of its answer instead of one sum: `sequence_log_probs`
takes the same positions through the same kernel, per token, and adds them up per sequence (the rows of a padded
batch, or the samples of a packed one). A per-token result gets a gradient that differs from token to token, known
only in the backward pass: the hidden states' gradient is still made in the forward (each row's depends on its own
token alone), the head weight's is made in the backward from the chunks' logits again.

It applies to LMs whose logits are their output head applied to the body's last hidden state; `head_matches`
checks that on a few tokens before it is used, and models that do more (logit soft-capping or scaling, prompt
tuning's virtual tokens) keep their own loss (and `sequence_log_probs_from_logits`).
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
    total = target_nll(selected, head, chosen, kernel)
    if num_items_in_batch is None:
        return total / max(int(chosen.numel()), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def sequence_log_probs(
    hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, cu_seq_lens: torch.Tensor | None = None
) -> torch.Tensor:
    """Each sequence's summed log-probability of its labelled tokens, `[sequences]` in float32, from the body's hidden
    states as `trained_positions_loss` takes them: the sequences are the rows, or with `cu_seq_lens` the samples of
    one packed row (a trailing stretch of padding is a sequence with nothing labelled)."""
    selected, chosen = trained_positions(hidden, labels)
    return _per_sequence(-target_nll(selected, head, chosen, per_token=True), labels, cu_seq_lens)


def sequence_log_probs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, cu_seq_lens: torch.Tensor | None = None
) -> torch.Tensor:
    """`sequence_log_probs` from an LM's own logits (an LM whose logits are not its head on its hidden states);
    logits longer than the labels are a prompt-tuned LM's, its virtual tokens first."""
    selected, chosen = trained_positions(logits[:, -labels.shape[1] :], labels)
    log_probs = F.log_softmax(selected.float(), dim=-1).gather(1, chosen[:, None]).squeeze(1)
    return _per_sequence(log_probs, labels, cu_seq_lens)


def _per_sequence(values: torch.Tensor, labels: torch.Tensor, cu_seq_lens: torch.Tensor | None) -> torch.Tensor:
    """Per-target `values` (in `trained_positions` order) summed per sequence."""
    trained = labels[:, 1:] != IGNORE_INDEX
    if cu_seq_lens is None:
        rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(trained)
        return values.new_zeros(labels.shape[0]).index_add(0, rows[trained], values)
    # The target at position t + 1 belongs to the packed sample whose [start, end) holds t + 1.
    ends = cu_seq_lens[1:].to(labels.device)
    samples = torch.searchsorted(ends, torch.arange(1, labels.shape[1], device=labels.device), right=True)
    return values.new_zeros(len(ends)).index_add(0, samples[None].expand_as(trained)[trained], values)


def target_nll(
    hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, kernel: str = "chunked", per_token: bool = False
) -> torch.Tensor:
    """The negative log-likelihood of `targets` under `head(hidden)` (`[targets, width]` hidden states): their sum,
    or with `per_token` each one's. The one place the loss reads the head's weights. Per token is chunked only."""
    if kernel == "liger" and not per_token:
        return fused_linear_cross_entropy()(head.weight, hidden, targets, head.bias)
    rows = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
    # Under no_grad (evaluation) no gradient is made: autograd still marks the inputs as wanting one.
    return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, rows, torch.is_grad_enabled(), per_token)


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


class _LinearCrossEntropy(torch.autograd.Function):
    """The cross-entropy of `hidden @ weight.T + bias` against `targets`, summed (or `per_token`), a chunk of `rows`
    positions at a time. The gradients are made in the forward pass and scaled by the incoming gradient in the
    backward - except, per token, the weight's and bias's: each row weighs in by its own incoming gradient, so they
    are made in the backward, from each chunk's logits computed again."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, grads, per_token):
        wants_hidden, wants_weight = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        wants_bias = grads and bias is not None and ctx.needs_input_grad[2]
        later = per_token and (wants_weight or wants_bias)  # the head's gradients wait for the per-token weights
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_weight and not later else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wants_bias and not later else None
        total = hidden.new_zeros((hidden.shape[0],) if per_token else (), dtype=torch.float32)
        now = grad_hidden is not None or grad_weight is not None or grad_bias is not None
        for start in range(0, hidden.shape[0], rows):
            part, part_targets = hidden[start : start + rows], targets[start : start + rows]
            nll, grad_logits = _chunk_nll(part, weight, bias, part_targets, now)
            if per_token:
                total[start : start + rows] = nll
            else:
                total += nll.sum()
            if grad_logits is None:
                continue
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            if grad_weight is not None:  # summed over the chunks in float32
                grad_weight.addmm_(grad_logits.t(), part.float())
            if grad_hidden is not None:
                grad_hidden[start : start + rows] = grad_logits.to(weight.dtype) @ weight
        ctx.per_token, ctx.rows, ctx.later = per_token, rows, (wants_weight, wants_bias) if later else None
        ctx.save_for_backward(
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            *((hidden, weight, bias, targets) if later else (None,) * 4),
        )
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias, hidden, weight, bias, targets = ctx.saved_tensors
        if not ctx.per_token:
            scaled = [None if grad is None else grad * grad_total.to(grad.dtype) for grad in ctx.saved_tensors[:3]]
            return (*scaled, None, None, None, None)
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total[:, None].to(grad_hidden.dtype)
        if ctx.later is not None:
            wants_weight, wants_bias = ctx.later
            weight_sum = torch.zeros_like(weight, dtype=torch.float32) if wants_weight else None
            bias_sum = torch.zeros_like(bias, dtype=torch.float32) if wants_bias else None
            for start in range(0, hidden.shape[0], ctx.rows):
                part = hidden[start : start + ctx.rows]
                grad_logits = _chunk_nll(part, weight, bias, targets[start : start + ctx.rows], True)[1]
                grad_logits *= grad_total[start : start + ctx.rows, None]
                if bias_sum is not None:
                    bias_sum += grad_logits.sum(0)
                if weight_sum is not None:
                    weight_sum.addmm_(grad_logits.t(), part.float())
            grad_weight = None if weight_sum is None else weight_sum.to(weight.dtype)
            grad_bias = None if bias_sum is None else bias_sum.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _chunk_nll(part, weight, bias, targets, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's NLL of its target, and (`with_grad`) d(nll)/d(logits) = softmax - one-hot, in float32."""
    logits = F.linear(part, weight, bias).float()
    log_total = torch.logsumexp(logits, dim=-1)
    nll = log_total - logits.gather(1, targets[:, None]).squeeze(1)
    if not with_grad:
        return nll, None
    grad_logits = logits.sub_(log_total[:, None]).exp_()  # made in place of the logits
    grad_logits[torch.arange(len(targets), device=grad_logits.device), targets] -= 1
    return nll, grad_logits
