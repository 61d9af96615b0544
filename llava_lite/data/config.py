"""Where training data comes from and what to do with records that do not fit."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# The data files a source may name; any other path that does not exist may be a hub dataset's name.
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".csv")


@dataclass
class DataSource:
    # A .json / .jsonl file (LLaVA `conversations` or `messages` records), a .parquet / .arrow / .csv file,
    # a folder written by `datasets.save_to_disk`, or - only when you name one - a hub dataset.
    path: str
    # Images resolve inside this folder; default: the data file's own folder.
    image_folder: str | None = None
    split: str = "train"
    # Our field -> the dataset's column, for data whose columns are named otherwise:
    # {"messages": "dialog", "images": "pictures", "id": "uid"}.
    columns: dict[str, str] = field(default_factory=dict)
    # Extra role names -> user | assistant | system, added to the usual ones (human, gpt, ...).
    roles: dict[str, str] = field(default_factory=dict)

    def check_exists(self) -> None:
        """A path that can only be local (a data-file suffix, or starting with /, ./, ../, ~) must exist: a typo
        fails at once instead of being looked up on the hub as a dataset name (which `datasets` retries)."""
        local = Path(self.path).suffix.lower() in DATA_FILE_SUFFIXES or self.path.startswith(("/", "./", "../", "~"))
        if local and not Path(self.path).expanduser().exists():
            raise ValueError(f"{self.path}: no such data file or folder")


@dataclass
class DataConfig:
    sources: list[DataSource] = field(default_factory=list)
    max_length: int = 2048
    # Over-long samples: cut (never through an image's tokens) or treat as bad records.
    overflow: Literal["truncate", "drop"] = "truncate"
    # Bad records (malformed, missing or corrupt image, placeholder/image mismatch, too long):
    # stop with an error naming file and record, or skip them and count the skips by reason.
    on_bad_record: Literal["error", "skip"] = "error"
    # Look for every image file when the data is loaded, so missing images surface before training.
    check_images_exist: bool = True
    # Sequence packing: several samples in one row, each kept apart (position ids restart, no attention across
    # samples), so little is padding. With packing, `train.batch_size` counts rows.
    packing: bool = False
    pack_length: int | None = None  # tokens per row; default: max_length
    pack_images: int | None = None  # images per row; default: no limit
    pack_window: int = 1000  # samples planned together (best-fit decreasing)
    # Without packing: batches of one modality (with images, text-only) and of similar lengths.
    group_by_modality_length: bool = False
    # Shuffle the samples (or packed rows) each epoch; false keeps the data's order (a `data mix --curriculum`).
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.packing and self.group_by_modality_length:
            raise ValueError("data: packing and group_by_modality_length exclude each other; choose one")
