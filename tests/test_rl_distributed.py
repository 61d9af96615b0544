"""`recipe: rl` and `recipe: reward` on two CPU ranks (gloo) under every shipped engine, launched as the README writes
it: `accelerate launch --config_file configs/accelerate/X.yaml --num_processes 2 -m llava_lite train CONFIG.yaml`
(through tests/distributed_train.py, which records what each rank saw). Marker `engines`.

RL, full fine-tuning of a tiny model with an untied head and a KL to the reference (beta 0.5), one prompt a rank a
step, image and text-only prompts: under DDP, ZeRO-2, ZeRO-3 with every weight split and released (the test copy of
the shipped file that test_engines.py uses) and FSDP2, each rank samples for real; given the same answers to the
same prompts (the helper's `--same-completions`: answers made from each prompt line alone), two ranks update as one
process with twice the batch (losses, KL, rewards, weights). A group stays on its process; the ranks draw
differently from the same prompt; every engine draws what DDP draws, and a ZeRO-3 run and a FSDP2 run killed
(SIGKILL) after a checkpoint resume with the same prompts, draws, losses and KL (data order, generation seeds and the
starting weights as the reference restored). Under ZeRO-3 and FSDP2 the weights are split at the update and whole on
each process through the last sampled token (gathered once per generation batch, not per token), and the
reference's copy of the LM is split by the engine too (one process, DDP and ZeRO-2 keep the starting weights beside
the model).

The reward model, under DDP, ZeRO-3 (split) and FSDP2, trains as one process with twice the batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from distributed_train import same_completions
from preference_helpers import QUIET, write_pairs
from test_distributed import free_port, history, launch
from test_engines import ACCELERATE, HELPER, assert_same_weights, zero3_split_config

from llava_lite.demo import shapes
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset
from llava_lite.run_folder import COMPLETIONS_FILE
from llava_lite.train.config import load_train_config
from llava_lite.train.rl_trainer import RLTrainer
from llava_lite.train.run import run_training

pytestmark = pytest.mark.engines

STEPS, KILL_AT, G = 4, 2, 4
ENGINES = {
    "ddp": ACCELERATE / "ddp.yaml",
    "zero2": ACCELERATE / "deepspeed_zero2.yaml",
    "fsdp2": ACCELERATE / "fsdp2.yaml",
}  # and "zero3": the split copy of deepspeed_zero3.yaml, made in the folder
IMAGE_REFERENCES = ("triangle", "green", "top right", "yellow", "star", "purple", "top left", "orange")
TEXT_REFERENCES = ("seven", "green", "pink", "grey")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """12 prompt lines - 8 asking the same of the same picture, 4 the same text-only question - with their own ids
    and references (the same prompt on two ranks shows whether their draws differ); a tiny starting run with an
    untied head; the RL recipe (4 answers of up to 5 tokens, exact match with the reference, DAPO's loss, beta 0.5,
    AdamW, fp32); the ZeRO-3 test config."""
    folder = tmp_path_factory.mktemp("rl_engines")
    picture = shapes.make_images(folder / "images", 1, 3, "shape")[0].name
    lines = [
        {"id": f"picture{i}", "image": picture, "prompt": "What is in the picture?", "reference": reference}
        for i, reference in enumerate(IMAGE_REFERENCES)
    ]
    lines += [{"id": f"text{i}", "prompt": "Name a colour.", "reference": r} for i, r in enumerate(TEXT_REFERENCES)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    start = folder / "start"
    untied = preset("tiny", language_model={"model_config": {"tie_word_embeddings": False}})
    LlavaLiteModel.from_config(untied).save_pretrained(start)
    recipe = {
        "recipe": "rl",
        "init_from": str(start),
        "output_dir": str(folder / "unused"),
        "data": {"sources": [{"path": str(folder / "prompts.jsonl"), "image_folder": str(folder / "images")}]},
        "finetune": {"method": "full"},
        "rl": {"num_generations": G, "max_new_tokens": 5, "rewards": [{"kind": "reference"}], "beta": 0.5},
        "train": {
            **QUIET,
            "max_steps": STEPS,
            "batch_size": 1,
            "learning_rate": 1e-3,
            "optimizer": "adamw_torch",
            "scheduler": "constant",
            "max_grad_norm": 1e9,
            "precision": "fp32",
            "save_steps": KILL_AT,
            "save_total_limit": None,
        },
        "seed": 11,
    }
    (folder / "rl.yaml").write_text(yaml.safe_dump(recipe))
    return {"folder": folder, "recipe": folder / "rl.yaml", "zero3": zero3_split_config(folder), "start": start}


def launched(config: Path, recipe: Path, output: Path, reports: Path, *flags: str, kill: int | None = None):
    """Two ranks under `accelerate launch` with `config`, through tests/distributed_train.py with `flags`."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    command += ["--num_processes", "2", "--main_process_port", str(free_port()), str(HELPER), str(reports), *flags]
    command += (["--kill-after-checkpoint", str(kill)] if kill else []) + ["--", "train", str(recipe)]
    done = launch([*command, f"output_dir={output}"])
    if kill is None:
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        assert done.returncode != 0 and (output / f"checkpoint-{kill}").is_dir(), done.stderr[-3000:]
    return done


def rank_reports(reports: Path) -> list[dict]:
    return [json.loads((reports / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def rl_run(setup: dict, engine: str, kill: bool = False) -> dict:
    """The RL recipe on two ranks under `engine` with the same completions; with `kill`, killed after checkpoint
    KILL_AT and run again as a user reruns it. Each rank's draws and micro-batches, both parts' together."""
    folder = setup["folder"]
    config = setup["zero3"] if engine == "zero3" else ENGINES[engine]
    output, reports = folder / engine, folder / f"{engine}_reports"
    parts = [reports]
    if kill:
        launched(config, setup["recipe"], output, folder / f"{engine}_killed", "--same-completions", kill=KILL_AT)
        parts.insert(0, folder / f"{engine}_killed")
    done = launched(config, setup["recipe"], output, reports, "--same-completions")
    ranks = [rank_reports(part) for part in parts]
    joined = [
        {**ranks[-1][r], "draws": [d for part in ranks for d in part[r]["draws"]],
         "rollouts": [m for part in ranks for m in part[r]["rollouts"]]}
        for r in (0, 1)
    ]  # fmt: skip
    return {"output": output, "ranks": joined, "stderr": done.stderr}


@pytest.fixture(scope="module")
def one_process(setup) -> Path:
    """One process with two prompts a step, answered as the launched runs answer them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RLTrainer, "_sample_and_score", same_completions(RLTrainer._sample_and_score))
        config = load_train_config(setup["recipe"], [f"output_dir={setup['folder'] / 'one'}", "train.batch_size=2"])
        return run_training(config)


@pytest.fixture(scope="module")
def runs(setup) -> dict[str, dict]:
    return {
        "ddp": rl_run(setup, "ddp"),
        "zero2": rl_run(setup, "zero2"),
        "zero3": rl_run(setup, "zero3", kill=True),
        "fsdp2": rl_run(setup, "fsdp2", kill=True),
    }


def logged(folder: Path, key: str) -> dict[int, float]:
    return {step: entry[key] for step, entry in history(folder).items() if key in entry}


def completion_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / COMPLETIONS_FILE).read_text().splitlines()]


def draws_by_step(rank: dict) -> dict[int, dict]:
    return {draw["step"]: draw for draw in rank["draws"]}


# ----- RL -----------------------------------------------------------------------------------------------------------
def test_two_ranks_under_every_engine_update_as_one_process_with_twice_the_batch(one_process, runs):
    expected = {key: logged(one_process, key) for key in ("loss", "kl", "reward", "rewards/reference/mean")}
    assert sorted(expected["loss"]) == list(range(1, STEPS + 1))
    assert all(expected["loss"][step] != 0 for step in expected["loss"])  # the answers' rewards differ in each group
    assert expected["kl"][1] == 0 and all(expected["kl"][step] > 1e-3 for step in range(2, STEPS + 1))
    for engine, run in runs.items():
        for key, values in expected.items():
            got = logged(run["output"], key)
            for step in range(1, STEPS + 1):
                assert abs(got[step] - values[step]) <= 1e-4 * abs(values[step]) + 1e-6, (engine, key, step, got)
        assert_same_weights(run["output"], one_process)
    wrappers = {engine: {rank["wrapper"] for rank in run["ranks"]} for engine, run in runs.items()}
    assert wrappers == {
        "ddp": {"DistributedDataParallel"},
        "zero2": {"DeepSpeedEngine"},
        "zero3": {"DeepSpeedEngine"},
        "fsdp2": {"FSDPLlavaLiteModel"},
    }


def test_a_group_stays_on_its_process_and_the_processes_share_each_steps_prompts(one_process, runs):
    expected = {}
    for line in completion_lines(one_process):
        expected.setdefault(line["step"], []).append(line["id"])
    for engine, run in runs.items():
        ranks = run["ranks"]
        by_step = [{m["step"]: m for m in rank["rollouts"]} for rank in ranks]
        for step in range(1, STEPS + 1):
            mine, theirs = by_step[0][step], by_step[1][step]
            assert mine["answers"] == theirs["answers"] == G, (engine, step)  # all G answers of a prompt here
            assert mine["ids"] + theirs["ids"] == expected[step], (engine, step)
        # completions.jsonl: every prompt once a step, with its G answers, as one process wrote it.
        assert completion_lines(run["output"]) == completion_lines(one_process), engine


def test_the_ranks_draw_differently_and_every_engine_draws_as_ddp_through_a_resume(runs):
    ddp = [draws_by_step(rank) for rank in runs["ddp"]["ranks"]]
    same_prompt = [step for step in ddp[0] if ddp[0][step]["prompts"] == ddp[1][step]["prompts"]]
    assert same_prompt, "no step gave both ranks the same prompt"
    for step in same_prompt:  # the same model and prompt: only the processes' seeds tell the draws apart
        assert ddp[0][step]["answers"] != ddp[1][step]["answers"], step
    for engine in ("zero2", "zero3", "fsdp2"):
        for rank, expected in zip(runs[engine]["ranks"], ddp):
            got = draws_by_step(rank)
            assert sorted(got) == list(range(1, STEPS + 1)), engine
            for step in got:
                assert got[step]["prompts"] == expected[step]["prompts"], (engine, step)
                assert got[step]["answers"] == expected[step]["answers"], (engine, step)


def test_killed_zero3_and_fsdp2_runs_resume_from_their_checkpoints(runs):
    for engine in ("zero3", "fsdp2"):
        output = runs[engine]["output"]
        assert f"resuming from {output / f'checkpoint-{KILL_AT}'}" in runs[engine]["stderr"], engine
        # Both parts' draws were recorded: steps 1-2 before the kill, 3-4 after it.
        assert [d["step"] for d in runs[engine]["ranks"][0]["draws"]] == list(range(1, STEPS + 1)), engine


def test_sharded_weights_are_gathered_once_for_sampling_and_split_again_for_the_update(runs):
    for engine in ("zero3", "fsdp2"):
        for rank in runs[engine]["ranks"]:
            assert all(draw["whole"] for draw in rank["draws"]), engine  # whole through the last sampled token
            for part in ("head", "decoder"):
                held = rank["held"][part]  # at the first update, after sampling gave the weights back
                assert held["here"] < held["full"], (engine, part, held)
            assert rank["held"]["decoder"]["dtensor"] == (engine == "fsdp2")
            assert any(len(answer) > 1 for draw in rank["draws"] for answer in draw["answers"])


def test_the_reference_of_full_fine_tuning_is_split_by_zero3_and_fsdp2_and_kept_whole_by_the_others(runs):
    for engine, run in runs.items():
        for rank in run["ranks"]:
            if engine in ("ddp", "zero2"):
                assert "reference_held" not in rank, engine  # the starting weights beside the model
                continue
            for part in ("head", "decoder"):  # about half on each rank (FSDP2), none between passes (split ZeRO-3)
                held = rank["reference_held"][part]
                assert held["here"] <= 0.6 * held["full"] and held["dtensor"] == (engine == "fsdp2"), (engine, held)


# ----- the reward model ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_setup(setup) -> dict:
    """Pairs with and without images, the reward recipe from the untied start (fp32, AdamW, one pair a rank a step),
    and one process with two pairs a step."""
    folder = setup["folder"] / "reward"
    data = write_pairs(folder, 6, text_only=2)
    recipe = {
        "recipe": "reward",
        "init_from": str(setup["start"]),
        "output_dir": str(folder / "unused"),
        "data": {"sources": [{"path": str(data["pairs"]), "image_folder": str(data["images"])}], "max_length": 128},
        "train": {
            **QUIET,
            "max_steps": 3,
            "batch_size": 1,
            "learning_rate": 1e-3,
            "optimizer": "adamw_torch",
            "max_grad_norm": 1e9,
            "precision": "fp32",
        },
        "finetune": {"method": "full"},
        "seed": 5,
    }
    path = folder / "reward.yaml"
    path.write_text(yaml.safe_dump(recipe))
    one = run_training(load_train_config(path, [f"output_dir={folder / 'one'}", "train.batch_size=2"]))
    return {"folder": folder, "recipe": path, "one": one}


@pytest.mark.parametrize("engine", ["ddp", "zero3", "fsdp2"])
def test_the_reward_model_on_two_ranks_trains_as_one_process(setup, reward_setup, engine):
    folder = reward_setup["folder"]
    config = setup["zero3"] if engine == "zero3" else ENGINES[engine]
    output, reports = folder / engine, folder / f"{engine}_reports"
    launched(config, reward_setup["recipe"], output, reports)
    expected, got = history(reward_setup["one"]), history(output)
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    for step in expected:
        for key in ("loss", "accuracy", "rewards/chosen", "rewards/margins"):
            assert abs(got[step][key] - expected[step][key]) <= 1e-4 * abs(expected[step][key]) + 1e-5, (key, step)
    assert expected[3]["rewards/margins"] != 0
    ranks = rank_reports(reports)
    if engine != "ddp":  # the decoder really was split
        assert all(rank["held"]["decoder"]["here"] < rank["held"]["decoder"]["full"] for rank in ranks)
    assert_same_weights(output, reward_setup["one"])
