"""One start-up per run: the records' counts (what packing, grouping and replay plan from) are exactly the
processor's, measured in a pool as in one loop, kept beside the run and read back while the records and the
processor are the same; a bad record is marked, or stops the run with its own error. And the Trainer's evaluation
loss weighs every token once, as training's does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import fixture_path, processor_for, text_conversation

from llava_lite.config_io import from_dict
from llava_lite.data import measure as measure_module
from llava_lite.data.collator import Collator
from llava_lite.data.config import DataSource
from llava_lite.data.conversation import Conversation, Message
from llava_lite.data.dataset import ConversationDataset
from llava_lite.data.errors import BadRecordError
from llava_lite.data.formats import read_source
from llava_lite.data.masking import IGNORE_INDEX
from llava_lite.data.measure import measure
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset
from llava_lite.train.config import TrainConfig
from llava_lite.train.run import run_training


@pytest.fixture(scope="module")
def records() -> list[Conversation]:
    """Real LLaVA-Instruct conversations (their images are not needed to count tokens), and one bad record."""
    source = DataSource(path=str(fixture_path("data", "llava_instruct_100.json")))
    conversations = read_source(source, "error", check_images_exist=False)[0][:30]
    mismatched = Conversation(
        [Message("user", "<image>\nWhat is it?"), Message("assistant", "A cat.")], source="record odd"
    )
    return [*conversations[:10], mismatched, *conversations[10:]]


@pytest.fixture(scope="module")
def processor():
    return processor_for(LlavaLiteModel.from_config(preset("tiny")))


def direct_counts(records, processor) -> list[tuple[int, int, int]]:
    counts = []
    for record in records:
        try:
            encoded = processor.encode(record)
        except BadRecordError:
            counts.append((0, 0, 0))
            continue
        counts.append((len(encoded.input_ids), len(encoded.images), int((encoded.labels[1:] != IGNORE_INDEX).sum())))
    return counts


def as_counts(measured) -> list[tuple[int, int, int]]:
    return list(zip(measured.lengths.tolist(), measured.images.tolist(), measured.trained.tolist()))


def test_counts_are_the_processors_and_a_pool_gives_the_same(records, processor, monkeypatch):
    serial = measure(records, processor, stop_on_bad=False)
    assert as_counts(serial) == direct_counts(records, processor)
    assert serial.bad() == [(10, "image_count_mismatch")]
    monkeypatch.setattr(measure_module, "POOL_FROM", 1)
    monkeypatch.setattr(measure_module, "_CHUNK", 7)
    monkeypatch.setattr(measure_module, "_workers", lambda: 2)
    pooled = measure(records, processor, stop_on_bad=False)
    assert as_counts(pooled) == as_counts(serial) and np.array_equal(pooled.reasons, serial.reasons)


def test_the_counts_are_kept_beside_the_run_and_measured_again_when_the_records_change(
    records, processor, tmp_path, monkeypatch
):
    first = measure(records, processor, stop_on_bad=False, cache_dir=tmp_path)
    assert (tmp_path / "measured.safetensors").is_file()

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(type(processor), "encode", no_encoding)
    again = measure(records, processor, stop_on_bad=False, cache_dir=tmp_path)
    assert as_counts(again) == as_counts(first) and again.bad() == first.bad()
    monkeypatch.undo()
    changed = [*records[:-1], text_conversation()]
    remeasured = measure(changed, processor, stop_on_bad=False, cache_dir=tmp_path)
    assert as_counts(remeasured) == direct_counts(changed, processor)
    (tmp_path / "measured.safetensors").write_bytes(b"torn")  # a damaged cache is measured again
    assert as_counts(measure(changed, processor, stop_on_bad=False, cache_dir=tmp_path)) == as_counts(remeasured)


def test_a_bad_record_is_marked_under_skip_and_stops_with_its_own_error_otherwise(records, processor):
    skipping = ConversationDataset(records, processor, "skip")
    lengths, _ = skipping.measure()
    assert lengths[10] == 0 and dict(skipping.skips.counts()) == {"image_count_mismatch": 1}
    with pytest.raises(BadRecordError, match="record odd.*1 <image> placeholder.* but 0 image"):
        ConversationDataset(records, processor, "error").measure()


def test_the_evaluation_loss_weighs_every_token_once(tmp_path):
    short = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes."}]}
    long = {"conversations": [{"from": "human", "value": "Count"}, {"from": "gpt", "value": "one two three " * 12}]}
    data, held_out = tmp_path / "train.json", tmp_path / "eval.json"
    data.write_text(json.dumps([short, long] * 2))
    held_out.write_text(json.dumps([short, long, short]))  # batches of 2: (short, long), (short)
    raw = {
        "recipe": "stage2",
        "model": "tiny",
        "output_dir": str(tmp_path / "run"),
        "data": {"sources": [{"path": str(data)}]},
        "eval_data": {"sources": [{"path": str(held_out)}]},
        "train": {"max_steps": 2, "save_steps": 2, "batch_size": 2, "learning_rate": 1e-2, "report_to": "none"},
    }
    output = run_training(from_dict(TrainConfig, raw))
    logged = [
        e["eval_loss"]
        for e in json.loads((output / "trainer_state.json").read_text())["log_history"]
        if "eval_loss" in e
    ]
    model = LlavaLiteModel.from_pretrained(output).eval()  # the weights the evaluation at step 2 saw
    processor = processor_for(model, max_length=2048)
    collate = Collator(model.tokenizer.pad_token_id)
    nll, tokens, batch_means = 0.0, 0, []
    with torch.no_grad():
        for record in (short, long, short):
            question, answer = (turn["value"] for turn in record["conversations"])
            sample = processor.sample(Conversation([Message("user", question), Message("assistant", answer)]))
            count = int((sample["labels"][1:] != IGNORE_INDEX).sum())
            nll += float(model(**collate([sample])).loss) * count
            tokens += count
            batch_means.append(float(model(**collate([sample])).loss))
    assert logged == [pytest.approx(nll / tokens, rel=1e-5)]
    assert abs(logged[0] - sum(batch_means) / 3) > 1e-3  # a mean of per-record means would differ
