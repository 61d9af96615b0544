"""A torch Dataset of conversations: each encoded by the processor when asked for, under a bad-record policy."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset

from llava_lite.data.config import DataConfig
from llava_lite.data.conversation import Conversation
from llava_lite.data.errors import BadRecordError
from llava_lite.data.formats import read_sources
from llava_lite.data.measure import Measurement, measure
from llava_lite.data.processor import Processor
from llava_lite.data.skips import SkipCounter

logger = logging.getLogger(__name__)


class ConversationDataset(Dataset):
    """Each item, from the processor: `input_ids`, `labels` (1-D long tensors), and per image `pixel_values`
    (`[3, H, W]` tensors) and `image_tokens` (its token count).

    Under `on_bad_record="skip"`, a record that fails when its sample is built (a corrupt image, a sample
    too long) is passed over for the next good one and marked in `skips` (shared with DataLoader workers).
    `skipped_at_load` holds the records skipped while the data was read.
    """

    def __init__(
        self,
        conversations: list[Conversation],
        processor: Processor,
        on_bad_record: Literal["error", "skip"] = "error",
        skipped_at_load: Counter | None = None,
        measure_cache: str | Path | None = None,
    ) -> None:
        """`measure_cache`: the folder where the records' measured counts are kept (the run's output folder)."""
        self.conversations = conversations
        self.processor = processor
        self.on_bad_record = on_bad_record
        self.skipped_at_load: Counter = Counter(skipped_at_load or {})
        self.skips = SkipCounter(len(conversations))
        self.measure_cache = measure_cache
        self._measured: Measurement | None = None

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.conversations)):
            sample = self.sample_of((index + attempt) % len(self.conversations))
            if sample is not None:
                return sample
        raise RuntimeError("every record of the dataset is bad; nothing to train on")

    def sample_of(self, record: int) -> dict | None:
        """Record `record` as a sample; None when it is bad and skipped (then it is marked in `skips`)."""
        try:
            return self.processor.sample(self.conversations[record])
        except BadRecordError as err:
            self._bad(record, err)
            return None

    def measure(self) -> tuple[list[int], list[int]]:
        """Every record's token count and image count, from its text alone (no image is loaded); a bad record
        raises, or under `skip` is marked and measures 0 tokens. Computed once (see `llava_lite.data.measure`)."""
        measured = self.measurement()
        return measured.lengths.tolist(), measured.images.tolist()

    def measurement(self) -> Measurement:
        """The records' counts, trained tokens included; every process of a run must ask at the same time."""
        if self._measured is None:
            stop = self.on_bad_record == "error"
            self._measured = measure(self.conversations, self.processor, stop, self.measure_cache)
            for record, reason in self._measured.bad():
                self.skips.mark(record, reason)
        return self._measured

    def _bad(self, record: int, err: BadRecordError) -> None:
        if self.on_bad_record == "error":
            raise err
        self.skips.mark(record, err.reason)
        logger.debug("skipped %s", err)


def load_conversations(config: DataConfig) -> tuple[list[Conversation], Counter]:
    """Every instruction source's records, in order, and the records skipped while reading them, by reason.
    Replay text (`kind: text` sources) is read by `llava_lite.data.replay`."""
    if not config.sources:
        raise ValueError("data: no sources given")
    return read_sources(config.instruction_sources, config.on_bad_record, config.check_images_exist)


def build_dataset(config: DataConfig, processor: Processor) -> ConversationDataset:
    conversations, skipped = load_conversations(config)
    return ConversationDataset(conversations, processor, config.on_bad_record, skipped)
