"""The self-improvement loop doing its job on the shapes task: a stage-2 model left weak on one question kind gets
better at it over rounds of its own answers, scored against the known answers.

Stage 2 (from the tiny preset, projector and LM together, no stage 1) learns from the shapes conversations with the
corner question asked of only one picture in `corner_every`: it answers colour and shape well and the corner poorly
(near chance, sometimes with a colour). `llava-lite improve` then runs rounds on the training pictures' questions,
all three kinds (the kinds it knows keep it from forgetting them): 4 sampled answers per question, the `reference`
scorer (exact match with the true answer), and training from the last round's run - SFT on its own right answers
(rejection sampling) by default, or stage 3 on pairs of its own right and wrong answers (DPO with an NLL term on the
chosen). After each round the held-out pictures' questions are answered greedily and scored per kind: the table
shows the corner rising from round 0.

Everything lands in `out`: the data, stage 2's config and run, the loop's config (`improve.yaml`, re-run it with
`llava-lite improve`) and its rounds, and `improve_demo.json` with the accuracies per round and kind.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from llava_lite.config_io import from_dict
from llava_lite.demo import shapes
from llava_lite.improve.config import ImproveConfig
from llava_lite.improve.loop import run_improve
from llava_lite.train.config import load_train_config
from llava_lite.train.run import run_training

WEAK = "corner"


@dataclass
class ImproveDemoSettings:
    out: Path
    train_images: int = 160
    eval_images: int = 40
    corner_every: int = 8  # stage 2 sees the corner question of one picture in this many
    stage2_steps: int = 300
    rounds: int = 3
    samples: int = 4
    round_steps: int = 120
    recipe: str = "stage2"  # stage2: SFT on the best answers; preference: DPO on the pairs
    seed: int = 0


@dataclass
class ImproveDemoResult:
    accuracy: list[dict[str, float]]  # per round (0: stage 2), held-out accuracy per kind
    pairs: list[int]
    sft_records: list[int]
    chance: dict[str, float]
    seconds: dict[str, float]


def weak_questions(questions: list[dict], every: int, kind: str = WEAK) -> list[dict]:
    """The stage-2 conversations with `kind`'s question (the weak kind's) kept for one picture in `every` only."""
    question = shapes.QUESTIONS[kind][0]
    records = []
    for number, record in enumerate(questions):
        turns = record["conversations"]
        pairs = [(q["value"].replace("<image>\n", ""), a) for q, a in zip(turns[::2], turns[1::2])]
        if number % every:
            pairs = [(q, a) for q, a in pairs if q != question]
        conversation = []
        for index, (q, a) in enumerate(pairs):
            conversation += [{"from": "human", "value": f"<image>\n{q}" if index == 0 else q}, a]
        records.append({**record, "conversations": conversation})
    return records


def build_data(out: Path, settings: ImproveDemoSettings) -> dict[str, Path]:
    data = out / "data"
    paths = shapes.build_dataset(data, settings.train_images, settings.eval_images, 0, settings.seed)
    questions = json.loads(paths["questions"].read_text(encoding="utf-8"))
    paths["weak"] = shapes.write_json(data / "questions_weak.json", weak_questions(questions, settings.corner_every))
    # The loop's prompts: every training picture's three questions, the true answers as references. The kinds it
    # already answers well are asked too: their right answers, trained on again, keep them (SFT on the weak kind
    # alone makes it answer every question with a corner).
    prompts = [
        {"id": f"{record['id']}:{kind}", "image": record["image"], "prompt": question, "reference": answer}
        for record in questions
        for q, answer_turn in zip(record["conversations"][::2], record["conversations"][1::2])
        for kind, (question, _) in shapes.QUESTIONS.items()
        if q["value"].endswith(question)
        for answer in [answer_turn["value"]]
    ]
    paths["prompts"] = _jsonl(data / "prompts.jsonl", prompts)
    held_out = [json.loads(line) for line in paths["eval"].read_text(encoding="utf-8").splitlines()]
    paths["held_out"] = _jsonl(
        data / "held_out.jsonl", [{**r, "category": r["id"].rsplit(":", 1)[1]} for r in held_out]
    )
    return paths


def stage2_recipe(out: Path, paths: dict[str, Path], settings: ImproveDemoSettings) -> dict:
    return {
        "recipe": "stage2",
        "model": "tiny",
        "output_dir": str(out / "stage2"),
        "data": {"sources": [{"path": str(paths["weak"]), "image_folder": str(paths["images"])}], "max_length": 256},
        # As the shapes demo's stage 2: a large step for a 2-layer LM trained from random weights.
        "train": {
            "max_steps": settings.stage2_steps,
            "batch_size": 8,
            "learning_rate": 3e-3,
            "logging_steps": 25,
            "save_steps": 100000,
            "report_to": "none",
        },  # fmt: skip
        "seed": settings.seed,
    }


def improve_recipe(out: Path, paths: dict[str, Path], settings: ImproveDemoSettings) -> dict:
    train = {
        "max_steps": settings.round_steps, "batch_size": 8, "learning_rate": 1e-3, "warmup_ratio": 0.1,
        "logging_steps": 10, "save_steps": 20, "save_total_limit": 1, "report_to": "none",
    }  # fmt: skip
    recipe: dict = {"recipe": settings.recipe, "data": {"max_length": 128}, "train": train, "seed": settings.seed}
    if settings.recipe == "preference":
        recipe["finetune"] = {"method": "full"}
        recipe["preference"] = {"loss": "sigmoid", "beta": 0.1, "sft_weight": 1.0}
    return {
        "start": str(out / "stage2"),
        "output_dir": str(out / "improve"),
        "prompts": str(paths["prompts"]),
        "image_folder": str(paths["images"]),
        "rounds": settings.rounds,
        "sample": {
            "samples": settings.samples,
            "temperature": 1.0,
            "max_new_tokens": 8,
            "batch_size": 32,
            "seed": settings.seed,
        },  # fmt: skip
        "score": {"scorer": "reference", "match": "exact"},
        # SFT keeps only right answers; the pairs are its own right answer against its own wrong one.
        "pairs": {"mode": "best_worst", "sft_min_score": 1.0},
        "train": recipe,
        "eval": {"held_out": str(paths["held_out"]), "metric": f"held_out.by_category.{WEAK}", "max_new_tokens": 8},
        "patience": settings.rounds,  # every round, so the table shows them all
    }


def run_improve_demo(settings: ImproveDemoSettings, log=print) -> ImproveDemoResult:
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    log(f"drawing {settings.train_images} training and {settings.eval_images} held-out pictures in {out}/data")
    paths = build_data(out, settings)
    seconds: dict[str, float] = {}
    config_path = out / "stage2.yaml"
    config_path.write_text(yaml.safe_dump(stage2_recipe(out, paths, settings), sort_keys=False), encoding="utf-8")
    log(f"stage 2, the corner asked of one picture in {settings.corner_every}: llava-lite train {config_path}")
    started = time.monotonic()
    run_training(load_train_config(config_path))
    seconds["stage2"] = time.monotonic() - started
    raw = improve_recipe(out, paths, settings)
    loop_path = out / "improve.yaml"
    loop_path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    log(f"the loop: llava-lite improve {loop_path}")
    started = time.monotonic()
    rows = run_improve(from_dict(ImproveConfig, raw, str(loop_path)), log=log)
    seconds["loop"] = time.monotonic() - started
    result = ImproveDemoResult(
        [row.results["held_out"]["by_category"] for row in rows],
        [row.pairs for row in rows],
        [row.sft_records for row in rows],
        {kind: shapes.chance(kind) for kind in shapes.QUESTIONS},
        seconds,
    )
    (out / "improve_demo.json").write_text(json.dumps(asdict(result), indent=2), encoding="utf-8")
    return result


def report(result: ImproveDemoResult) -> str:
    kinds = list(shapes.QUESTIONS)
    rows = [f"{'round':>5}  {'pairs':>5}  {'sft':>4}  " + "  ".join(f"{k:>7}" for k in kinds)]
    for number, accuracy in enumerate(result.accuracy):
        cells = "  ".join(f"{accuracy[k]:>7.0%}" for k in kinds)
        rows.append(f"{number:>5}  {result.pairs[number]:>5}  {result.sft_records[number]:>4}  {cells}")
    rows.append(f"{'chance':>19}  " + "  ".join(f"{result.chance[k]:>7.0%}" for k in kinds))
    rows.append("seconds: " + ", ".join(f"{name} {s:.0f}" for name, s in result.seconds.items()))
    return "\n".join(rows)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
