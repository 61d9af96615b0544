"""Replay of general text against forgetting: text cut into windows, every token trained, mixed into each epoch.

A `kind: text` source holds documents: a .txt file, each .txt file of a folder, or the text column of anything
`datasets` loads. Documents are tokenized as plain text (a literal `<image>` or template marker in them stays
text: special tokens are split), joined with EOS between them, and cut into windows of `window` tokens, each
led by BOS when the tokenizer has one - as `llava-lite eval` reads general text. A replay sample has no
template: its labels are its ids, so every token after the first is predicted.

`ReplayMix` is the instruction dataset followed by one epoch's replay windows; the Trainer's sampler shuffles
them together, so every epoch holds exactly the share asked for:
- unit samples: round(M r / (1 - r)) windows beside M instruction records;
- unit tokens: windows whose trained tokens add up to round(T r / (1 - r)) beside T trained instruction tokens
  (the last window cut to fit; exact unless records are skipped while samples are built).
Which windows come from the seed; when the text holds fewer than an epoch needs, they are used again, each pass
in a new order. Every epoch replays the same windows, in the new order the sampler gives them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from llava_lite.data.cache import read_cached, write_cached
from llava_lite.data.collator import REPLAY
from llava_lite.data.config import DataConfig, DataSource, ReplaySettings
from llava_lite.data.dataset import ConversationDataset
from llava_lite.data.errors import BadRecordError
from llava_lite.data.formats import load_with_datasets
from llava_lite.data.masking import IGNORE_INDEX
from llava_lite.run_folder import REPLAY_WINDOWS_FILE

logger = logging.getLogger(__name__)


def read_replay_text(config: DataConfig) -> list[str]:
    """The documents of every `kind: text` source, in order; read before any model is built."""
    return [document for source in config.text_sources for document in read_documents(source)]


def read_documents(source: DataSource) -> list[str]:
    path = Path(source.path).expanduser()
    if path.is_file() and path.suffix.lower() == ".txt":
        return [_read_text_file(path)]
    if path.is_dir() and not any((path / name).is_file() for name in ("dataset_info.json", "state.json")):
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"{path}: a text source folder needs .txt files (or a dataset saved by `datasets`)")
        return [_read_text_file(file) for file in files]
    if path.suffix.lower() in (".json", ".jsonl") and path.is_file():
        import datasets

        rows = datasets.load_dataset("json", data_files=str(path), split=source.split)
    else:
        source.check_exists()
        rows = load_with_datasets(source)
    column = source.text_column
    if column not in rows.column_names:
        raise ValueError(
            f"{source.path}: no column {column!r} to replay (columns: {', '.join(rows.column_names)}); "
            "set the source's text_column"
        )
    documents = []
    for index, text in enumerate(rows[column]):
        if not isinstance(text, str):
            raise BadRecordError(f"{source.path} record {index}", "malformed", f"{column!r} is not text")
        documents.append(text)
    return documents


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start})") from None


def text_windows(tokenizer, documents: list[str], window: int) -> list[np.ndarray]:
    """The documents as one token stream (EOS after each) cut into windows of at most `window` ids, each led by
    BOS when the tokenizer has one; a last window of fewer than two ids is dropped (it predicts nothing)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if window - len(bos) < 1:
        raise ValueError(f"replay window {window} leaves no room for text")
    documents = [d for d in documents if d.strip()]
    if not documents:
        return []
    encoded = tokenizer(documents, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    stream = [i for ids in encoded for i in (*ids, *eos)]
    return [np.asarray(w, dtype=np.int64) for w in bos_windows(stream, bos, window)]


def cached_text_windows(tokenizer, documents: list[str], window: int, cache_dir: str | Path) -> list[np.ndarray]:
    """`text_windows`, kept in `cache_dir` (the run's output folder) under a digest of the documents, the
    tokenizer and the window, so a resumed or rerun run, and every process but the one that made them, read them
    back instead of tokenizing the text again."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{window}\x00{tokenizer.bos_token_id}\x00{tokenizer.eos_token_id}\x00".encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    for document in documents:
        digest.update(b"\x00D" + document.encode())
    key, path = digest.hexdigest(), Path(cache_dir) / REPLAY_WINDOWS_FILE
    cached = read_cached(path, key)
    if cached is not None:
        ids, ends = cached["ids"].numpy(), cached["ends"].tolist()
        return [ids[start:end] for start, end in zip([0, *ends[:-1]], ends)]
    windows = text_windows(tokenizer, documents, window)
    ends = np.cumsum([len(w) for w in windows], dtype=np.int64)
    ids = np.concatenate(windows) if windows else np.zeros(0, dtype=np.int64)
    write_cached(path, key, {"ids": torch.from_numpy(ids), "ends": torch.from_numpy(ends)})
    return windows


def bos_windows(ids: list[int], bos: list[int], window: int) -> list[list[int]]:
    """A token stream cut into windows of at most `window` ids, each led by `bos` (BOS, or nothing); a last window
    of fewer than two ids is dropped (it predicts nothing). Replay and `eval --text` cut text the same way."""
    step = window - len(bos)
    windows = [bos + ids[start : start + step] for start in range(0, len(ids), step)]
    return [w for w in windows if len(w) >= 2]


def trained_tokens(labels: np.ndarray | torch.Tensor) -> int:
    """Tokens a sample trains: labels after the first (each position predicts the next), as the Trainer counts."""
    return int((labels[1:] != IGNORE_INDEX).sum())


class ReplayMix(Dataset):
    """`instructions`, then the epoch's replay samples (`input_ids` = `labels`, no images, `replay: True`)."""

    def __init__(
        self, instructions: ConversationDataset, windows: list[np.ndarray], settings: ReplaySettings, seed: int
    ) -> None:
        if not windows:
            raise ValueError("the replay text gives no window of two or more tokens")
        self.instructions = instructions
        self.windows = windows
        share = settings.ratio / (1 - settings.ratio)
        order = _window_order(len(windows), seed)
        if settings.unit == "samples":
            self.replay = [(next(order), None) for _ in range(round(len(instructions) * share))]
        else:
            self.replay = _windows_for_tokens(windows, order, round(_instruction_tokens(instructions) * share))
        logger.info(
            "replaying %d text windows (%d trained tokens) beside %d instruction records",
            len(self.replay),
            sum(trained_tokens(self._ids(i)) for i in range(len(self.replay))),
            len(instructions),
        )

    @property
    def skips(self):
        """Records skipped while instruction samples were built (replay text is never skipped)."""
        return self.instructions.skips

    def __len__(self) -> int:
        return len(self.instructions) + len(self.replay)

    def __getitem__(self, index: int) -> dict:
        if index < len(self.instructions):
            return self.instructions[index]
        ids = torch.from_numpy(self._ids(index - len(self.instructions)).copy())
        return {"input_ids": ids, "labels": ids.clone(), "pixel_values": [], "image_tokens": [], REPLAY: True}

    def _ids(self, replay_index: int) -> np.ndarray:
        window, length = self.replay[replay_index]
        return self.windows[window][:length]


def _window_order(count: int, seed: int) -> Iterator[int]:
    """Window indices, every window once per pass, each pass in its own seeded order."""
    rng = np.random.default_rng(seed)
    while True:
        yield from rng.permutation(count).tolist()


def _windows_for_tokens(windows: list[np.ndarray], order: Iterator[int], budget: int) -> list[tuple[int, int | None]]:
    """(window, length) pairs whose trained tokens sum to exactly `budget`; the last window is cut to fit."""
    chosen: list[tuple[int, int | None]] = []
    while budget > 0:
        window = next(order)
        trains = len(windows[window]) - 1
        chosen.append((window, None if trains <= budget else budget + 1))
        budget -= min(trains, budget)
    return chosen


def _instruction_tokens(dataset: ConversationDataset) -> int:
    """Trained tokens of every instruction record as the processor encodes it (no images loaded), from the
    records' measurement (made once per run, which packing and grouping share)."""
    return int(dataset.measurement().trained.sum())
