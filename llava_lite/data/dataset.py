"""A torch Dataset of conversations: text encoded and images loaded lazily, per sample, under a bad-record policy."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Literal

import torch
from torch.utils.data import Dataset

from llava_lite.data.config import DataConfig
from llava_lite.data.conversation import Conversation
from llava_lite.data.errors import BadRecordError
from llava_lite.data.formats import read_source
from llava_lite.data.images import ImagePreprocessor, load_image
from llava_lite.data.processor import ConversationProcessor

logger = logging.getLogger(__name__)


class ConversationDataset(Dataset):
    """Each item: `input_ids`, `labels` (1-D long tensors), `pixel_values` (`[images, 3, H, W]` or None).

    Under `on_bad_record="skip"`, a record that fails when its sample is built (a corrupt image, a sample
    too long) is passed over for the next good one; the reasons travel with the item as `skipped`, so
    whoever consumes the batches counts them, in DataLoader workers too. `skipped_at_load` holds the
    records skipped while the data was read.
    """

    def __init__(
        self,
        conversations: list[Conversation],
        processor: ConversationProcessor,
        image_preprocessor: ImagePreprocessor | None,
        on_bad_record: Literal["error", "skip"] = "error",
        skipped_at_load: Counter | None = None,
    ) -> None:
        self.conversations = conversations
        self.processor = processor
        self.image_preprocessor = image_preprocessor
        self.on_bad_record = on_bad_record
        self.skipped_at_load: Counter = Counter(skipped_at_load or {})

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict:
        reasons: list[str] = []
        for attempt in range(len(self.conversations)):
            conversation = self.conversations[(index + attempt) % len(self.conversations)]
            try:
                sample = self.encode(conversation)
            except BadRecordError as err:
                if self.on_bad_record == "error":
                    raise
                reasons.append(err.reason)
                logger.debug("skipped %s", err)
                continue
            sample["skipped"] = reasons
            return sample
        raise RuntimeError("every record of the dataset is bad; nothing to train on")

    def encode(self, conversation: Conversation) -> dict:
        encoded = self.processor.encode(conversation)
        pixel_values = None
        if encoded.images:
            if self.image_preprocessor is None:
                raise BadRecordError(conversation.source, "malformed", "an image record, but the model takes no images")
            pixel_values = torch.stack(
                [self.image_preprocessor(load_image(path, conversation.source)) for path in encoded.images]
            )
        return {
            "input_ids": torch.from_numpy(encoded.input_ids),
            "labels": torch.from_numpy(encoded.labels),
            "pixel_values": pixel_values,
        }


def load_conversations(config: DataConfig) -> tuple[list[Conversation], Counter]:
    """Every source's records, in order, and the records skipped while reading them, by reason."""
    if not config.sources:
        raise ValueError("data: no sources given")
    conversations: list[Conversation] = []
    skipped: Counter = Counter()
    for source in config.sources:
        records, source_skipped = read_source(source, config.on_bad_record, config.check_images_exist)
        conversations.extend(records)
        skipped.update(source_skipped)
        if source_skipped:
            logger.warning("%s: skipped %s", source.path, dict(source_skipped))
    return conversations, skipped


def build_dataset(
    config: DataConfig, processor: ConversationProcessor, image_preprocessor: ImagePreprocessor | None
) -> ConversationDataset:
    conversations, skipped = load_conversations(config)
    return ConversationDataset(conversations, processor, image_preprocessor, config.on_bad_record, skipped)
