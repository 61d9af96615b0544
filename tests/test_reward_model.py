"""`recipe: reward`: the Bradley-Terry loss (with TRL's margin and centring) is the hand computation; a pair's rewards
do not depend on how its batch was laid out (padded, packed, alone) and the tower runs once per image; a short run
ranks its training pairs; the run folder loads as any run, reloads its head and scores the same, through the Python
scorer, `eval --preference` and `data score --scorer reward-model`."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from llava_lite import cli
from llava_lite.config_io import ConfigError, from_dict
from llava_lite.data.config import DataConfig, DataSource
from llava_lite.data.errors import BadRecordError
from llava_lite.data.masking import IGNORE_INDEX
from llava_lite.data.preference_formats import read_pairs
from llava_lite.data.preference_pairs import PreferenceCollator, PreferenceDataset
from llava_lite.demo import shapes
from llava_lite.eval.reward_model import RewardModel, load_reward_model
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.pair_log_probs import split_batch
from llava_lite.model.presets import preset
from llava_lite.model.processor_for_config import processor_for_config
from llava_lite.model.reward_head import (
    REWARD_HEAD,
    add_reward_head,
    last_answer_positions,
    load_reward_head,
    sequence_rewards,
)
from llava_lite.model.saving import load_trained_weights
from llava_lite.run_folder import REWARD_HEAD_FILE
from llava_lite.train.config import RewardSettings, TrainConfig
from llava_lite.train.recipes import resolved
from llava_lite.train.recipes.reward import read_scored_pairs, reward_loss
from llava_lite.train.run import run_training

QUIET = {"report_to": "none", "logging_steps": 10, "save_steps": 1000, "warmup_ratio": 0.0}
QUESTION = "What colour is the shape?"


def write_colour_pairs(folder: Path, count: int, seed: int = 0, margins: list | None = None) -> dict[str, Path]:
    """One pair per shapes picture in TRL's conversational format: the shape's colour chosen, another colour
    rejected; with `margins`, each row's `margin`."""
    items = shapes.make_images(folder / "images", count, seed, "pair")
    rng = random.Random(seed)
    rows = []
    for index, item in enumerate(items):
        wrong = rng.choice([colour for colour in shapes.COLOURS if colour != item.colour])
        row = {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"\n{QUESTION}"}]}],
            "chosen": [{"role": "assistant", "content": item.colour}],
            "rejected": [{"role": "assistant", "content": wrong}],
            "images": [item.name],
        }
        if margins is not None:
            row["margin"] = margins[index]
        rows.append(row)
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"pairs": path, "images": folder / "images"}


def reward_config(pairs: dict[str, Path], output: Path, **sections) -> TrainConfig:
    raw = {
        "recipe": "reward",
        "model": "tiny",
        "output_dir": str(output),
        "data": {"sources": [{"path": str(pairs["pairs"]), "image_folder": str(pairs["images"])}], "max_length": 128},
        "train": {**QUIET, "max_steps": 2, "batch_size": 8},
        "finetune": {"method": "full"},
        "resume": "never",
    }
    for name, value in sections.items():
        raw[name] = {**raw[name], **value} if isinstance(raw.get(name), dict) else value
    return from_dict(TrainConfig, raw)


def tiny_reward_model() -> LlavaLiteModel:
    torch.manual_seed(0)
    model = LlavaLiteModel.from_config(preset("tiny"))
    add_reward_head(model)
    return model.eval()


# ----- the loss -------------------------------------------------------------------------------------------------
def test_the_loss_is_minus_log_sigmoid_of_the_reward_difference_by_hand():
    chosen, rejected = [1.5, -0.2, 0.3], [0.5, 0.4, 0.3]
    losses = reward_loss(torch.tensor(chosen), torch.tensor(rejected))
    by_hand = [math.log(1 + math.exp(-(c - r))) for c, r in zip(chosen, rejected)]
    assert losses.tolist() == pytest.approx(by_hand, abs=1e-6)
    assert losses.mean().item() == pytest.approx(sum(by_hand) / 3, abs=1e-6)


def test_the_margin_and_centring_enter_the_loss_as_trls_reward_trainer_has_them():
    chosen, rejected, margin, coefficient = [1.5, -0.2, 0.3], [0.5, 0.4, 0.3], [1.0, 0.0, -0.5], 0.01
    losses = reward_loss(torch.tensor(chosen), torch.tensor(rejected), torch.tensor(margin), coefficient)
    # TRL: -logsigmoid(r_chosen - r_rejected - margin).mean() + coefficient * mean((r_chosen + r_rejected) ** 2)
    bradley_terry = [math.log(1 + math.exp(-(c - r - m))) for c, r, m in zip(chosen, rejected, margin)]
    centring = [coefficient * (c + r) ** 2 for c, r in zip(chosen, rejected)]
    assert losses.tolist() == pytest.approx([b + c for b, c in zip(bradley_terry, centring)], abs=1e-6)
    assert losses.mean().item() == pytest.approx(sum(bradley_terry) / 3 + sum(centring) / 3, abs=1e-6)


# ----- the model ------------------------------------------------------------------------------------------------
def test_the_head_reads_each_sequences_last_answer_token_in_padded_rows_and_packed_samples():
    x = IGNORE_INDEX
    padded = torch.tensor([[x, x, 5, 6, x, x], [x, 7, x, x, x, x]])
    rows, positions = last_answer_positions(padded)
    assert rows.tolist() == [0, 1] and positions.tolist() == [3, 1]
    packed = torch.tensor([[x, x, 5, 6, x, 7, 8, 9, x, x]])  # samples [0, 5), [5, 8), then padding [8, 10)
    rows, positions = last_answer_positions(packed, torch.tensor([0, 5, 8, 10]))
    assert rows.tolist() == [0, 0, 0] and positions.tolist() == [3, 7, 8]  # the padding: its first position


def test_padded_packed_and_lone_pairs_get_the_same_rewards_and_the_tower_runs_once_per_image(tmp_path):
    data = write_colour_pairs(tmp_path, 3)
    rows = data["pairs"].read_text().splitlines()
    text_pair = {"prompt": "Say a colour.", "chosen": "blue", "rejected": "a colour"}
    data["pairs"].write_text("\n".join([*rows, json.dumps(text_pair)]) + "\n")
    pairs, _ = read_pairs(DataSource(str(data["pairs"]), str(data["images"])))
    model = tiny_reward_model()
    dataset = PreferenceDataset(pairs, processor_for_config(model.config, model.tokenizer))
    items = [dataset[index] for index in range(len(dataset))]
    collate = PreferenceCollator(model.tokenizer.pad_token_id)
    tower_batches = []
    tower = model.vision_tower.forward
    model.vision_tower.forward = lambda pixels: tower_batches.append(len(pixels)) or tower(pixels)

    def rewards(batch_items) -> torch.Tensor:
        inputs, pair_index, _ = split_batch(collate(batch_items))
        with torch.no_grad():
            return sequence_rewards(model, inputs)[: 2 * len(pair_index)]

    padded = rewards(items)
    assert tower_batches == [3]  # one pass, each pair's picture once for its two answers
    packed = rewards([{"packed": items}])
    alone = torch.cat([rewards([item]) for item in items])
    assert len(padded) == 8 and padded.std() > 0
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-5)


def test_a_saved_head_loads_beside_the_model_and_into_a_resumed_model(tmp_path):
    model = tiny_reward_model()
    model.save_pretrained(tmp_path / "run")
    assert (tmp_path / "run" / REWARD_HEAD_FILE).is_file()
    plain = LlavaLiteModel.from_pretrained(tmp_path / "run")  # the folder loads as any run's
    assert not hasattr(plain, REWARD_HEAD)
    head = load_reward_head(plain, tmp_path / "run")
    torch.testing.assert_close(head.weight, model.reward_head.weight, rtol=0, atol=0)

    torch.manual_seed(1)
    resumed = LlavaLiteModel.from_config(preset("tiny"))
    add_reward_head(resumed)
    assert not torch.equal(resumed.reward_head.weight, model.reward_head.weight)
    load_trained_weights(resumed, tmp_path / "run")  # what a resumed run does with its checkpoint
    torch.testing.assert_close(resumed.reward_head.weight, model.reward_head.weight, rtol=0, atol=0)


def test_a_folder_without_a_head_is_no_reward_model(tmp_path):
    LlavaLiteModel.from_config(preset("tiny")).save_pretrained(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=f"{REWARD_HEAD_FILE}: missing: .* is no reward model"):
        load_reward_model(tmp_path / "run")


# ----- margins and checks ---------------------------------------------------------------------------------------
def test_margins_are_read_from_their_column_and_a_pair_without_one_is_named(tmp_path):
    data = write_colour_pairs(tmp_path, 3, margins=[1, 0.5, None])
    config = DataConfig(sources=[DataSource(str(data["pairs"]), str(data["images"]))])
    with pytest.raises(BadRecordError, match=r"pairs.jsonl line 3: `margin` must be a number, got None$"):
        read_scored_pairs(config, "margin")
    config.on_bad_record = "skip"
    pairs, skipped = read_scored_pairs(config, "margin")
    assert [pair.margin for pair in pairs] == [1.0, 0.5] and skipped == {"malformed": 1}


def test_a_margin_moves_the_first_loss_as_the_formula_says(tmp_path):
    # The new head's rewards are near 0, so the first loss is about log(1 + e^margin): 2.13 for a margin of 2,
    # 0.69 (log 2) without one.
    data = write_colour_pairs(tmp_path, 8, margins=[2.0] * 8)
    first = {}
    for name, reward in (("plain", None), ("margin", {"margin_column": "margin"})):
        config = reward_config(data, tmp_path / name, train={"max_steps": 1, "logging_steps": 1}, reward=reward)
        history = json.loads((run_training(config) / "trainer_state.json").read_text())["log_history"]
        first[name] = history[0]["loss"]
    assert first["plain"] == pytest.approx(math.log(2), abs=0.1)
    assert first["margin"] == pytest.approx(math.log(1 + math.exp(2)), abs=0.25)


def test_configs_that_cannot_work_are_refused_in_one_line(tmp_path):
    data = write_colour_pairs(tmp_path, 2)
    with pytest.raises(ConfigError, match="^recipe reward has no eval_data"):
        resolved(reward_config(data, tmp_path / "r", eval_data={"sources": [{"path": str(data["pairs"])}]}))
    with pytest.raises(ConfigError, match="^the reward section is for recipe reward, not preference$"):
        resolved(reward_config(data, tmp_path / "r", recipe="preference", reward={}))
    with pytest.raises(ValueError, match="center_rewards_coefficient must be 0 or more"):
        RewardSettings(center_rewards_coefficient=-1)
    config = resolved(reward_config(data, tmp_path / "r"))
    assert config.reward == RewardSettings() and config.train.learning_rate == 1e-5
    assert resolved(config) == config


# ----- a short run ----------------------------------------------------------------------------------------------
class KeepModel(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A reward model trained from the tiny model on 16 colour pairs (packed), and the model as training left it."""
    folder = tmp_path_factory.mktemp("reward_run")
    data = write_colour_pairs(folder, 16)
    config = reward_config(
        data,
        folder / "run",
        data={"packing": True},
        train={"max_steps": 100, "learning_rate": 5e-3, "logging_steps": 20},
        reward={"center_rewards_coefficient": 0.01},
    )
    keep = KeepModel()
    run = run_training(config, callbacks=[keep])
    pairs, _ = read_pairs(DataSource(str(data["pairs"]), str(data["images"])))
    return {**data, "run": run, "model": keep.model, "pair_list": pairs}


def test_a_short_run_ranks_its_training_pairs_and_logs_trls_names(trained):
    logs = [e for e in json.loads((trained["run"] / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert all(name in logs[-1] for name in ("accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins"))
    assert logs[-1]["loss"] < logs[0]["loss"] and logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
    chosen, rejected = load_reward_model(trained["run"]).pair_rewards(trained["pair_list"])
    assert float((chosen > rejected).float().mean()) > 0.9


def test_the_run_folder_reloads_and_scores_as_the_trained_model_did(trained):
    as_trained = RewardModel(trained["model"]).pair_rewards(trained["pair_list"])
    reloaded = load_reward_model(trained["run"]).pair_rewards(trained["pair_list"])
    for before, after in zip(as_trained, reloaded):
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_scores_of_prompts_and_completions_are_the_pairs_rewards(trained):
    scorer = load_reward_model(trained["run"], batch_size=3)  # batches that split a prompt's completions
    chosen, rejected = scorer.pair_rewards(trained["pair_list"])
    rows = [json.loads(line) for line in trained["pairs"].read_text().splitlines()]
    prompts = [{"image": row["images"][0], "prompt": QUESTION} for row in rows for _ in range(2)]
    completions = [row[side][0]["content"] for row in rows for side in ("chosen", "rejected")]
    scores = scorer.score(prompts, completions, image_folder=trained["images"])
    assert scores[0::2] == pytest.approx(chosen.tolist(), abs=1e-4)
    assert scores[1::2] == pytest.approx(rejected.tolist(), abs=1e-4)


def test_eval_preference_reports_a_reward_models_accuracy(trained, capsys):
    code = cli.main(["eval", "--model", str(trained["run"]), "--preference", str(trained["pairs"]),
                     "--preference-images", str(trained["images"]), "--json"])  # fmt: skip
    assert code == 0
    results = json.loads(capsys.readouterr().out)["preference"]
    chosen, rejected = load_reward_model(trained["run"]).pair_rewards(trained["pair_list"])
    assert results["pairs"] == 16 and results["accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))
    assert results["accuracy"] > 0.9 and results["mean_margin"] == pytest.approx(float((chosen - rejected).mean()))
    assert results["reference"] == "none (a reward model's scores)"


def test_data_score_scores_sampled_candidates_with_the_reward_model(trained, tmp_path, capsys):
    rows = [json.loads(line) for line in trained["pairs"].read_text().splitlines()]
    samples = [
        {"id": str(index), "image": row["images"][0], "prompt": QUESTION,
         "candidates": [{"text": colour} for colour in shapes.COLOURS]}
        for index, row in enumerate(rows)
    ]  # fmt: skip
    source = tmp_path / "samples.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in samples))
    output = tmp_path / "scored.jsonl"
    code = cli.main(["data", "score", "--input", str(source), "--output", str(output), "--scorer", "reward-model",
                     "--model", str(trained["run"]), "--image-folder", str(trained["images"]),
                     "--batch-size", "3"])  # fmt: skip
    assert code == 0 and "scored: 64" in capsys.readouterr().out
    scored = [json.loads(line) for line in output.read_text().splitlines()]
    by_colour = [{c["text"]: c["score"] for c in row["candidates"]} for row in scored]
    scorer = load_reward_model(trained["run"])
    prompts = [{"image": row["image"], "prompt": QUESTION} for row in samples for _ in shapes.COLOURS]
    direct = scorer.score(prompts, [c for _ in samples for c in shapes.COLOURS], image_folder=trained["images"])
    assert [score for row in by_colour for score in row.values()] == pytest.approx(direct, abs=1e-4)
    answers = [(pair["chosen"][0]["content"], pair["rejected"][0]["content"]) for pair in rows]
    ranked = [row[chosen] > row[rejected] for row, (chosen, rejected) in zip(by_colour, answers)]
    assert sum(ranked) / len(ranked) > 0.9  # the training pairs' two answers are among the candidates


def test_data_rate_adds_the_reward_models_score_of_each_records_last_answer_as_quality(trained, tmp_path, capsys):
    rows = [json.loads(line) for line in trained["pairs"].read_text().splitlines()]
    records = [
        {"id": f"r{index}", "image": row["images"][0],
         "conversations": [{"from": "human", "value": "<image>\n" + QUESTION},
                           {"from": "gpt", "value": row[side][0]["content"]}]}
        for index, row in enumerate(rows) for side in ("chosen", "rejected")
    ]  # fmt: skip
    source, output = tmp_path / "records.json", tmp_path / "rated.json"
    source.write_text(json.dumps(records))
    code = cli.main(["data", "rate", str(source), "--out", str(output), "--scorer", "reward-model",
                     "--judge-model", str(trained["run"]), "--image-folder", str(trained["images"])])  # fmt: skip
    assert code == 0 and "quality:" in capsys.readouterr().out
    rated = json.loads(output.read_text())
    assert [r["id"] for r in rated] == [r["id"] for r in records]
    direct = load_reward_model(trained["run"]).score(
        [{"image": r["image"], "prompt": QUESTION} for r in records],
        [r["conversations"][1]["value"] for r in records],
        image_folder=trained["images"],
    )
    assert [r["quality"] for r in rated] == pytest.approx(direct, abs=1e-4)
    chosen, rejected = [r["quality"] for r in rated[0::2]], [r["quality"] for r in rated[1::2]]
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(chosen) > 0.9


def test_a_merged_export_of_a_reward_run_keeps_its_head_and_scores_the_same(trained, tmp_path):
    out = tmp_path / "merged"
    assert cli.main(["export", "--model", str(trained["run"]), "--format", "merged", "--out", str(out)]) == 0
    before = load_reward_model(trained["run"]).pair_rewards(trained["pair_list"])
    after = load_reward_model(out).pair_rewards(trained["pair_list"])
    for old, new in zip(before, after):
        assert torch.allclose(old, new, atol=1e-5)
