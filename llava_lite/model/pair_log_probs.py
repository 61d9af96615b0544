"""Each preference pair's log-probability of its chosen and of its rejected answer under a model, from batches the
preference collator made (`llava_lite.data.preference_pairs`: chosen and rejected of each pair in turn).

The model computes them in its forward (`sequence_log_probs=True`): the LM head runs at the answers' tokens only,
through the chunked head the loss uses, and packed sequences stay apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from llava_lite.data.collator import batch_to
from llava_lite.data.preference_pairs import COMPLETION_TOKENS, PAIR_INDEX


@dataclass
class PairLogProbs:
    """Per pair: the summed log-probability of the chosen and of the rejected answer, and their token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def per_token(self) -> PairLogProbs:
        """The log-probabilities averaged over each answer's tokens (SimPO's, ORPO's and IPO's length norm)."""
        return PairLogProbs(
            self.chosen / self.chosen_tokens.clamp(min=1),
            self.rejected / self.rejected_tokens.clamp(min=1),
            self.chosen_tokens,
            self.rejected_tokens,
        )


def split_batch(batch: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A preference batch as (the model's inputs, which pairs it holds, each sequence's answer tokens)."""
    inputs = {k: v for k, v in batch.items() if k not in (PAIR_INDEX, COMPLETION_TOKENS)}
    return inputs, batch[PAIR_INDEX], batch[COMPLETION_TOKENS]


def pair_log_probs(model, inputs: dict, completion_tokens: torch.Tensor) -> tuple[PairLogProbs, object]:
    """The pairs' log-probabilities under `model` (maybe wrapped, e.g. for DDP), and the tower's features of the
    batch's images when this pass ran the tower (None when `inputs` brought them, or has no images)."""
    outputs = model(**inputs, sequence_log_probs=True)
    pairs = len(completion_tokens) // 2
    logps = outputs.logps[: 2 * pairs]  # a packed row's trailing padding is one more sequence
    tokens = completion_tokens.to(logps.device)
    return PairLogProbs(logps[0::2], logps[1::2], tokens[0::2], tokens[1::2]), outputs.image_features


@torch.no_grad()
def log_probs_of_pairs(
    model,
    items: Iterable[dict],
    collate: Callable[[list[dict]], dict],
    batch_size: int,
    device: torch.device | str,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    total: int | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pair indices, chosen log-probs, rejected log-probs) over `items` (dataset items: pairs or packed rows of
    pairs), `batch_size` items a batch, `model` in eval mode and under `context()` (adapters off, autocast ...)."""
    was_training = model.training
    model.eval()
    indices, chosen, rejected = [], [], []
    batch: list[dict] = []
    bar = tqdm(total=total, desc="log-probs of pairs", unit="item", disable=not progress)

    def flush() -> None:
        inputs, pair_index, completion_tokens = split_batch(collate(batch))
        with context():
            logps, _ = pair_log_probs(model, batch_to(inputs, device), completion_tokens)
        indices.append(pair_index)
        chosen.append(logps.chosen.float().cpu())
        rejected.append(logps.rejected.float().cpu())
        bar.update(len(batch))
        batch.clear()

    try:
        for item in items:
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        bar.close()
        model.train(was_training)
    if not indices:
        empty = torch.zeros(0)
        return empty.long(), empty, empty
    return torch.cat(indices), torch.cat(chosen), torch.cat(rejected)
