"""tools/bench_preference.py, TRL's DPOTrainer against our preference recipe, padded and packed: every side runs and
is reported with its ratio to TRL's, and TRL's and ours start from the same loss on the same first pairs (ratios
only: speed is for a quiet machine)."""

from __future__ import annotations

import json

import pytest
import trl  # noqa: F401  # a dev dependency: the side the benchmark measures ours against
from conftest import run_tool


def test_the_quick_benchmark_runs_every_side_and_trl_and_ours_start_from_the_same_loss(tmp_path):
    out = tmp_path / "bench.json"
    stdout = run_tool("bench_preference.py", "--quick", "--json", str(out), timeout=900)
    assert "failed" not in stdout, stdout
    sides = json.loads(out.read_text())["sides"]
    assert set(sides) == {"trl", "ours", "ours_packed"}
    for side, result in sides.items():
        assert result["pairs_per_s"] > 0 and result["tokens_per_s"] > 0 and result["peak_mib"] > 0, side
        assert f"\n{side} " in stdout
    # The same pairs in the same order from the same weights: DPO's first loss is log 2 on both sides.
    assert sides["ours"]["first_losses"][0] == pytest.approx(sides["trl"]["first_losses"][0], abs=1e-4)
    assert sides["ours"]["reference_s"] > 0  # full fine-tuning: our reference pass ran before training
