"""Before training: that the data has a record to train on, or one clear error naming the sources and, under
`on_bad_record: skip`, how many records were skipped for which reason.

Without this, data whose every record is skipped reaches torch's sampler (`num_samples=0`, naming no file) or
the dataset's endless search for a good record.
"""

from __future__ import annotations

from collections import Counter

from llava_lite.data.config import DataConfig
from llava_lite.data.conversation import Conversation
from llava_lite.data.dataset import ConversationDataset
from llava_lite.data.errors import BadRecordError


class NoRecordsError(ValueError):
    """No record of the data can be trained on; the message is the one line a user sees."""


def require_records(config: DataConfig, records: list[Conversation], skipped: Counter, role: str = "data") -> None:
    """NoRecordsError when reading the sources left no record (`skipped`: the records skipped while reading)."""
    if not records:
        raise NoRecordsError(no_records_message(config, skipped, role))


def require_a_sample(
    config: DataConfig, dataset: ConversationDataset, skipped_at_load: Counter, role: str = "data"
) -> None:
    """NoRecordsError unless some record becomes a sample. Records are encoded in order until one does - the first,
    as a rule - so this costs one sample unless the data is bad; a bad record under `on_bad_record: error`
    raises its own error, as it would in training."""
    skipped = Counter(skipped_at_load)
    for conversation in dataset.conversations:
        try:
            dataset.processor.sample(conversation)
        except BadRecordError as err:
            if dataset.on_bad_record == "error":
                raise
            skipped[err.reason] += 1
            continue
        return
    raise NoRecordsError(no_records_message(config, skipped, role))


def no_records_message(config: DataConfig, skipped: Counter, role: str) -> str:
    """The one line saying that `role`'s sources left nothing to train on, with the skips by reason."""
    sources = ", ".join(source.path for source in config.sources)
    if not skipped:
        return f"{role}: no records in {sources}"
    counts = ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items()))
    return (
        f"{role}: no record left to train on in {sources}: all {sum(skipped.values())} were skipped "
        f"(on_bad_record: skip): {counts}"
    )
