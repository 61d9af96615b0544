"""The AnyRes demo on a small budget: the same tiny model answers about a small mark's colour and 1-pixel pattern
better with AnyRes tiles than with one 32 x 32 view, and the one view never learns the pattern."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import ROOT

from llava_lite.demo.anyres_demo import QUESTIONS, AnyResDemoSettings, chance, run_anyres_demo, table


def test_anyres_beats_one_view_on_the_small_mark(tmp_path):
    # Seeds 0, 1 and 2 at this budget: AnyRes 84 %, 66 %, 95 % over both kinds, one view 51 %, 25 %, 47 %; the one
    # view's pattern 27-38 % (chance 33 %). AnyRes's pattern needs the full budget to be reliable (100 % at 1500
    # steps for seeds 0 and 1; 35-100 % here), so the test holds both kinds together.
    settings = AnyResDemoSettings(tmp_path, train_images=400, eval_images=60, stage1_steps=10, stage2_steps=600)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small only lose to a second thread on a busy CPU
    try:
        single, anyres = run_anyres_demo(settings, log=lambda message: None)
    finally:
        torch.set_num_threads(threads)

    assert (single.layout, single.tokens_per_image) == ("single", 16)
    assert (anyres.layout, anyres.tokens_per_image) == ("anyres", 88)  # 16 + 4 tiles x 16 + 8 newlines
    mean = {r.layout: sum(r.accuracy.values()) / len(r.accuracy) for r in (single, anyres)}
    mean_chance = sum(chance(kind) for kind in QUESTIONS) / len(QUESTIONS)
    assert mean["anyres"] > mean["single"] + 0.15, table([single, anyres])
    assert mean["anyres"] > mean_chance + 0.25, table([single, anyres])
    assert single.accuracy["pattern"] < 0.5, table([single, anyres])  # the weave is gone from one view

    saved = json.loads((tmp_path / "anyres_demo.json").read_text())
    assert [row["layout"] for row in saved] == ["single", "anyres"]
    for layout in ("single", "anyres"):
        assert (tmp_path / layout / "stage2.yaml").is_file()


def test_the_tool_has_help_and_a_seed():
    command = [sys.executable, str(ROOT / "tools" / "anyres_demo.py"), "--help"]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    assert "--seed" in result.stdout and "--stage2-steps" in result.stdout
