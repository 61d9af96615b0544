"""Where training data comes from and what to do with records that do not fit."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# The data files a source may name; any other path that does not exist may be a hub dataset's name.
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".csv", ".txt")


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
    # conversations: instruction records. text: general text replayed beside them (every token trained, no
    # template; see `replay`) - a .txt file, a folder of .txt files, or any data `datasets` loads with a text column.
    kind: Literal["conversations", "text"] = "conversations"
    text_column: str = "text"

    def check_exists(self) -> None:
        """A path that can only be local (a data-file suffix, or starting with /, ./, ../, ~) must exist: a typo
        fails at once instead of being looked up on the hub as a dataset name (which `datasets` retries)."""
        local = Path(self.path).suffix.lower() in DATA_FILE_SUFFIXES or self.path.startswith(("/", "./", "../", "~"))
        if local and not Path(self.path).expanduser().exists():
            raise ValueError(f"{self.path}: no such data file or folder")


@dataclass
class ReplaySettings:
    """How much general text (the `kind: text` sources) each epoch mixes in with the instruction records."""

    # The replay share of an epoch: of its samples, or of its trained tokens. 0.2 with 800 instruction records
    # and unit samples adds 200 text windows.
    ratio: float
    unit: Literal["samples", "tokens"] = "samples"
    # Tokens per replay sample; default: data.max_length.
    window: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.ratio < 1:
            raise ValueError(f"replay ratio must be in (0, 1), got {self.ratio}")
        if self.window is not None and self.window < 2:
            raise ValueError(f"replay window must hold at least 2 tokens, got {self.window}")


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
    # samples), and a step's rows laid end to end with no padding. With packing, `train.batch_size` counts rows.
    packing: bool = False
    pack_length: int | None = None  # tokens per row; default: max_length
    pack_images: int | None = None  # images per row; default: no limit
    pack_window: int = 1000  # samples planned together (best-fit decreasing)
    # Without packing: batches of one modality (with images, text-only) and of similar lengths.
    group_by_modality_length: bool = False
    # Shuffle the samples (or packed rows) each epoch; false keeps the data's order (a `data mix --curriculum`).
    shuffle: bool = True
    # Replay of general text against forgetting; needs at least one `kind: text` source (and they need it).
    replay: ReplaySettings | None = None

    def __post_init__(self) -> None:
        if self.packing and self.group_by_modality_length:
            raise ValueError("data: packing and group_by_modality_length exclude each other; choose one")
        if self.replay is not None and (self.packing or self.group_by_modality_length):
            raise ValueError("data.replay mixes its text by its own order: it cannot be packed or grouped (yet)")
        texts = [s.path for s in self.sources if s.kind == "text"]
        if texts and self.replay is None:
            raise ValueError(f"text source {texts[0]} is replayed: set data.replay.ratio")
        if self.replay is not None and not texts:
            raise ValueError("data.replay needs a source with kind: text")
        if self.sources and len(texts) == len(self.sources):
            raise ValueError("data: replay text needs instruction data beside it (a source of kind conversations)")

    @property
    def instruction_sources(self) -> list[DataSource]:
        return [s for s in self.sources if s.kind == "conversations"]

    @property
    def text_sources(self) -> list[DataSource]:
        return [s for s in self.sources if s.kind == "text"]
