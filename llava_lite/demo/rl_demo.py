"""RL against DPO and SFT on the model's own answers, on the shapes task: one undertrained stage-2 run weak on one
question kind, the same training prompts, and each way of stage 3 trained from it; held-out accuracy by kind.

Stage 2 is the improve demo's (the tiny preset, projector and LM, 300 steps) with the weak kind's question - the
corner's by default - asked of one picture in `weak_every`: it answers the other kinds fairly and the weak one near
chance. Every training picture's three questions, with their true answers, are the prompts every arm learns from:
- `dpo`: the model's own mistakes made into pairs as a user makes them - `samples` answers sampled per prompt
  (temperature 1) and scored by exact match, the true answer chosen against each distinct wrong one - and stage 3
  with `recipe: preference`'s shipped defaults (only the learning rate and steps given): DPO's sigmoid loss, beta
  0.1, and the NLL term on the chosen answer (`preference.sft_weight` 1, RPO's);
- `dpo_plain`: the same pairs with `sft_weight: 0` - TRL's DPOTrainer loss alone, our default before;
- `sft_best`: stage 2 again on each prompt's best sampled answer when it is right (rejection sampling);
- `grpo`: `recipe: rl` on the prompts, `num_generations` answers per prompt each step, rewarded by exact match with
  the true answer (the `reference` reward; TRL's DAPO loss and GRPO's group advantages, the recipe's defaults).
Each arm trains `steps` steps of `batch_size` items (pairs, records or prompts), full fine-tuning, the same seed, at
each of `learning_rates`. Each model is measured on the held-out pictures' questions - greedy answers scored by exact
match per kind, and the mean log-probability of their true answers per kind - and on the DPO pairs: the mean summed
log-probability of their chosen (true) and rejected (wrong) answers. Likelihood displacement is the true answers'
log-probabilities falling below the start's. The DPO runs' logged `logps/chosen` is given as its means over the first
and the last sixth of the steps, GRPO's `reward` as its mean over each pass over the prompts.

Everything lands in `out`: the data (`data/`: prompts, samples, pairs, SFT records), stage 2's config and each arm's
(re-run them with `llava-lite train`), the runs, and `rl_demo.json` with the table's numbers.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from llava_lite.data.config import DataSource
from llava_lite.data.preference_formats import read_pairs
from llava_lite.data.writing import write_lines_atomically, write_records
from llava_lite.demo import improve_demo, shapes
from llava_lite.demo.pipeline import score
from llava_lite.eval.preference import pair_scores
from llava_lite.eval.vqa import normalize_answer
from llava_lite.improve.pairs import PairSettings, build_pairs, preference_row
from llava_lite.improve.sample import SampleSettings, sample_file
from llava_lite.improve.score import score_by_reference
from llava_lite.inference.batch import generate_file
from llava_lite.inference.generator import Generator, SamplingSettings
from llava_lite.run_folder import read_trainer_state
from llava_lite.train.config import load_train_config
from llava_lite.train.run import run_training

ARMS = ("start", "dpo_plain", "dpo", "sft_best", "grpo")
# What each DPO arm sets in its `preference` section: `dpo` nothing (the shipped defaults), `dpo_plain` the NLL term
# off (TRL's DPOTrainer, and our default before).
DPO_SECTIONS = {"dpo": {}, "dpo_plain": {"sft_weight": 0.0}}
MAX_NEW_TOKENS = 8  # the longest answer, "bottom right", is 3 tokens


@dataclass
class RLDemoSettings:
    out: Path
    train_images: int = 160
    eval_images: int = 100
    weak: str = "corner"  # the kind stage 2 is left weak on
    weak_every: int = 8  # stage 2 sees the weak kind's question of one picture in this many
    stage2_steps: int = 300
    samples: int = 4  # answers sampled per prompt for the pairs and the SFT records
    steps: int = 180  # each arm's: three passes over the 480 prompts for grpo
    batch_size: int = 8
    # Every arm at each: the tiny model's rates (stage 2 took 3e-3), not a real model's.
    learning_rates: tuple[float, ...] = (3e-4, 1e-3)
    num_generations: int = 8  # grpo: answers per prompt each step
    arms: tuple[str, ...] = ARMS
    seed: int = 0


@dataclass
class ArmResult:
    name: str
    learning_rate: float | None  # None for the start
    accuracy: dict[str, float]  # held-out, per kind
    true_logps: dict[str, float]  # held-out, per kind: the true answers' mean log-probability
    pairs_chosen: float  # the DPO pairs' chosen (true) answers: mean summed log-probability
    pairs_rejected: float  # and their rejected (wrong) ones
    trained_on: int = 0  # pairs, SFT records or prompts
    logged_chosen: list[float] | None = None  # DPO: logged `logps/chosen`, the first and the last sixth of the steps
    logged_rejected: list[float] | None = None
    reward: list[float] | None = None  # grpo: logged `reward`, the mean of each pass over the prompts
    seconds: float = 0.0


@dataclass
class RLDemoResult:
    arms: list[ArmResult]
    sampled_right: dict[str, float]  # the start's sampled answers to the training prompts: the share right, per kind
    chance: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)


# ----- data -------------------------------------------------------------------------------------------------------


def build_data(out: Path, settings: RLDemoSettings) -> dict[str, Path]:
    """The improve demo's data - the pictures, the prompts (every training picture's three questions with their true
    answers) and the held-out lines - and stage 2's conversations, the weak kind's question asked of one picture in
    `weak_every`."""
    paths = improve_demo.build_data(out, _improve_settings(settings))
    questions = json.loads(paths["questions"].read_text(encoding="utf-8"))
    paths["weak"] = shapes.write_json(
        paths["weak"].with_name(f"questions_weak_{settings.weak}.json"),
        improve_demo.weak_questions(questions, settings.weak_every, settings.weak),
    )
    paths["held_out_pairs"] = held_out_pairs(paths)
    return paths


def held_out_pairs(paths: dict[str, Path]) -> Path:
    """The held-out questions as pairs, to measure how likely a model finds their true answers: the true answer
    chosen, the next answer of its kind rejected."""
    rows = []
    for line in paths["held_out"].read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        answers = list(shapes.QUESTIONS[row["category"]][1])
        other = answers[(answers.index(row["reference"]) + 1) % len(answers)]
        rows.append(preference_row(row, row["reference"], other))
    path = paths["held_out"].with_name("held_out_pairs.jsonl")
    write_records(path, rows)
    return path


def own_answers(start: Path, paths: dict[str, Path], settings: RLDemoSettings) -> dict[str, Path]:
    """The start's sampled answers to the prompts, scored against the true answers; the pairs (the true answer chosen,
    each distinct wrong answer rejected) and the SFT records (each prompt's best answer, when right)."""
    data = paths["prompts"].parent
    sampled, scored = data / "samples.jsonl", data / "scored.jsonl"
    sampling = SampleSettings(settings.samples, 1.0, 1.0, MAX_NEW_TOKENS, settings.seed, 32)
    sample_file(Generator.from_folder(start, device="cpu"), paths["prompts"], sampled, sampling, paths["images"], True)
    score_by_reference(sampled, scored, "exact")
    rows = [json.loads(line) for line in scored.read_text(encoding="utf-8").splitlines()]
    pairs = [preference_row(row, row["reference"], wrong) for row in rows for wrong in wrong_answers(row)]
    _, sft, _ = build_pairs(str(scored), PairSettings(sft_min_score=1.0))
    paths = {**paths, "scored": scored, "pairs": data / "pairs.jsonl", "sft": data / "sft.jsonl"}
    write_records(paths["pairs"], pairs)
    write_records(paths["sft"], sft)
    return paths


def wrong_answers(row: dict) -> list[str]:
    """A scored line's distinct wrong candidates (after VQAv2's normalisation), in the order sampled."""
    seen: dict[str, str] = {}
    for candidate in row["candidates"]:
        text = candidate["text"]
        if candidate["score"] < 1.0 and text.strip():
            seen.setdefault(normalize_answer(text), text)
    return list(seen.values())


def sampled_right(scored: Path) -> dict[str, float]:
    """The share of sampled answers that are right, per kind."""
    right: dict[str, list[float]] = {}
    for line in scored.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        right.setdefault(row["id"].rsplit(":", 1)[1], []).extend(c["score"] for c in row["candidates"])
    return {kind: _mean(values) for kind, values in right.items()}


# ----- the arms ---------------------------------------------------------------------------------------------------


def arm_recipe(name: str, learning_rate: float, paths: dict[str, Path], settings: RLDemoSettings) -> dict:
    """The training config of arm `name` (not `start`) at `learning_rate`, from the stage-2 run."""
    out = settings.out
    train = {
        "max_steps": settings.steps, "batch_size": settings.batch_size, "learning_rate": learning_rate,
        "warmup_ratio": 0.0, "logging_steps": 1, "save_steps": 100000, "report_to": "none",
    }  # fmt: skip
    common = {
        "init_from": str(out / "stage2"), "output_dir": str(out / "runs" / f"{name}_lr{learning_rate:g}"),
        "finetune": {"method": "full"}, "train": train, "seed": settings.seed, "resume": "never",
    }  # fmt: skip
    images = str(paths["images"])
    if name in DPO_SECTIONS:
        data = {"sources": [{"path": str(paths["pairs"]), "image_folder": images}], "max_length": 128}
        return {"recipe": "preference", **common, "data": data, "preference": DPO_SECTIONS[name]}
    if name == "sft_best":
        data = {"sources": [{"path": str(paths["sft"]), "image_folder": images}], "max_length": 128}
        return {"recipe": "stage2", **common, "data": data}
    if name == "grpo":
        data = {"sources": [{"path": str(paths["prompts"]), "image_folder": images}], "max_length": 128}
        rl = {
            "num_generations": settings.num_generations, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0,
            "rewards": [{"kind": "reference", "match": "exact"}],
        }  # fmt: skip
        return {"recipe": "rl", **common, "data": data, "rl": rl}
    raise ValueError(f"unknown arm {name!r}; choose from {', '.join(ARMS)}")


def prepare(settings: RLDemoSettings, log=print) -> tuple[Path, dict[str, Path], dict[str, float]]:
    """The data, the stage-2 run (the start) and its own answers: (the start, the data's paths, seconds taken)."""
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    log(f"drawing {settings.train_images} training and {settings.eval_images} held-out pictures in {out}/data")
    paths = build_data(out, settings)
    started = time.monotonic()
    stage2 = _written(out / "stage2.yaml", improve_demo.stage2_recipe(out, paths, _improve_settings(settings)))
    log(f"stage 2: llava-lite train {stage2} (the {settings.weak} asked of one picture in {settings.weak_every})")
    start = run_training(load_train_config(stage2, ["resume=never"]))
    seconds["stage2"] = time.monotonic() - started
    started = time.monotonic()
    paths = own_answers(start, paths, settings)
    seconds["sampling"] = time.monotonic() - started
    log(f"the start's own answers: {_lines(paths['pairs'])} pairs (true against wrong), {_lines(paths['sft'])} right")
    return start, paths, seconds


def start_arm(start: Path, paths: dict[str, Path], settings: RLDemoSettings) -> ArmResult:
    return ArmResult("start", None, *measured(start, paths, settings.out / "answers_start.jsonl"))


def train_arm(
    name: str, learning_rate: float, paths: dict[str, Path], settings: RLDemoSettings, log=print
) -> ArmResult:
    """Arm `name` trained from the start at `learning_rate`, and measured."""
    started = time.monotonic()
    tag = f"{name}_lr{learning_rate:g}"
    config = _written(settings.out / f"{tag}.yaml", arm_recipe(name, learning_rate, paths, settings))
    log(f"{tag}: llava-lite train {config}")
    run = run_training(load_train_config(config))
    logged = [entry for entry in _history(run) if "loss" in entry]
    data = "pairs" if name in DPO_SECTIONS else "sft" if name == "sft_best" else "prompts"
    result = ArmResult(name, learning_rate, *measured(run, paths, settings.out / f"answers_{tag}.jsonl"))
    result.trained_on = _lines(paths[data])
    if name in DPO_SECTIONS:
        result.logged_chosen = first_and_last(logged, "logps/chosen")
        result.logged_rejected = first_and_last(logged, "logps/rejected")
    if name == "grpo":
        rewards = [entry["reward"] for entry in logged if "reward" in entry]
        per_pass = -(-result.trained_on // settings.batch_size)
        result.reward = [_mean(rewards[i : i + per_pass]) for i in range(0, len(rewards), per_pass)]
    result.seconds = time.monotonic() - started
    log(f"{tag}: held-out accuracy {result.accuracy}")
    return result


def run_rl_demo(settings: RLDemoSettings, log=print) -> RLDemoResult:
    start, paths, seconds = prepare(settings, log)
    arms = [start_arm(start, paths, settings)] if "start" in settings.arms else []
    for learning_rate in settings.learning_rates:
        arms += [train_arm(name, learning_rate, paths, settings, log) for name in settings.arms if name != "start"]
    chance = {kind: shapes.chance(kind) for kind in shapes.QUESTIONS}
    result = RLDemoResult(arms, sampled_right(paths["scored"]), chance, seconds)
    write_lines_atomically(settings.out / "rl_demo.json", [json.dumps(asdict(result), indent=2)])
    return result


# ----- measuring --------------------------------------------------------------------------------------------------


def measured(run: Path, paths: dict[str, Path], answers: Path) -> tuple[dict, dict, float, float]:
    """`run`'s exact-match accuracy per kind on the held-out questions (greedy answers) and its mean log-probability
    of their true answers per kind; the mean summed log-probability of the DPO pairs' chosen and rejected answers."""
    generator = Generator.from_folder(run, device="cpu")
    greedy = SamplingSettings(max_new_tokens=MAX_NEW_TOKENS)
    generate_file(generator, paths["eval"], answers, greedy, paths["images"], 32, overwrite=True)
    held_out, _ = read_pairs(DataSource(str(paths["held_out_pairs"]), str(paths["images"])), "error")
    true, _ = pair_scores(generator.model, held_out, batch_size=32, progress=False)
    kinds = [pair.id.rsplit(":", 1)[1] for pair in held_out]
    true_logps = {k: float(true[[i for i, kind in enumerate(kinds) if kind == k]].mean()) for k in shapes.QUESTIONS}
    pairs, _ = read_pairs(DataSource(str(paths["pairs"]), str(paths["images"])), "error")
    chosen, rejected = pair_scores(generator.model, pairs, batch_size=32, progress=False)
    return score(answers), true_logps, float(chosen.mean()), float(rejected.mean())


def first_and_last(logged: list[dict], key: str) -> list[float]:
    """The mean of `key` over the first and over the last sixth of the logged steps."""
    values = [entry[key] for entry in logged if key in entry]
    size = max(len(values) // 6, 1)
    return [_mean(values[:size]), _mean(values[-size:])]


def mean_accuracy(arm: ArmResult) -> float:
    return _mean(list(arm.accuracy.values()))


def report(result: RLDemoResult) -> str:
    kinds = list(shapes.QUESTIONS)
    header = f"{'arm':<10} {'lr':>6} {'trained on':>10}  " + "  ".join(f"{k:>6}" for k in kinds) + f"  {'mean':>5}"
    header += "  " + "  ".join(f"{'log p ' + k:>12}" for k in kinds)
    header += f"  {'pairs: chosen':>13}  {'rejected':>8}  {'logged logps/chosen':>19}  reward per pass"
    rows = [header]
    for arm in result.arms:
        rate = f"{arm.learning_rate:g}" if arm.learning_rate else "-"
        cells = "  ".join(f"{arm.accuracy[k]:>6.0%}" for k in kinds)
        true = "  ".join(f"{arm.true_logps[k]:>12.2f}" for k in kinds)
        logged = f"{arm.logged_chosen[0]:.2f} -> {arm.logged_chosen[1]:.2f}" if arm.logged_chosen else "-"
        reward = " -> ".join(f"{value:.2f}" for value in arm.reward) if arm.reward else "-"
        rows.append(
            f"{arm.name:<10} {rate:>6} {arm.trained_on:>10}  {cells}  {mean_accuracy(arm):>5.0%}  {true}  "
            f"{arm.pairs_chosen:>13.2f}  {arm.pairs_rejected:>8.2f}  {logged:>19}  {reward}"
        )
    rows.append(f"{'chance':<28}  " + "  ".join(f"{result.chance[k]:>6.0%}" for k in kinds))
    rows.append("log p KIND: the held-out questions' true answers, mean log-probability; pairs: the DPO pairs' answers")
    right = ", ".join(f"{kind} {value:.0%}" for kind, value in result.sampled_right.items())
    rows.append(f"the start's sampled answers to the training questions, right: {right}")
    timing = {**result.seconds, **{f"{a.name} {a.learning_rate:g}": a.seconds for a in result.arms if a.seconds}}
    rows.append("seconds: " + ", ".join(f"{name} {s:.0f}" for name, s in timing.items()))
    return "\n".join(rows)


def _improve_settings(settings: RLDemoSettings) -> improve_demo.ImproveDemoSettings:
    return improve_demo.ImproveDemoSettings(
        settings.out,
        train_images=settings.train_images,
        eval_images=settings.eval_images,
        corner_every=settings.weak_every,
        stage2_steps=settings.stage2_steps,
        seed=settings.seed,
    )


def _written(path: Path, recipe: dict) -> Path:
    write_lines_atomically(path, [yaml.safe_dump(recipe, sort_keys=False).rstrip("\n")])
    return path


def _history(run: Path) -> list[dict]:
    return read_trainer_state(run)["log_history"]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())
