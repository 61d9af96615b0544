"""A small synthetic image task the demo can learn on a CPU: one coloured shape in one corner of a picture.

Each image has three attributes - colour, shape, corner - so every question has a known answer and a
known chance level. Written as LLaVA records: captions for stage 1, question-answer conversations for
stage 2, a few text-only records mixed in, and held-out questions for evaluation.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 210, 20)}
SHAPES = ("circle", "square", "triangle")
CORNERS = ("top left", "top right", "bottom left", "bottom right")
QUESTIONS = {
    "colour": ("What colour is the shape?", COLOURS),
    "shape": ("What shape is in the picture?", SHAPES),
    "corner": ("Which corner is the shape in?", CORNERS),
}
SIZE = 64


@dataclass(frozen=True)
class ShapeImage:
    name: str
    colour: str
    shape: str
    corner: str

    def answer(self, attribute: str) -> str:
        return getattr(self, attribute)

    @property
    def caption(self) -> str:
        return f"A {self.colour} {self.shape} in the {self.corner} corner."


def draw(item: ShapeImage, rng: random.Random) -> Image.Image:
    grey = rng.randint(225, 255)
    image = Image.new("RGB", (SIZE, SIZE), (grey, grey, grey))
    pen = ImageDraw.Draw(image)
    half = SIZE // 2
    radius = rng.randint(9, 13)
    cx = (half // 2 if "left" in item.corner else half + half // 2) + rng.randint(-3, 3)
    cy = (half // 2 if "top" in item.corner else half + half // 2) + rng.randint(-3, 3)
    colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[item.colour])
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if item.shape == "circle":
        pen.ellipse(box, fill=colour)
    elif item.shape == "square":
        pen.rectangle(box, fill=colour)
    else:
        pen.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    return image


def make_images(folder: Path, count: int, seed: int, prefix: str) -> list[ShapeImage]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for index in range(count):
        item = ShapeImage(
            f"{prefix}_{index:05d}.png", rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(CORNERS)
        )
        draw(item, rng).save(folder / item.name)
        items.append(item)
    return items


def caption_records(items: list[ShapeImage]) -> list[dict]:
    return [
        {
            "id": item.name,
            "image": item.name,
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image briefly."},
                {"from": "gpt", "value": item.caption},
            ],
        }
        for item in items
    ]


def question_records(items: list[ShapeImage], seed: int) -> list[dict]:
    """One conversation per image: the three questions in a random order, the image in the first turn."""
    rng = random.Random(seed)
    records = []
    for item in items:
        attributes = list(QUESTIONS)
        rng.shuffle(attributes)
        turns = []
        for number, attribute in enumerate(attributes):
            question = QUESTIONS[attribute][0]
            turns.append({"from": "human", "value": f"<image>\n{question}" if number == 0 else question})
            turns.append({"from": "gpt", "value": item.answer(attribute)})
        records.append({"id": item.name, "image": item.name, "conversations": turns})
    return records


def text_only_records(count: int, seed: int) -> list[dict]:
    """Plain text instructions with no image, mixed into stage 2 as LLaVA mixes ShareGPT text."""
    rng = random.Random(seed)
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    records = []
    for index in range(count):
        a, b = rng.randint(1, 4), rng.randint(1, 4)
        records.append(
            {
                "id": f"text_{index:05d}",
                "conversations": [
                    {"from": "human", "value": f"What is {words[a - 1]} plus {words[b - 1]}?"},
                    {"from": "gpt", "value": words[a + b - 1]},
                ],
            }
        )
    return records


def eval_records(items: list[ShapeImage]) -> list[dict]:
    """Held-out questions, one per image and attribute, in the format `llava-lite generate` reads."""
    return [
        {"id": f"{item.name}:{attribute}", "image": item.name, "prompt": question, "reference": item.answer(attribute)}
        for item in items
        for attribute, (question, _) in QUESTIONS.items()
    ]


def chance(attribute: str) -> float:
    return 1.0 / len(QUESTIONS[attribute][1])


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return path


def build_dataset(folder: Path, train_images: int, eval_images: int, text_records: int, seed: int) -> dict[str, Path]:
    """Images and record files under `folder`; returns the paths of the record files by role."""
    images = folder / "images"
    train = make_images(images, train_images, seed, "train")
    held_out = make_images(images, eval_images, seed + 1, "eval")
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_records(held_out)), "utf-8")
    return {
        "captions": write_json(folder / "captions.json", caption_records(train)),
        "questions": write_json(folder / "questions.json", question_records(train, seed)),
        "text": write_json(folder / "text_only.json", text_only_records(text_records, seed)),
        "eval": folder / "eval.jsonl",
        "images": images,
    }
