"""Several processes: two CPU ranks over gloo train as one process with twice the batch, write one run folder, count
both ranks' skips and resume a killed run; FSDP2 shards our model; the shipped accelerate configs parse."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from llava_lite.data.conversation import Conversation, Message
from llava_lite.demo import shapes
from llava_lite.inference.generator import Generator, SamplingSettings
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.train.config import load_train_config
from llava_lite.train.run import run_training

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve().parent
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
STEPS = 6
CORRUPT = 4  # image records whose files are not images: skipped while samples are built


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """A stage-2 recipe over 24 records - 10 with an image, 10 text-only, 4 with a corrupt image - in a fixed
    shuffled order; per-device batch 2 and plain SGD, so every difference in the gradients shows in the weights."""
    folder = tmp_path_factory.mktemp("distributed")
    data = shapes.build_dataset(folder / "shapes", 10, 1, 10, seed=3)
    for index in range(CORRUPT):
        (data["images"] / f"corrupt_{index}.png").write_bytes(b"not an image")
    records = json.loads(data["questions"].read_text()) + json.loads(data["text"].read_text())
    template = records[0]
    records += [{**template, "id": f"corrupt_{i}", "image": f"corrupt_{i}.png"} for i in range(CORRUPT)]
    random.Random(0).shuffle(records)
    (folder / "mixed.json").write_text(json.dumps(records))
    config = {
        "recipe": "stage2",
        "model": "tiny",
        "output_dir": str(folder / "unused"),
        "data": {
            "sources": [{"path": str(folder / "mixed.json"), "image_folder": str(data["images"])}],
            "max_length": 128,
            "on_bad_record": "skip",
        },
        "train": {
            "max_steps": STEPS,
            "batch_size": 2,
            "optimizer": "sgd",
            "learning_rate": 0.5,
            "scheduler": "constant",
            "warmup_ratio": 0.0,
            "max_grad_norm": 1e9,
            "logging_steps": 1,
            "save_steps": 2,
            "save_total_limit": None,
            "report_to": "none",
        },
        "seed": 7,
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun_train(
    recipe: Path, output: Path, reports: Path, *extra: str, overrides: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Two ranks under torchrun, each running `llava-lite train` (through tests/distributed_train.py)."""
    return launch(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + [str(HELPERS / "distributed_train.py"), str(reports), *extra]
        + ["--", "train", str(recipe), f"output_dir={output}", *overrides]
    )


def accelerate_train(recipe: Path, output: Path) -> subprocess.CompletedProcess:
    """Two ranks under `accelerate launch` with the shipped DDP config, as a user starts them."""
    return launch(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/ddp.yaml"]
        + ["--num_processes", "2", "--main_process_port", str(free_port())]
        + ["-m", "llava_lite", "train", str(recipe), f"output_dir={output}"]
    )


def history(folder: Path) -> dict[int, dict]:
    entries = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry for entry in entries if "loss" in entry}


def assert_close(got: float, expected: float, what: str) -> None:
    assert abs(got - expected) <= 1e-5 * abs(expected), f"{what}: {got} != {expected}"


@pytest.fixture(scope="module")
def two_ranks(recipe) -> dict:
    """The uninterrupted two-process run: its output folder, what it printed, and what each rank saw."""
    output, reports = recipe.parent / "two_ranks", recipe.parent / "two_ranks_reports"
    done = torchrun_train(recipe, output, reports)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"output": output, "stdout": done.stdout, "stderr": done.stderr, "ranks": ranks}


def test_two_processes_train_exactly_as_one_with_twice_the_batch(recipe, two_ranks, tmp_path):
    ranks = two_ranks["ranks"]
    for rank in ranks:
        assert rank["wrapper"] == "DistributedDataParallel" and rank["find_unused_parameters"] is False
        assert len(rank["batches"]) == STEPS
    # Some steps had a text-only micro-batch on one rank while the other rank's had images.
    steps = list(zip(ranks[0]["batches"], ranks[1]["batches"]))
    assert any((mine[0] == 0) != (theirs[0] == 0) for mine, theirs in steps), steps
    assert "find_unused_parameters" not in two_ranks["stderr"]

    config = load_train_config(recipe, [f"output_dir={tmp_path / 'one'}", "train.batch_size=4"])
    one = run_training(config)
    expected, got = history(one), history(two_ranks["output"])
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert_close(got[step]["loss"], expected[step]["loss"], f"loss at step {step}")
        assert_close(got[step]["grad_norm"], expected[step]["grad_norm"], f"gradient norm at step {step}")
    trained_one = LlavaLiteModel.from_pretrained(one).state_dict()
    trained_two = LlavaLiteModel.from_pretrained(two_ranks["output"]).state_dict()
    for name, weight in trained_one.items():
        assert torch.allclose(trained_two[name], weight, rtol=1e-5, atol=1e-6), name


def test_two_processes_train_packed_rows_exactly_as_one_with_twice_the_rows(recipe, tmp_path):
    packing = ("data.packing=true", "data.pack_length=100")  # rows of an image sample and a text-only one
    output, reports = tmp_path / "two", tmp_path / "reports"
    done = torchrun_train(recipe, output, reports, overrides=(*packing, "train.batch_size=1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "packed 24 samples into 14 rows" in done.stderr  # 12 rows in 6 steps: all in the first epoch
    ranks = [json.loads((reports / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for seen in ranks:
        assert len(seen["batches"]) == STEPS and all(sum(batch) == 1 for batch in seen["batches"])  # one row
        assert len(seen["samples_per_row"]) == STEPS
    assert max(n for seen in ranks for n in seen["samples_per_row"]) >= 2  # samples share a row
    config = load_train_config(recipe, [f"output_dir={tmp_path / 'one'}", *packing, "train.batch_size=2"])
    expected, got = history(run_training(config)), history(output)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert_close(got[step]["loss"], expected[step]["loss"], f"loss at step {step}")
        # One row of 2 x the samples against two rows averaged by DDP: the sums run in another order.
        grad_norm = got[step]["grad_norm"]
        assert abs(grad_norm - expected[step]["grad_norm"]) <= 1e-4 * grad_norm, f"gradient norm at step {step}"


def test_two_processes_write_one_run_folder_that_loads_answers_and_counts_both_ranks_skips(recipe, two_ranks):
    output = two_ranks["output"]
    assert two_ranks["stdout"].count("saved the trained model to") == 1
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    rng_states = sorted(p.name for p in (output / "checkpoint-6").glob("rng_state_*"))
    assert rng_states == ["rng_state_0.pth", "rng_state_1.pth"]  # one run of two ranks, not two runs
    assert not list(output.rglob(".staging"))

    # The run read the whole data once: each rank met corrupt records of its own, and all of them count, once.
    here = [rank["skipped_here"].get("corrupt_image", 0) for rank in two_ranks["ranks"]]
    assert all(count > 0 for count in here) and sum(here) >= CORRUPT, here
    assert f"saved {output}; skipped records: corrupt_image {CORRUPT}" in two_ranks["stderr"]
    assert two_ranks["stderr"].count("; skipped records:") == 1
    assert history(output)[STEPS]["skipped_records"] == CORRUPT

    image = Image.open(next((recipe.parent / "shapes" / "images").glob("train_*.png"))).convert("RGB")
    question = Conversation([Message("user", "<image>\nWhat colour is the shape?")])
    answer = Generator.from_folder(output, "cpu").complete([question], [[image]], SamplingSettings(max_new_tokens=8))
    assert answer[0].completion_tokens > 0 and answer[0].finish_reason in ("stop", "length")


def test_a_killed_two_process_run_resumes_under_accelerate_launch_with_the_same_losses(recipe, two_ranks):
    output, reports = recipe.parent / "killed", recipe.parent / "killed_reports"
    killed = torchrun_train(recipe, output, reports, "--kill-after-checkpoint", "4")
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr, killed.stderr[-3000:]
    assert (output / "checkpoint-4").is_dir() and not (output / "trainer_state.json").exists()
    resumed = accelerate_train(recipe, output)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {output / 'checkpoint-4'}" in resumed.stderr
    expected, got = history(two_ranks["output"]), history(output)
    for step in (5, 6):
        assert_close(got[step]["loss"], expected[step]["loss"], f"loss at step {step}")
    final_whole = LlavaLiteModel.from_pretrained(two_ranks["output"]).state_dict()
    final_resumed = LlavaLiteModel.from_pretrained(output).state_dict()
    for name, weight in final_whole.items():
        assert torch.allclose(final_resumed[name], weight, rtol=1e-5, atol=1e-6), name


def test_fsdp2_shards_our_model_with_the_shipped_wrapping_trains_and_gathers_a_full_state(recipe):
    reports = recipe.parent / "fsdp2"
    done = launch(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + [str(HELPERS / "fsdp2_steps.py"), str(recipe), str(reports)]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    layers = LlavaLiteModel.from_pretrained(reports / "run").base_language_model.config.num_hidden_layers
    for rank in ranks:  # one unit per decoder layer, the rest in the root; rank 1's batches are text-only
        assert rank["units"] == ["LlamaDecoderLayer"] * layers + ["LlavaLiteModel"]
        assert_close(rank["losses"][0], rank["reference_loss"], "sharded loss against the unsharded model's")
    main = ranks[0]
    assert main["shapes_match"] and main["changed"] == ["language_model", "projector"]
    assert main["saved_equals_gathered"] and main["reloaded_equals_gathered"]


def launch_dests() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


def check_accelerate_config(path: Path) -> dict:
    """The config as `accelerate launch` reads it: its config class (which refuses unknown top-level fields), the
    launch arguments its engine section maps to, and the engine plugin built from what the launcher hands over."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    config = load_config_from_file(str(path))
    dests = launch_dests()
    for section in ("fsdp_config", "deepspeed_config"):
        unknown = [key for key in getattr(config, section) if key not in dests]
        assert not unknown, f"{path.name}: accelerate does not know {section} {unknown}"
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args = _validate_launch_command(args)[0]
    if config.distributed_type == DistributedType.FSDP:
        env, plugin_class = prepare_multi_gpu_env(args), FullyShardedDataParallelPlugin
    elif config.distributed_type == DistributedType.DEEPSPEED:
        args.deepspeed_fields_from_accelerate_config = ",".join(config.deepspeed_config)
        env, plugin_class = prepare_deepspeed_cmd_env(args)[1], DeepSpeedPlugin
    else:
        return {"config": config}
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        return {"config": config, "plugin": plugin_class()}
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_accelerate_config_parses_and_names_only_fields_accelerate_knows(path):
    checked = check_accelerate_config(path)
    config = checked["config"]
    plugin = checked.get("plugin")
    # Precision is the recipe's (train.precision), not the launcher's. accelerate refuses a launcher precision
    # beside a DeepSpeed file, so the DeepSpeed configs name none and their file takes the Trainer's ("auto").
    if path.name.startswith("deepspeed_zero"):
        assert "mixed_precision" not in yaml.safe_load(path.read_text())
    else:
        assert config.mixed_precision == "no"
    if path.name == "fsdp2.yaml":
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
        assert plugin.transformer_cls_names_to_wrap is None  # taken from the model's _no_split_modules
        assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    if path.name.startswith("deepspeed_zero"):
        zero = plugin.deepspeed_config["zero_optimization"]
        assert zero["stage"] == int(path.stem[-1])
        if zero["stage"] == 3:
            assert plugin.deepspeed_config["bf16"] == plugin.deepspeed_config["fp16"] == {"enabled": "auto"}
            assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # a run folder, not only shards
            # every tensor of a CLIP-L/14-336 tower (largest 1024 x 4096) stays whole; a 7B LM's 4096 x 4096 do not
            assert 1024 * 4096 < zero["stage3_param_persistence_threshold"] < 4096 * 4096
    if path.name == "ddp_2machines.yaml":
        assert config.num_machines == 2 and config.num_processes == 16 and config.main_process_ip


def test_an_accelerate_config_with_a_field_accelerate_does_not_know_is_refused(tmp_path):
    source = (ROOT / "configs" / "accelerate" / "fsdp2.yaml").read_text()
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text(source.replace("fsdp_reshard_after_forward", "fsdp_reshard_after_foward"))
    with pytest.raises(AssertionError, match="does not know fsdp_config"):
        check_accelerate_config(misspelt)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(source + "num_gpus: 8\n")
    with pytest.raises(ValueError, match="unknown keys.*num_gpus"):
        check_accelerate_config(unknown)


def test_one_process_seeing_several_gpus_is_told_to_start_one_per_gpu(recipe, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    config = load_train_config(recipe)
    with pytest.raises(ValueError, match="4 GPUs are visible to one process: start one process per GPU"):
        run_training(config)
