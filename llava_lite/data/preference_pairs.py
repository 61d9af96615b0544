"""Preference pairs as model inputs: each answer a sequence of its own after the shared prompt, the prompt's images
loaded once per pair, and batches in which chosen and rejected (and several pairs) stay apart.

A pair is encoded as two conversations - the prompt, then the chosen or the rejected answer - by the processor that
encodes instruction data: the same template, the same masking (only the final answer is trained, from the end of
the generation prompt through the end-of-turn marker), the same image slots. The prompt holds every image, so an
over-long sequence is cut inside its answer and never through an image: the answer's end is cut off (counted and
logged), and a prompt that leaves no token of an answer is a `too_long` bad pair, never a silently empty one.

A batch (`PreferenceCollator`) lays the sequences out chosen, rejected, chosen, rejected, ...: padded rows, or for
packed items (`llava_lite.data.packing.PackedDataset` over pairs) one padding-free row with `cu_seq_lens`, which
the model's attention keeps apart as it keeps packed samples apart. Each pair's images are in the batch once
(`pixel_values`); `image_order` names the image that fills each image block of the sequences, so the tower runs once
per image and both answers see the same features. `pair_index` says which pairs the batch holds, and
`completion_tokens` how many tokens each sequence's answer has.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from llava_lite.data.collator import Collator, stack_images
from llava_lite.data.errors import BadRecordError
from llava_lite.data.masking import IGNORE_INDEX
from llava_lite.data.preference_formats import PreferencePair
from llava_lite.data.processor import EncodedConversation, Processor
from llava_lite.data.skips import SkipCounter

logger = logging.getLogger(__name__)

SIDES = ("chosen", "rejected")
# Batch keys that are not model inputs: which pairs a batch holds, and each sequence's answer length.
PAIR_INDEX, COMPLETION_TOKENS = "pair_index", "completion_tokens"


@dataclass
class EncodedPair:
    chosen: EncodedConversation
    rejected: EncodedConversation
    truncated: int  # answers cut to fit max_length (0, 1 or 2)

    @property
    def length(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


class PreferenceDataset(Dataset):
    """Item i: `{"pair": i, "chosen": {input_ids, labels}, "rejected": {...}, "pixel_values", "image_tokens",
    "image_sizes"}` - the images once. Under `on_bad_record="skip"` a pair that fails when its sample is built is
    passed over for the next good one and marked in `skips`, as `ConversationDataset` does."""

    def __init__(
        self,
        pairs: list[PreferencePair],
        processor: Processor,
        max_length: int | None = None,
        overflow: Literal["truncate", "drop"] = "truncate",
        on_bad_record: Literal["error", "skip"] = "error",
    ) -> None:
        if processor.max_length is not None:
            raise ValueError("a preference dataset cuts its pairs itself: give it a processor without max_length")
        self.pairs = pairs
        self.processor = processor
        self.max_length = max_length
        self.overflow = overflow
        self.on_bad_record = on_bad_record
        self.skips = SkipCounter(len(pairs))
        self._measured: tuple[list[int], list[int]] | None = None
        self.fingerprint: str | None = None  # of every pair's tokens and images, once measured

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.pairs)):
            sample = self.sample_of((index + attempt) % len(self.pairs))
            if sample is not None:
                return sample
        raise RuntimeError("every pair of the data is bad; nothing to train on")

    def encode(self, index: int) -> EncodedPair:
        """Pair `index` as two encoded conversations, cut to `max_length` inside the answers; BadRecordError if bad."""
        pair = self.pairs[index]
        sides = []
        for side in SIDES:
            encoded = self.processor.encode(pair.conversation(getattr(pair, side)), only_last_answer=True)
            sides.append(self._fit(encoded, pair.source, side))
        (chosen, cut_chosen), (rejected, cut_rejected) = sides
        if np.array_equal(_answer_ids(chosen), _answer_ids(rejected)):
            raise BadRecordError(
                pair.source, "identical_answers", "the chosen and the rejected answer have the same tokens (as cut)"
            )
        return EncodedPair(chosen, rejected, cut_chosen + cut_rejected)

    def sample_of(self, index: int) -> dict | None:
        """Pair `index` as a sample, its images loaded; None when it is bad and skipped (then marked in `skips`)."""
        try:
            encoded = self.encode(index)
            sample = self.processor.sample_from(encoded.chosen, self.pairs[index].source)
        except BadRecordError as err:
            self._bad(index, err)
            return None
        rejected = encoded.rejected
        return {
            "pair": index,
            "chosen": {"input_ids": sample["input_ids"], "labels": sample["labels"]},
            "rejected": {
                "input_ids": torch.from_numpy(rejected.input_ids),
                "labels": torch.from_numpy(rejected.labels),
            },
            "pixel_values": sample["pixel_values"],
            "image_tokens": sample["image_tokens"],
            "image_sizes": sample["image_sizes"],
        }

    def measure(self) -> tuple[list[int], list[int]]:
        """Every pair's tokens (both sequences) and images, from the text alone (no image is loaded); a bad pair
        raises, or under `skip` is marked and measures 0. Computed once; also counts and logs the answers cut to
        fit, and takes the `fingerprint` of every pair's tokens and image files."""
        if self._measured is None:
            lengths, images, truncated = [], [], 0
            digest = hashlib.sha256()
            for index in tqdm(range(len(self.pairs)), desc="measuring", unit="pair", disable=len(self.pairs) < 5000):
                try:
                    encoded = self.encode(index)
                except BadRecordError as err:
                    self._bad(index, err)
                    lengths.append(0)
                    images.append(0)
                    digest.update(f"bad {index}".encode())
                    continue
                lengths.append(encoded.length)
                images.append(len(encoded.chosen.images))
                truncated += encoded.truncated
                _digest_pair(digest, encoded)
            if truncated:
                logger.warning(
                    "%d of %d answers were cut to max_length %s (their ends, end-of-turn marker included, are not "
                    "trained)", truncated, 2 * len(self.pairs), self.max_length,
                )  # fmt: skip
            self._measured = (lengths, images)
            self.fingerprint = digest.hexdigest()
        return self._measured

    def first_good(self) -> int | None:
        """The first pair that becomes a sample (its images loaded), without marking skips; None if none does."""
        for index in range(len(self.pairs)):
            try:
                self.processor.sample_from(self.encode(index).chosen, self.pairs[index].source)
            except BadRecordError:
                if self.on_bad_record == "error":
                    raise
                continue
            return index
        return None

    def _fit(self, encoded: EncodedConversation, source: str, side: str) -> tuple[EncodedConversation, int]:
        """`encoded` cut at `max_length`, which must leave a token of its answer (the prompt, images and all, comes
        first); (sequence, 1) when it was cut."""
        length = len(encoded.input_ids)
        if self.max_length is None or length <= self.max_length:
            return encoded, 0
        if self.overflow == "drop":
            raise BadRecordError(
                source, "too_long", f"{length} tokens with the {side} answer exceed max_length {self.max_length}"
            )
        answer_start = int(np.flatnonzero(encoded.labels != IGNORE_INDEX)[0])
        if answer_start >= self.max_length:
            raise BadRecordError(
                source, "too_long", f"the prompt takes {answer_start} tokens: max_length {self.max_length} leaves no "
                f"token of the {side} answer",
            )  # fmt: skip
        cut = slice(0, self.max_length)
        return EncodedConversation(encoded.input_ids[cut], encoded.labels[cut], encoded.images, encoded.image_tokens), 1

    def _bad(self, index: int, err: BadRecordError) -> None:
        if self.on_bad_record == "error":
            raise err
        self.skips.mark(index, err.reason)
        logger.debug("skipped %s", err)


def _answer_ids(encoded: EncodedConversation) -> np.ndarray:
    return encoded.labels[encoded.labels != IGNORE_INDEX]


def _digest_pair(digest, encoded: EncodedPair) -> None:
    """What the reference log-probs of a pair depend on in the data: its tokens and labels, and its image files."""
    for side in (encoded.chosen, encoded.rejected):
        digest.update(side.input_ids.tobytes())
        digest.update(side.labels.tobytes())
    for image in encoded.chosen.images:
        try:
            stat = os.stat(image)
            digest.update(f"{image} {stat.st_size} {stat.st_mtime_ns}".encode())
        except (OSError, TypeError):
            digest.update(repr(image).encode())


@dataclass
class PreferenceCollator:
    """Pairs (or packed rows of pairs) to one batch: chosen and rejected of each pair in turn, padded rows or one
    packed row; the images once per pair with `image_order`; `pair_index` and `completion_tokens`."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, items: list[dict]) -> dict:
        packed = any("packed" in item for item in items)
        pairs = [pair for item in items for pair in item.get("packed", [item])]
        sequences = [pair[side] for pair in pairs for side in SIDES]
        rows = Collator(self.pad_token_id, "right", self.pad_to_multiple_of)
        batch = rows([{"packed": sequences}] if packed else sequences)
        batch[PAIR_INDEX] = torch.tensor([pair["pair"] for pair in pairs])
        # Position 0 of a sequence is never predicted (packed, it is masked; padded, nothing comes before it).
        batch[COMPLETION_TOKENS] = torch.tensor([int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in sequences])
        images = [image for pair in pairs for image in pair["pixel_values"]]
        if images:
            order, tokens, first = [], [], 0
            for pair in pairs:
                own = list(range(first, first + len(pair["pixel_values"])))
                order += own + own  # the chosen sequence's image blocks, then the rejected one's
                tokens += list(pair["image_tokens"]) * 2
                first += len(own)
            batch["pixel_values"] = stack_images(images)
            batch["image_order"] = torch.tensor(order)
            batch["image_tokens"] = torch.tensor(tokens)
            batch["image_sizes"] = torch.tensor([size for pair in pairs for size in pair["image_sizes"]]).view(-1, 2)
        return batch
