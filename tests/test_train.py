"""The two recipes: what each stage trains and freezes, token-normalised accumulation, resume, atomic saves."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import StopAt
from transformers import TrainerCallback

from llava_lite.config_io import from_dict
from llava_lite.demo import shapes
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset
from llava_lite.run_folder import STAGING_DIR
from llava_lite.train.config import TrainConfig
from llava_lite.train.recipes import resolved
from llava_lite.train.run import run_training
from llava_lite.train.trainable_model import build_training_model
from llava_lite.train.trainer import LlavaTrainer

QUIET = {"report_to": "none", "logging_steps": 1, "save_steps": 1000, "warmup_ratio": 0.0}


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> dict[str, Path]:
    return shapes.build_dataset(tmp_path_factory.mktemp("shapes"), 24, 4, 8, seed=0)


def config(tmp_path: Path, data: dict[str, Path], recipe: str = "stage1", **changes) -> TrainConfig:
    sources = {
        "stage1": [{"path": str(data["captions"]), "image_folder": str(data["images"])}],
        "stage2": [
            {"path": str(data["questions"]), "image_folder": str(data["images"])},
            {"path": str(data["text"])},
        ],
    }[recipe]
    raw = {
        "recipe": recipe,
        "model": "tiny",
        "output_dir": str(tmp_path / recipe),
        "data": {"sources": sources, "max_length": 128},
        "train": {**QUIET, "max_steps": 3, "batch_size": 4, "learning_rate": 1e-2},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[section] = value
    return from_dict(TrainConfig, raw)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_all_changed(before: dict, after: dict, what: str) -> None:
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"{what}: {len(unchanged)} tensors did not move, e.g. {unchanged[:3]}"


def assert_all_equal(before: dict, after: dict, what: str) -> None:
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{what}: {len(changed)} frozen tensors changed, e.g. {changed[:3]}"


def test_stage1_trains_the_projector_alone(tmp_path, shapes_data):
    cfg = config(tmp_path, shapes_data)
    initial = build_training_model(resolved(cfg))  # the same seed builds the same starting model
    trained = LlavaLiteModel.from_pretrained(run_training(cfg))
    assert_all_changed(state(initial.projector), state(trained.projector), "projector")
    assert_all_equal(state(initial.vision_tower), state(trained.vision_tower), "vision tower")
    assert_all_equal(state(initial.language_model), state(trained.language_model), "language model")


def test_stage2_trains_projector_and_whole_lm_never_the_tower(tmp_path, shapes_data):
    stage1 = run_training(config(tmp_path, shapes_data))
    cfg = config(tmp_path, shapes_data, "stage2", model=None, init_from=str(stage1))
    initial = build_training_model(resolved(cfg))
    trained = LlavaLiteModel.from_pretrained(run_training(cfg))
    assert_all_changed(state(initial.projector), state(trained.projector), "projector")
    assert_all_changed(state(initial.language_model), state(trained.language_model), "language model")
    assert_all_equal(state(initial.vision_tower), state(trained.vision_tower), "vision tower")


def test_stage2_with_lora_trains_adapters_and_projector_only(tmp_path, shapes_data):
    cfg = config(tmp_path, shapes_data, "stage2", finetune={"method": "lora", "lora": {"r": 4, "alpha": 8}})
    initial = build_training_model(resolved(cfg))
    out = run_training(cfg)
    trained = LlavaLiteModel.from_pretrained(out)
    before, after = state(initial.language_model), state(trained.language_model)
    adapters = [k for k in before if "lora_" in k]
    assert adapters
    assert_all_changed({k: before[k] for k in adapters}, after, "LoRA adapters")
    assert_all_equal({k: v for k, v in before.items() if "lora_" not in k}, after, "base LM")
    assert_all_changed(state(initial.projector), state(trained.projector), "projector")
    assert_all_equal(state(initial.vision_tower), state(trained.vision_tower), "vision tower")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_projector_learns_at_its_own_rate_beside_adapters(tmp_path, shapes_data):
    cfg = resolved(config(tmp_path, shapes_data, "stage2", finetune={"method": "lora"}, train__learning_rate=None))
    assert cfg.train.learning_rate == 2e-4 and cfg.train.projector_lr == 2e-5
    full = resolved(config(tmp_path, shapes_data, "stage2", train__learning_rate=None))
    assert full.train.learning_rate == full.train.projector_lr == 2e-5
    stage1 = resolved(config(tmp_path, shapes_data, train__learning_rate=None))
    assert stage1.train.learning_rate == 1e-3 and stage1.data_template == "plain"


def test_optimizer_groups_carry_each_parts_learning_rate(tmp_path, shapes_data):
    cfg = config(tmp_path, shapes_data, "stage2", train__projector_lr=0.5, train__learning_rate=0.01)
    seen = {}

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
            names = {id(p): n.split(".")[0] for n, p in model.named_parameters()}
            for group in optimizer.param_groups:
                for param in group["params"]:
                    seen.setdefault(names[id(param)], set()).add(group["lr"])

    run_training(cfg, callbacks=[Capture()])
    assert seen["projector"] == {0.5}
    assert seen["language_model"] == {0.01}
    assert "vision_tower" not in seen


def test_text_only_and_image_records_train_in_one_batch(tmp_path, shapes_data, monkeypatch):
    cfg = config(tmp_path, shapes_data, "stage2", train__batch_size=32, train__max_steps=1)
    batches = []
    original = LlavaTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        image_rows = (inputs["input_ids"] == model.image_token_id).any(dim=1)
        batches.append((int(image_rows.sum()), int((~image_rows).sum())))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(LlavaTrainer, "compute_loss", spy)
    out = run_training(cfg)
    with_images, text_only = batches[0]
    assert with_images == 24 and text_only == 8
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert torch.isfinite(torch.tensor(history[0]["loss"]))


def test_recipe_says_once_what_it_trains_and_freezes(tmp_path, shapes_data, caplog):
    with caplog.at_level(logging.INFO, logger="llava_lite"):
        build_training_model(resolved(config(tmp_path, shapes_data)))
    lines = [r.getMessage() for r in caplog.records if r.name == "llava_lite.train.trainable_model"]
    assert len(lines) == 4
    assert lines[0].startswith("frozen ") and "vision_tower" in lines[0]
    assert lines[1].startswith("trained") and "projector" in lines[1]
    assert lines[2].startswith("frozen ") and "language_model" in lines[2]
    assert all("params" in line and line.endswith("stored in float32") for line in lines[:3])
    assert lines[3] == "computing in float32"  # no autocast on a CPU under precision auto


def test_accumulated_loss_is_normalised_by_target_tokens_not_per_micro_batch(tmp_path):
    data = tmp_path / "d.json"
    short = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes."}]}
    long = {"conversations": [{"from": "human", "value": "Tell me"}, {"from": "gpt", "value": "one two " * 30}]}
    data.write_text(json.dumps([short, long]))
    updates = {}
    for name, batch, accumulate in (("together", 2, 1), ("accumulated", 1, 2)):
        raw = {
            "recipe": "stage2",
            "model": "tiny",
            "output_dir": str(tmp_path / name),
            "data": {"sources": [{"path": str(data)}]},
            "train": {
                **QUIET,
                "max_steps": 1,
                "batch_size": batch,
                "gradient_accumulation": accumulate,
                "optimizer": "sgd",
                "learning_rate": 1.0,
                "scheduler": "constant",
                "max_grad_norm": 1e9,
            },
        }
        cfg = from_dict(TrainConfig, raw)
        initial = state(build_training_model(resolved(cfg)).language_model)
        trained = state(LlavaLiteModel.from_pretrained(run_training(cfg)).language_model)
        updates[name] = {k: trained[k] - initial[k] for k in initial}
    key = "model.layers.0.mlp.down_proj.weight"
    assert updates["together"][key].abs().max() > 0
    for name in updates["together"]:
        assert torch.allclose(updates["together"][name], updates["accumulated"][name], atol=1e-5), name


def losses(folder: Path) -> dict[int, float]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


@pytest.mark.parametrize(
    "ordering",
    [{}, {"data__packing": True, "data__pack_length": 160}, {"data__group_by_modality_length": True}],
    ids=["random", "packed", "grouped"],
)
def test_resumed_training_reproduces_the_uninterrupted_losses(tmp_path, shapes_data, ordering):
    settings = {"train__max_steps": 6, "train__save_steps": 2, **ordering}
    whole = run_training(config(tmp_path / "whole", shapes_data, "stage2", **settings))
    cut_cfg = config(tmp_path / "cut", shapes_data, "stage2", **settings)
    run_training(cut_cfg, callbacks=[StopAt(4)])
    assert (Path(cut_cfg.output_dir) / "checkpoint-4").is_dir()
    resumed = run_training(cut_cfg)  # resume=auto picks checkpoint-4
    expected, got = losses(whole), losses(resumed)
    assert set(range(1, 7)) <= set(expected)
    for step in (5, 6):
        assert got[step] == pytest.approx(expected[step], abs=1e-6)
    final_whole = LlavaLiteModel.from_pretrained(whole).state_dict()
    final_resumed = LlavaLiteModel.from_pretrained(resumed).state_dict()
    for key in final_whole:
        assert torch.allclose(final_whole[key], final_resumed[key], atol=1e-6), key


def test_a_save_killed_midway_leaves_the_last_checkpoint_whole(tmp_path, shapes_data, monkeypatch):
    cfg = config(tmp_path, shapes_data, "stage2", train__max_steps=4, train__save_steps=2)
    original = LlavaTrainer._save

    def dying_save(self, output_dir=None, state_dict=None):
        if self.state.global_step == 4:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "projector.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt("killed while saving")
        return original(self, output_dir, state_dict)

    monkeypatch.setattr(LlavaTrainer, "_save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg)
    out = Path(cfg.output_dir)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / STAGING_DIR).is_dir()  # the torn save stayed out of sight
    LlavaLiteModel.from_pretrained(out / "checkpoint-2")  # loads
    monkeypatch.setattr(LlavaTrainer, "_save", original)
    run_training(cfg)  # resume=auto continues from checkpoint-2 and finishes
    assert (out / "checkpoint-4").is_dir() and not (out / STAGING_DIR).exists()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


def test_resolved_config_is_saved_beside_every_checkpoint_and_old_ones_rotate_out(tmp_path, shapes_data):
    import yaml

    out = run_training(config(tmp_path, shapes_data, train__max_steps=3, train__save_steps=1))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # save_total_limit 2
    for folder in (out, out / "checkpoint-2", out / "checkpoint-3"):
        saved = yaml.safe_load((folder / "train_config.yaml").read_text())
        assert saved["recipe"] == "stage1" and saved["train"]["learning_rate"] == 1e-2
        assert saved["data_template"] == "plain" and saved["finetune"]["method"] == "none"


def test_stage1_saves_megabytes_not_the_frozen_lm_when_it_has_a_source(tmp_path, shapes_data):
    base = tmp_path / "base"
    LlavaLiteModel.from_config(preset("tiny")).save_pretrained(base)
    lm_path = str(base / "language_model")
    cfg = config(
        tmp_path, shapes_data, model={"preset": "tiny", "language_model": {"name": lm_path, "tokenizer": "tiny"}}
    )
    out = run_training(cfg)
    assert not (out / "language_model").exists()
    saved = json.loads((out / "llava_lite_config.json").read_text())["model"]["language_model"]
    assert saved["name"] == lm_path
    reloaded = LlavaLiteModel.from_pretrained(out)
    original = LlavaLiteModel.from_pretrained(base)
    assert_all_equal(state(original.language_model), state(reloaded.language_model), "referenced LM")


def test_skipped_records_are_counted_once(tmp_path, shapes_data, caplog):
    images = shutil.copytree(shapes_data["images"], tmp_path / "images")
    (images / "corrupt.png").write_bytes(b"not an image")
    records = json.loads(shapes_data["captions"].read_text())
    records[3]["image"] = "corrupt.png"  # skipped while training
    records[5]["image"] = "gone.png"  # skipped while the data is read
    data = tmp_path / "captions.json"
    data.write_text(json.dumps(records))
    cfg = config(
        tmp_path,
        shapes_data,
        data__sources=[{"path": str(data), "image_folder": str(images)}],
        data__on_bad_record="skip",
        train__max_steps=-1,
        train__epochs=1,
    )
    with caplog.at_level(logging.INFO, logger="llava_lite"):
        run_training(cfg)
    saved = [r.getMessage() for r in caplog.records if r.getMessage().startswith("saved ")]
    assert saved == [f"saved {cfg.output_dir}; skipped records: corrupt_image 1, missing_image 1"]


def test_qlora_from_a_saved_run_loads_its_lm_in_4bit(tmp_path, monkeypatch):
    # The 4-bit loading itself needs bitsandbytes and a CUDA GPU; here: the saved run's LM is asked for it.
    from llava_lite.model import saving

    LlavaLiteModel.from_config(preset("tiny")).save_pretrained(tmp_path / "stage1")
    asked = []

    def build(lm_config):
        asked.append(lm_config.quantization)
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(saving, "build_language_model", build)
    cfg = from_dict(
        TrainConfig,
        {
            "recipe": "stage2",
            "init_from": str(tmp_path / "stage1"),
            "output_dir": str(tmp_path / "stage2"),
            "data": {"sources": [{"path": "unused.json"}]},
            "finetune": {"method": "qlora"},
        },
    )
    with pytest.raises(RuntimeError, match="stop before loading"):
        build_training_model(resolved(cfg))
    assert asked == ["4bit"]


def test_adapters_train_the_marker_rows_of_the_data_template(tmp_path, shapes_data):
    cfg = config(tmp_path, shapes_data, "stage2", finetune={"method": "lora", "lora": {"r": 4}}, data_template="chatml")
    model = build_training_model(resolved(cfg))
    markers = sorted(model.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert model.language_model.peft_config["default"].trainable_token_indices == markers


def test_a_missing_data_file_is_refused_before_the_model_is_built(tmp_path, shapes_data, monkeypatch):
    def no_model(config):
        raise AssertionError("the model was built before the data paths were checked")

    monkeypatch.setattr("llava_lite.train.recipes.stage2.build_training_model", no_model)
    missing = tmp_path / "held_out.jsonl"
    cfg = config(tmp_path, shapes_data, eval_data={"sources": [{"path": str(missing)}]})
    with pytest.raises(ValueError, match=f"^{re.escape(str(missing))}: no such data file or folder$"):
        run_training(cfg)
