"""The loop's demo on a small budget: the kind stage 2 left weak is answered better after the rounds than before,
and the shipped config is the demo's own loop."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import ROOT

from llava_lite.config_io import from_dict
from llava_lite.demo.improve_demo import WEAK, ImproveDemoSettings, build_data, improve_recipe, run_improve_demo
from llava_lite.improve.config import ImproveConfig


def test_the_weak_kinds_held_out_accuracy_rises_from_round_0_to_the_last(tmp_path):
    settings = ImproveDemoSettings(tmp_path / "demo", rounds=2)
    result = run_improve_demo(settings, log=lambda message: None)
    assert len(result.accuracy) == 3  # round 0 (stage 2) and two rounds
    before, after = result.accuracy[0][WEAK], result.accuracy[-1][WEAK]
    assert before < 0.4, f"stage 2 should be weak on {WEAK}: {before:.0%}"
    assert after >= before + 0.2, f"{WEAK}: {before:.0%} in round 0, {after:.0%} after the rounds"
    assert all(n > 0 for n in result.sft_records[1:])  # each round trained on its own right answers


def test_the_shipped_loop_config_is_the_demos_own(tmp_path):
    out = Path("runs/improve_demo")
    paths = {name: out / "data" / f for name, f in (("prompts", "prompts.jsonl"), ("held_out", "held_out.jsonl"))}
    paths["images"] = out / "data" / "images"
    shipped = yaml.safe_load((ROOT / "configs" / "improve" / "demo_improve.yaml").read_text())
    assert shipped == improve_recipe(out, paths, ImproveDemoSettings(out))
    from_dict(ImproveConfig, shipped)
    # and the demo writes the data those paths name
    written = build_data(tmp_path, ImproveDemoSettings(tmp_path, train_images=4, eval_images=2))
    assert {name: written[name].name for name in ("prompts", "held_out")} == {
        "prompts": "prompts.jsonl",
        "held_out": "held_out.jsonl",
    }
