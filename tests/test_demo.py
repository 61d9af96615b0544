"""The demo end to end on a small budget: the loss falls and every kind of held-out question is answered far above
chance."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import ROOT

from llava_lite.config_io import from_dict
from llava_lite.demo.pipeline import DemoSettings, demo_recipes, run_demo
from llava_lite.train.config import TrainConfig


def test_short_demo_learns_every_question_far_above_chance(tmp_path):
    settings = DemoSettings(tmp_path / "demo", train_images=320, eval_images=40, text_records=40, stage2_epochs=20)
    result = run_demo(settings, log=lambda message: None)

    history = json.loads((tmp_path / "demo" / "stage2" / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses[-1] < losses[0] / 4

    assert set(result.accuracy) == {"colour", "shape", "corner"}
    # Each kind on its own: chance is 25 % (colour, corner) or 33 % (shape). A model that tells only top from
    # bottom scores 50 % on corner, so 80 % means it learned where the shape is, not half of it. Shape is the
    # hardest kind at this budget and the one that varies: over seeds 0-2 it ended at 78 %, 95 % and 68 % (colour
    # and corner at 98-100 % every time), and a change of 1e-7 in the head's gradients' rounding moved seed 0 from
    # 90 % to 78 %. So shape must reach twice its chance, 67 %: what telling one shape from the other two would score.
    floors = {"colour": 0.8, "corner": 0.8, "shape": 2 / 3}
    for kind, accuracy in result.accuracy.items():
        assert accuracy >= floors[kind], f"{kind}: {accuracy:.0%} held-out accuracy (chance {result.chance[kind]:.0%})"
    assert result.chat_answer in {"red", "green", "blue", "yellow"}


def test_shipped_demo_configs_are_the_demos_own_recipes():
    recipes = demo_recipes(Path("runs/demo"))
    for stage in ("stage1", "stage2"):
        shipped = yaml.safe_load((ROOT / "configs" / f"demo_{stage}.yaml").read_text())
        assert shipped == recipes[stage]
        from_dict(TrainConfig, shipped)
