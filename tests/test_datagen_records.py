"""Replies to records: parsing, the rejection reasons, duplicates, and records the foundation's loader trains on."""

from __future__ import annotations

import json

import pytest
from chat_server import write_scenes
from conftest import fixture_path, processor_for

from llava_lite.cli import main
from llava_lite.data.config import DataSource
from llava_lite.data.formats import read_source
from llava_lite.data.masking import IGNORE_INDEX
from llava_lite.datagen.filters import DEFAULT_BOUNDS, DuplicateFilter, check_reply, check_turns, parse_score
from llava_lite.datagen.parse import Rejection, Turn, parse_description, parse_turns


def test_decorated_labels_separators_and_preamble_parse_into_turns():
    reply = (
        "Sure! Here is the conversation.\n\n**Question 1:** What is the man holding?\n**Answer 1:** A kite.\n"
        "===\nQ: Is it windy?\nA: Yes, the kite is high\nin the air.\n---\nUser: Where is he?\nAssistant: On a beach."
    )
    assert parse_turns(reply) == [
        Turn("What is the man holding?", "A kite."),
        Turn("Is it windy?", "Yes, the kite is high\nin the air."),
        Turn("Where is he?", "On a beach."),
    ]


@pytest.mark.parametrize(
    "reply",
    ["Just some prose without labels.", "Question: Why?\nQuestion: How?\nAnswer: So.", "Question: Where is it?"],
)
def test_replies_that_are_not_question_then_answer_are_unparsable(reply):
    with pytest.raises(Rejection) as caught:
        parse_turns(reply)
    assert caught.value.reason == "unparsable"


def test_a_description_drops_its_label_and_keeps_its_paragraphs():
    assert parse_description("Description: A bus.\n\n\n\nIt is red.") == "A bus.\n\nIt is red."
    with pytest.raises(Rejection, match="unparsable"):
        parse_description("Question: What is this?\nAnswer: A bus.")


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("I'm sorry, but I can't help with that.", "refusal"),
        ("As an AI language model, I have no eyes. Question: x", "refusal"),
    ],
)
def test_empty_and_refusing_replies_are_rejected_before_parsing(text, reason):
    with pytest.raises(Rejection) as caught:
        check_reply(text)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    "answer",
    [
        "According to the caption, a man rides a horse.",
        "The bbox of the horse covers most of the image.",
        "The horse is at [0.37, 0.21, 0.88, 0.95].",
        "Its coordinates put it on the left.",
        "From the given description, it is sunny.",
        "The horse spans 0.370, 0.210 to the right.",
    ],
)
def test_answers_that_mention_what_the_model_was_given_are_rejected(answer):
    with pytest.raises(Rejection) as caught:
        check_turns([Turn("Where is the horse?", answer)], DEFAULT_BOUNDS["conversation"])
    assert caught.value.reason == "mentions_context"


def test_length_turn_count_and_repeated_questions_are_rejected_with_their_reason():
    def reason(turns, kind="conversation"):
        with pytest.raises(Rejection) as caught:
            check_turns(turns, DEFAULT_BOUNDS[kind])
        return caught.value.reason

    assert reason([Turn("Why?", "Because.")], "reasoning") == "too_short"
    assert reason([Turn("Why?", "word " * 301)]) == "too_long"
    assert (
        reason([Turn("Why is it so?", "Because it rained all night long, so.")] * 2, "reasoning") == "wrong_turn_count"
    )
    assert reason([Turn("What colour?", "Red."), Turn("What  colour ?", "Blue.")]) == "repeated_question"
    check_turns(
        [Turn("What colour is the bus?", "It is red.")], DEFAULT_BOUNDS["conversation"]
    )  # and a good one passes


def test_exact_duplicates_anywhere_and_near_duplicates_within_an_image_are_dropped():
    dedup = DuplicateFilter(threshold=0.7)
    text = "What is the man doing? He is flying a red kite on a sunny beach near the water."
    dedup.check("img1", text)
    with pytest.raises(Rejection, match="duplicate"):
        dedup.check("img2", text.upper().replace("?", " ?"))
    with pytest.raises(Rejection, match="near_duplicate"):
        dedup.check("img1", text.replace("sunny", "bright"))
    dedup.check("img2", text.replace("sunny", "bright"))  # another image may say nearly the same
    dedup.check("img1", "How many people are there? Two people stand by the car.")


def test_judge_scores_are_read_from_the_last_score_line():
    assert parse_score("Accurate and helpful.\nScore: 8") == 8.0
    assert parse_score("score = 6.5") == 6.5
    assert parse_score("I would give it an eight.") is None


def test_datagen_records_load_with_the_foundation_loader_and_train_only_the_answers(tmp_path, tiny_model):
    out = tmp_path / "data.json"
    caps = str(fixture_path("data", "caps_boxes_coco2014_val_80.jsonl"))
    assert main(["datagen", "--annotations", caps, "--limit", "6", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    conversations, skipped = read_source(DataSource(str(out)), check_images_exist=False)
    assert not skipped and len(conversations) == len(written) >= 15
    processor = processor_for(tiny_model)
    tokenizer = tiny_model.tokenizer
    end = processor.template.end_of_turn
    for conversation in conversations:
        assert conversation.messages[0].content.startswith("<image>\n") and len(conversation.images) == 1
        encoded = processor.encode(conversation)
        trained = encoded.labels != IGNORE_INDEX
        # Each run of trained tokens decodes to one answer and its end-of-turn marker, in order, and nothing else.
        runs, start = [], None
        for index, flag in enumerate([*trained.tolist(), False]):
            if flag and start is None:
                start = index
            elif not flag and start is not None:
                runs.append(tokenizer.decode(encoded.input_ids[start:index]))
                start = None
        answers = [m.content for m in conversation.messages if m.role == "assistant"]
        assert [run.strip().removesuffix(end.strip()).strip() for run in runs] == answers


def test_hf_backend_generates_batched_and_padding_does_not_change_a_reply(tmp_path, tiny_model):
    from llava_lite.data.annotations import ImageAnnotations
    from llava_lite.llm.chat import ChatRequest
    from llava_lite.llm.hf import HFBackend

    folder = tmp_path / "lm"
    tiny_model.language_model.save_pretrained(folder)
    tiny_model.tokenizer.save_pretrained(folder)
    backend = HFBackend(str(folder), batch_size=3, max_new_tokens=6, temperature=0.0, device="cpu")
    image = ImageAnnotations("1", "a.jpg", ["A cat."])
    contexts = ["A cat.", "A long description of a dog running over a field of green grass in the sun.", "Hi"]
    requests = [
        ChatRequest(str(n), "conversation", [{"role": "user", "content": c}], image) for n, c in enumerate(contexts)
    ]
    together = backend.complete(requests)
    alone = [backend.complete([request])[0] for request in requests]
    assert [r.text for r in together] == [r.text for r in alone]
    assert all(r.prompt_tokens > 0 and 0 < r.completion_tokens <= 6 for r in together)


def test_hf_backend_through_the_command_accounts_for_every_task(tmp_path, tiny_model, capsys):
    folder = tmp_path / "lm"
    tiny_model.language_model.save_pretrained(folder)
    tiny_model.tokenizer.save_pretrained(folder)
    annotations = write_scenes(tmp_path / "scenes.jsonl", 3)
    out = tmp_path / "out.jsonl"
    argv = [
        "datagen",
        "--annotations",
        annotations,
        "--backend",
        "hf",
        "--model",
        str(folder),
        "--kinds",
        "conversation",
    ]
    assert main([*argv, "--batch-size", "2", "--max-tokens", "4", "--device", "cpu", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    rejects = [json.loads(line) for line in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records + rejects) == [f"img{n}-conversation" for n in range(3)]
    assert "tokens: " in capsys.readouterr().out


def test_datagen_help_explains_itself(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["datagen", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out.lower()
    for words in ("--backend", "--concurrency", "--judge", "--api-key-env", "rejects", "resumes", "example"):
        assert words in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--kinds", "conversation,poems"], "unknown kind(s) poems"),
        (["--backend", "template", "--judge"], "cannot judge"),
        (["--prompts", "/nowhere"], "no such prompts folder"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, extra, message):
    annotations = write_scenes(tmp_path / "scenes.jsonl", 1)
    assert main(["datagen", "--annotations", annotations, "--out", str(tmp_path / "o.json"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


@pytest.mark.parametrize(
    "flag, value",
    [("--limit", "0"), ("--limit", "-1"), ("--batch-size", "0"), ("--concurrency", "0"), ("--max-tokens", "0"),
     ("--max-consecutive-failures", "0"), ("--max-retries", "-1"), ("--limit", "two"), ("--dtype", "bf16")],
)  # fmt: skip
def test_bad_option_values_are_refused_by_flag_before_anything_is_read(tmp_path, capsys, flag, value):
    missing = str(tmp_path / "missing.jsonl")  # never opened: the flag is checked first
    with pytest.raises(SystemExit) as exited:
        main(["datagen", "--annotations", missing, "--out", str(tmp_path / "o.json"), flag, value])
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"llava-lite datagen: error: argument {flag}: ") and repr(value) in last


def test_a_prompts_folder_replaces_the_built_in_prompt_of_its_kinds(tmp_path):
    from llava_lite.datagen.prompts import load_prompts

    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "conversation.yaml").write_text(
        'system: Our own words.\nexamples:\n  - context: A cat.\n    reply: "Question: What?\\nAnswer: A cat."\n'
    )
    prompts = load_prompts(["conversation", "detail"], str(folder))
    assert prompts["conversation"].messages("A dog.") == [
        {"role": "system", "content": "Our own words."},
        {"role": "user", "content": "A cat."},
        {"role": "assistant", "content": "Question: What?\nAnswer: A cat."},
        {"role": "user", "content": "A dog."},
    ]
    assert prompts["detail"] == load_prompts(["detail"])["detail"] and len(prompts["detail"].questions) >= 5
    (folder / "detail.yaml").write_text("examples: []\n")
    with pytest.raises(ValueError, match=r"detail\.yaml \(detail prompts\): needs a `system` message"):
        load_prompts(["detail"], str(folder))
