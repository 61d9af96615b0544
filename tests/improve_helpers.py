"""Shared material for the self-improvement loop's tests: a saved tiny run and shapes prompts with references."""

from __future__ import annotations

import json
from pathlib import Path

from llava_lite.demo import shapes
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset

CORNER_QUESTION = shapes.QUESTIONS["corner"][0]


def tiny_run(folder: Path) -> Path:
    """A saved run of the tiny model with random weights: its answers are noise, which is all sampling needs."""
    LlavaLiteModel.from_config(preset("tiny")).save_pretrained(folder)
    return folder


def corner_prompts(folder: Path, count: int, seed: int = 0, name: str = "prompts.jsonl") -> dict[str, Path]:
    """`count` shapes pictures and one `generate` line per picture asking its corner, the true one as `reference`."""
    items = shapes.make_images(folder / "images", count, seed, f"p{seed}")
    rows = [
        {"id": item.name, "image": item.name, "prompt": CORNER_QUESTION, "reference": item.corner, "category": "corner"}
        for item in items
    ]
    path = folder / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"prompts": path, "images": folder / "images"}


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
