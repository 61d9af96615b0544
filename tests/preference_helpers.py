"""Shared material for the preference tests: pairs about the demo's shapes, a saved starting run, recipe configs."""

from __future__ import annotations

import json
from pathlib import Path

from llava_lite.config_io import from_dict
from llava_lite.demo import shapes
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset
from llava_lite.train.config import TrainConfig

QUIET = {"report_to": "none", "logging_steps": 1, "save_steps": 1000, "warmup_ratio": 0.0}


def mirrored(corner: str) -> str:
    """The corner on the other side: the mistake a model that cannot tell left from right makes."""
    return corner.replace("left", "\0").replace("right", "left").replace("\0", "right")


def write_pairs(folder: Path, count: int, seed: int = 0, text_only: int = 0) -> dict[str, Path]:
    """`count` pairs in TRL's conversational format, one per shapes picture: which corner, the right one chosen and
    its mirror rejected; `text_only` more pairs without an image. Returns the pairs file and the image folder."""
    items = shapes.make_images(folder / "images", count, seed, "pair")
    rows = [
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhich corner?"}]}],
            "chosen": [{"role": "assistant", "content": item.corner}],
            "rejected": [{"role": "assistant", "content": mirrored(item.corner)}],
            "images": [item.name],
        }
        for item in items
    ]
    rows += [
        {"prompt": [{"role": "user", "content": f"What is {n} plus one?"}], "chosen": str(n + 1), "rejected": str(n)}
        for n in range(text_only)
    ]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"pairs": path, "images": folder / "images"}


def starting_run(folder: Path) -> Path:
    """A saved run to start stage 3 from (the tiny model with random weights: what matters is that it is a run)."""
    LlavaLiteModel.from_config(preset("tiny")).save_pretrained(folder)
    return folder


def preference_config(start: Path, pairs: dict[str, Path], output: Path, **sections) -> TrainConfig:
    """A `recipe: preference` config from `start` on `pairs` (`write_pairs`'s); `sections` extend or replace its
    sections."""
    raw = {
        "recipe": "preference",
        "init_from": str(start),
        "output_dir": str(output),
        "data": {"sources": [{"path": str(pairs["pairs"]), "image_folder": str(pairs["images"])}], "max_length": 128},
        "train": {**QUIET, "max_steps": 2, "batch_size": 2, "learning_rate": 1e-3},
        "finetune": {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "resume": "never",
    }
    for name, value in sections.items():
        raw[name] = {**raw[name], **value} if isinstance(raw.get(name), dict) else value
    return from_dict(TrainConfig, raw)
