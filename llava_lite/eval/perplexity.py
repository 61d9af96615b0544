"""Perplexity: of the answers in held-out instruction data, and of plain text under a language model.

Both are token-weighted: exp(total negative log-likelihood / number of predicted tokens) over the whole
set, as language-model evaluations report it, not a mean of per-record perplexities (which would let a
two-token answer weigh as much as a page).
- Response perplexity scores exactly the tokens training would train - the assistant answers and their
  end-of-turn markers, never the prompt, the system message or image tokens - with the model's own
  template and masking, images included.
- Text perplexity scores a plain text file cut into windows of `window` tokens; each window starts
  fresh (with BOS when the tokenizer has one, so its first token is predicted too; otherwise the first
  token of each window is context only). Base and tuned LM score the same token ids, so their ratio -
  the forgetting measure - compares like with like.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llava_lite.data.collator import Collator, batch_to
from llava_lite.data.config import DataSource
from llava_lite.data.dataset import ConversationDataset
from llava_lite.data.errors import BadRecordError
from llava_lite.data.formats import read_source
from llava_lite.data.masking import IGNORE_INDEX
from llava_lite.data.replay import bos_windows
from llava_lite.model.processor_for_config import processor_for_config


@dataclass
class Perplexity:
    perplexity: float
    mean_nll: float  # nats per predicted token
    tokens: int  # predicted tokens
    records: int  # conversations, or text windows

    @classmethod
    def from_sums(cls, nll: float, tokens: int, records: int) -> Perplexity:
        if tokens == 0:
            raise ValueError("nothing to score: no predicted tokens")
        return cls(math.exp(nll / tokens), nll / tokens, tokens, records)

    def as_dict(self) -> dict:
        return asdict(self)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of `labels[:, 1:]` under `logits[:, :-1]` (each position predicts the next), and the count.
    Logits longer than the labels are those of a prompt-tuned LM, its virtual tokens first: they are left out."""
    logits = logits[:, -labels.shape[1] :]
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    if not scored.any():
        return 0.0, 0
    log_probs = F.log_softmax(logits[:, :-1][scored].float(), dim=-1)
    nll = -log_probs.gather(1, targets[scored].unsqueeze(1)).sum()
    return float(nll), int(scored.sum())


def read_conversations(path: str | Path, image_folder: str | Path | None = None, limit: int | None = None) -> list:
    """Held-out records in any format the training readers take; a bad record stops with its file and number.

    Only the images of the first `limit` records are looked for."""
    source = DataSource(path=str(path), image_folder=str(image_folder) if image_folder else None)
    conversations, _ = read_source(source, on_bad_record="error", check_images_exist=False)
    conversations = conversations[:limit] if limit else conversations
    for conversation in conversations:
        missing = next((image for image in conversation.images if not Path(image).is_file()), None)
        if missing:
            raise BadRecordError(conversation.source, "missing_image", f"image {missing} does not exist")
    return conversations


@torch.no_grad()
def response_perplexity(
    model, conversations: list, batch_size: int = 8, max_length: int | None = None, progress: bool = False
) -> Perplexity:
    """Perplexity of the assistant tokens of `conversations` under `model` (a LlavaLiteModel)."""
    if not conversations:
        raise ValueError("no held-out conversations to score")
    device = next(model.parameters()).device
    processor = processor_for_config(model.config, model.tokenizer, max_length=max_length)
    dataset = ConversationDataset(conversations, processor, on_bad_record="error")
    collator = Collator(model.tokenizer.pad_token_id, "right")
    nll, tokens = 0.0, 0
    with eval_mode(model):
        batches = range(0, len(dataset), batch_size)
        for start in tqdm(batches, desc="response perplexity", unit="batch", disable=not progress):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            labels = batch.pop("labels")
            batch = batch_to(batch, device)
            logits = model(**batch).logits
            batch_nll, batch_tokens = token_nll(logits, labels.to(device))
            nll += batch_nll
            tokens += batch_tokens
    return Perplexity.from_sums(nll, tokens, len(dataset))


def text_windows(tokenizer, text: str, window: int) -> list[list[int]]:
    """`text` as token windows of at most `window` ids, each led by BOS when the tokenizer has one."""
    if window < 2:
        raise ValueError("the text window must hold at least 2 tokens")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return bos_windows(ids, [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [], window)


@torch.no_grad()
def text_perplexity(
    language_model, windows: list[list[int]], batch_size: int = 4, pad_token_id: int = 0, progress: bool = False
) -> Perplexity:
    """Perplexity of every window's tokens after its first, under a transformers causal LM."""
    if not windows:
        raise ValueError("the text gives no window of two or more tokens to score")
    rows = language_model.get_input_embeddings().num_embeddings  # not `.weight`: a ZeRO-3 shard is empty
    if max(max(w) for w in windows) >= rows:
        raise ValueError(f"the text holds token ids beyond this LM's {rows} embedding rows (added tokens?)")
    device = next(language_model.parameters()).device
    collator = Collator(pad_token_id, "right")
    nll, tokens = 0.0, 0
    with eval_mode(language_model):
        batches = range(0, len(windows), batch_size)
        for start in tqdm(batches, desc="text perplexity", unit="batch", disable=not progress):
            ids = [torch.tensor(window) for window in windows[start : start + batch_size]]
            batch = collator([{"input_ids": w, "labels": w} for w in ids])
            mask = batch["attention_mask"].to(device)
            logits = language_model(input_ids=batch["input_ids"].to(device), attention_mask=mask).logits
            batch_nll, batch_tokens = token_nll(logits, batch["labels"].to(device))
            nll += batch_nll
            tokens += batch_tokens
    return Perplexity.from_sums(nll, tokens, len(windows))


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Evaluate without dropout, then hand the module back in the mode it came in (training calls this too)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
