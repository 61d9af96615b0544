"""tools/gpu_check.py, the prepared GPU check, runs its own code on the CPU with tiny shapes (`--dry-run`): every
side a CPU can run trains and reports, the sides that need a GPU say so, the FLOP count adds up, and the RL step
runs."""

from __future__ import annotations

import json

from conftest import run_tool


def test_the_gpu_check_dry_run_trains_every_side_a_cpu_can_run(tmp_path):
    out = tmp_path / "check.json"
    stdout = run_tool("gpu_check.py", "--dry-run", "--rl", "--json", str(out), timeout=600)
    for side in ("ours_packed_flash", "ours_packed_liger"):  # no CUDA GPU here
        assert f"{side}: skipped (needs a CUDA GPU" in stdout
    report = json.loads(out.read_text())
    sides = report["sides"]
    assert set(sides) == {"plain", "ours", "ours_packed", "qlora"}
    for side, result in sides.items():
        assert result["nonpad_tokens_per_s"] > 0 and result["peak_mib"] > 0, side
        assert result["model_tflops_per_s"] > 0, side
        assert all(loss > 0 for loss in result["first_losses"]), side
    # Plain and ours train the same first batch from the same weights, both under bf16 autocast.
    assert abs(sides["ours"]["first_losses"][0] - sides["plain"]["first_losses"][0]) < 1e-3
    assert sides["ours_packed"]["padding"] == 0.0 and sides["ours"]["padding"] > 0
    assert len(sides["qlora"]["losses"]) == 2  # one warm-up step and one timed
    assert report["shapes"]["lm_matrix_params"] > 0 and report["shapes"]["patches"] == 16
    for side in sides:
        assert f"\n{side} " in stdout
    # The RL step: our side's quick look (3 prompts x 2 answers), its figures kept.
    rl = report["rl"]["sides"]["ours"]
    assert rl["completions"] == 6 and rl["completions_per_s"] > 0 and rl["peak_mib"] > 0
    assert "rl (tools/bench_rl.py):" in stdout
