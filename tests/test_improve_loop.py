"""`llava-lite improve`: two rounds on the tiny model end to end, each starting from the last one's run, and a loop
killed in round 2's training continuing there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT
from improve_helpers import corner_prompts, read_lines, tiny_run
from rubric_server import RubricServer

from llava_lite.cli import main
from llava_lite.improve.loop import load_improve_config, run_improve

STEPS = 4


def loop_config(folder, start, data, held_out, url) -> dict:
    return {
        "start": str(start),
        "output_dir": str(folder / "improve"),
        "prompts": str(data["prompts"]),
        "image_folder": str(data["images"]),
        "rounds": 2,
        "sample": {"samples": 3, "max_new_tokens": 4, "batch_size": 8},
        # The stand-in judge scores an answer by its length: pairs to train on, from the tiny random model.
        "score": {"scorer": "judge", "model": "stand-in", "base_url": url, "concurrency": 2},
        "train": {
            "recipe": "preference",
            "data": {"max_length": 96},
            "finetune": {"method": "full"},
            "train": {
                "max_steps": STEPS,
                "batch_size": 2,
                "learning_rate": 1e-3,
                "save_steps": 2,
                "logging_steps": 1,
                "warmup_ratio": 0.0,
                "report_to": "none",
            },
        },  # fmt: skip
        "eval": {"held_out": str(held_out["prompts"]), "metric": "held_out.accuracy"},
        "patience": 5,  # both rounds, whatever the (random) model scores
    }


@pytest.fixture(scope="module")
def server():
    with RubricServer() as running:
        yield running


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loop")
    return {
        "folder": folder,
        "start": tiny_run(folder / "start"),
        "data": corner_prompts(folder, 8),
        "held_out": corner_prompts(folder, 4, seed=1, name="held_out.jsonl"),
    }


def write_config(material, server, name: str):
    folder = material["folder"] / name
    folder.mkdir()
    raw = loop_config(folder, material["start"], material["data"], material["held_out"], server.url)
    path = folder / "improve.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, folder / "improve"


@pytest.fixture(scope="module")
def finished(material, server):
    path, out = write_config(material, server, "whole")
    assert main(["improve", str(path)]) == 0
    return out


def test_two_rounds_run_end_to_end_each_from_the_last_ones_run(finished, material):
    table = json.loads((finished / "improve.json").read_text())
    assert [row["round"] for row in table["rounds"]] == [0, 1, 2]
    assert table["rounds"][0]["run"] == str(material["start"])
    for number, start in ((1, material["start"]), (2, finished / "round_1" / "run")):
        folder = finished / f"round_{number}"
        train = yaml.safe_load((folder / "train.yaml").read_text())
        assert train["init_from"] == str(start) and train["recipe"] == "preference"
        assert train["data"]["sources"][0]["path"] == str(folder / "pairs.jsonl")
        assert table["rounds"][number]["start"] == str(start)
        assert table["rounds"][number]["pairs"] == len(read_lines(folder / "pairs.jsonl")) > 0
        state = json.loads((folder / "run" / "trainer_state.json").read_text())
        assert state["global_step"] == STEPS
        assert (folder / "run" / "model.safetensors").exists() or any((folder / "run").glob("*.safetensors"))
        assert len(read_lines(folder / "samples.jsonl")) == 8
        held_out = json.loads((folder / "eval.json").read_text())
        assert held_out["results"]["held_out"]["count"] == 4
        assert held_out["metric"] == held_out["results"]["held_out"]["accuracy"]
    # Each round draws its own samples (its seed is the round's), so round 2 is not round 1 again.
    first = [c["text"] for row in read_lines(finished / "round_1" / "samples.jsonl") for c in row["candidates"]]
    second = [c["text"] for row in read_lines(finished / "round_2" / "samples.jsonl") for c in row["candidates"]]
    assert first != second


def test_a_loop_killed_in_round_2s_training_continues_there(material, server):
    path, out = write_config(material, server, "killed")
    script = (
        "import os, signal, sys\n"
        "from transformers import TrainerCallback\n"
        "from llava_lite.improve.loop import load_improve_config, run_improve\n"
        "class Kill(TrainerCallback):\n"
        "    def on_step_end(self, args, state, control, **kwargs):\n"
        "        if 'round_2' in args.output_dir and state.global_step == 3:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "run_improve(load_improve_config(sys.argv[1]), callbacks=[Kill()])\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == -9, done.stderr[-3000:]
    assert (out / "round_2" / "run" / "checkpoint-2").is_dir()
    assert not (out / "round_2" / "eval.json").exists()
    before = {p: p.stat().st_mtime_ns for p in (out / "round_1").rglob("*") if p.is_file()}
    before_samples = (out / "round_2" / "samples.jsonl").stat().st_mtime_ns

    said: list[str] = []
    rows = run_improve(load_improve_config(path), log=said.append)
    assert [row.round for row in rows] == [0, 1, 2]
    assert any(
        line.startswith("round 2: training (preference)") and line.endswith("continuing from checkpoint-2")
        for line in said
    ), said
    redone = ("round 1: sampling", "round_1: scoring", "round 1: training", "round 1: evaluating", "round 2: sampling")
    assert not any(line.startswith(redone) for line in said), said  # nothing finished is done again
    assert {p: p.stat().st_mtime_ns for p in (out / "round_1").rglob("*") if p.is_file()} == before
    assert (out / "round_2" / "samples.jsonl").stat().st_mtime_ns == before_samples
    state = json.loads((out / "round_2" / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    assert os.path.exists(out / "round_2" / "eval.json")


def test_a_bad_loop_config_ends_in_one_line_naming_the_key(tmp_path, capsys):
    path = tmp_path / "improve.yaml"
    raw = {"start": "a", "output_dir": "b", "prompts": "c", "eval": {"held_out": "d"}}
    path.write_text(yaml.safe_dump({**raw, "train": {"recipe": "preference", "init_from": "x"}}))
    assert main(["improve", str(path)]) == 2
    assert "init_from" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({**raw, "train": {"recipe": "stage1"}}))
    assert main(["improve", str(path)]) == 2
    assert "train.recipe must be preference" in capsys.readouterr().err
