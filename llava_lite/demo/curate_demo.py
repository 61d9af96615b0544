"""Curating a noisy mixture on the shapes task: the same number of records chosen by each `data select` rule, stage 2
trained on each (and on everything), held-out accuracy compared.

The mixture: the shapes conversations (three questions about each picture) and the arithmetic text-only records,
`noise` of each with every answer replaced by a wrong one of its kind (another colour, shape, corner or number - as
an annotator who did not look would write), and `duplicates` of the records copied under new ids. A short stage-2
run on the whole mixture (`probe_steps`) rates every record (`data rate`: answer loss, IFD), then each rule keeps
`keep` of the records (`data select --by loss`, `ifd`, `diverse`, `random`), and stage 2 trains from the tiny preset
on each choice - and on everything - for the same `stage2_steps` steps, with the same seed. The held-out pictures'
questions are answered greedily (`llava-lite generate`) and scored per kind.

Everything lands in `out`: the data (`data/mixture.json`, its `corrupted.json`, the rated file, each selection
and its summary), the runs, and `curate_demo.json` with the table's numbers.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from llava_lite.curate.rate import load_run, rate_with_model
from llava_lite.curate.records import read_curate_records
from llava_lite.curate.select import SelectSettings, select_file
from llava_lite.curate.signals import SignalScorer
from llava_lite.data.writing import write_records
from llava_lite.demo import shapes
from llava_lite.demo.pipeline import score
from llava_lite.inference.batch import generate_file
from llava_lite.inference.generator import Generator, SamplingSettings
from llava_lite.train.config import load_train_config
from llava_lite.train.run import run_training

RULES = ("loss", "ifd", "diverse", "random")
WRONG_NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class CurateDemoSettings:
    out: Path
    train_images: int = 240
    eval_images: int = 80  # 240 held-out questions: answering them takes seconds
    text_records: int = 60
    noise: float = 0.3  # the share of records whose answers are all wrong
    duplicates: float = 0.1  # the share of records copied once more under a new id
    keep: float = 0.6  # the share every rule keeps
    min_distance: float = 0.001  # diverse: the tiny LM's mean hidden states are close (median to the nearest: 0.0012)
    probe_steps: int = 400  # the short run that rates the mixture
    stage2_steps: int = 600
    rules: tuple[str, ...] = RULES
    train_on_all: bool = True  # also stage 2 on the whole mixture (the table's first row)
    seed: int = 0


@dataclass
class TrainedOn:
    name: str  # "all", or the rule
    records: int
    corrupted: int  # of them, records with wrong answers
    copies: int  # of them, copies of another record
    accuracy: dict[str, float]  # held-out, per kind
    seconds: float


@dataclass
class CurateDemoResult:
    rows: list[TrainedOn]
    precision: dict[str, float] = field(default_factory=dict)  # per rule: the share of its dropped that were wrong
    recall: dict[str, float] = field(default_factory=dict)  # per rule: the share of the wrong it dropped
    chance: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


# ----- the mixture ----------------------------------------------------------------------------------------------


def corrupted(record: dict, rng: random.Random) -> dict:
    """`record` with every answer replaced by a wrong one of the same kind."""
    turns = [dict(turn) for turn in record["conversations"]]
    for question, answer in zip(turns[::2], turns[1::2]):
        answer["value"] = rng.choice([v for v in _answers_like(question["value"]) if v != answer["value"]])
    return {**record, "conversations": turns}


def _answers_like(question: str) -> tuple[str, ...]:
    for text, answers in shapes.QUESTIONS.values():
        if question.endswith(text):
            return tuple(answers)
    return WRONG_NUMBERS  # the arithmetic records


def build_mixture(data: Path, settings: CurateDemoSettings) -> dict[str, Path]:
    """The shapes data under `data`, and `mixture.json` (records marked by `source`) with `corrupted.json`: the ids
    whose answers are wrong and the ids that are copies."""
    paths = shapes.build_dataset(data, settings.train_images, settings.eval_images, 0, settings.seed)
    questions = json.loads(paths["questions"].read_text(encoding="utf-8"))
    records = [{**r, "source": "shapes"} for r in questions]
    records += [{**r, "source": "arithmetic"} for r in shapes.text_only_records(settings.text_records, settings.seed)]
    rng = random.Random(settings.seed)
    wrong = set(rng.sample(range(len(records)), round(settings.noise * len(records))))
    records = [corrupted(r, rng) if i in wrong else r for i, r in enumerate(records)]
    copies = [
        {**records[i], "id": f"{records[i]['id']}_copy"}
        for i in sorted(rng.sample(range(len(records)), round(settings.duplicates * len(records))))
    ]
    wrong_ids = {records[i]["id"] for i in wrong}
    wrong_ids |= {c["id"] for c in copies if c["id"].removesuffix("_copy") in wrong_ids}
    mixture = records + copies
    rng.shuffle(mixture)
    paths["mixture"] = shapes.write_json(data / "mixture.json", mixture)
    paths["truth"] = shapes.write_json(
        data / "corrupted.json", {"wrong": sorted(wrong_ids), "copies": sorted(c["id"] for c in copies)}
    )
    return paths


# ----- training and scoring -------------------------------------------------------------------------------------


def stage2_recipe(output: Path, data: Path, images: Path, steps: int, seed: int) -> dict:
    """Stage 2 from the tiny preset (no stage 1) on one data file: the shapes demo's large step for a 2-layer LM
    trained from random weights."""
    return {
        "recipe": "stage2",
        "model": "tiny",
        "output_dir": str(output),
        "data": {"sources": [{"path": str(data), "image_folder": str(images)}], "max_length": 256},
        "train": {
            "max_steps": steps,
            "batch_size": 8,
            "learning_rate": 3e-3,
            "logging_steps": 50,
            "save_steps": 100000,
            "report_to": "none",
        },  # fmt: skip
        "seed": seed,
    }


def train(out: Path, name: str, data: Path, images: Path, steps: int, seed: int) -> Path:
    config_path = out / f"{name}.yaml"
    recipe = stage2_recipe(out / "runs" / name, data, images, steps, seed)
    config_path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return run_training(load_train_config(config_path))


def held_out_accuracy(run: Path, paths: dict[str, Path], out: Path) -> dict[str, float]:
    generator = Generator.from_folder(run, device="cpu")
    answers = out / f"{run.name}_held_out_answers.jsonl"
    generate_file(
        generator, paths["eval"], answers, SamplingSettings(max_new_tokens=8), paths["images"], 32, overwrite=True
    )
    return score(answers)


def run_curate_demo(settings: CurateDemoSettings, log=print) -> CurateDemoResult:
    out = settings.out
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    paths = build_mixture(data, settings)
    truth = json.loads(paths["truth"].read_text(encoding="utf-8"))
    wrong, copies = set(truth["wrong"]), set(truth["copies"])
    mixture = json.loads(paths["mixture"].read_text(encoding="utf-8"))
    log(f"mixture: {len(mixture)} records, {len(wrong)} with wrong answers, {len(copies)} copies -> {paths['mixture']}")

    started = time.monotonic()
    log(f"a short run on all of it ({settings.probe_steps} steps) to rate the records")
    probe = train(out, "probe", paths["mixture"], paths["images"], settings.probe_steps, settings.seed)
    model = load_run(probe, device="cpu")
    records = read_curate_records(paths["mixture"], paths["images"])
    rate_with_model(records, SignalScorer(model, batch_size=16))
    rated = data / "rated.json"
    write_records(rated, [record.raw for record in records])
    seconds["rate"] = time.monotonic() - started

    chosen: dict[str, Path] = {"all": paths["mixture"]} if settings.train_on_all else {}
    result = CurateDemoResult([], chance={kind: shapes.chance(kind) for kind in shapes.QUESTIONS}, seconds=seconds)
    for rule in settings.rules:
        kept_path = data / f"select_{rule}.json"
        select_file(
            rated,
            kept_path,
            SelectSettings(rule, settings.keep, settings.seed, settings.min_distance),
            model if rule == "diverse" else None,  # the others read the rated fields; diverse embeds with the run
            paths["images"],
        )
        kept = {r["id"] for r in json.loads(kept_path.read_text(encoding="utf-8"))}
        dropped = {r["id"] for r in mixture} - kept
        result.precision[rule] = len(dropped & wrong) / max(len(dropped), 1)
        result.recall[rule] = len(dropped & wrong) / max(len(wrong), 1)
        log(f"--by {rule}: kept {len(kept)}; of the {len(dropped)} dropped, {result.precision[rule]:.0%} were wrong")
        chosen[rule] = kept_path

    for name, path in chosen.items():
        ids = [r["id"] for r in json.loads(path.read_text(encoding="utf-8"))]
        log(f"stage 2 on {name} ({len(ids)} records, {settings.stage2_steps} steps)")
        started = time.monotonic()
        run = train(out, name, path, paths["images"], settings.stage2_steps, settings.seed)
        accuracy = held_out_accuracy(run, paths, out)
        used = time.monotonic() - started
        result.rows.append(
            TrainedOn(name, len(ids), sum(i in wrong for i in ids), sum(i in copies for i in ids), accuracy, used)
        )
    (out / "curate_demo.json").write_text(json.dumps(asdict(result), indent=2, default=str), encoding="utf-8")
    return result


def mean_accuracy(row: TrainedOn) -> float:
    return sum(row.accuracy.values()) / len(row.accuracy)


def report(result: CurateDemoResult) -> str:
    kinds = list(shapes.QUESTIONS)
    header = f"{'trained on':<10}  {'records':>7}  {'wrong':>5}  {'copies':>6}  " + "  ".join(f"{k:>6}" for k in kinds)
    rows = [header + f"  {'mean':>6}  {'dropped wrong':>13}"]
    for row in result.rows:
        cells = "  ".join(f"{row.accuracy[k]:>6.0%}" for k in kinds)
        precision = f"{result.precision[row.name]:>13.0%}" if row.name in result.precision else f"{'-':>13}"
        rows.append(
            f"{row.name:<10}  {row.records:>7}  {row.corrupted:>5}  {row.copies:>6}  {cells}  "
            f"{mean_accuracy(row):>6.0%}  {precision}"
        )
    rows.append(f"{'chance':<32}  " + "  ".join(f"{result.chance[k]:>6.0%}" for k in kinds))
    rows.append("seconds: " + ", ".join(f"{row.name} {row.seconds:.0f}" for row in result.rows))
    return "\n".join(rows)
