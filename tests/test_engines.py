"""Every shipped accelerate config runs stage 2 on two CPU ranks (gloo), launched as the README writes it:
`accelerate launch --config_file configs/accelerate/X.yaml --num_processes 2 -m llava_lite train CONFIG.yaml`.

DDP is the reference. DeepSpeed ZeRO-2, and ZeRO-3 with every weight split and released (a test copy of the
shipped file: persistence threshold, live parameters and reuse distance at 0) and an untied head, give its losses
and weights; a ZeRO-3 run and an FSDP2 run killed after a checkpoint resume with the same losses; packed rows train
under the shipped ZeRO-3 and FSDP2 configs as one process with twice the rows; the KL to the base (adapters off)
and replay under ZeRO-3 and FSDP2 equal one process's; every run folder loads in one process and answers. Images
and text-only samples meet across ranks in the same step; evaluation during training gives DDP's numbers, run by
the main process alone under DDP and by every process under ZeRO-3 and FSDP2. Run alone with `pytest -m engines`.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from test_distributed import free_port, history, launch

from llava_lite.data.conversation import Conversation, Message
from llava_lite.demo import shapes
from llava_lite.inference.generator import Generator, SamplingSettings
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.train.config import load_train_config
from llava_lite.train.run import run_training

pytestmark = pytest.mark.engines

ROOT = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).resolve().parent / "distributed_train.py"
ACCELERATE = ROOT / "configs" / "accelerate"
STEPS, KILL_AT = 6, 3
PACKED = ("data.packing=true", "data.pack_length=100", "train.batch_size=1")  # one row a rank a step
# LoRA whose B starts random, so the tuned LM differs from the base (adapters off) from the first step.
KL = (
    "finetune.method=peft",
    "finetune.peft={peft_type: LORA, r: 4, lora_alpha: 8, init_lora_weights: false, target_modules: all-linear}",
    "train.kl_to_base=0.5",
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A stage-2 recipe (full fine-tuning, fp32, AdamW, an untied head) over 10 records with an image and 10
    text-only ones in a fixed shuffled order, general text to replay, and the ZeRO-3 test config."""
    folder = tmp_path_factory.mktemp("engines")
    data = shapes.build_dataset(folder / "shapes", 10, 1, 10, seed=3)
    records = json.loads(data["questions"].read_text()) + json.loads(data["text"].read_text())
    random.Random(0).shuffle(records)
    (folder / "mixed.json").write_text(json.dumps(records))
    (folder / "general.txt").write_text(
        "The harbour was quiet in the morning, and the boats rocked slowly on the water. " * 8
        + "A baker opened the shop at dawn and the street smelled of bread. " * 8
    )
    recipe = {
        "recipe": "stage2",
        "model": {"preset": "tiny", "language_model": {"model_config": {"tie_word_embeddings": False}}},
        "output_dir": str(folder / "unused"),
        "data": {
            "sources": [{"path": str(folder / "mixed.json"), "image_folder": str(data["images"])}],
            "max_length": 96,
        },
        "train": {
            "max_steps": STEPS,
            "batch_size": 2,
            "optimizer": "adamw_torch",
            "learning_rate": 3e-3,
            "scheduler": "constant",
            "warmup_ratio": 0.0,
            "max_grad_norm": 1e9,
            "precision": "fp32",
            "logging_steps": 1,
            "save_steps": KILL_AT,
            "save_total_limit": None,
            "report_to": "none",
        },
        # Evaluation during training at the checkpoints: the main process alone under DDP, every one when sharded.
        "eval": {"every_steps": KILL_AT, "instruct": str(folder / "mixed.json"), "limit": 4, "batch_size": 2},
        "seed": 7,
    }
    recipe["eval"]["image_folder"] = str(data["images"])
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    replay = {**recipe, "data": {**recipe["data"], "replay": {"ratio": 0.25, "window": 48}}}
    replay["data"]["sources"] = [*recipe["data"]["sources"], {"path": str(folder / "general.txt"), "kind": "text"}]
    (folder / "replay.yaml").write_text(yaml.safe_dump(replay))
    zero3_split_config(folder)
    return {"folder": folder, "recipe": folder / "recipe.yaml", "replay": folder / "replay.yaml", "images": data}


def zero3_split_config(folder: Path) -> Path:
    """A copy of the shipped ZeRO-3 launch config with nothing kept whole: every weight is split, gathered for its
    forward and released after it (persistence threshold, live parameters and reuse distance at 0)."""
    zero3 = json.loads((ACCELERATE / "deepspeed_zero3.json").read_text())
    zero3["zero_optimization"].update(
        stage3_param_persistence_threshold=0, stage3_max_live_parameters=0, stage3_max_reuse_distance=0
    )
    (folder / "zero3_split.json").write_text(json.dumps(zero3))
    shipped = (ACCELERATE / "deepspeed_zero3.yaml").read_text()
    assert "configs/accelerate/deepspeed_zero3.json" in shipped
    split = shipped.replace("configs/accelerate/deepspeed_zero3.json", str(folder / "zero3_split.json"))
    (folder / "zero3_split.yaml").write_text(split)
    return folder / "zero3_split.yaml"


def accelerate_train(config: Path, recipe: Path, output: Path, *overrides: str, reports: Path | None = None, kill=None):
    """Two ranks under `accelerate launch`; with `reports`, through tests/distributed_train.py (what each rank saw,
    and `kill`: SIGKILL after that checkpoint)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    command += ["--num_processes", "2", "--main_process_port", str(free_port())]
    if reports is None:
        command += ["-m", "llava_lite"]
    else:
        command += [str(HELPER), str(reports)] + (["--kill-after-checkpoint", str(kill)] if kill else []) + ["--"]
    done = launch([*command, "train", str(recipe), f"output_dir={output}", *overrides])
    if kill is None:
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        assert done.returncode != 0 and (output / f"checkpoint-{kill}").is_dir(), done.stderr[-3000:]
    return done


def ranks(reports: Path) -> list[dict]:
    return [json.loads((reports / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def losses(folder: Path, key: str = "loss") -> dict[int, float]:
    return {step: entry[key] for step, entry in history(folder).items() if key in entry}


def checkpoint_losses(folder: Path, key: str = "loss") -> dict[int, float]:
    entries = json.loads((folder / f"checkpoint-{KILL_AT}" / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry[key] for entry in entries if key in entry}


def evaluated(folder: Path) -> dict[int, float]:
    """Response perplexity logged by the evaluation during training, by step."""
    entries = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["response_perplexity"] for entry in entries if "response_perplexity" in entry}


def assert_losses(got: dict[int, float], expected: dict[int, float], steps, rel: float, what: str) -> None:
    for step in steps:
        assert abs(got[step] - expected[step]) <= rel * abs(expected[step]), f"{what}, step {step}: {got} {expected}"


def assert_same_weights(folder: Path, reference: Path) -> None:
    """Every tensor within 1e-6 on average; single elements within 1e-3 (a third of one step's AdamW update: an
    element whose gradient is near 0 gets an update of either sign from rounding alone)."""
    ours = LlavaLiteModel.from_pretrained(folder).state_dict()
    theirs = LlavaLiteModel.from_pretrained(reference).state_dict()
    assert ours.keys() == theirs.keys()
    for name, weight in theirs.items():
        difference = (ours[name] - weight).abs()
        assert difference.mean() <= 1e-6 and difference.max() <= 1e-3, f"{folder.name} against {reference.name}: {name}"


def greedy_answer(folder: Path, images: dict) -> list[int]:
    image = Image.open(next(images["images"].glob("train_*.png"))).convert("RGB")
    question = Conversation([Message("user", "<image>\nWhat colour is the shape?")])
    answer = Generator.from_folder(folder, "cpu").complete([question], [[image]], SamplingSettings(max_new_tokens=6))
    assert answer[0].completion_tokens > 0
    return answer[0].token_ids


def one_process(setup: dict, name: str, recipe: Path, *overrides: str) -> Path:
    config = load_train_config(recipe, [f"output_dir={setup['folder'] / name}", *overrides])
    return run_training(config)


# ----- the runs, each launched once and shared by the tests -------------------------------------------------------
@pytest.fixture(scope="module")
def ddp(setup) -> dict:
    reports = setup["folder"] / "ddp_reports"
    output = setup["folder"] / "ddp"
    accelerate_train(ACCELERATE / "ddp.yaml", setup["recipe"], output, reports=reports)
    return {"output": output, "ranks": ranks(reports)}


@pytest.fixture(scope="module")
def zero2(setup) -> Path:
    output = setup["folder"] / "zero2"
    accelerate_train(ACCELERATE / "deepspeed_zero2.yaml", setup["recipe"], output)
    return output


@pytest.fixture(scope="module")
def zero3_split(setup) -> dict:
    """ZeRO-3 with every weight split, killed after checkpoint 3 and resumed as a user reruns it."""
    config, output, reports = setup["folder"] / "zero3_split.yaml", setup["folder"] / "zero3", setup["folder"] / "z3r"
    accelerate_train(config, setup["recipe"], output, reports=reports, kill=KILL_AT)
    killed = checkpoint_losses(output)
    perplexity = checkpoint_losses(output, "response_perplexity")
    resumed = accelerate_train(config, setup["recipe"], output)
    return {"output": output, "ranks": ranks(reports), "killed": killed, "perplexity": perplexity, "resumed": resumed}


@pytest.fixture(scope="module")
def packed_one_process(setup) -> Path:
    """One process with two rows a step: what two ranks of one row each must train as."""
    return one_process(setup, "packed_one", setup["recipe"], *PACKED, "train.batch_size=2")


@pytest.fixture(scope="module")
def fsdp2_packed(setup) -> dict:
    """The shipped FSDP2 config on packed rows, killed after checkpoint 3 and resumed."""
    output, reports = setup["folder"] / "fsdp2", setup["folder"] / "fsdp2_reports"
    accelerate_train(ACCELERATE / "fsdp2.yaml", setup["recipe"], output, *PACKED, reports=reports, kill=KILL_AT)
    killed = checkpoint_losses(output)
    resumed = accelerate_train(ACCELERATE / "fsdp2.yaml", setup["recipe"], output, *PACKED)
    return {"output": output, "ranks": ranks(reports), "killed": killed, "resumed": resumed}


@pytest.fixture(scope="module")
def kl_one_process(setup) -> Path:
    return one_process(setup, "kl_one", setup["replay"], *KL, "train.batch_size=4", "train.max_steps=3")


# ----- DDP, ZeRO-2, ZeRO-3 -----------------------------------------------------------------------------------------
def test_zero2_and_zero3_with_split_weights_train_as_ddp_and_save_folders_that_load_alike(
    setup, ddp, zero2, zero3_split
):
    for rank in ddp["ranks"]:
        assert rank["wrapper"] == "DistributedDataParallel"
    steps = list(zip(ddp["ranks"][0]["batches"], ddp["ranks"][1]["batches"]))
    assert any((mine[0] == 0) != (theirs[0] == 0) for mine, theirs in steps), steps  # text-only beside images
    assert [rank.get("evaluations", 0) for rank in ddp["ranks"]] == [2, 0]  # the main process alone evaluates
    for rank in zero3_split["ranks"]:
        assert rank["wrapper"] == "DeepSpeedEngine"
        assert rank["evaluations"] == 1  # every process, at step 3 (before the kill)
        for part in ("head", "decoder"):  # split, and released between forwards
            held = rank["held"][part]
            assert not held["persistent"] and held["here"] == 0 and held["full"] > 0, (part, held)
    expected = losses(ddp["output"])
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert_losses(losses(zero2), expected, range(1, STEPS + 1), 1e-4, "ZeRO-2 against DDP")
    assert_losses(zero3_split["killed"], expected, range(1, KILL_AT + 1), 1e-4, "ZeRO-3 against DDP")
    ddp_perplexity = evaluated(ddp["output"])
    assert sorted(ddp_perplexity) == [KILL_AT, STEPS]
    assert_losses(evaluated(zero2), ddp_perplexity, ddp_perplexity, 1e-4, "ZeRO-2's evaluation")
    assert_losses(zero3_split["perplexity"], ddp_perplexity, [KILL_AT], 1e-4, "ZeRO-3's evaluation")
    assert_losses(evaluated(zero3_split["output"]), ddp_perplexity, [STEPS], 1e-4, "resumed ZeRO-3's evaluation")
    for folder in (zero2, zero3_split["output"]):
        assert_same_weights(folder, ddp["output"])
        assert greedy_answer(folder, setup["images"]) == greedy_answer(ddp["output"], setup["images"])


def test_a_killed_zero3_run_resumes_with_the_same_losses(ddp, zero3_split):
    output = zero3_split["output"]
    assert f"resuming from {output / f'checkpoint-{KILL_AT}'}" in zero3_split["resumed"].stderr
    assert (output / f"checkpoint-{KILL_AT}" / f"global_step{KILL_AT}").is_dir()  # DeepSpeed's own state
    assert_losses(losses(output), losses(ddp["output"]), range(KILL_AT + 1, STEPS + 1), 1e-4, "resumed ZeRO-3")


def test_packed_rows_train_under_the_shipped_zero3_config_as_one_process_with_twice_the_rows(setup, packed_one_process):
    output = setup["folder"] / "zero3_packed"
    accelerate_train(ACCELERATE / "deepspeed_zero3.yaml", setup["recipe"], output, *PACKED, "train.max_steps=3")
    expected = losses(packed_one_process)
    assert_losses(losses(output), expected, range(1, 4), 1e-4, "packed ZeRO-3 against one process")
    assert greedy_answer(output, setup["images"])  # the run folder loads and answers


# ----- FSDP2 through the Trainer --------------------------------------------------------------------------------
def test_fsdp2_trains_packed_rows_as_one_process_resumes_after_a_kill_and_saves_a_folder_that_answers(
    setup, fsdp2_packed, packed_one_process
):
    for rank in fsdp2_packed["ranks"]:
        assert rank["wrapper"] == "FSDPLlavaLiteModel"
        for part in ("head", "decoder"):  # DTensors, each rank holding about half (1025 head rows: 513 and 512)
            held = rank["held"][part]
            assert held["dtensor"] and 0.4 * held["full"] < held["here"] < 0.6 * held["full"], (part, held)
        assert all(sum(batch) == 1 for batch in rank["batches"]) and max(rank["samples_per_row"]) >= 2
        assert rank["evaluations"] == 1  # every process evaluates, the model being split
    expected = losses(packed_one_process)
    assert_losses(fsdp2_packed["killed"], expected, range(1, KILL_AT + 1), 1e-4, "FSDP2 against one process")
    output = fsdp2_packed["output"]
    assert f"resuming from {output / f'checkpoint-{KILL_AT}'}" in fsdp2_packed["resumed"].stderr
    assert_losses(losses(output), expected, range(KILL_AT + 1, STEPS + 1), 1e-4, "resumed FSDP2")
    assert_losses(evaluated(output), evaluated(packed_one_process), [STEPS], 1e-4, "FSDP2's evaluation")
    assert_same_weights(output, packed_one_process)
    assert greedy_answer(output, setup["images"]) == greedy_answer(packed_one_process, setup["images"])


def test_the_data_is_measured_once_over_both_ranks_and_read_back_on_resume(setup, fsdp2_packed):
    records = len(json.loads((setup["folder"] / "mixed.json").read_text()))
    encoded = [rank["encodes_before_training"] for rank in fsdp2_packed["ranks"]]
    # Each rank encodes its half of the records, and one sample checking that there is data at all.
    assert all(count <= records // 2 + 1 for count in encoded) and sum(encoded) >= records, encoded
    assert f"token counts of {records} records read from" in fsdp2_packed["resumed"].stderr


# ----- KL to the base and replay under sharding -------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["zero3_split", "fsdp2"])
def test_kl_to_the_base_and_replay_under_sharding_equal_one_process(setup, kl_one_process, engine):
    config = setup["folder"] / "zero3_split.yaml" if engine == "zero3_split" else ACCELERATE / "fsdp2.yaml"
    output = setup["folder"] / f"kl_{engine}"
    accelerate_train(config, setup["replay"], output, *KL, "train.max_steps=3")
    for key in ("loss", "kl_to_base", "replay_loss", "instruction_loss"):
        expected = losses(kl_one_process, key)
        assert expected, key
        assert_losses(losses(output, key), expected, sorted(expected), 1e-4, f"{key} under {engine}")
    assert losses(kl_one_process, "kl_to_base")[1] > 1e-3  # the adapters change the LM from the start
