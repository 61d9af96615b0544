"""How likely a model finds a given answer: the log-likelihood of an assistant turn after a prompt, images included.

This is what multiple-choice evaluation asks of a model (lmms-eval's and lm-eval's `loglikelihood` requests): the
conversation is rendered with the model's own template and masked as training masks it, so the scored tokens are
exactly the ones training trains - the answer and its end-of-turn marker ("the model answers exactly this, then
stops"), never the prompt, system message or image tokens. The LM's body runs once per batch; its output head
runs only at the positions that predict a scored token, in chunks (`llava_lite.model.loss`), so the `[tokens,
vocab]` logits are never made. LMs whose logits are not their head on the last hidden state (soft-capping,
prompt tuning's virtual tokens) are scored from their own full logits instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from llava_lite.data.collator import Collator, batch_to
from llava_lite.data.conversation import Conversation
from llava_lite.data.masking import IGNORE_INDEX
from llava_lite.eval.perplexity import eval_mode
from llava_lite.model.loss import CHUNK_ELEMENTS, body_and_head, head_matches
from llava_lite.model.processor_for_config import processor_for_config


@dataclass(frozen=True)
class Likelihood:
    log_likelihood: float  # summed log-probability of the scored tokens (nats, <= 0)
    greedy: bool  # every scored token is the model's most likely next token
    tokens: int  # how many tokens were scored


class LikelihoodScorer:
    def __init__(self, model, max_length: int | None = None) -> None:
        """`model`: a LlavaLiteModel. The head-only-where-scored split is checked once, here."""
        self.model = model
        self.device = next(model.parameters()).device
        self.processor = processor_for_config(model.config, model.tokenizer, max_length=max_length)
        self.collator = Collator(model.tokenizer.pad_token_id, "right")
        split = body_and_head(model.language_model)
        if split is not None and not head_matches(model.language_model, *split):
            split = None
        self.split = split

    @torch.no_grad()
    def score(self, conversations: list[Conversation], images: list[list[Image.Image]]) -> list[Likelihood]:
        """One result per conversation (each ends with the assistant turn to score); `images[i]` fill conversation
        i's placeholders. Scored as one batch."""
        samples = [
            self.processor.sample(Conversation(c.messages, list(i), c.id, c.source))
            for c, i in zip(conversations, images)
        ]
        batch = batch_to(self.collator(samples), self.device)
        labels = batch.pop("labels")
        with eval_mode(self.model):
            if self.split is None:
                return _from_logits(self.model(**batch).logits, labels)
            return self._from_hidden(batch, labels)

    def _from_hidden(self, batch: dict, labels: torch.Tensor) -> list[Likelihood]:
        body, head = self.split
        model = self.model
        embeds = model.embed(
            batch["input_ids"], batch.get("pixel_values"), batch.get("image_tokens"), None, batch.get("image_sizes")
        )
        hidden = body(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
        ).last_hidden_state
        targets = labels[:, 1:]
        scored = targets != IGNORE_INDEX
        rows = torch.arange(len(labels), device=labels.device)[:, None].expand_as(targets)[scored]
        selected, chosen = hidden[:, :-1][scored], targets[scored]
        step = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
        log_probs, greedy = [], []
        for start in range(0, len(chosen), step):
            logits = head(selected[start : start + step]).float()
            part = chosen[start : start + step]
            log_probs.append(F.log_softmax(logits, dim=-1).gather(1, part[:, None]).squeeze(1))
            greedy.append(logits.argmax(dim=-1) == part)
        return _per_row(torch.cat(log_probs), torch.cat(greedy), rows, len(labels))


def _from_logits(logits: torch.Tensor, labels: torch.Tensor) -> list[Likelihood]:
    """From full logits; logits longer than the labels are a prompt-tuned LM's, its virtual tokens first."""
    logits = logits[:, -labels.shape[1] :][:, :-1].float()
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    rows = torch.arange(len(labels), device=labels.device)[:, None].expand_as(targets)[scored]
    log_probs = F.log_softmax(logits[scored], dim=-1).gather(1, targets[scored][:, None]).squeeze(1)
    return _per_row(log_probs, logits[scored].argmax(dim=-1) == targets[scored], rows, len(labels))


def _per_row(log_probs: torch.Tensor, greedy: torch.Tensor, rows: torch.Tensor, count: int) -> list[Likelihood]:
    totals = torch.zeros(count, dtype=torch.float64, device=log_probs.device).index_add_(0, rows, log_probs.double())
    misses = torch.zeros(count, dtype=torch.long, device=log_probs.device).index_add_(0, rows, (~greedy).long())
    tokens = torch.bincount(rows, minlength=count)
    return [
        Likelihood(float(total), int(miss) == 0, int(n))
        for total, miss, n in zip(totals.tolist(), misses.tolist(), tokens.tolist())
    ]
