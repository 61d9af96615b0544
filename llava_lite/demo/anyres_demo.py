"""Why AnyRes: a task whose answer is a detail one low-resolution view loses, learnt by the same tiny model with one
view per image and with AnyRes tiles.

Each 64 x 64 picture holds one small mark (16 x 16 pixels, on the tiles' 8-pixel patch grid) on a flat grey ground,
anywhere in it: its colour is one of four, its pattern one of three - stripes across, stripes down or checks, each
a 1-pixel weave that colours half of every 2 x 2 block. The tiny towers read 32 x 32 pixels. One view squashes the
picture to that: each 2 x 2 block becomes one pixel and every pattern the same flat 8 x 8 tint. AnyRes
(`grid_pinpoints: [[64, 64]]`) adds the four 32 x 32 quarters at full resolution, where the weave is whole.

Both runs get the same data, recipe (stage 1 on captions, stage 2 on questions), steps and seed; only
`vision_tower.image_layout` differs. Everything lands in `out`: the data, each layout's recipe configs (re-run
them with `llava-lite train`) and runs, its held-out answers, and `anyres_demo.json` with the table's numbers.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from PIL import Image

from llava_lite.data.writing import write_lines_atomically
from llava_lite.demo.pipeline import score
from llava_lite.inference.batch import generate_file
from llava_lite.inference.generator import Generator, SamplingSettings
from llava_lite.model.image_layout import image_geometry
from llava_lite.model.presets import resolve_model_config
from llava_lite.train.config import load_train_config
from llava_lite.train.run import run_training

COLOURS = {"red": (210, 40, 40), "green": (40, 150, 50), "blue": (40, 70, 210), "yellow": (230, 190, 30)}
# Coloured cells of a 2 x 2 block, as (row, column): every pattern colours half of each block, so a 2x squash
# (and any symmetric filter at that scale) leaves the same flat tint whatever the pattern.
PATTERNS = {"stripes across": ((0, 0), (0, 1)), "stripes down": ((0, 0), (1, 0)), "checks": ((0, 0), (1, 1))}
QUESTIONS = {
    "colour": ("What colour is the mark?", COLOURS),
    "pattern": ("What pattern does the mark have?", PATTERNS),
}
LAYOUTS = ("single", "anyres")
SIZE = 64  # pixels a side; the tiny towers read 32
MARK = 16  # pixels a side: 2 x 2 of the tiles' patches
GROUND = 215
PATCH = 8  # the tiny towers' patch: the mark is drawn inside one, as a whole weave


@dataclass
class AnyResDemoSettings:
    out: Path
    train_images: int = 800
    eval_images: int = 120
    stage1_steps: int = 100
    stage2_steps: int = 1500
    batch_size: int = 8
    learning_rate: float = 3e-3
    preset: str = "tiny"
    seed: int = 0


@dataclass
class LayoutResult:
    layout: str
    tokens_per_image: int
    seconds: float  # stage 1 and stage 2 training
    accuracy: dict[str, float]


def draw(colour: str, pattern: str, rng: random.Random) -> Image.Image:
    pixels = [(GROUND,) * 3] * (SIZE * SIZE)
    ink = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    # On the tiles' patch grid (so also on the 2 x 2 blocks one view averages).
    top, left = rng.randrange(0, SIZE - MARK + 1, PATCH), rng.randrange(0, SIZE - MARK + 1, PATCH)
    cells = PATTERNS[pattern]
    phase_y, phase_x = rng.randrange(2), rng.randrange(2)  # which edge a stripe runs along: no side is a clue
    for y in range(MARK):
        for x in range(MARK):
            if ((y + phase_y) % 2, (x + phase_x) % 2) in cells:
                pixels[(top + y) * SIZE + left + x] = ink
    image = Image.new("RGB", (SIZE, SIZE))
    image.putdata(pixels)
    return image


def make_images(folder: Path, count: int, seed: int, prefix: str) -> list[dict]:
    """`count` pictures under `folder`, each with its name and answers (colour and pattern balanced by turns)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for index in range(count):
        colour, pattern = rng.choice(list(COLOURS)), rng.choice(list(PATTERNS))
        name = f"{prefix}_{index:05d}.png"
        draw(colour, pattern, rng).save(folder / name)
        items.append({"name": name, "colour": colour, "pattern": pattern})
    return items


def build_dataset(folder: Path, settings: AnyResDemoSettings) -> dict[str, Path]:
    images = folder / "images"
    train = make_images(images, settings.train_images, settings.seed, "train")
    held_out = make_images(images, settings.eval_images, settings.seed + 1, "eval")
    rng = random.Random(settings.seed)
    captions, questions = [], []
    for item in train:
        caption = f"A {item['colour']} mark with {item['pattern']}."
        captions.append(_record(item["name"], [("Describe the image briefly.", caption)]))
        kinds = list(QUESTIONS)
        rng.shuffle(kinds)
        questions.append(_record(item["name"], [(QUESTIONS[kind][0], item[kind]) for kind in kinds]))
    evaluation = [
        {"id": f"{item['name']}:{kind}", "image": item["name"], "prompt": question, "reference": item[kind]}
        for item in held_out
        for kind, (question, _) in QUESTIONS.items()
    ]
    paths = {"captions": folder / "captions.json", "questions": folder / "questions.json"}
    write_lines_atomically(paths["captions"], [json.dumps(captions, indent=1)])
    write_lines_atomically(paths["questions"], [json.dumps(questions, indent=1)])
    write_lines_atomically(folder / "eval.jsonl", [json.dumps(row) for row in evaluation])
    return {**paths, "eval": folder / "eval.jsonl", "images": images}


def _record(name: str, turns: list[tuple[str, str]]) -> dict:
    conversations = []
    for number, (question, answer) in enumerate(turns):
        conversations.append({"from": "human", "value": f"<image>\n{question}" if number == 0 else question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": name, "image": name, "conversations": conversations}


def model_spec(layout: str, settings: AnyResDemoSettings) -> dict:
    """The model both runs train: the preset, with one view per image or AnyRes on a 2 x 2 grid of tiles."""
    tower = {"image_layout": layout}
    if layout == "anyres":
        tower["grid_pinpoints"] = [[SIZE, SIZE]]
    return {"preset": settings.preset, "vision_tower": tower}


def recipes(layout: str, data: dict[str, Path], settings: AnyResDemoSettings) -> dict[str, dict]:
    run = settings.out / layout
    images = str(data["images"])
    common = {
        "batch_size": settings.batch_size,
        "logging_steps": 25,
        "save_steps": 100000,
        "report_to": "none",
    }
    stage1 = {
        "recipe": "stage1",
        "model": model_spec(layout, settings),
        "output_dir": str(run / "stage1"),
        "data": {"sources": [{"path": str(data["captions"]), "image_folder": images}], "max_length": 256},
        "train": {**common, "max_steps": settings.stage1_steps},
        "seed": settings.seed,
    }
    stage2 = {
        "recipe": "stage2",
        "init_from": str(run / "stage1"),
        "output_dir": str(run / "stage2"),
        "data": {"sources": [{"path": str(data["questions"]), "image_folder": images}], "max_length": 256},
        "train": {**common, "max_steps": settings.stage2_steps, "learning_rate": settings.learning_rate},
        "seed": settings.seed,
    }
    return {"stage1": stage1, "stage2": stage2}


def train_layout(layout: str, data: dict[str, Path], settings: AnyResDemoSettings, log=print) -> LayoutResult:
    run = settings.out / layout
    run.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for stage, recipe in recipes(layout, data, settings).items():
        path = run / f"{stage}.yaml"
        write_lines_atomically(path, [yaml.safe_dump(recipe, sort_keys=False)])
        log(f"{layout}: {stage} (llava-lite train {path})")
        run_training(load_train_config(path, ["resume=never"]))
    seconds = time.monotonic() - started
    log(f"{layout}: answering the held-out questions")
    generator = Generator.from_folder(run / "stage2", device="cpu")
    answers = run / "held_out_answers.jsonl"
    generate_file(generator, data["eval"], answers, SamplingSettings(max_new_tokens=8), data["images"], 32, True)
    config = resolve_model_config(model_spec(layout, settings))
    tokens = image_geometry(config).tokens_for(Image.new("RGB", (SIZE, SIZE)))
    return LayoutResult(layout, tokens, seconds, score(answers))


def run_anyres_demo(settings: AnyResDemoSettings, log=print) -> list[LayoutResult]:
    settings.out.mkdir(parents=True, exist_ok=True)
    log(f"drawing {settings.train_images} training and {settings.eval_images} held-out pictures")
    data = build_dataset(settings.out / "data", settings)
    results = [train_layout(layout, data, settings, log) for layout in LAYOUTS]
    write_lines_atomically(settings.out / "anyres_demo.json", [json.dumps([asdict(r) for r in results], indent=2)])
    return results


def chance(kind: str) -> float:
    return 1.0 / len(QUESTIONS[kind][1])


def table(results: list[LayoutResult]) -> str:
    """The results as a Markdown table, one layout a row, and chance as the last."""
    kinds = list(QUESTIONS)
    rows = [
        "| layout | tokens per image | train time | " + " | ".join(f"{kind} accuracy" for kind in kinds) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in kinds) + " |",
    ]
    for r in results:
        cells = " | ".join(f"{r.accuracy.get(kind, 0.0):.0%}" for kind in kinds)
        rows.append(f"| {r.layout} | {r.tokens_per_image} | {r.seconds:.0f} s | {cells} |")
    rows.append("| chance | | | " + " | ".join(f"{chance(kind):.0%}" for kind in kinds) + " |")
    return "\n".join(rows)
