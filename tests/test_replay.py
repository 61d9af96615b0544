"""Replay of general text in stage 2: every replay token trained, instruction labels untouched, the epoch's share
exact for a seed, its loss logged on its own, bad text sources refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fixture_path
from torch.utils.data import DataLoader

from llava_lite.cli import main
from llava_lite.config_io import ConfigError, from_dict
from llava_lite.data.collator import REPLAY_TOKENS, Collator
from llava_lite.data.config import DataConfig, DataSource, ReplaySettings
from llava_lite.data.dataset import ConversationDataset
from llava_lite.data.formats import read_source
from llava_lite.data.masking import IGNORE_INDEX
from llava_lite.data.replay import ReplayMix, read_documents, text_windows, trained_tokens
from llava_lite.demo import shapes
from llava_lite.model.presets import preset
from llava_lite.model.processor_for_config import processor_for_config
from llava_lite.train.config import TrainConfig
from llava_lite.train.run import run_training

ANSWERS = ("eval", "llava_bench_wild", "answers_gpt4.jsonl")  # real text, in a `text` column


@pytest.fixture(scope="module")
def processor():
    return processor_for_config(preset("tiny"), max_length=256)


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return read_documents(DataSource(path=str(fixture_path(*ANSWERS)), kind="text"))


def instruction_dataset(processor, name: str = "mllm_demo") -> ConversationDataset:
    path = fixture_path("data", "mllm_demo", "mllm_demo.json") if name == "mllm_demo" else fixture_path("data", name)
    records, _ = read_source(DataSource(path=str(path)), check_images_exist=name == "mllm_demo")
    return ConversationDataset(records, processor)


def test_replay_samples_train_every_token_and_instruction_samples_keep_assistant_labels(processor, documents):
    instructions = instruction_dataset(processor)
    windows = text_windows(processor.tokenizer, documents, 48)
    mix = ReplayMix(instructions, windows, ReplaySettings(ratio=0.25), seed=0)
    assert len(mix) == 8  # 6 records, and 6 x 0.25 / 0.75 = 2 windows
    for index in range(len(instructions)):
        expected = processor.sample(instructions.conversations[index])["labels"]
        got = mix[index]["labels"]
        assert torch.equal(got, expected)
        assert (got == IGNORE_INDEX).any() and "replay" not in mix[index]
    for index in range(6, 8):
        sample = mix[index]
        assert sample["replay"] and sample["pixel_values"] == []
        assert torch.equal(sample["labels"], sample["input_ids"])
    batch = Collator(processor.tokenizer.pad_token_id)([mix[0], mix[6], mix[7]])
    marks = batch[REPLAY_TOKENS]
    assert marks[1:].sum() == len(mix[6]["input_ids"]) + len(mix[7]["input_ids"]) and not marks[0].any()
    assert (batch["labels"][marks] == batch["input_ids"][marks]).all()


def test_replay_text_keeps_special_markers_as_plain_text(processor):
    windows = text_windows(processor.tokenizer, ["a picture <image> and <|im_start|> in prose"], 64)
    ids = set(windows[0].tolist())
    specials = {processor.image_token_id, processor.tokenizer.convert_tokens_to_ids("<|im_start|>")}
    assert not ids & specials


def test_sample_share_holds_exactly_over_an_epoch(processor, documents):
    instructions = instruction_dataset(processor)
    mix = ReplayMix(instructions, text_windows(processor.tokenizer, documents, 32), ReplaySettings(0.4), seed=3)
    loader = DataLoader(mix, batch_size=3, shuffle=True, collate_fn=Collator(processor.tokenizer.pad_token_id))
    replayed = sum(int(b[REPLAY_TOKENS].any(dim=1).sum()) for b in loader if REPLAY_TOKENS in b)
    assert (replayed, len(mix)) == (4, 10)  # round(6 x 0.4 / 0.6) = 4 of 10


def test_token_share_is_exact_and_the_windows_follow_the_seed(processor, documents):
    instructions = instruction_dataset(processor, "llava_instruct_100.json")
    windows = text_windows(processor.tokenizer, documents, 64)
    settings = ReplaySettings(ratio=0.2, unit="tokens")
    mix = ReplayMix(instructions, windows, settings, seed=7)
    instruction_tokens = sum(trained_tokens(processor.encode(c).labels) for c in instructions.conversations)
    replayed = [mix[i]["input_ids"] for i in range(len(instructions), len(mix))]
    assert sum(trained_tokens(ids) for ids in replayed) == round(instruction_tokens * 0.2 / 0.8)
    again = ReplayMix(instructions, windows, settings, seed=7)
    other = ReplayMix(instructions, windows, settings, seed=8)
    assert all(torch.equal(a, again[i]["input_ids"]) for i, a in enumerate(replayed, len(instructions)))
    assert any(not torch.equal(a, other[i]["input_ids"]) for i, a in enumerate(replayed, len(instructions)))


def test_replay_and_instruction_losses_are_logged_apart(tmp_path):
    data = shapes.build_dataset(tmp_path / "shapes", 8, 1, 4, seed=0)
    text = tmp_path / "general.txt"
    text.write_text("The ferry left the harbour at dawn and the gulls followed it out to sea. " * 40)
    config = from_dict(
        TrainConfig,
        {
            "recipe": "stage2",
            "model": "tiny",
            "output_dir": str(tmp_path / "run"),
            "data": {
                "sources": [
                    {"path": str(data["questions"]), "image_folder": str(data["images"])},
                    {"path": str(text), "kind": "text"},
                ],
                "replay": {"ratio": 0.5, "window": 32},
            },
            "train": {"max_steps": 2, "batch_size": 16, "report_to": "none", "logging_steps": 1, "save_steps": 100},
        },
    )
    history = json.loads((run_training(config) / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "loss" in entry]
    assert len(steps) == 2
    for entry in steps:  # every batch of 16 holds both kinds (8 records, 8 windows)
        low, high = sorted((entry["instruction_loss"], entry["replay_loss"]))
        assert low <= entry["loss"] <= high  # the loss is their token-weighted mean
        assert "kl_to_base" not in entry


def test_a_text_source_needs_a_replay_share_and_the_other_way_round(tmp_path):
    text = {"path": "t.txt", "kind": "text"}
    with pytest.raises(ConfigError, match="set data.replay.ratio"):
        from_dict(DataConfig, {"sources": [{"path": "a.json"}, text]})
    with pytest.raises(ConfigError, match="kind: text"):
        from_dict(DataConfig, {"sources": [{"path": "a.json"}], "replay": {"ratio": 0.1}})
    with pytest.raises(ConfigError, match=r"ratio must be in \(0, 1\)"):
        from_dict(DataConfig, {"sources": [{"path": "a.json"}, text], "replay": {"ratio": 1.0}})


def test_a_text_source_without_its_column_fails_in_one_line_naming_file_and_column(tmp_path, capsys):
    answers = fixture_path(*ANSWERS)
    config = tmp_path / "run.yaml"
    config.write_text(
        json.dumps(
            {
                "recipe": "stage2",
                "model": "tiny",
                "output_dir": str(tmp_path / "run"),
                "data": {
                    "sources": [
                        {"path": str(fixture_path("data", "mllm_demo", "mllm_demo.json"))},
                        {"path": str(answers), "kind": "text", "text_column": "body"},
                    ],
                    "replay": {"ratio": 0.1},
                },
            }
        )
    )
    assert main(["train", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert str(answers) in error and "'body'" in error and "text_column" in error


def test_plain_text_given_as_conversations_is_refused_with_a_hint(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("just prose")
    with pytest.raises(ValueError, match="kind: text"):
        read_source(DataSource(path=str(text)))
