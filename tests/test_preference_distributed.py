"""`recipe: preference` on two CPU ranks over gloo (DDP): it trains exactly as one process with twice the batch, a run
killed by SIGKILL after a checkpoint resumes with the same losses, and the precomputed reference is computed once
(each rank its share) and reused by the resumed run. Under the shipped ZeRO-3 (every weight split) and FSDP2 launch
configs it trains as one process too (marker `engines`)."""

from __future__ import annotations

import json

import pytest
import yaml
from preference_helpers import QUIET, starting_run, write_pairs
from test_distributed import history, torchrun_train
from test_engines import ACCELERATE, accelerate_train, zero3_split_config

from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset
from llava_lite.run_folder import REFERENCE_LOGPS_FILE
from llava_lite.train.config import load_train_config
from llava_lite.train.run import run_training

STEPS = 4


def test_two_ranks_train_as_one_and_a_killed_run_resumes_with_the_same_losses_and_reference(tmp_path):
    data = write_pairs(tmp_path, 6, text_only=2)  # text-only pairs: some steps one rank has no image
    config = {
        "recipe": "preference",
        "init_from": str(starting_run(tmp_path / "start")),
        "output_dir": str(tmp_path / "unused"),
        "data": {"sources": [{"path": str(data["pairs"]), "image_folder": str(data["images"])}], "max_length": 128},
        "train": {**QUIET, "max_steps": STEPS, "batch_size": 1, "learning_rate": 1e-3, "save_steps": 2},
        "finetune": {"method": "full"},
        "preference": {"loss": "sigmoid", "beta": 0.5, "sft_weight": 0.1},
        "seed": 5,
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config))
    output, reports = tmp_path / "two", tmp_path / "reports"

    killed = torchrun_train(recipe, output, reports, "--kill-after-checkpoint", "2")
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr, killed.stderr[-3000:]
    assert "computing the reference log-probs of 8 pairs" in killed.stderr
    stored = output / REFERENCE_LOGPS_FILE
    written = stored.stat().st_mtime_ns
    assert (output / "checkpoint-2").is_dir() and not (output / "trainer_state.json").exists()

    resumed = torchrun_train(recipe, output, reports)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {output / 'checkpoint-2'}" in resumed.stderr
    assert f"reusing the reference log-probs in {stored}" in resumed.stderr
    assert stored.stat().st_mtime_ns == written
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(
        rank["wrapper"] == "DistributedDataParallel" and rank["find_unused_parameters"] is False for rank in ranks
    )

    one = run_training(load_train_config(recipe, [f"output_dir={tmp_path / 'one'}", "train.batch_size=2"]))
    expected, got = history(one), history(output)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        for key in ("loss", "rewards/margins", "logps/chosen", "nll_loss"):
            # A tolerance that scales with the operands: a margin is a difference of summed float32 log-probs of
            # tens of nats (float32 resolves ~4e-6 at 34), so it is as exact as they are, not as its small value.
            scale = operand_scale(expected[step], key)
            assert abs(got[step][key] - expected[step][key]) <= 1e-5 * scale + 1e-6, (step, key)
    assert got[STEPS]["rewards/margins"] != 0  # the policy moved from its reference


@pytest.mark.engines
@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_the_preference_recipe_under_zero3_and_fsdp2_trains_as_one_process(tmp_path, engine):
    """Full fine-tuning with the precomputed reference and an untied head, every ZeRO-3 weight split and released
    (the head's gradient is made in the backward pass, the policy's log-probs in the forward): two ranks under the
    shipped launch configs, as the README writes them, give one process's losses and margins with twice the batch."""
    data = write_pairs(tmp_path, 6, text_only=2)
    start = tmp_path / "start"
    LlavaLiteModel.from_config(
        preset("tiny", language_model={"model_config": {"tie_word_embeddings": False}})
    ).save_pretrained(start)
    config = {
        "recipe": "preference",
        "init_from": str(start),
        "output_dir": str(tmp_path / "unused"),
        "data": {"sources": [{"path": str(data["pairs"]), "image_folder": str(data["images"])}], "max_length": 128},
        "train": {
            **QUIET,
            "max_steps": 3,
            "batch_size": 1,
            "learning_rate": 1e-3,
            "optimizer": "adamw_torch",
            "max_grad_norm": 1e9,
            "precision": "fp32",
        },  # fmt: skip
        "finetune": {"method": "full"},
        "preference": {"loss": "sigmoid", "beta": 0.5, "sft_weight": 0.1},
        "seed": 5,
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config))
    launch_config = ACCELERATE / "fsdp2.yaml"
    if engine == "zero3":
        launch_config = zero3_split_config(tmp_path)
    output = tmp_path / engine
    done = accelerate_train(launch_config, recipe, output, reports=tmp_path / "reports")
    assert "computing the reference log-probs of 8 pairs" in done.stderr
    ranks = [json.loads((tmp_path / "reports" / f"rank{r}.json").read_text()) for r in (0, 1)]
    if engine == "zero3":  # the head really was split: each rank holds none of it between steps
        assert all(r["held"]["head"]["here"] < r["held"]["head"]["full"] for r in ranks), ranks
    else:  # the decoder really is sharded (the head is the root's: FSDP2 leaves it whole after the reference pass)
        assert all(r["held"]["decoder"]["dtensor"] for r in ranks), [r["held"] for r in ranks]
        assert all(r["held"]["decoder"]["here"] < r["held"]["decoder"]["full"] for r in ranks)

    one = run_training(load_train_config(recipe, [f"output_dir={tmp_path / 'one'}", "train.batch_size=2"]))
    expected, got = history(one), history(output)
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    for step in expected:
        for key in ("loss", "rewards/margins", "logps/chosen", "nll_loss"):
            assert abs(got[step][key] - expected[step][key]) <= 1e-4 * abs(expected[step][key]) + 1e-5, (step, key)
    assert got[3]["rewards/margins"] != 0


def operand_scale(logs: dict[str, float], key: str) -> float:
    """The size of what `key` was computed from: the log-probs themselves for a reward margin, else its value."""
    if key == "rewards/margins":
        return abs(logs["logps/chosen"]) + abs(logs["logps/rejected"])
    return abs(logs[key])
