"""`recipe: preference` end to end: a short run learns its pairs (TRL's metric names in the log, `eval --preference`
agreeing), the precomputed reference is stored, reused and recomputed when the data changes, the reference-free
losses train without one, and configs that cannot work are refused in one line."""

from __future__ import annotations

import json
import logging
import re

import pytest
from preference_helpers import preference_config, starting_run, write_pairs
from transformers import TrainerState

from llava_lite import cli
from llava_lite.config_io import ConfigError
from llava_lite.run_folder import REFERENCE_LOGPS_FILE
from llava_lite.train.recipes import preference, resolved
from llava_lite.train.recipes.preference import ReferenceAtTrainBegin
from llava_lite.train.run import run_training

TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")  # fmt: skip


def history(folder) -> list[dict]:
    return [e for e in json.loads((folder / "trainer_state.json").read_text())["log_history"] if "loss" in e]


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> dict:
    """Eight pairs whose rejected answer is always the same evasion, and a run to start from."""
    folder = tmp_path_factory.mktemp("preference_runs")
    data = write_pairs(folder, 8)
    rows = [json.loads(line) for line in data["pairs"].read_text().splitlines()]
    for row in rows:
        row["rejected"] = [{"role": "assistant", "content": "It is hard to say."}]
    data["pairs"].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"folder": folder, "data": data, "start": starting_run(folder / "start")}


def full_run(material, name: str, **train):
    return preference_config(
        material["start"], material["data"], material["folder"] / name, finetune={"method": "full"},
        train={"max_steps": 10, "batch_size": 4, "learning_rate": 3e-3, "scheduler": "constant", **train},
        preference={"beta": 0.5},
    )  # fmt: skip


@pytest.fixture(scope="module")
def learned(material):
    return run_training(full_run(material, "learned", logging_steps=5))


def test_a_short_run_learns_its_pairs_and_logs_trls_metrics(material, learned, capsys):
    logs = history(learned)
    assert [e["step"] for e in logs] == [1, 5, 10]
    assert all(name in entry for entry in logs for name in TRL_METRICS)
    # DPO's log 2 at the start (policy = reference) plus the NLL term on the chosen answers, on by default.
    assert logs[0]["rewards/accuracies"] == 0.0
    assert logs[0]["nll_loss"] > 0 and logs[0]["loss"] == pytest.approx(0.6931 + logs[0]["nll_loss"], abs=1e-4)
    assert logs[-1]["rewards/accuracies"] > 0.9 and logs[-1]["rewards/margins"] > 0
    assert (learned / REFERENCE_LOGPS_FILE).is_file()

    data = material["data"]
    code = cli.main(["eval", "--model", str(learned), "--preference", str(data["pairs"]), "--preference-images",
                     str(data["images"]), "--json"])  # fmt: skip
    assert code == 0
    results = json.loads(capsys.readouterr().out)["preference"]
    assert results["pairs"] == 8 and results["accuracy"] > 0.9 and results["mean_margin"] > 0
    assert results["reference"] == str(material["start"]) and results["beta"] == 0.5  # from the run's config


def test_the_precomputed_reference_is_reused_by_a_new_start_and_recomputed_when_the_data_changes(
    material, learned, caplog
):
    stored = learned / REFERENCE_LOGPS_FILE
    written = stored.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="llava_lite.train.recipes.preference"):
        run_training(full_run(material, "learned", max_steps=1))  # resume=never: the run starts over
    assert f"reusing the reference log-probs in {stored}" in caplog.text
    assert stored.stat().st_mtime_ns == written

    pairs = material["data"]["pairs"]
    original = pairs.read_text()
    try:
        pairs.write_text("".join(original.splitlines(keepends=True)[:-1]))  # one pair fewer
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="llava_lite.train.recipes.preference"):
            run_training(full_run(material, "learned", max_steps=1))
    finally:
        pairs.write_text(original)
    assert "computing the reference log-probs of 7 pairs" in caplog.text
    assert stored.stat().st_mtime_ns != written


def test_a_resumed_sharded_run_whose_stored_reference_is_gone_is_refused_rather_than_computed_again(material):
    # Under ZeRO-3 and FSDP the reference is made at the start of training; a resumed run's model holds the
    # checkpoint's weights by then, so a missing table cannot be made again from the starting model.
    config = resolved(full_run(material, "resumed_without_reference", max_steps=1))
    trainer, _ = preference.build_trainer(config, None, False)
    stored = material["folder"] / "resumed_without_reference" / REFERENCE_LOGPS_FILE
    assert stored.is_file()  # made as the trainer was built (one process: the starting model's weights)
    stored.unlink()
    trainer.reference = None
    at_begin = ReferenceAtTrainBegin(trainer, config, trainer.train_dataset, trainer.train_dataset)
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(stored))}: missing, .* start the run afresh \(resume: never\)$"
    ):
        at_begin.on_train_begin(trainer.args, TrainerState(global_step=3), None)
    assert trainer.reference is None and not stored.exists()
    at_begin.on_train_begin(trainer.args, TrainerState(global_step=0), None)  # a fresh start computes it
    assert trainer.reference is not None and stored.is_file()


def test_orpo_trains_packed_pairs_without_a_reference_and_logs_its_terms(material):
    config = preference_config(
        material["start"], material["data"], material["folder"] / "orpo", data={"packing": True},
        preference={"loss": "orpo"}, train={"max_steps": 2, "batch_size": 1},
    )  # fmt: skip
    assert resolved(config).preference.reference == "none" and resolved(config).preference.sft_weight == 1.0
    logs = history(run_training(config))
    assert all(name in logs[-1] for name in (*TRL_METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen"))
    assert not (material["folder"] / "orpo" / REFERENCE_LOGPS_FILE).exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"finetune": {"method": "full"}, "preference": {"reference": "adapters_off"}}, "needs adapters"),
        ({"preference": {"loss": "simpo", "reference": "precomputed"}}, "needs no reference"),
        ({"preference": {"loss": "hinge", "label_smoothing": 0.1}}, "label_smoothing applies to"),
        ({"recipe": "stage2", "preference": {"loss": "ipo"}}, "the preference section is for recipe preference"),
        ({"data": {"group_by_modality_length": True}}, "pack the pairs instead"),
    ],
)
def test_configs_that_cannot_work_are_refused_in_one_line(material, changes, message):
    with pytest.raises(ConfigError, match=message):
        resolved(preference_config(material["start"], material["data"], material["folder"] / "refused", **changes))
