"""Precision as a 7B user meets it: an LM loaded in bf16 trains float32 master weights (and float32 AdamW moments),
moves as a float32 run does, is saved in the dtype it was loaded in, and says so in the log; QLoRA's 4-bit base
loads, trains, saves and reloads for real (bitsandbytes' CPU backend)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import TrainerCallback

from llava_lite.config_io import ConfigError, from_dict, to_dict
from llava_lite.data.collator import Collator
from llava_lite.data.formats import parse_record
from llava_lite.demo import shapes
from llava_lite.model.language_model import process_device_map
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.processor_for_config import processor_for_config
from llava_lite.train.config import TrainConfig
from llava_lite.train.recipes import resolved
from llava_lite.train.run import run_training
from llava_lite.train.trainable_model import build_training_model

STEPS = 20
QUIET = {"report_to": "none", "logging_steps": 1, "save_steps": 1000, "warmup_ratio": 0.0, "scheduler": "constant"}


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> dict[str, Path]:
    return shapes.build_dataset(tmp_path_factory.mktemp("shapes"), 24, 4, 8, seed=0)


@pytest.fixture(scope="module")
def stage1(shapes_data, tmp_path_factory) -> Path:
    """A short stage-1 run of the tiny preset: its LM (random weights, float32) is saved in the run folder."""
    out = tmp_path_factory.mktemp("stage1") / "run"
    raw = {
        "recipe": "stage1",
        "model": "tiny",
        "output_dir": str(out),
        "data": {"sources": [{"path": str(shapes_data["captions"]), "image_folder": str(shapes_data["images"])}]},
        "train": {**QUIET, "max_steps": 2, "batch_size": 4},
    }
    return run_training(from_dict(TrainConfig, raw))


def stage2(stage1: Path, data: dict, out: Path, lm: dict | None = None, method: str = "full", **train) -> TrainConfig:
    raw = {
        "recipe": "stage2",
        "init_from": str(stage1),
        "output_dir": str(out),
        "data": {
            "sources": [
                {"path": str(data["questions"]), "image_folder": str(data["images"])},
                {"path": str(data["text"])},
            ],
            "max_length": 128,
        },
        "finetune": {"method": method},
        "train": {**QUIET, "max_steps": STEPS, "batch_size": 4, "learning_rate": 2e-5, **train},
    }
    if lm:
        raw["model"] = {"language_model": lm}
    return from_dict(TrainConfig, raw)


class Finish(TrainerCallback):
    """What the trained model and its optimizer hold when training ends."""

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
        self.lm = {n: p.detach().float().clone() for n, p in model.language_model.named_parameters()}
        moments = [t for s in optimizer.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
        self.moments = {t.dtype for t in moments}
        lm = {id(p) for p in model.language_model.parameters()}
        self.lm_moments = {s["exp_avg"].dtype for p, s in optimizer.state.items() if id(p) in lm}


def train_recording(config: TrainConfig) -> tuple[Path, Finish, dict[str, torch.Tensor]]:
    """The run, what it held at its end, and the LM weights it started from (as float32 copies)."""
    start = build_training_model(resolved(config))  # the same seed and source build the same start
    before = {n: p.detach().float().clone() for n, p in start.language_model.named_parameters()}
    finish = Finish()
    return run_training(config, callbacks=[finish]), finish, before


@pytest.fixture(scope="module")
def runs(stage1, shapes_data, tmp_path_factory) -> dict:
    """Three stage-2 full fine-tunes under bf16 autocast, lr 2e-5: the LM loaded in float32; loaded in bf16 with
    float32 masters (the default); loaded in bf16 and trained in bf16 (master_weights: as_loaded)."""
    folder = tmp_path_factory.mktemp("precision")
    settings = {
        "fp32_loaded": ({"dtype": "float32"}, {}),
        "bf16_loaded": ({"dtype": "bfloat16"}, {}),
        "pure_bf16": ({"dtype": "bfloat16"}, {"master_weights": "as_loaded"}),
    }
    return {
        name: train_recording(stage2(stage1, shapes_data, folder / name, lm, precision="bf16", **train))
        for name, (lm, train) in settings.items()
    }


def moved(before: dict, after: dict) -> dict[str, torch.Tensor]:
    return {name: after[name] - before[name] for name in before}


def test_a_bf16_loaded_lm_trains_float32_masters_with_float32_moments(runs):
    _, finish, _ = runs["bf16_loaded"]
    assert finish.trained and set(finish.trained.values()) == {torch.float32}
    assert finish.moments == {torch.float32}
    _, pure, _ = runs["pure_bf16"]
    assert {d for n, d in pure.trained.items() if n.startswith("language_model.")} == {torch.bfloat16}
    assert pure.lm_moments == {torch.bfloat16}  # AdamW keeps its moments in the weights' dtype


def test_float32_masters_move_as_a_float32_run_where_pure_bf16_loses_most_updates(runs):
    deltas = {name: moved(before, finish.lm) for name, (_, finish, before) in runs.items()}
    reference = torch.cat([d.flatten() for d in deltas["fp32_loaded"].values()])
    masters = torch.cat([d.flatten() for d in deltas["bf16_loaded"].values()])
    pure = torch.cat([d.flatten() for d in deltas["pure_bf16"].values()])
    # The two runs start from weights one bf16 rounding apart, so their updates differ a little: 0.8 % measured.
    assert (masters - reference).norm() / reference.norm() < 0.1
    assert (masters == 0).float().mean() < 0.01
    # In pure bf16 an update under 1/256 of its weight rounds away: most weights never move in 20 steps (70 % of them
    # measured, the updates 87 % off the float32 run's).
    assert (pure == 0).float().mean() > 0.5
    assert (pure - reference).norm() / reference.norm() > 0.3


def test_a_finished_run_is_saved_in_the_dtype_its_lm_was_loaded_in_and_checkpoints_keep_the_masters(runs, stage1):
    folder, finish, _ = runs["bf16_loaded"]
    with safe_open(str(folder / "language_model" / "model.safetensors"), "pt") as weights:
        stored = {weights.get_tensor(k).dtype for k in weights.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert stored == {torch.bfloat16}
    reloaded = LlavaLiteModel.from_pretrained(folder)
    assert reloaded.base_language_model.dtype == torch.bfloat16
    for name, param in reloaded.language_model.named_parameters():
        assert torch.equal(param.float(), finish.lm[name].to(torch.bfloat16).float()), name
    config = json.loads((folder / "llava_lite_config.json").read_text())["model"]
    assert config["language_model"]["dtype"] == "bfloat16"


def test_a_checkpoint_keeps_float32_masters_so_a_resumed_bf16_run_continues_exactly(stage1, shapes_data, tmp_path):
    from conftest import StopAt

    lm = {"dtype": "bfloat16"}
    whole = run_training(stage2(stage1, shapes_data, tmp_path / "whole", lm, precision="bf16", max_steps=4))
    config = stage2(stage1, shapes_data, tmp_path / "cut", lm, precision="bf16", max_steps=4, save_steps=2)
    run_training(config, callbacks=[StopAt(2)])
    with safe_open(str(tmp_path / "cut" / "checkpoint-2" / "language_model" / "model.safetensors"), "pt") as weights:
        stored = {weights.get_tensor(k).dtype for k in weights.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert stored == {torch.float32}
    resumed = run_training(config)
    losses = [
        [e["loss"] for e in json.loads((f / "trainer_state.json").read_text())["log_history"] if "loss" in e]
        for f in (whole, resumed)
    ]
    assert losses[0][2:] == losses[1][2:]


def test_the_log_says_per_part_how_it_is_stored_and_what_computes(stage1, shapes_data, tmp_path, caplog):
    config = stage2(stage1, shapes_data, tmp_path / "x", {"dtype": "bfloat16"}, method="lora", precision="bf16")
    with caplog.at_level(logging.INFO, logger="llava_lite.train.trainable_model"):
        build_training_model(resolved(config))
    lines = [r.getMessage() for r in caplog.records if r.name == "llava_lite.train.trainable_model"]
    assert lines[0].startswith("frozen ") and "vision_tower" in lines[0] and lines[0].endswith("stored in float32")
    assert lines[1].endswith("stored in float32")  # the projector
    assert "with adapters, stored in trained float32, frozen bfloat16" in lines[2]
    assert lines[3] == "computing in bf16 autocast"


def test_init_from_may_set_how_the_lm_loads_and_nothing_else(stage1, shapes_data, tmp_path):
    with pytest.raises(ValueError, match=r"may only set chat_template and language_model.\{dtype, attn_implementation"):
        stage2(stage1, shapes_data, tmp_path / "x", {"num_hidden_layers": 3})
    with pytest.raises(ValueError, match="dtype must be one of"):
        stage2(stage1, shapes_data, tmp_path / "x", {"dtype": "float8"})
    eager = stage2(stage1, shapes_data, tmp_path / "x", {"attn_implementation": "eager"})
    model = build_training_model(resolved(eager))
    assert model.base_language_model.config._attn_implementation == "eager"


def test_under_ddp_a_bf16_loaded_lm_trains_float32_masters_with_float32_moments(stage1, shapes_data, tmp_path):
    import os
    import subprocess
    import sys

    import yaml
    from conftest import ROOT

    config = stage2(stage1, shapes_data, tmp_path / "run", {"dtype": "bfloat16"}, precision="bf16", max_steps=2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(to_dict(config)))
    reports = tmp_path / "reports"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + [str(ROOT / "tests" / "distributed_train.py"), str(reports), "--", "train", str(recipe)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((reports / f"rank{rank}.json").read_text())
        assert seen["wrapper"] == "DistributedDataParallel"
        assert seen["trained_dtypes"] == ["torch.float32"] and seen["moment_dtypes"] == ["torch.float32"]


# ----- QLoRA: a real 4-bit NF4 base (bitsandbytes' CPU backend) ------------------------------------------------
def test_the_quantized_base_goes_on_each_processs_own_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert process_device_map({"LOCAL_RANK": "3"}) == {"": 3}
    assert process_device_map({}) == {"": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert process_device_map({"LOCAL_RANK": "3"}) == {"": "cpu"}


@pytest.fixture(scope="module")
def qlora_run(stage1, shapes_data, tmp_path_factory) -> tuple[Path, Finish]:
    config = stage2(stage1, shapes_data, tmp_path_factory.mktemp("qlora") / "run", method="qlora", max_steps=3)
    config.train.learning_rate = 1e-2
    finish = Finish()
    return run_training(config, callbacks=[finish]), finish


def test_qlora_trains_adapters_over_a_real_4bit_base(qlora_run, stage1, shapes_data, tmp_path):
    import bitsandbytes as bnb

    model = build_training_model(resolved(stage2(stage1, shapes_data, tmp_path / "x", method="qlora")))
    quantized = [m for m in model.base_language_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.quant_type == "nf4" for m in quantized)
    assert all(m.weight.quant_state.nested for m in quantized)  # double quantization
    assert not any(m.weight.requires_grad for m in quantized)
    _, finish = qlora_run
    trained = set(finish.trained)
    assert trained and all(".lora_" in n or n.startswith("projector.") or "trainable_tokens" in n for n in trained)
    assert set(finish.trained.values()) == {torch.float32}


def test_an_evaluation_pass_leaves_the_gradients_through_the_4bit_base_as_they_were(stage1, shapes_data, tmp_path):
    def gradients(evaluate_first: bool) -> dict[str, torch.Tensor]:
        model = build_training_model(resolved(stage2(stage1, shapes_data, tmp_path / "x", method="qlora")))
        model.loss_kernel = "full"  # no probe of the LM (an eval-mode pass of its own) before the training pass
        for name, param in model.named_parameters():  # LoRA's B starts at zero: give every adapter a say
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(0))
        records = json.loads(shapes_data["text"].read_text())[:2]
        processor = processor_for_config(model.config, model.tokenizer)
        batch = Collator(model.tokenizer.pad_token_id)([processor.sample(parse_record(r, "x")) for r in records])
        if evaluate_first:  # as the loss's probe of the LM and any evaluation do
            model.eval()
            with torch.no_grad():
                model(**batch)
        model.train()
        model(**batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None and "layers.0." in n}

    plain, after_evaluation = gradients(False), gradients(True)
    assert plain
    for name, grad in plain.items():
        assert (after_evaluation[name] - grad).norm() <= 1e-2 * grad.norm(), name


def test_a_qlora_run_saves_adapters_and_reloads_them_over_the_base(qlora_run):
    folder, finish = qlora_run
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    assert not (folder / "language_model").exists()  # the base is named by its source, not copied
    reloaded = LlavaLiteModel.from_pretrained(folder)
    for name, param in reloaded.language_model.named_parameters():
        if ".lora_" in name:
            assert torch.equal(param.float(), finish.lm[name]), name


def test_a_qlora_run_merges_into_its_full_precision_base(qlora_run, tmp_path):
    from llava_lite.cli import main

    folder, _ = qlora_run
    assert main(["export", "--model", str(folder), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    merged = LlavaLiteModel.from_pretrained(tmp_path / "merged")
    adapters = LlavaLiteModel.from_pretrained(folder)
    ids = torch.tensor([[1, 5, 9, 30, 77, 2]])
    with torch.no_grad():
        expected = adapters(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert not merged.uses_adapters
    assert torch.allclose(got, expected, atol=1e-4)


def test_quantizing_a_model_built_from_a_config_is_refused_in_one_line(shapes_data, tmp_path):
    raw = {
        "recipe": "stage2",
        "model": "tiny",
        "output_dir": str(tmp_path / "x"),
        "data": {"sources": [{"path": str(shapes_data["text"])}]},
        "finetune": {"method": "qlora"},
    }
    with pytest.raises(ValueError, match="quantizes pretrained weights, and a model built from model_config has none"):
        build_training_model(resolved(from_dict(TrainConfig, raw)))


def test_a_config_error_names_the_bad_master_weights_value(stage1, shapes_data, tmp_path):
    with pytest.raises((ConfigError, ValueError), match="master_weights"):
        stage2(stage1, shapes_data, tmp_path / "x", master_weights="bf16")
