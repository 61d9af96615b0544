"""`recipe: rl` as a user runs it: its settings resolved and checked, its prompts' order, a short run from a weak
stage-2 model on the shapes prompts raising the mean reward, what it logs and writes, dynamic sampling, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, StopAt

from llava_lite.config_io import ConfigError, from_dict
from llava_lite.data.config import DataConfig
from llava_lite.data.errors import BadRecordError
from llava_lite.demo.improve_demo import ImproveDemoSettings, build_data
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset
from llava_lite.model.processor_for_config import processor_for_config
from llava_lite.run_folder import COMPLETIONS_FILE
from llava_lite.train.config import TrainConfig, load_train_config
from llava_lite.train.recipes import resolved
from llava_lite.train.rl_prompts import PromptDataset, load_prompt_lines
from llava_lite.train.rl_trainer import GroupBlockSampler
from llava_lite.train.run import run_training

QUIET = {"report_to": "none", "logging_steps": 1, "save_steps": 1000, "warmup_ratio": 0.0}
TRL_NAMES = (
    "reward", "reward_std", "rewards/reference/mean", "rewards/reference/std", "frac_reward_zero_std",
    "completions/mean_length", "completions/clipped_ratio", "entropy", "clip_ratio/region_mean",
)  # fmt: skip


@pytest.fixture(scope="module")
def shapes_prompts(tmp_path_factory) -> dict[str, Path]:
    """The shapes pictures' questions as prompt lines with their true answers (`reference`), 48 pictures: 144."""
    out = tmp_path_factory.mktemp("shapes")
    return build_data(out, ImproveDemoSettings(out, train_images=48, eval_images=4))


@pytest.fixture(scope="module")
def random_start(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("start")
    LlavaLiteModel.from_config(preset("tiny")).save_pretrained(folder)
    return folder


def rl_config(start: Path, prompts: dict[str, Path], output: Path, **sections) -> TrainConfig:
    raw = {
        "recipe": "rl",
        "init_from": str(start),
        "output_dir": str(output),
        "data": {"sources": [{"path": str(prompts["prompts"]), "image_folder": str(prompts["images"])}]},
        "train": {**QUIET, "max_steps": 2, "batch_size": 4, "learning_rate": 1e-3},
        "rl": {"num_generations": 4, "max_new_tokens": 6, "rewards": [{"kind": "reference"}]},
        "resume": "never",
    }
    for name, value in sections.items():
        raw[name] = {**raw[name], **value} if isinstance(raw.get(name), dict) else value
    return from_dict(TrainConfig, raw)


def history(run: Path) -> list[dict]:
    return json.loads((run / "trainer_state.json").read_text())["log_history"]


def completion_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / COMPLETIONS_FILE).read_text().splitlines()]


REWARDS_FILE = """
def parity_unless_colour(prompts, completions, id, **columns):
    return [0.0 if ":colour" in line else float(len(text) % 2) for line, text in zip(id, completions)]
"""


def parity_reward(folder: Path) -> Path:
    """A user's reward file: a random model's answers score 0 or 1 by their length (so groups differ), except the
    colour questions', which all score 0."""
    path = folder / "my_reward.py"
    path.write_text(REWARDS_FILE)
    return path


# ----- settings ---------------------------------------------------------------------------------------------------
def test_resolving_fills_trls_defaults_and_resolving_again_changes_nothing(tmp_path, random_start, shapes_prompts):
    config = resolved(rl_config(random_start, shapes_prompts, tmp_path, train={"learning_rate": None}))
    rl = config.rl
    assert (rl.loss, rl.advantage, rl.scale_rewards) == ("dapo", "group", "group")
    assert (rl.epsilon, rl.epsilon_high) == (0.2, 0.2)
    assert config.train.learning_rate == 1e-6 and config.finetune.method == "full"
    assert resolved(config) == config
    gspo = resolved(rl_config(random_start, shapes_prompts, tmp_path, rl={"loss": "gspo"})).rl
    assert (gspo.epsilon, gspo.epsilon_high) == (3e-4, 4e-4)
    rloo = resolved(rl_config(random_start, shapes_prompts, tmp_path, rl={"advantage": "rloo"})).rl
    assert rloo.scale_rewards == "none"
    lora = resolved(rl_config(random_start, shapes_prompts, tmp_path, finetune={"method": "lora"}, train={}))
    assert lora.train.learning_rate == 1e-3  # given; adapters' default is 1e-5
    assert resolved(rl_config(random_start, shapes_prompts, tmp_path, train={"learning_rate": None},
                              finetune={"method": "lora"})).train.learning_rate == 1e-5  # fmt: skip


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"rl": {"rewards": []}}, r"^rl.rewards: give at least one reward"),
        ({"rl": {"rewards": [{"kind": "bleu"}]}}, r"^rl.rewards\[0\]: unknown reward kind 'bleu'"),
        ({"rl": {"rewards": [{"kind": "reward_model"}]}}, r"^rl.rewards\[0\].model: name the reward model's run"),
        ({"rl": {"advantage": "rloo", "scale_rewards": "group"}}, "rloo takes scale_rewards none or batch"),
        ({"rl": {"num_iterations": 2}, "train": {"save_steps": 5}}, r"save_steps \(5\) must be a multiple"),
        ({"finetune": {"method": "none"}}, "recipe rl tunes the LM"),
        ({"data": {"group_by_modality_length": True}}, "group_by_modality_length is not supported"),
    ],
)
def test_a_bad_rl_config_is_refused_in_one_line(tmp_path, random_start, shapes_prompts, sections, message):
    with pytest.raises(ConfigError, match=message):
        resolved(rl_config(random_start, shapes_prompts, tmp_path, **sections))


def test_the_rl_section_is_refused_under_another_recipe(tmp_path, random_start, shapes_prompts):
    config = rl_config(random_start, shapes_prompts, tmp_path, recipe="stage2")
    with pytest.raises(ConfigError, match="^the rl section is for recipe rl, not stage2$"):
        resolved(config)


def test_each_steps_prompts_come_in_blocks_dealt_to_the_processes_and_repeated_for_each_iteration():
    sampler = GroupBlockSampler(13, batch_size=2, accumulation=1, processes=2, repeats=2, seed=0, shuffle=False)
    order = list(sampler)
    assert len(sampler) == len(order) == 3 * 4 * 2  # three whole blocks of four (the last prompt left out)
    batches = [order[i : i + 2] for i in range(0, len(order), 2)]
    # Batch k goes to process k mod 2: each process sees its two prompts, then the same two again.
    assert batches[:4] == [[0, 1], [2, 3], [0, 1], [2, 3]]
    shuffled = GroupBlockSampler(13, 2, 1, 2, 1, seed=0, shuffle=True)
    first = list(shuffled)
    shuffled.set_epoch(1)
    assert first != list(shuffled) and sorted(first) == sorted(set(first))
    with pytest.raises(ConfigError, match="3 prompts cannot fill one step of train.batch_size 2 x gradient_acc"):
        GroupBlockSampler(3, 2, 1, 2, 1, 0, False)


def test_the_shipped_rl_config_starts_from_the_improve_demos_stage2_run_on_its_prompts():
    config = resolved(load_train_config(ROOT / "configs" / "rl" / "demo_rl.yaml"))
    demo = ImproveDemoSettings(Path("runs/improve_demo"))
    assert config.init_from == str(demo.out / "stage2")
    assert config.data.sources[0].path == str(demo.out / "data" / "prompts.jsonl")
    assert config.rl.rewards == [{"kind": "reference", "match": "exact"}] and config.rl.scale_rewards == "group"
    assert config.train.max_steps // config.train.save_steps >= 3


# ----- prompt lines -----------------------------------------------------------------------------------------------
def test_prompt_lines_carry_their_other_fields_and_bad_lines_are_named_or_counted(tmp_path, shapes_prompts):
    image = sorted(shapes_prompts["images"].glob("*.png"))[0].name
    rows = [
        {"id": "a", "image": image, "prompt": "Which corner?", "reference": "top left", "boxes": [[0, 0, 1, 1]]},
        {"id": "b", "messages": [{"role": "user", "content": "<image>\nWhat colour?"}], "images": [image]},
        {"id": "c", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"id": "d", "prompt": "<image>\n<image>\nTwo?", "image": image},
        {"id": "e", "prompt": "x " * 300},
        {"id": "f", "answer": "no prompt"},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = {"sources": [{"path": str(path), "image_folder": str(shapes_prompts["images"])}], "max_length": 64}
    with pytest.raises(BadRecordError, match=r"prompts.jsonl line 3 \(id c\): the last message must be the user's"):
        load_prompt_lines(from_dict(DataConfig, data))
    lines, skipped = load_prompt_lines(from_dict(DataConfig, {**data, "on_bad_record": "skip"}))
    assert [line.id for line in lines] == ["a", "b", "e"]
    assert skipped == {"prompt_not_ending_on_user": 1, "image_count_mismatch": 1, "malformed": 1}
    assert lines[0].fields == {"id": "a", "prompt": "Which corner?", "reference": "top left", "boxes": [[0, 0, 1, 1]]}
    assert lines[0].prompt == "Which corner?"
    assert lines[1].prompt == [{"role": "user", "content": "<image>\nWhat colour?"}]
    assert lines[0].images == [str(shapes_prompts["images"] / image)]
    model = LlavaLiteModel.from_config(preset("tiny"))
    processor = processor_for_config(model.config, model.tokenizer)
    dataset = PromptDataset(lines, processor, max_length=64, on_bad_record="skip")
    assert dataset.skips.counts() == {"too_long": 1}  # a prompt is never cut: its end is where the answer starts
    assert dataset[2]["index"] == 0 and len(dataset[0]["sample"]["pixel_values"]) == 1


# ----- a run ------------------------------------------------------------------------------------------------------
def test_rl_from_a_weak_stage2_run_raises_the_mean_reward(tmp_path, shapes_prompts):
    questions = {"path": str(shapes_prompts["questions"]), "image_folder": str(shapes_prompts["images"])}
    stage2 = {
        "recipe": "stage2",
        "model": "tiny",
        "output_dir": str(tmp_path / "stage2"),
        "data": {"sources": [questions]},
        "train": {**QUIET, "max_steps": 150, "batch_size": 8, "learning_rate": 3e-3, "logging_steps": 50},
    }
    start = run_training(from_dict(TrainConfig, stage2))  # a third to half of its sampled answers right
    steps = 54  # three passes over the 144 prompts, 8 per step
    config = rl_config(
        start, shapes_prompts, tmp_path / "rl",
        train={"max_steps": steps, "batch_size": 8, "learning_rate": 1e-3},
        rl={"num_generations": 8, "max_new_tokens": 8},
    )  # fmt: skip
    run = run_training(config)
    logged = [entry for entry in history(run) if "reward" in entry]
    assert len(logged) == steps and all(name in logged[0] for name in TRL_NAMES)
    # Each pass asks every prompt once: the same questions. Over seeds the third pass gains 0.05 to 0.11.
    first, _, third = (sum(e["reward"] for e in logged[i : i + 18]) / 18 for i in (0, 18, 36))
    assert third > first + 0.03, (first, third)
    # completions.jsonl: every logged step's prompts, each with its G answers, their rewards and advantages.
    lines = completion_lines(run)
    assert len(lines) == steps * 8 and [line["step"] for line in lines[:9]] == [1] * 8 + [2]
    answers = lines[0]["completions"]
    assert len(answers) == 8 and set(answers[0]) == {"text", "tokens", "truncated", "rewards", "reward", "advantage"}
    for line in lines:
        rewards = [answer["rewards"]["reference"] for answer in line["completions"]]
        advantages = [answer["advantage"] for answer in line["completions"]]
        assert abs(sum(advantages)) < 1e-3 and (max(rewards) > min(rewards)) == any(advantages)


def test_a_resumed_run_samples_and_updates_as_the_uninterrupted_one(tmp_path, random_start, shapes_prompts):
    settings = {"train": {"max_steps": 4, "save_steps": 2}}
    whole = run_training(rl_config(random_start, shapes_prompts, tmp_path / "whole", **settings))
    cut = rl_config(random_start, shapes_prompts, tmp_path / "cut", **settings, resume="auto")
    run_training(cut, callbacks=[StopAt(3)])  # stopped (as if killed) after step 3; its checkpoint is step 2's
    (Path(cut.output_dir) / "checkpoint-3").rename(Path(cut.output_dir) / "ignored")
    assert len(completion_lines(Path(cut.output_dir))) == 3 * 4
    resumed = run_training(cut)
    expected = {e["step"]: (e["loss"], e["reward"]) for e in history(whole) if "reward" in e}
    got = {e["step"]: (e["loss"], e["reward"]) for e in history(resumed) if "reward" in e}
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], abs=1e-6)
    # The stopped run's step-3 lines were dropped on resuming, then written again: the same file.
    assert completion_lines(resumed) == completion_lines(whole)


def test_later_iterations_update_on_the_same_answers_against_the_sampler(tmp_path, random_start, shapes_prompts):
    rewards = [{"kind": "python", "function": f"{parity_reward(tmp_path)}:parity_unless_colour"}]
    config = rl_config(
        random_start, shapes_prompts, tmp_path / "run",
        train={"max_steps": 4, "save_steps": 2}, rl={"num_iterations": 2, "epsilon": 0.01, "rewards": rewards},
    )  # fmt: skip
    run = run_training(config)
    lines = completion_lines(run)
    assert sorted({line["step"] for line in lines}) == [1, 3]  # sampled before steps 1 and 3 only
    logged = {e["step"]: e for e in history(run) if "loss" in e}
    assert "reward" in logged[1] and "reward" not in logged[2]  # nothing sampled for step 2 to report
    # The first pass's ratio is exactly 1; the second's moved after the first update and meets the clip.
    assert logged[1]["clip_ratio/region_mean"] == 0.0 and logged[2]["clip_ratio/region_mean"] > 0.0


def test_dynamic_sampling_drops_groups_that_all_score_the_same_and_refills_them(tmp_path, random_start, shapes_prompts):
    rewards = [{"kind": "python", "function": f"{parity_reward(tmp_path)}:parity_unless_colour"}]
    config = rl_config(
        random_start, shapes_prompts, tmp_path / "run",
        train={"max_steps": 3}, rl={"rewards": rewards, "dynamic_sampling": True},
    )  # fmt: skip
    run = run_training(config)
    lines = completion_lines(run)
    assert len(lines) == 3 * 4 and not [line for line in lines if ":colour" in line["id"]]
    assert all(e["frac_reward_zero_std"] == 0.0 for e in history(run) if "reward" in e)
