"""Stage 3 doing its job on the shapes task: a stage-2 model with a systematic error, corrected by preference tuning
on pairs whose rejected answer is its kind of mistake.

The error is taught by the data, as real data teaches it: stage 2 learns from questions whose corner answers are
upside down, top for bottom - what a vertical-flip augmentation that does not flip the text leaves behind. The
model then answers "bottom left" for a shape in the top left, confidently: its held-out corner accuracy is near
zero while colour and shape are learnt. (Top from bottom is what the tiny model learns early; left from right only
after a long plateau, see the README's demo section, so a short stage 2 answers left and right by chance.) Stage 3
(`recipe: preference`, DPO) tunes it on pairs about its own training pictures: "Which corner is the shape in?",
the true corner chosen, the same corner upside down (the model's mistake) rejected. The held-out pictures are
answered before and after (`llava-lite generate`) and scored per question, the corner's top/bottom half on its own
too; the held-out pairs are scored against the stage-2 model (`llava-lite eval --preference`).

Everything lands in `out`: the data, the three recipe configs (re-run them with `llava-lite train`), the runs,
the held-out answers of both stages and `preference_demo.json` with the table's numbers.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from llava_lite.data.writing import write_lines_atomically
from llava_lite.demo import shapes
from llava_lite.demo.pipeline import DemoSettings, demo_recipes, score
from llava_lite.eval.preference import evaluate_preference
from llava_lite.inference.batch import generate_file
from llava_lite.inference.generator import Generator, SamplingSettings
from llava_lite.train.config import load_train_config
from llava_lite.train.run import run_training

CORNER_QUESTION = shapes.QUESTIONS["corner"][0]
TOP_OR_BOTTOM = "corner: top/bottom"  # the corner answer's first word alone: the half stage 2 learnt upside down


@dataclass
class PreferenceDemoSettings:
    out: Path
    train_images: int = 800
    eval_images: int = 100
    text_records: int = 200
    stage1_epochs: float = 2.0
    stage2_epochs: float = 4.0
    stage3_steps: int = 120
    stage3_batch_size: int = 8
    stage3_learning_rate: float = 2e-4
    beta: float = 0.1
    seed: int = 0


@dataclass
class PreferenceDemoResult:
    before: dict[str, float]  # held-out accuracy per question, stage 2
    after: dict[str, float]  # and after stage 3
    chance: dict[str, float]
    held_out_pairs: dict  # eval --preference of the stage-3 run against the stage-2 one
    seconds: dict[str, float]


def upside_down(corner: str) -> str:
    """The corner at the other end, top for bottom."""
    return corner.replace("top", "\0").replace("bottom", "top").replace("\0", "bottom")


def corner_pairs(questions: list[dict]) -> list[dict]:
    """TRL's conversational preference rows, one per picture: which corner, the truth chosen, upside down rejected."""
    rows = []
    for record in questions:
        turns = record["conversations"]
        corner = next(a["value"] for q, a in zip(turns[::2], turns[1::2]) if q["value"].endswith(CORNER_QUESTION))
        rows.append(
            {
                "prompt": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"\n{CORNER_QUESTION}"}]}
                ],
                "chosen": [{"role": "assistant", "content": corner}],
                "rejected": [{"role": "assistant", "content": upside_down(corner)}],
                "images": [record["image"]],
            }
        )
    return rows


def with_flipped_corners(questions: list[dict]) -> list[dict]:
    """The question records as a text-blind vertical flip leaves them: every corner answer upside down."""
    flipped = json.loads(json.dumps(questions))
    for record in flipped:
        turns = record["conversations"]
        for question, answer in zip(turns[::2], turns[1::2]):
            if question["value"].endswith(CORNER_QUESTION):
                answer["value"] = upside_down(answer["value"])
    return flipped


def build_data(out: Path, settings: PreferenceDemoSettings) -> dict[str, Path]:
    paths = shapes.build_dataset(
        out / "data", settings.train_images, settings.eval_images, settings.text_records, settings.seed
    )
    questions = json.loads(paths["questions"].read_text(encoding="utf-8"))
    paths["flipped"] = shapes.write_json(out / "data" / "questions_flipped.json", with_flipped_corners(questions))
    paths["pairs"] = out / "data" / "corner_pairs.jsonl"
    write_lines_atomically(paths["pairs"], [json.dumps(row) for row in corner_pairs(questions)])
    # Held-out pairs: the held-out pictures, asked the same question.
    held_out = [json.loads(line) for line in paths["eval"].read_text(encoding="utf-8").splitlines()]
    held_out = [r for r in held_out if r["id"].endswith(":corner")]
    rows = [
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"\n{r['prompt']}"}]}],
            "chosen": [{"role": "assistant", "content": r["reference"]}],
            "rejected": [{"role": "assistant", "content": upside_down(r["reference"])}],
            "images": [r["image"]],
        }
        for r in held_out
    ]
    paths["held_out_pairs"] = out / "data" / "held_out_corner_pairs.jsonl"
    write_lines_atomically(paths["held_out_pairs"], [json.dumps(row) for row in rows])
    return paths


def recipes(out: Path, paths: dict[str, Path], settings: PreferenceDemoSettings) -> dict[str, dict]:
    """Stage 1 and 2 as the demo trains them (stage 2 on the flipped corners, shorter), and stage 3 on the pairs."""
    base = demo_recipes(
        out,
        DemoSettings(
            out, stage1_epochs=settings.stage1_epochs, stage2_epochs=settings.stage2_epochs, seed=settings.seed
        ),
    )
    base["stage2"]["data"]["sources"][0]["path"] = str(paths["flipped"])
    stage3 = {
        "recipe": "preference",
        "init_from": str(out / "stage2"),
        "output_dir": str(out / "stage3"),
        "data": {"sources": [{"path": str(paths["pairs"]), "image_folder": str(paths["images"])}], "max_length": 256},
        "finetune": {"method": "full"},
        "preference": {"loss": "sigmoid", "beta": settings.beta, "sft_weight": 0.0},  # as its README table was measured
        "train": {
            "max_steps": settings.stage3_steps,
            "batch_size": settings.stage3_batch_size,
            "learning_rate": settings.stage3_learning_rate,
            "warmup_ratio": 0.1,
            "logging_steps": 10,
            "save_steps": 100000,
            "report_to": "none",
        },
        "seed": settings.seed,
    }
    return {"stage1": base["stage1"], "stage2": base["stage2"], "stage3": stage3}


def run_preference_demo(settings: PreferenceDemoSettings, log=print) -> PreferenceDemoResult:
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    log(f"drawing {settings.train_images} training and {settings.eval_images} held-out pictures in {out}/data")
    paths = build_data(out, settings)
    configs = recipes(out, paths, settings)
    seconds: dict[str, float] = {}
    accuracy: dict[str, dict[str, float]] = {}
    for stage in ("stage1", "stage2", "stage3"):
        config_path = out / f"{stage}.yaml"
        config_path.write_text(yaml.safe_dump(configs[stage], sort_keys=False), encoding="utf-8")
        log(f"{stage}: llava-lite train {config_path}")
        started = time.monotonic()
        run_training(load_train_config(config_path, ["resume=never"]))
        seconds[stage] = time.monotonic() - started
        if stage != "stage1":
            accuracy[stage] = held_out_accuracy(out / stage, paths, out / f"{stage}_answers.jsonl")
            log(f"{stage}: held-out accuracy {accuracy[stage]}")
    held_out_pairs = evaluate_preference(
        out / "stage3",
        paths["held_out_pairs"],
        lambda folder: Generator.from_folder(folder, "cpu").model,
        paths["images"],
        progress=False,
    )
    result = PreferenceDemoResult(
        accuracy["stage2"],
        accuracy["stage3"],
        {**{a: shapes.chance(a) for a in shapes.QUESTIONS}, TOP_OR_BOTTOM: 0.5},
        held_out_pairs,
        seconds,
    )
    (out / "preference_demo.json").write_text(json.dumps(asdict(result), indent=2), encoding="utf-8")
    return result


def held_out_accuracy(run: Path, paths: dict[str, Path], answers: Path) -> dict[str, float]:
    """Exact-match accuracy per question of `run` on the held-out pictures, and of the corner's top/bottom word."""
    generator = Generator.from_folder(run, device="cpu")
    settings = SamplingSettings(max_new_tokens=8)
    generate_file(generator, paths["eval"], answers, settings, paths["images"], 32, overwrite=True)
    rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    halves = [_words(r["answer"])[:1] == _words(r["reference"])[:1] for r in rows if r["id"].endswith(":corner")]
    return {**score(answers), TOP_OR_BOTTOM: sum(halves) / max(len(halves), 1)}


def _words(text: str) -> list[str]:
    return text.strip().lower().rstrip(".").split()


def report(result: PreferenceDemoResult) -> str:
    rows = [f"{'question':<18} {'stage 2':>8} {'stage 3':>8} {'chance':>7}"]
    for attribute in (*shapes.QUESTIONS, TOP_OR_BOTTOM):
        before, after = result.before[attribute], result.after[attribute]
        rows.append(f"{attribute:<18} {before:>8.0%} {after:>8.0%} {result.chance[attribute]:>7.0%}")
    pairs = result.held_out_pairs
    rows.append(
        f"\nheld-out corner pairs ({pairs['pairs']}): stage 3 prefers the true corner to it upside down in "
        f"{pairs['accuracy']:.0%} against stage 2 (mean margin {pairs['mean_margin']:.2f} nats)"
    )
    rows.append("training: " + ", ".join(f"{stage} {s:.0f} s" for stage, s in result.seconds.items()))
    return "\n".join(rows)
