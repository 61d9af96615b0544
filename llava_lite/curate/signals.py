"""What a trained run says about each record: how hard its answers are for it, with and without the instruction,
and where the record sits in its representation space.

- Answer loss: the mean negative log-likelihood (nats per token) of the tokens training trains - the assistant
  answers and their end-of-turn markers - given the whole conversation, images included. High for answers the run
  cannot predict: hard ones, and wrong ones (the small-loss rule against noisy labels keeps the lowest).
- Unconditioned loss: the same answer tokens with the instruction removed. The user turns are emptied rather than
  dropped, so the template's turn markers stay and the answers are tokenized as before; system messages and images
  go with the instruction.
- IFD ("From Quantity to Quality", instruction-following difficulty): answer loss / unconditioned loss. Below 1 the
  instruction helps predict the answer, and the higher the less it helps: the record still has something to teach.
  At or above 1 the answer does not follow from its instruction at all.
- Embedding: the LM's last hidden state averaged over the record's tokens (image tokens included), for deita's
  distance test in `data select --by diverse`.

Computed in batches, padded rows or packed rows (each record alone in its segment), through the model's own
forward: its per-sequence log-probabilities of the labelled tokens come from the chunked head
(`llava_lite.model.loss.sequence_log_probs`, the path preference training uses), or from the LM's logits for an LM
that is more than its head on its body (`sequence_log_probs_from_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

from llava_lite.data.collator import Collator, batch_to
from llava_lite.data.conversation import Conversation, Message
from llava_lite.data.masking import IGNORE_INDEX
from llava_lite.eval.perplexity import eval_mode
from llava_lite.model.loss import sequence_log_probs, sequence_log_probs_from_logits
from llava_lite.model.processor_for_config import processor_for_config
from llava_lite.model.prompt_learning import lm_position_ids


@dataclass
class AnswerLoss:
    loss: float  # nats per answer token
    tokens: int  # answer tokens scored
    embedding: np.ndarray | None = None  # float32 `[hidden]`, when asked for


@dataclass
class SequenceSignals:
    """What one forward gives per sequence (row, or packed sample): the summed log-probability of its labelled
    tokens, and its tokens' mean last hidden state when asked for."""

    log_probs: torch.Tensor
    embeddings: torch.Tensor | None = None


def without_instruction(conversation: Conversation) -> Conversation:
    """The conversation's answers with the instruction removed (see the module doc): user turns empty, no system
    message, no images."""
    messages = [
        Message(m.role, m.content if m.role == "assistant" else "") for m in conversation.messages if m.role != "system"
    ]
    return Conversation(messages, [], conversation.id, conversation.source)


class SignalScorer:
    """A run's answer losses (and embeddings) of conversations, `batch_size` at a time, padded or packed."""

    def __init__(
        self, model, batch_size: int = 8, packed: bool = False, max_length: int | None = None, progress: bool = False
    ) -> None:
        """`model`: a LlavaLiteModel, on the device it should run on. `max_length` cuts records as training would
        (default: the LM's context length)."""
        if batch_size < 1:
            raise ValueError("the batch size must be at least 1")
        self.model = model
        self.device = next(model.parameters()).device
        self.processor = processor_for_config(
            model.config, model.tokenizer, max_length=max_length or model.context_length
        )
        self.collator = Collator(model.tokenizer.pad_token_id, "right")
        self.batch_size = batch_size
        self.packed = packed
        self.progress = progress

    def answer_losses(
        self, conversations: list[Conversation], embeddings: bool = False, desc: str = "answer loss"
    ) -> list[AnswerLoss]:
        """One result per conversation, in order; a record that cannot be encoded stops with its source."""
        results: list[AnswerLoss] = []
        starts = range(0, len(conversations), self.batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=None if self.progress else True):
            results += self.batch_losses(conversations[start : start + self.batch_size], embeddings)
        return results

    @torch.no_grad()
    def batch_losses(self, conversations: list[Conversation], embeddings: bool = False) -> list[AnswerLoss]:
        """The conversations as one batch: one padded row each, or all in one packed row."""
        samples = [self.processor.sample(conversation) for conversation in conversations]
        # Counted before collating: packing blanks each sample's first label, which is never a target anyway.
        counts = [int((sample["labels"][1:] != IGNORE_INDEX).sum()) for sample in samples]
        batch = self.collator([{"packed": samples}] if self.packed else samples)
        batch = batch_to(batch, self.device)
        objective = partial(per_sequence_signals, embeddings=embeddings)
        with eval_mode(self.model):
            signals = self.model(**batch, objective=objective)
        log_probs = signals.log_probs[: len(samples)].double().cpu()
        means = signals.embeddings[: len(samples)].float().cpu().numpy() if embeddings else [None] * len(samples)
        return [AnswerLoss(-float(lp) / n, n, mean) for lp, n, mean in zip(log_probs, counts, means)]


def per_sequence_signals(
    model, input_ids, inputs_embeds, labels, split, embeddings: bool = False, **lm_inputs
) -> SequenceSignals:
    """Run by `LlavaLiteModel.forward` on its embedded batch (its `objective` hook, where the LM's head is whole on
    every engine): `split` is the LM's (body, head), or None when its logits are more than its head on its body."""
    sequences = lm_inputs.get("cu_seq_lens_q")  # a packed row's samples; None for padded rows
    if split is not None:
        body, head = split
        hidden = body(inputs_embeds=inputs_embeds, **lm_inputs).last_hidden_state
        log_probs = sequence_log_probs(hidden, head, labels, sequences)
    else:
        language_model = model.language_model
        lm_inputs = {**lm_inputs, "position_ids": lm_position_ids(language_model, lm_inputs.get("position_ids"))}
        output = language_model(inputs_embeds=inputs_embeds, output_hidden_states=embeddings, **lm_inputs)
        log_probs = sequence_log_probs_from_logits(output.logits, labels, sequences)
        hidden = output.hidden_states[-1][:, -labels.shape[1] :] if embeddings else None  # virtual tokens lead
    means = _mean_per_sequence(hidden, lm_inputs.get("attention_mask"), sequences) if embeddings else None
    return SequenceSignals(log_probs, means)


def _mean_per_sequence(
    hidden: torch.Tensor, attention_mask: torch.Tensor | None, sequences: torch.Tensor | None
) -> torch.Tensor:
    """`[sequences, width]`: each row's mean over its unpadded positions, or each packed sample's over its own."""
    if sequences is None:
        weights = attention_mask.to(torch.float32)[..., None]
        return (hidden.float() * weights).sum(1) / weights.sum(1)
    ends = sequences[1:].to(hidden.device)
    sample_of = torch.searchsorted(ends, torch.arange(hidden.shape[1], device=hidden.device), right=True)
    sums = hidden.new_zeros(len(ends), hidden.shape[-1], dtype=torch.float32).index_add_(
        0, sample_of, hidden[0].float()
    )
    lengths = (ends - sequences[:-1].to(hidden.device)).clamp(min=1)
    return sums / lengths[:, None]


def ifd(answer_loss: float, unconditioned_loss: float) -> float | None:
    """Instruction-following difficulty; None when the unconditioned loss is 0 (nothing to divide by)."""
    return answer_loss / unconditioned_loss if unconditioned_loss > 0 else None
