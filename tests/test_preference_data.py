"""Preference pairs: the four formats as the peers write them, every bad pair named or counted, answers encoded and
cut as training needs them, and batches that keep chosen and rejected apart with each image once."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import processor_for, solid_image

from llava_lite import cli
from llava_lite.data.config import DataSource
from llava_lite.data.errors import BadRecordError
from llava_lite.data.masking import IGNORE_INDEX
from llava_lite.data.preference_formats import read_pairs
from llava_lite.data.preference_pairs import PreferenceCollator, PreferenceDataset

QUESTION = "What colour is the square?"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    solid_image(tmp_path / "red.png", (220, 30, 30))
    solid_image(tmp_path / "blue.png", (30, 30, 220), (24, 36))
    return tmp_path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# One record of each format, shaped as each peer documents it.
TRL_CONVERSATIONAL = {
    "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
    "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "It is red."}]}],
    "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "It is green."}]}],
    "images": ["red.png"],
}
TRL_IMPLICIT_PROMPT = {
    "chosen": [{"role": "user", "content": f"<image>{QUESTION}"}, {"role": "assistant", "content": "It is red."}],
    "rejected": [{"role": "user", "content": f"<image>{QUESTION}"}, {"role": "assistant", "content": "It is green."}],
    "image": "red.png",
}
RLAIF_V = {
    "ds_name": "RLAIF-V",
    "image": {"bytes": None, "path": "red.png"},
    "question": QUESTION,
    "chosen": "It is red.",
    "rejected": "It is green.",
    "origin_dataset": "OK-VQA",
    "origin_split": '{"model": "OmniLMM-12B", "feedback_model": "OmniLMM-12B", "type": "question_answering"}',
    "idx": "OK-VQA-0",
    "image_path": "red.png",
}
LLAVA_RLHF = {
    "id": "0",
    "image": "red.png",
    "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}],
    "output_1": {"from": "llava", "value": "It is green."},
    "output_2": {"from": "llava", "value": "It is red."},
    "preference": 2,
}
LLAMA_FACTORY = {
    "conversations": [{"from": "human", "value": f"<image>{QUESTION}"}],
    "chosen": {"from": "gpt", "value": "It is red."},
    "rejected": {"from": "gpt", "value": "It is green."},
    "images": ["red.png"],
}
FORMATS = {
    "trl": TRL_CONVERSATIONAL,
    "trl_implicit_prompt": TRL_IMPLICIT_PROMPT,
    "rlaif_v": RLAIF_V,
    "llava_rlhf": LLAVA_RLHF,
    "llama_factory": LLAMA_FACTORY,
}


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_reads_its_real_shape(folder, name):
    pairs, skipped = read_pairs(DataSource(str(write_jsonl(folder / f"{name}.jsonl", [FORMATS[name]]))))
    assert not skipped and len(pairs) == 1
    pair = pairs[0]
    assert (pair.chosen, pair.rejected) == ("It is red.", "It is green.")
    assert pair.images == [str((folder / "red.png").resolve())]
    assert [m.role for m in pair.prompt] == ["user"]
    assert pair.prompt[0].content.replace("\n", "") == f"<image>{QUESTION}"


def test_trl_rows_read_back_by_datasets_from_parquet_read_the_same(folder):
    """`datasets` fills the missing fields of content parts with None ({"type": "image", "text": None})."""
    from datasets import Dataset

    rows = [TRL_CONVERSATIONAL, {**TRL_CONVERSATIONAL, "images": ["blue.png"]}]
    Dataset.from_list(rows).to_parquet(str(folder / "pairs.parquet"))
    pairs, skipped = read_pairs(DataSource(str(folder / "pairs.parquet")))
    assert not skipped
    assert [p.prompt[0].content for p in pairs] == [f"<image>{QUESTION}"] * 2
    assert [Path(p.images[0]).name for p in pairs] == ["red.png", "blue.png"]


BAD_PAIRS = {
    "no_rejected": {**LLAMA_FACTORY, "rejected": None},
    "no_chosen": {k: v for k, v in TRL_CONVERSATIONAL.items() if k != "chosen"},
    "identical_answers": {**RLAIF_V, "rejected": "It is red."},
    "image_count_mismatch": {**LLAMA_FACTORY, "images": ["red.png", "blue.png"]},
    "prompt_not_ending_on_user": {
        **LLAMA_FACTORY,
        "conversations": [*LLAMA_FACTORY["conversations"], {"from": "gpt", "value": "A square."}],
    },
}


@pytest.mark.parametrize("reason", BAD_PAIRS)
def test_each_bad_pair_is_a_named_error_or_a_counted_skip(folder, reason):
    path = write_jsonl(folder / "pairs.jsonl", [LLAVA_RLHF, BAD_PAIRS[reason], TRL_CONVERSATIONAL])
    with pytest.raises(BadRecordError) as error:
        read_pairs(DataSource(str(path)))
    assert error.value.reason == reason
    assert str(error.value).startswith(f"{path} line 2")
    pairs, skipped = read_pairs(DataSource(str(path)), on_bad_record="skip")
    assert len(pairs) == 2 and skipped == {reason: 1}


def test_an_image_outside_the_image_folder_is_refused(folder):
    path = write_jsonl(folder / "pairs.jsonl", [{**LLAMA_FACTORY, "images": ["../elsewhere.png"]}])
    with pytest.raises(BadRecordError, match="leaves the image folder"):
        read_pairs(DataSource(str(path)))


@pytest.fixture
def pair_dataset(tiny_model, folder):
    """Three pairs: a two-turn prompt (an earlier answer in it), a one-turn one, one with a long rejected answer."""
    two_turns = {
        **LLAMA_FACTORY,
        "conversations": [
            {"from": "human", "value": "<image>Describe it."},
            {"from": "gpt", "value": "A square."},
            {"from": "human", "value": QUESTION},
        ],
    }
    long = {**LLAMA_FACTORY, "images": ["blue.png"], "rejected": {"from": "gpt", "value": "green " * 40}}
    pairs, _ = read_pairs(DataSource(str(write_jsonl(folder / "pairs.jsonl", [two_turns, LLAMA_FACTORY, long]))))
    return lambda **settings: PreferenceDataset(pairs, processor_for(tiny_model), **settings)


def test_only_the_final_answer_and_its_end_of_turn_marker_are_trained(tiny_model, pair_dataset):
    encoded = pair_dataset().encode(0)
    tokenizer = tiny_model.tokenizer
    for side, answer in ((encoded.chosen, "It is red."), (encoded.rejected, "It is green.")):
        trained = side.labels[side.labels != IGNORE_INDEX]
        text = tokenizer.decode(trained)
        assert text.strip().startswith(answer) and text.strip() != answer  # the end-of-turn marker follows
        assert "A square." not in text  # the prompt's earlier answer is context, not trained
        first = int((side.labels != IGNORE_INDEX).argmax())
        assert (side.input_ids[:first] == encoded.chosen.input_ids[:first]).all()  # the same prompt before it


def test_an_answer_is_cut_inside_itself_and_never_silently_dropped(pair_dataset, caplog):
    full = pair_dataset()
    whole = full.encode(2)
    fitting = [full.encode(0).chosen, full.encode(0).rejected, full.encode(1).chosen, whole.chosen]
    limit = max(len(side.input_ids) for side in fitting) + 2  # every answer fits but the long rejected one
    dataset = pair_dataset(max_length=limit)
    with caplog.at_level(logging.WARNING, logger="llava_lite.data.preference_pairs"):
        dataset.measure()
    assert "1 of 6 answers were cut to max_length" in caplog.text
    cut = dataset.encode(2)
    assert len(cut.rejected.input_ids) == limit and cut.rejected.images == whole.rejected.images
    assert (cut.rejected.input_ids == whole.rejected.input_ids[:limit]).all()
    prompt = int((whole.chosen.labels != IGNORE_INDEX).argmax())  # tokens before the answer, images among them
    with pytest.raises(BadRecordError, match="leaves no token of the chosen answer") as error:
        pair_dataset(max_length=prompt).encode(0)
    assert error.value.reason == "too_long"
    with pytest.raises(BadRecordError, match="exceed max_length"):
        pair_dataset(max_length=limit, overflow="drop").encode(2)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_batch_keeps_chosen_and_rejected_apart_and_holds_each_image_once(tiny_model, pair_dataset, packed):
    dataset = pair_dataset()
    samples = [dataset[i] for i in range(3)]
    collate = PreferenceCollator(tiny_model.tokenizer.pad_token_id)
    batch = collate([{"packed": samples}] if packed else samples)
    lengths = [len(s[side]["input_ids"]) for s in samples for side in ("chosen", "rejected")]
    if packed:
        assert batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in batch
        assert batch["cu_seq_lens"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
        restarts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
        assert restarts == batch["cu_seq_lens"][:-1].tolist()
    else:
        assert batch["input_ids"].shape == (6, max(lengths))
        assert batch["attention_mask"].sum(1).tolist() == lengths
    assert len(batch["pixel_values"]) == 3  # one image per pair, not one per answer
    assert batch["image_order"].tolist() == [0, 0, 1, 1, 2, 2]
    assert batch["image_tokens"].tolist() == [16] * 6
    assert batch["pair_index"].tolist() == [0, 1, 2]
    answers = [int((s[side]["labels"] != IGNORE_INDEX).sum()) for s in samples for side in ("chosen", "rejected")]
    assert batch["completion_tokens"].tolist() == answers


def test_inspect_data_shows_each_answer_of_a_pair_with_its_trained_tokens_marked(folder, capsys):
    path = write_jsonl(folder / "pairs.jsonl", [LLAVA_RLHF, BAD_PAIRS["identical_answers"], LLAMA_FACTORY])
    code = cli.main(
        ["inspect-data", str(path), "--pairs", "--samples", "1", "--color", "never", "--pack-length", "200"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "| chosen |" in out and "| rejected |" in out
    assert "[[It is red." in out and "[[It is green." in out and QUESTION in out
    assert "records: 3 read" in out and "identical_answers: 1" in out and "pairs: 2 usable" in out
    assert "packing: 2 samples into" in out
