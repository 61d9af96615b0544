"""What stage 2 adds to the LM loss to keep what the base model knew: replayed text's loss, logged on its own, and
BETA x KL(tuned || base) at chosen positions.

Both need the loss token by token, so it is computed here rather than by the LM. The model runs without labels,
asked for its hidden states (and the logits of one position, the least the LM computes); the hidden states of
the positions that predict a label are gathered, and only those pass the LM head - never the whole
`[tokens, vocab]` matrix. At the KL positions the base model's log-probabilities come the same way from a second
forward without gradients (`FrozenBase`).

Normalisation: every predicted token counts once. The loss is (sum of cross-entropies + BETA x sum of KLs at the
KL positions) / targets, `targets` being the Trainer's count of labelled tokens over the whole accumulated batch
and every process, so BETA = 0 gives the plain loss and accumulation or more processes give the same update.

Logged beside the Trainer's `loss` (means since the last log, over every process): `instruction_loss` (assistant
tokens), `replay_loss` (replay text) and `kl_to_base` (nats per KL position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from llava_lite.data.masking import IGNORE_INDEX
from llava_lite.model.loss import trained_positions

# Running sums, in this order: instruction NLL and tokens, replay NLL and tokens, KL and KL positions.
SUMS = ("instruction_nll", "instruction_tokens", "replay_nll", "replay_tokens", "kl", "kl_positions")


class FrozenBase:
    """The LM as training found it, for the KL term, without a second model object.

    With adapters (any peft method) it is the LM with its adapters switched off: nothing is copied. Otherwise the
    starting values of the LM's trained weights are kept and swapped in for one forward (`torch.func
    .functional_call`): full fine-tuning keeps one more copy of the LM's weights (2 bytes a parameter in bf16,
    14 GB for a 7B LM; no gradients or optimizer state), BitFit only its biases. The image features come from the
    current tower and projector for both: the KL compares the language models on the same inputs.
    """

    def __init__(self, model) -> None:
        """Taken from `model` before training starts (and before a checkpoint is resumed into it)."""
        self.adapters = model.uses_adapters
        lm = model.language_model
        trained = [] if self.adapters else [(n, p) for n, p in lm.named_parameters() if p.requires_grad]
        self.start = {f"language_model.{n}": p.detach().clone() for n, p in trained}
        self._name_of = {id(p): f"language_model.{n}" for n, p in trained}  # tied weights: one name, one copy

    @torch.no_grad()
    def log_probs(self, model, inputs: dict, length: int, positions: torch.Tensor) -> torch.Tensor:
        """`[positions, vocab]` log-probabilities of the base at `positions` (`[batch, length - 1]`, True where a
        position's next-token distribution is wanted); `model` is the unwrapped LlavaLiteModel."""
        head = model.language_model.get_output_embeddings()
        if self.adapters:
            with model.language_model.disable_adapter():
                hidden = final_hidden(model(**inputs, **HIDDEN_ONLY), length)[positions]
                logits = head(hidden)
        else:
            device = head.weight.device
            if any(t.device != device for t in self.start.values()):  # the Trainer placed the model after we copied
                self.start = {name: t.to(device) for name, t in self.start.items()}
            outputs = functional_call(model, self.start, args=(), kwargs={**inputs, **HIDDEN_ONLY}, strict=False)
            names = self._name_of
            head_start = {n: self.start[names[id(p)]] for n, p in head.named_parameters() if id(p) in names}
            logits = functional_call(head, head_start, (final_hidden(outputs, length)[positions],))
        return F.log_softmax(logits.float(), dim=-1)


# What the forward is asked for: hidden states, and the logits of one position only (the head runs where needed).
HIDDEN_ONLY = {"output_hidden_states": True, "logits_to_keep": 1}


def final_hidden(outputs, length: int) -> torch.Tensor:
    """The last layer's hidden states (after the final norm) of the positions that predict the next token,
    `[batch, length - 1, hidden]`; virtual tokens of prompt tuning, which lead the sequence, are left out."""
    return outputs.hidden_states[-1][:, -length:-1]


class Objective:
    """The stage-2 loss with its terms apart: called by the Trainer in place of the model's own loss."""

    def __init__(self, model, kl_to_base: float = 0.0, kl_positions: str = "both") -> None:
        self.beta = kl_to_base
        self.kl_positions = kl_positions
        self.base = FrozenBase(model) if kl_to_base > 0 else None
        self.sums: torch.Tensor | None = None

    def __call__(
        self,
        model,
        unwrapped,
        inputs: dict,
        replay_tokens: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """The loss of one (micro-)batch; `model` is what the Trainer runs (maybe wrapped for DDP), `unwrapped`
        the LlavaLiteModel inside, `replay_tokens` the collator's marks of replay text."""
        labels = inputs["labels"]
        forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        predicted = labels[:, 1:] != IGNORE_INDEX
        outputs = model(**forward_inputs, **HIDDEN_ONLY)
        hidden, targets = trained_positions(final_hidden(outputs, labels.shape[1]), labels)
        head = unwrapped.language_model.get_output_embeddings()
        log_probs = F.log_softmax(head(hidden).float(), dim=-1)
        nll = -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        replay = replay_tokens[:, 1:][predicted] if replay_tokens is not None else torch.zeros_like(nll, dtype=bool)
        loss = nll.sum()
        kl = nll.new_zeros(0)
        if self.base is not None:
            at = {"both": torch.ones_like(replay), "assistant": ~replay, "replay": replay}[self.kl_positions]
            if at.any():
                chosen = predicted.clone()
                chosen[predicted] = at
                base = self.base.log_probs(unwrapped, forward_inputs, labels.shape[1], chosen)
                tuned = log_probs[at]
                kl = (tuned.exp() * (tuned - base)).sum(dim=-1)
                loss = loss + self.beta * kl.sum()
        self._add(nll.detach(), replay, kl.detach())
        denominator = num_items_in_batch if num_items_in_batch is not None else predicted.sum().clamp(min=1)
        return loss / denominator

    def _add(self, nll: torch.Tensor, replay: torch.Tensor, kl: torch.Tensor) -> None:
        instruction = ~replay
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
