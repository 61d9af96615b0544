"""What stage 2 adds to the LM loss to keep what the base model knew: replayed text's loss, logged on its own, and
BETA x KL(tuned || base) at chosen positions.

Both need the loss token by token, so it is computed here rather than by the LM, and inside the model's forward
(`LlavaLiteModel.forward(objective=...)`), where engines that shard weights (DeepSpeed ZeRO-3, FSDP) hold the
LM head whole. The LM's body gives its last hidden state; at the positions that predict a label, the chunked head
of `llava_lite.model.loss` gives each token's cross-entropy and, against the base model's hidden states at the same
positions (a second pass of the body without gradients, on the same image features: the tower and projector do not
run again), each KL position's KL - never a `[tokens, vocab]` matrix. An LM whose logits are more than its head on
its last hidden state (soft-capping, scaling, prompt tuning's virtual tokens) keeps its own logits instead.

Normalisation: every predicted token counts once. The loss is (sum of cross-entropies + BETA x sum of KLs at the
KL positions) / targets, `targets` being the Trainer's count of labelled tokens over the whole accumulated batch
and every process, so BETA = 0 gives the plain loss and accumulation or more processes give the same update.

Logged beside the Trainer's `loss` (means since the last log, over every process): `instruction_loss` (assistant
tokens), `replay_loss` (replay text) and `kl_to_base` (nats per KL position).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from llava_lite.data.masking import IGNORE_INDEX
from llava_lite.model.loss import HeadReference, chunked_head_terms, trained_positions
from llava_lite.model.prompt_learning import lm_position_ids
from llava_lite.train.reference import ReferenceLM

# Running sums, in this order: instruction NLL and tokens, replay NLL and tokens, KL and KL positions.
SUMS = ("instruction_nll", "instruction_tokens", "replay_nll", "replay_tokens", "kl", "kl_positions")


class Objective:
    """The stage-2 loss with its terms apart: called by the Trainer in place of the model's own loss."""

    def __init__(self, model, kl_to_base: float = 0.0, kl_positions: str = "both") -> None:
        """`model` is the LlavaLiteModel before training starts (the KL's base is taken from it)."""
        self.beta = kl_to_base
        self.kl_positions = kl_positions
        self.base = ReferenceLM(model) if kl_to_base > 0 else None
        self.sums: torch.Tensor | None = None

    def __call__(
        self,
        model,
        inputs: dict,
        replay_tokens: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """The loss of one (micro-)batch; `model` is what the Trainer runs (maybe wrapped by DDP, DeepSpeed or FSDP),
        `replay_tokens` the collator's marks of replay text."""
        terms = partial(self.loss, replay_tokens=replay_tokens, num_items_in_batch=num_items_in_batch)
        return model(**inputs, objective=terms).loss

    def loss(
        self,
        model,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        labels: torch.Tensor,
        split,
        replay_tokens: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **lm_inputs,
    ) -> CausalLMOutputWithPast:
        """Run by `LlavaLiteModel.forward` on its embedded batch: `split` is the LM's (body, head), or None when its
        logits are more than that; `lm_inputs` what the LM's forward takes beside the embeddings."""
        predicted = labels[:, 1:] != IGNORE_INDEX
        replay = (
            replay_tokens[:, 1:][predicted] if replay_tokens is not None else predicted.new_zeros(int(predicted.sum()))
        )
        kl_weights = None
        if self.base is not None:
            at = {"both": torch.ones_like(replay), "assistant": ~replay, "replay": replay}[self.kl_positions]
            kl_weights = at.float() * self.beta
        # The base pass runs on every rank every step, KL positions or none: sharded engines gather its weights.
        total, nll, kl = token_terms(model, split, input_ids, inputs_embeds, labels, lm_inputs, self.base, kl_weights)
        self._add(nll, replay, None if kl is None else kl[kl_weights > 0])
        denominator = num_items_in_batch if num_items_in_batch is not None else predicted.sum().clamp(min=1)
        if torch.is_tensor(denominator):
            denominator = denominator.to(total.device)
        return CausalLMOutputWithPast(loss=total / denominator)

    def _add(self, nll: torch.Tensor, replay: torch.Tensor, kl: torch.Tensor | None) -> None:
        instruction = ~replay
        kl = nll.new_zeros(0) if kl is None else kl
        step = torch.stack(
            [
                nll[instruction].sum(),
                instruction.sum().to(nll.dtype),
                nll[replay].sum(),
                replay.sum().to(nll.dtype),
                kl.sum(),
                torch.tensor(float(len(kl)), device=nll.device),
            ]
        ).double()
        self.sums = step if self.sums is None else self.sums + step

    def take_logs(self, reduce=None) -> dict[str, float]:
        """The terms' means since the last call, over every process (`reduce` sums a tensor across them; every
        process must call this at the same step), and the sums start again."""
        if self.sums is None:
            return {}
        sums = reduce(self.sums) if reduce is not None else self.sums
        self.sums = None
        values = dict(zip(SUMS, sums.tolist()))
        logs = {}
        for name, total, count in (
            ("instruction_loss", "instruction_nll", "instruction_tokens"),
            ("replay_loss", "replay_nll", "replay_tokens"),
            ("kl_to_base", "kl", "kl_positions"),
        ):
            if values[count]:
                logs[name] = values[total] / values[count]
        return logs


def token_terms(
    model,
    split,
    input_ids: torch.Tensor,
    inputs_embeds: torch.Tensor,
    labels: torch.Tensor,
    lm_inputs: dict,
    base: ReferenceLM | None = None,
    kl_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The summed loss (cross-entropies, plus `kl_weights` x KL against `base` when given), and per target token
    its cross-entropy and KL (detached): through the chunked head when the LM is `split` into body and head, else
    from its own logits. Run inside `LlavaLiteModel.forward` (see `Objective.loss`)."""
    if split is not None:
        return _chunked(model, split, input_ids, inputs_embeds, labels, lm_inputs, base, kl_weights)
    return _from_logits(model, input_ids, inputs_embeds, labels, lm_inputs, base, kl_weights)


def _chunked(model, split, input_ids, inputs_embeds, labels, lm_inputs, base, kl_weights):
    body, head = split
    hidden = body(inputs_embeds=inputs_embeds, **lm_inputs).last_hidden_state
    selected, targets = trained_positions(hidden, labels)
    reference = None
    if base is not None:
        with torch.no_grad():
            base_hidden = base.hidden(model, body, input_ids, inputs_embeds, lm_inputs)
        weight, bias = base.head(model, head)
        reference = HeadReference(trained_positions(base_hidden, labels)[0], weight, bias)
    terms = chunked_head_terms(selected, head.weight, head.bias, targets, kl_weights=kl_weights, reference=reference)
    return terms.total, terms.nll, None if reference is None else terms.kl


def _from_logits(model, input_ids, inputs_embeds, labels, lm_inputs, base, kl_weights):
    """For an LM that is more than its body and head: its own logits at every position."""
    lm = model.language_model
    length = labels.shape[1]
    lm_inputs = {**lm_inputs, "position_ids": lm_position_ids(lm, lm_inputs.get("position_ids"))}
    logits = lm(inputs_embeds=inputs_embeds, **lm_inputs).logits[:, -length:]  # virtual tokens lead
    selected, targets = trained_positions(logits, labels)
    log_probs = F.log_softmax(selected.float(), dim=-1)
    nll = -log_probs.gather(1, targets[:, None]).squeeze(1)
    if base is None:
        return nll.sum(), nll.detach(), None
    with torch.no_grad():
        base_logits = base.logits(model, input_ids, inputs_embeds, lm_inputs)[:, -length:]
        base_log_probs = F.log_softmax(trained_positions(base_logits, labels)[0].float(), dim=-1)
    kl = (log_probs.exp() * (log_probs - base_log_probs)).sum(dim=-1)
    return nll.sum() + (kl * kl_weights).sum(), nll.detach(), kl.detach()


@dataclass
class RowLosses(ModelOutput):
    """Per row of a batch: the summed cross-entropy of its targets and their count (float64)."""

    nll: torch.Tensor | None = None
    tokens: torch.Tensor | None = None


def row_losses(model, inputs: dict) -> RowLosses:
    """Each row's summed cross-entropy and target count, from one forward of `model` (maybe wrapped by an engine)
    through the same head as training's loss: what a token-weighted evaluation adds up."""
    return model(**inputs, objective=_row_losses)


def _row_losses(model, input_ids, inputs_embeds, labels, split, **lm_inputs) -> RowLosses:
    _, nll, _ = token_terms(model, split, input_ids, inputs_embeds, labels, lm_inputs)
    rows = (labels[:, 1:] != IGNORE_INDEX).nonzero()[:, 0]
    sums = nll.new_zeros(labels.shape[0], dtype=torch.float64).index_add_(0, rows, nll.double())
    counts = torch.bincount(rows, minlength=labels.shape[0]).double()
    return RowLosses(nll=sums, tokens=counts)
