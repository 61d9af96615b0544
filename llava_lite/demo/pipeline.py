"""The offline demo, end to end: synthetic data, stage 1, stage 2, held-out accuracy against chance, a chat turn.

It uses only what a user uses: recipe configs written to the run folder (so each stage can be re-run with
`llava-lite train`), the trainer, the batch generator and a chat session.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from llava_lite.data.conversation import IMAGE_PLACEHOLDER
from llava_lite.demo import shapes
from llava_lite.inference.batch import generate_file
from llava_lite.inference.chat import ChatSession
from llava_lite.inference.generator import Generator, SamplingSettings
from llava_lite.train.config import load_train_config
from llava_lite.train.run import run_training


@dataclass
class DemoSettings:
    out: Path
    train_images: int = 800
    eval_images: int = 100
    text_records: int = 200
    stage1_epochs: float = 2.0
    stage2_epochs: float = 16.0
    seed: int = 0


@dataclass
class DemoResult:
    accuracy: dict[str, float]
    chance: dict[str, float]
    chat_question: str
    chat_answer: str
    seconds: float


def demo_recipes(out: Path, settings: DemoSettings | None = None) -> dict[str, dict]:
    """The two recipe configs the demo trains with (also shipped as configs/demo_stage{1,2}.yaml)."""
    settings = settings or DemoSettings(out)
    data = out / "data"
    images = str(data / "images")
    # A checkpoint every quarter of each stage (100 and 2,000 steps at the default sizes), as every shipped recipe
    # has: a killed demo continues where it stopped when run again.
    common = {"batch_size": 16, "logging_steps": 25, "save_total_limit": 1, "report_to": "none"}
    stage1 = {
        "recipe": "stage1",
        "model": "tiny",
        "output_dir": str(out / "stage1"),
        "data": {"sources": [{"path": str(data / "captions.json"), "image_folder": images}], "max_length": 256},
        "train": {**common, "save_steps": 25, "epochs": settings.stage1_epochs},
        "seed": settings.seed,
    }
    stage2 = {
        "recipe": "stage2",
        "init_from": str(out / "stage1"),
        "output_dir": str(out / "stage2"),
        "data": {
            "sources": [
                {"path": str(data / "questions.json"), "image_folder": images},
                {"path": str(data / "text_only.json")},
            ],
            "max_length": 256,
        },
        # A 2-layer LM trained from random weights needs a far larger step than LLaVA's 2e-5 for a pretrained one.
        # It tells top from bottom early but left from right (which column of the 4x4 image tokens holds the
        # shape) only after a plateau of some hundreds of steps: 3e-3 (not 1e-3) and batches of 8 (twice the
        # steps, in about the same time on a CPU) get past it well before the cosine schedule has decayed.
        "train": {
            **common,
            "save_steps": 500,
            "epochs": settings.stage2_epochs,
            "learning_rate": 3e-3,
            "batch_size": 8,
        },
        "seed": settings.seed,
    }
    return {"stage1": stage1, "stage2": stage2}


def run_demo(settings: DemoSettings, log=print) -> DemoResult:
    started = time.monotonic()
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    log(f"[1/5] drawing {settings.train_images} training and {settings.eval_images} held-out images in {out}/data")
    paths = shapes.build_dataset(
        out / "data", settings.train_images, settings.eval_images, settings.text_records, settings.seed
    )
    recipes = demo_recipes(out, settings)
    for step, stage in ((2, "stage1"), (3, "stage2")):
        config_path = out / f"{stage}.yaml"
        config_path.write_text(yaml.safe_dump(recipes[stage], sort_keys=False), encoding="utf-8")
        what = "projector on captions" if stage == "stage1" else "projector + LM on questions and text"
        log(f"[{step}/5] {stage}: training the {what} (llava-lite train {config_path})")
        run_training(load_train_config(config_path, ["resume=never"]))

    log("[4/5] answering the held-out questions (llava-lite generate)")
    generator = Generator.from_folder(out / "stage2", device="cpu")
    answers_path = out / "held_out_answers.jsonl"
    generate_file(
        generator, paths["eval"], answers_path, SamplingSettings(max_new_tokens=8), paths["images"], 32, overwrite=True
    )
    accuracy = score(answers_path)
    chance = {attribute: shapes.chance(attribute) for attribute in shapes.QUESTIONS}

    log("[5/5] a chat turn about a held-out image (llava-lite chat)")
    session = ChatSession(generator, SamplingSettings(max_new_tokens=8))
    first = json.loads(paths["eval"].read_text(encoding="utf-8").splitlines()[0])
    session.set_image(paths["images"] / first["image"])
    question = shapes.QUESTIONS["colour"][0]
    answer = "".join(session.ask(question))
    return DemoResult(accuracy, chance, f"{IMAGE_PLACEHOLDER} {question}", answer, time.monotonic() - started)


def score(answers_path: Path) -> dict[str, float]:
    """Exact-match accuracy per attribute (case and a final full stop ignored)."""
    right: dict[str, list[bool]] = {}
    for line in answers_path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        attribute = row["id"].rsplit(":", 1)[1]
        right.setdefault(attribute, []).append(_normal(row["answer"]) == _normal(row["reference"]))
    return {attribute: sum(marks) / len(marks) for attribute, marks in right.items()}


def _normal(text: str) -> str:
    return text.strip().lower().rstrip(".")


def report(result: DemoResult) -> str:
    rows = [f"{'question':<10} {'accuracy':>9} {'chance':>8}"]
    for attribute, value in result.accuracy.items():
        rows.append(f"{attribute:<10} {value:>9.0%} {result.chance[attribute]:>8.0%}")
    mean = sum(result.accuracy.values()) / len(result.accuracy)
    mean_chance = sum(result.chance.values()) / len(result.chance)
    rows.append(f"{'all':<10} {mean:>9.0%} {mean_chance:>8.0%}")
    rows.append("")
    rows.append(f"you> {result.chat_question}")
    rows.append(f"assistant> {result.chat_answer}")
    rows.append(f"\n(demo finished in {result.seconds / 60:.1f} minutes)")
    return "\n".join(rows)
