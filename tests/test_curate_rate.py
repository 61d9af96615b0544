"""`data rate`: a run's answer loss, unconditioned loss and IFD equal a direct computation with the model, padded
and packed batches agree, and the command adds them to the records as written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import fixture_path

from llava_lite.cli import main
from llava_lite.curate.rate import rate_with_model
from llava_lite.curate.records import read_curate_records
from llava_lite.curate.signals import SignalScorer
from llava_lite.data.collator import Collator
from llava_lite.data.conversation import Conversation, Message
from llava_lite.data.masking import IGNORE_INDEX
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset
from llava_lite.model.processor_for_config import processor_for_config

QUESTION = "What is unusual about this picture?"
ANSWERS = ("A man is ironing clothes on the back of a taxi.", "No, it is dangerous.")


def records_of(folder: Path) -> list[dict]:
    """Three records: two turns about one picture (its image after the text), two pictures, and text only."""
    return [
        {
            "id": "ironing",
            "image": "a.jpg",
            "conversations": [
                {"from": "human", "value": f"{QUESTION}\n<image>"},
                {"from": "gpt", "value": ANSWERS[0]},
                {"from": "human", "value": "Is it safe?"},
                {"from": "gpt", "value": ANSWERS[1]},
            ],
            "metadata": {"kind": "conversation"},
        },
        {
            "id": "two pictures",
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "<image><image>Which one is by the water?"},
                {"role": "assistant", "content": "The second."},
            ],
            "images": ["a.jpg", "b.jpg"],
        },
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}],
        },
    ]


@pytest.fixture
def data(tmp_path) -> Path:
    shutil.copyfile(fixture_path("images", "extreme_ironing.jpg"), tmp_path / "a.jpg")
    shutil.copyfile(fixture_path("images", "waterview.jpg"), tmp_path / "b.jpg")
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records_of(tmp_path)))
    return path


@pytest.fixture
def model() -> LlavaLiteModel:
    torch.manual_seed(0)
    return LlavaLiteModel.from_config(preset("tiny")).eval()


@torch.no_grad()
def direct_answer_loss(model: LlavaLiteModel, conversation: Conversation) -> float:
    """The mean NLL of the trained tokens from the model's full logits, one record alone: the definition."""
    sample = processor_for_config(model.config, model.tokenizer).sample(conversation)
    batch = Collator(model.tokenizer.pad_token_id)([sample])
    labels = batch.pop("labels")[0]
    logits = model(**batch).logits[0].float()
    targets = labels[1:]
    scored = targets != IGNORE_INDEX
    nll = -F.log_softmax(logits[:-1][scored], dim=-1).gather(1, targets[scored][:, None])
    return float(nll.mean())


def answers_alone(answers: list[str]) -> Conversation:
    """The instruction removed, written out: an empty user turn before each answer, no system message, no image."""
    turns = []
    for answer in answers:
        turns += [Message("user", ""), Message("assistant", answer)]
    return Conversation(turns)


def test_answer_loss_and_ifd_equal_a_direct_computation_with_the_model(model, data):
    records = read_curate_records(data)
    rate_with_model(records, SignalScorer(model, batch_size=2))
    unconditioned = [answers_alone(ANSWERS), answers_alone(["The second."]), answers_alone(["Blue."])]
    for record, without in zip(records, unconditioned):
        conditioned = direct_answer_loss(model, record.conversation)
        alone = direct_answer_loss(model, without)
        assert record.raw["answer_loss"] == pytest.approx(conditioned, abs=1e-5)
        assert record.raw["unconditioned_loss"] == pytest.approx(alone, abs=1e-5)
        assert record.raw["ifd"] == pytest.approx(conditioned / alone, abs=1e-5)
    # the images count: the same answers about another picture have another loss
    swapped = Conversation(records[0].conversation.messages, [str(data.parent / "b.jpg")])
    assert abs(direct_answer_loss(model, swapped) - records[0].raw["answer_loss"]) > 1e-4


def test_padded_and_packed_batches_and_the_full_head_agree(model, data):
    conversations = [record.conversation for record in read_curate_records(data)]
    padded = SignalScorer(model, batch_size=3).answer_losses(conversations, embeddings=True)
    packed = SignalScorer(model, batch_size=3, packed=True).answer_losses(conversations, embeddings=True)
    one_by_one = SignalScorer(model, batch_size=1).answer_losses(conversations, embeddings=True)
    model.loss_kernel = "full"  # the LM's own logits, not the chunked head
    full = SignalScorer(model, batch_size=2).answer_losses(conversations, embeddings=True)
    for other in (packed, one_by_one, full):
        for mine, theirs in zip(padded, other):
            assert mine.tokens == theirs.tokens
            assert mine.loss == pytest.approx(theirs.loss, abs=1e-5)
            assert torch.allclose(torch.from_numpy(mine.embedding), torch.from_numpy(theirs.embedding), atol=1e-5)


def test_the_embedding_is_the_mean_last_hidden_state_over_the_records_tokens(model, data):
    conversation = read_curate_records(data)[2].conversation  # text only
    [signals] = SignalScorer(model).answer_losses([conversation], embeddings=True)
    sample = processor_for_config(model.config, model.tokenizer).sample(conversation)
    with torch.no_grad():
        hidden = model.language_model(sample["input_ids"][None], output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(torch.from_numpy(signals.embedding), hidden[0].mean(0), atol=1e-5)


def test_rate_command_adds_the_fields_to_the_records_as_written(model, data, tmp_path, capsys):
    run = tmp_path / "run"
    model.save_pretrained(run)
    out = tmp_path / "rated.json"
    args = ["data", "rate", str(data), "--out", str(out), "--model", str(run), "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "records: 3" in printed and "ifd:" in printed and "ifd below 1" in printed
    rated = json.loads(out.read_text())
    originals = records_of(tmp_path)
    for written, original in zip(rated, originals):
        assert {k: v for k, v in written.items() if k not in ("answer_loss", "unconditioned_loss", "ifd")} == original
    assert rated[2]["answer_loss"] == pytest.approx(
        direct_answer_loss(model, read_curate_records(data)[2].conversation)
    )
    packed_out = tmp_path / "packed.jsonl"
    assert main([*args[:4], str(packed_out), *args[5:], "--packed", "--batch-size", "3"]) == 0
    packed = [json.loads(line) for line in packed_out.read_text().splitlines()]
    for a, b in zip(rated, packed):
        assert a["ifd"] == pytest.approx(b["ifd"], abs=1e-5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scorer", "reward-model"], "--scorer reward-model needs --judge-model RUN (a run of `recipe: reward`)"),
        ([], "nothing to rate: give --model RUN"),
        (["--scorer", "self"], "--scorer self needs --model RUN"),
        (["--model", "no/such/run"], "--model no/such/run: no such run folder"),
    ],
)
def test_rate_refuses_what_it_cannot_do_in_one_line(data, tmp_path, capsys, extra, message):
    out = tmp_path / "rated.jsonl"
    assert main(["data", "rate", str(data), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists()


def test_a_bad_record_is_named_by_file_and_line(model, data, tmp_path, capsys):
    run = tmp_path / "run"
    model.save_pretrained(run)
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[0], json.dumps({"id": "broken", "image": "missing.jpg", "conversations": []})]))
    assert main(["data", "rate", str(data), "--out", str(tmp_path / "o.jsonl"), "--model", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{data} line 2 (id broken): no `conversations` or `messages` list" in err


# ----- quality by the judge rubric --------------------------------------------------------------------------------


def judged_records(folder: Path) -> Path:
    shutil.copyfile(fixture_path("images", "extreme_ironing.jpg"), folder / "a.jpg")
    rows = [
        {
            "id": "good",
            "image": "a.jpg",
            "captions": ["A man irons on the back of a taxi."],
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is he doing?"},
                {"from": "gpt", "value": "great"},
            ],
        },
        {
            "id": "two turns",
            "conversations": [
                {"from": "human", "value": "Name a colour."},
                {"from": "gpt", "value": "poor"},
                {"from": "human", "value": "Another?"},
                {"from": "gpt", "value": "Red."},
            ],
        },
        {"id": "flaky", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "flaky answer"}]},
    ]
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_judge_quality_is_the_rubric_mean_and_a_rerun_asks_only_for_what_failed(tmp_path, capsys):
    from rubric_server import ANSWER, RepliesServer, user_text

    data, out = judged_records(tmp_path), tmp_path / "rated.jsonl"
    failing = {"now": True}

    def reply(body: dict) -> tuple[int, str]:
        answer = ANSWER.search(user_text(body)).group(1)
        if "flaky" in answer and failing["now"]:
            return 500, ""
        points = {"great": (9, 7), "flaky answer": (5, 5)}.get(answer, (2, 1))
        return 200, f"Helpfulness: {points[0]}\nFaithfulness: {points[1]}\nBecause."

    with RepliesServer(reply) as server:
        command = [
            "data", "rate", str(data), "--out", str(out), "--scorer", "judge", "--judge-model", "stand-in",
            "--base-url", server.url, "--max-retries", "0",
        ]  # fmt: skip
        assert main(command) == 1  # a request failed: said, and the journal kept for a rerun
        assert "rerun the same command" in capsys.readouterr().err
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [row["quality"] for row in rows] == [8.0, 1.5, None]
        asked = next(body for body in server.bodies if "[Answer]\ngreat\n" in user_text(body))
        assert "A man irons on the back of a taxi." in user_text(asked)  # what the record says of its image
        two_turns = next(body for body in server.bodies if "Turn 2: Red." in user_text(body))
        assert "Turn 1: Name a colour.\nTurn 2: Another?" in user_text(two_turns)

        failing["now"] = False
        seen = len(server.bodies)
        assert main(command) == 0
        assert len(server.bodies) - seen == 1  # the failed one alone
        assert [json.loads(line)["quality"] for line in out.read_text().splitlines()] == [8.0, 1.5, 5.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "rated.jsonl", "records.jsonl"]  # no work files


def test_self_quality_runs_the_run_on_the_records_with_their_images(tmp_path, model, capsys):
    data, out = judged_records(tmp_path), tmp_path / "rated.jsonl"
    run = tmp_path / "run"
    model.save_pretrained(run)
    command = [
        "data", "rate", str(data), "--out", str(out), "--scorer", "self", "--model", str(run), "--max-tokens", "8",
        "--device", "cpu",
    ]  # fmt: skip
    assert main(command) == 0
    printed = capsys.readouterr().out
    # The tiny random run cannot follow a rubric: every reply gives no score, and is counted so.
    assert "unscored: 3 (no_score 3)" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["quality"] for row in rows] == [None, None, None]
    assert all(row["answer_loss"] > 0 for row in rows)  # --model also gave the run's signals
