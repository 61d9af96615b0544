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
The same chunked head (`chunked_head_terms`) gives the replay and KL objectives (`llava_lite.train.regularizers`)
their per-token cross-entropies and KLs against a reference model's hidden states, with per-token weights.

Preference training needs each sequence's log-probability of its answer instead of one sum: `sequence_log_probs`
takes the same positions through the same kernel and adds the tokens up per sequence (the rows of a padded batch,
or the samples of a packed one). Each token's gradient weight is known only in the backward pass (the loss's
derivative by its sequence's log-probability), so the forward computes the log-probabilities alone and the
backward runs the kernel again with those weights.

It applies to LMs whose logits are their output head applied to the body's last hidden state; `head_matches`
checks that on a few tokens before it is used, and models that do more (logit soft-capping or scaling, prompt
tuning's virtual tokens) keep their own loss (and `sequence_log_probs_from_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    device = next(embeddings.parameters()).device  # not `.weight`: ZeRO-3 would gather it on this rank alone
    ids = torch.arange(min(vocab_rows, embeddings.num_embeddings), device=device)[None]
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
        total = chunked_head_terms(selected, head.weight, head.bias, chosen).total
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
    one packed row (a trailing stretch of padding is a sequence with nothing labelled). Differentiable, through
    `chunked_head_terms`; engines that shard weights hold the head whole in the model's forward and backward."""
    selected, chosen = trained_positions(hidden, labels)
    sequence, count = _sequence_of_targets(labels, cu_seq_lens)
    return _SequenceLogProbs.apply(selected, head.weight, head.bias, chosen, sequence, count)


def sequence_log_probs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, cu_seq_lens: torch.Tensor | None = None
) -> torch.Tensor:
    """`sequence_log_probs` from an LM's own logits (an LM whose logits are not its head on its hidden states);
    logits longer than the labels are a prompt-tuned LM's, its virtual tokens first."""
    selected, chosen = trained_positions(logits[:, -labels.shape[1] :], labels)
    log_probs = F.log_softmax(selected.float(), dim=-1).gather(1, chosen[:, None]).squeeze(1)
    sequence, count = _sequence_of_targets(labels, cu_seq_lens)
    return log_probs.new_zeros(count).index_add(0, sequence, log_probs)


def _sequence_of_targets(labels: torch.Tensor, cu_seq_lens: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """For each target (in `trained_positions` order) the sequence it belongs to, and how many sequences there are."""
    trained = labels[:, 1:] != IGNORE_INDEX
    if cu_seq_lens is None:
        rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(trained)
        return rows[trained], labels.shape[0]
    # The target at position t + 1 belongs to the packed sample whose [start, end) holds t + 1.
    ends = cu_seq_lens[1:].to(labels.device)
    samples = torch.searchsorted(ends, torch.arange(1, labels.shape[1], device=labels.device), right=True)
    return samples[None].expand_as(trained)[trained], len(ends)


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


@dataclass
class HeadReference:
    """The other side of a KL(tuned || reference) taken beside the cross-entropy: the reference model's last hidden
    states at the same positions (`[positions, width]`, rows without KL weight unused) and its output head."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass
class HeadTerms:
    """What `chunked_head_terms` gives: `total`, the weighted sum that is differentiated, and per position its
    cross-entropy `nll` and `kl` (0 where no KL is taken), both detached."""

    total: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor


def chunked_head_terms(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    nll_weights: torch.Tensor | None = None,
    kl_weights: torch.Tensor | None = None,
    reference: HeadReference | None = None,
) -> HeadTerms:
    """The output head `hidden @ weight.T + bias` (`[positions, width]`) and its per-position terms, a chunk of
    positions at a time, never the whole `[positions, vocab]` logits: the cross-entropy against `targets`, and with
    `reference` and `kl_weights` the KL(tuned || reference) of each position's next-token distribution.
    `total` = sum(nll_weights * nll) + sum(kl_weights * kl) (weights default to 1 and 0); its gradients are made in
    the forward pass. Per-position weights serve any objective that is linear in the per-token terms; one that is
    not (a preference loss over sequence log-probabilities) can take the terms without gradient first, then
    weigh each token by its derivative: the gradients come out the same.

    Engines that shard weights (DeepSpeed ZeRO-3, FSDP) hold `weight` whole only inside the model's forward: call
    this from there (see `LlavaLiteModel.forward`)."""
    chunk = CHUNK_ELEMENTS // (2 if reference is not None else 1)  # a chunk holds the reference's logits too
    rows = max(1, chunk // weight.shape[0])
    ones = nll_weights if nll_weights is not None else hidden.new_ones(hidden.shape[0], dtype=torch.float32)
    if reference is not None and kl_weights is None:
        raise ValueError("a KL reference needs kl_weights, one per position")
    total, nll, kl = _HeadTerms.apply(
        hidden,
        weight,
        bias,
        targets,
        ones.float(),
        None if reference is None else kl_weights.float(),
        None if reference is None else reference.hidden,
        None if reference is None else reference.weight,
        None if reference is None else reference.bias,
        rows,
        torch.is_grad_enabled(),  # under no_grad (evaluation) no gradient is made
    )
    return HeadTerms(total, nll, kl)


def _products_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head's matrix products run in: autocast's on the hidden states' device when it is on there,
    else the hidden states' own."""
    device = hidden.device.type
    if hidden.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class _HeadTerms(torch.autograd.Function):
    """`chunked_head_terms`: `rows` positions at a time; the gradients are made in the forward pass and scaled by
    the incoming gradient of `total` in the backward (three matrix products per chunk, none recomputed)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, nll_weights, kl_weights, ref_hidden, ref_weight, ref_bias, rows, grads
    ):
        wants_hidden, wants_weight = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        wants_bias = grads and bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wants_bias else None
        nll = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        kl = torch.zeros_like(nll)
        # The products run in autocast's dtype when it is on (as `F.linear` would), the softmax in float32. The
        # chunk's tensors are made once and reused: a fresh `[rows, vocab]` tensor costs its page faults each time.
        dtype = _products_dtype(hidden)
        low_weight = weight.to(dtype)
        low_bias = None if bias is None else bias.to(dtype)
        rows = min(rows, hidden.shape[0])
        logits_buffer = hidden.new_empty((rows, weight.shape[0]), dtype=dtype)
        # In float32 the probabilities are made in place of the logits (their copies below are then no-ops).
        probs_buffer = logits_buffer if dtype == torch.float32 else torch.empty_like(logits_buffer, dtype=torch.float32)
        product_buffer = None
        if grad_weight is not None and dtype != torch.float32:
            product_buffer = torch.empty_like(weight, dtype=dtype)
        for start in range(0, hidden.shape[0], rows):
            end = start + rows
            part, part_targets, weights = hidden[start:end].to(dtype), targets[start:end], nll_weights[start:end]
            logits = torch.mm(part, low_weight.t(), out=logits_buffer[: len(part)])
            if low_bias is not None:
                logits += low_bias
            target_logits = logits.gather(1, part_targets[:, None]).squeeze(1).float()
            kl_part = None
            if ref_hidden is not None and kl_weights[start:end].any():
                # Both sides over the whole chunk, in the same operations: a reference equal to the tuned model
                # gives a KL of exactly 0.
                tuned = logits.float().log_softmax(-1)
                reference = F.linear(ref_hidden[start:end], ref_weight, ref_bias).float().log_softmax(-1)
                ratio = reference.neg_().add_(tuned)  # log p - log q, made in place of the reference
                tuned_probs = tuned.exp_()
                kl_part = (tuned_probs * ratio).sum(-1) * (kl_weights[start:end] != 0)
                kl[start:end] = kl_part
            # exp(logits - peak) and its row sums: the softmax and the log of its normalizer
            peak = logits.amax(-1, keepdim=True).float()
            probs = probs_buffer[: len(part)]
            probs.copy_(logits).sub_(peak).exp_()
            sums = probs.sum(-1)
            nll[start:end] = peak.squeeze(1) + sums.log() - target_logits
            if not (wants_hidden or wants_weight or wants_bias):
                continue
            # d(nll)/d(logits) = softmax - one-hot, made in place of the probabilities, times each position's weight
            grad_logits = probs.mul_((weights / sums)[:, None])
            grad_logits[torch.arange(len(part_targets), device=grad_logits.device), part_targets] -= weights
            if kl_part is not None:  # d(kl)/d(logits) = p * (log p - log q - kl)
                grad_logits += ratio.sub_(kl_part[:, None]).mul_(tuned_probs).mul_(kl_weights[start:end, None])
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            low_grad = logits.copy_(grad_logits)  # in the products' dtype, in place of the logits
            if grad_weight is not None:  # summed over the chunks in float32
                if product_buffer is None:
                    grad_weight.addmm_(low_grad.t(), part)
                else:
                    grad_weight += torch.mm(low_grad.t(), part, out=product_buffer)
            if grad_hidden is not None:
                grad_hidden[start:end] = low_grad @ low_weight
        total = (nll * nll_weights).sum()
        if kl_weights is not None:
            total = total + (kl * kl_weights).sum()
        ctx.save_for_backward(
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )
        ctx.mark_non_differentiable(nll, kl)
        return total, nll, kl

    @staticmethod
    def backward(ctx, grad_total, _grad_nll, _grad_kl):
        scaled = [None if grad is None else grad * grad_total.to(grad.dtype) for grad in ctx.saved_tensors]
        return (*scaled, *[None] * 8)


class _SequenceLogProbs(torch.autograd.Function):
    """`sequence_log_probs`: the forward runs `chunked_head_terms` without gradients for each target's NLL and sums
    them per sequence; the backward runs it again, each target weighed by minus its sequence's incoming gradient,
    and takes that pass's gradients (made in its forward, as always)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, sequence, count):
        nll = chunked_head_terms(hidden, weight, bias, targets).nll  # autograd is off in here: no gradient made
        ctx.save_for_backward(hidden, weight, bias, targets, sequence)
        return nll.new_zeros(count).index_add_(0, sequence, nll.neg())

    @staticmethod
    def backward(ctx, grad_log_probs):
        hidden, weight, bias, targets, sequence = ctx.saved_tensors
        wants = ctx.needs_input_grad[:3]
        with torch.enable_grad():
            leaves = [
                None if t is None else t.detach().requires_grad_(bool(want))
                for t, want in zip((hidden, weight, bias), wants)
            ]
            weights = grad_log_probs.float()[sequence].neg()
            total = chunked_head_terms(*leaves, targets, nll_weights=weights).total
            asked = [t for t, want in zip(leaves, wants) if want and t is not None]
            made = iter(torch.autograd.grad(total, asked) if asked else ())
        grads = [next(made) if want and t is not None else None for t, want in zip(leaves, wants)]
        return (*grads, None, None, None)
