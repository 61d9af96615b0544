"""Evaluation metrics against numbers worked out by hand: perplexities, VQAv2 answer normalisation and accuracy,
multiple choice."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import image_conversation, processor_for, solid_image, text_conversation
from torch import nn

from llava_lite.cli import main
from llava_lite.config_io import ConfigError, from_dict
from llava_lite.data.errors import BadRecordError
from llava_lite.eval.config import EvalConfig
from llava_lite.eval.perplexity import read_conversations, response_perplexity, text_perplexity, text_windows
from llava_lite.eval.report import read_training_log
from llava_lite.eval.suite import EvalSuite
from llava_lite.eval.vqa import Question, choice_letter, normalize_answer, read_questions, vqa_accuracy
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset


class FixedLM(nn.Module):
    """A 4-token LM that predicts 0, 1, 2, 3 with probabilities 1/2, 1/4, 1/8, 1/8 whatever came before."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 1)
        self.log_probs = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.log_probs.expand(*input_ids.shape, 4))


def test_text_perplexity_matches_a_hand_computed_value():
    # Tokens 1, 2, 3 and 0 follow the first: probabilities 1/4, 1/8, 1/8, 1/2, product 1/512.
    result = text_perplexity(FixedLM(), [[0, 1, 2, 3, 0]])
    assert result.tokens == 4
    assert result.perplexity == pytest.approx(512 ** (1 / 4))
    # Two windows weigh by tokens: 4 tokens at product 1/512 and 1 token at 1/2.
    both = text_perplexity(FixedLM(), [[0, 1, 2, 3, 0], [3, 0]], batch_size=2)
    assert both.tokens == 5
    assert both.perplexity == pytest.approx((512 * 2) ** (1 / 5))


def test_padding_in_a_batch_of_windows_changes_nothing():
    alone = [text_perplexity(FixedLM(), [window]) for window in ([0, 1, 2, 3, 0], [3, 0])]
    batched = text_perplexity(FixedLM(), [[0, 1, 2, 3, 0], [3, 0]], batch_size=2)
    total = sum(r.mean_nll * r.tokens for r in alone)
    assert batched.mean_nll == pytest.approx(total / 5)


def test_text_is_cut_into_windows_whose_first_token_is_context_without_bos(tiny_model):
    text = "The boats rocked slowly on the water of the quiet harbour. " * 8
    ids = tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = text_windows(tiny_model.tokenizer, text, window=16)
    assert tiny_model.tokenizer.bos_token_id is None
    joined = [t for w in windows for t in w]
    # In order, nothing skipped; a last window of a single token predicts nothing and is left out.
    assert joined == ids[: len(joined)] and len(ids) - len(joined) <= 1
    assert all(2 <= len(w) <= 16 for w in windows)
    result = text_perplexity(tiny_model.language_model, windows, batch_size=3)
    assert result.tokens == len(joined) - len(windows)


def test_response_perplexity_of_a_uniform_model_is_the_vocabulary_size(image_folder):
    model = LlavaLiteModel.from_config(preset("tiny"))
    with torch.no_grad():
        model.language_model.lm_head.weight.zero_()  # every logit 0: each token has probability 1/V
    vocab = model.language_model.get_input_embeddings().weight.shape[0]
    result = response_perplexity(model, [image_conversation(image_folder), text_conversation()])
    assert result.perplexity == pytest.approx(vocab)
    processor = processor_for(model)
    trained = sum(
        processor.encode(c).num_trained_tokens for c in (image_conversation(image_folder), text_conversation())
    )
    assert result.tokens == trained and result.records == 2


def test_response_perplexity_matches_a_direct_computation_over_assistant_tokens(tiny_model, image_folder):
    conversations = [image_conversation(image_folder, ("a.jpg", "b.jpg")), text_conversation()]
    result = response_perplexity(tiny_model, conversations, batch_size=2)
    nll, count = 0.0, 0
    for conversation in conversations:
        encoded = processor_for(tiny_model).encode(conversation)
        pixels = [processor_for(tiny_model).geometry.preprocessor(_open(p)) for p in encoded.images]
        with torch.no_grad():
            logits = tiny_model(
                input_ids=torch.from_numpy(encoded.input_ids)[None],
                pixel_values=torch.stack(pixels) if pixels else None,
            ).logits[0]
        for position, label in enumerate(encoded.labels.tolist()):
            if label != -100:
                nll -= F.log_softmax(logits[position - 1], dim=-1)[label].item()
                count += 1
    assert result.tokens == count
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def _open(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


@pytest.mark.parametrize(
    ("answer", "normalized"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("Yes!", "yes"),
        ("two", "2"),
        ("None", "0"),
        ("ten dogs", "10 dogs"),
        ("the dog", "dog"),
        ("A man", "man"),
        ("an apple", "apple"),
        ("black-and-white", "black and white"),
        ("red, white", "red white"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ('"stop"', "stop"),
        ("  on the\ttable\n", "on table"),
    ],
)
def test_answers_are_normalised_as_vqav2_does(answer, normalized):
    assert normalize_answer(answer) == normalized


def test_vqa_accuracy_is_the_soft_score_over_ten_humans():
    humans = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("Two.", humans) == pytest.approx(0.9)  # 3 x 2/3 and 7 x 1, over 10
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)  # 2 x 1/3 and 8 x 2/3
    assert vqa_accuracy("3", humans) == 1.0
    assert vqa_accuracy("4", humans) == 0.0
    assert vqa_accuracy("The Dog", ["dog"]) == 1.0


def test_multiple_choice_reads_the_letter_or_the_option_text():
    choices = ["a cat", "a dog", "a bird"]
    assert choice_letter("B", choices) == "B"
    assert choice_letter("(b) a dog", choices) == "B"
    assert choice_letter("C. a bird", choices) == "C"
    assert choice_letter("The dog", choices) == "B"
    assert choice_letter("Dogs are great", choices) is None
    assert choice_letter("D", choices) is None
    question = Question("1", None, "What animal?", ["a dog"], choices)
    assert question.score("B") == 1.0 and question.score("A") == 0.0
    assert "A. a cat\nB. a dog\nC. a bird" in question.prompt


def test_a_bad_question_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "Why?", "answer": "because"}\n{"question": "What?"}\n')
    with pytest.raises(BadRecordError, match=r"q.jsonl line 2: needs `answer`"):
        read_questions(path)
    path.write_text('{"question": "Which?", "choices": ["x", "y"], "answer": "z"}\n')
    with pytest.raises(BadRecordError, match="neither a letter nor one of the choices"):
        read_questions(path)


def test_eval_command_scores_vqa_and_writes_json(tmp_path, capsys):
    LlavaLiteModel.from_config(preset("tiny")).save_pretrained(tmp_path / "run")
    solid_image(tmp_path / "red.png", (255, 0, 0))
    questions = [
        {"question_id": 1, "image": "red.png", "question": "What colour?", "answers": ["red"] * 10, "category": "c"},
        {"question_id": 2, "image": "red.png", "question": "Which?", "choices": ["red", "blue"], "answer": "A"},
        {"question_id": 3, "question": "How many legs has a cat?", "answer": "four", "category": "c"},
    ]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    out = tmp_path / "results.json"
    assert main(["eval", "--model", str(tmp_path / "run"), "--vqa", str(tmp_path / "q.jsonl"), "--out", str(out)]) == 0
    vqa = json.loads(out.read_text())["vqa"]
    assert vqa["count"] == 3 and [a["question_id"] for a in vqa["answers"]] == ["1", "2", "3"]
    rescored = [
        Question(
            str(q["question_id"]),
            q.get("image"),
            q["question"],
            q.get("answers") or [q["answer"]],
            q.get("choices", []),
        ).score(a["prediction"])
        for q, a in zip(questions, vqa["answers"])
    ]
    assert [a["score"] for a in vqa["answers"]] == rescored
    assert vqa["accuracy"] == pytest.approx(sum(rescored) / 3)
    assert vqa["by_category"]["c"]["count"] == 2
    assert "VQA accuracy" in capsys.readouterr().out


def test_eval_command_without_anything_to_do_says_so_in_one_line(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--bench", str(tmp_path)]) == 2
    assert "--judge-base-url" in capsys.readouterr().err


def instruct_records(folder, images: list[str]) -> str:
    """A JSONL of held-out records, one per image name, in `folder`."""
    records = [
        {
            "messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Red."}],
            "images": [image],
        }
        for image in images
    ]
    path = folder / "held_out.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_only_the_images_of_records_within_the_limit_are_looked_for(tmp_path):
    solid_image(tmp_path / "red.png", (255, 0, 0))
    path = instruct_records(tmp_path, ["red.png", "red.png", "gone.png"])
    assert len(read_conversations(path, limit=2)) == 2
    with pytest.raises(BadRecordError, match=r"held_out.jsonl line 3: image .*gone.png does not exist"):
        read_conversations(path)


def test_a_suite_reads_its_data_once_and_scores_the_base_lm_once(tmp_path):
    torch.manual_seed(0)
    model = LlavaLiteModel.from_config(preset("tiny"))
    solid_image(tmp_path / "red.png", (255, 0, 0))
    model.language_model.save_pretrained(tmp_path / "base")
    (tmp_path / "plain.txt").write_text("The boats rocked slowly on the water of the quiet harbour. " * 6)
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": "red.png", "question": "Colour?", "answer": "red"}) + "\n")
    config = EvalConfig(
        instruct=instruct_records(tmp_path, ["red.png", "red.png"]),
        text=str(tmp_path / "plain.txt"),
        base_lm=str(tmp_path / "base"),
        text_window=16,
        vqa=str(tmp_path / "q.jsonl"),
        vqa_max_new_tokens=2,
    )
    suite = EvalSuite(model, config, progress=False)
    first = suite.run(model)
    # Nothing is read again from here on: data files, text and base LM may all go (the images are loaded per batch).
    for name in ("held_out.jsonl", "plain.txt", "q.jsonl"):
        (tmp_path / name).unlink()
    shutil.rmtree(tmp_path / "base")
    with torch.no_grad():
        model.language_model.lm_head.weight.mul_(2)  # "training" changes the tuned model, not the base LM
    second = suite.run(model)
    assert second["text_perplexity"]["base"] == first["text_perplexity"]["base"] is not None
    assert second["text_perplexity"]["base_source"] == str(tmp_path / "base")
    assert second["text_perplexity"]["tuned"] != first["text_perplexity"]["tuned"]
    assert second["response_perplexity"]["perplexity"] != first["response_perplexity"]["perplexity"]
    assert second["response_perplexity"]["records"] == 2 and second["vqa"]["count"] == 1


def test_the_training_log_is_read_from_the_newest_numbered_checkpoint(tmp_path):
    for name, step in (("checkpoint-2", 2), ("checkpoint-10", 10), ("checkpoint-foo", 99)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": step}]}))
    assert read_training_log(tmp_path) == [{"step": 10}]


def test_eval_settings_are_named_as_configs_and_flags_name_them(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^eval: text_window \(--text-window\) must be at least 2, got 1$"):
        from_dict(EvalConfig, {"text": "t.txt", "text_window": 1}, "eval")
    assert main(["eval", "--model", str(tmp_path), "--text", "t.txt", "--batch-size", "0"]) == 2
    assert "error: batch_size (--batch-size) must be at least 1, got 0" in capsys.readouterr().err


def test_eval_command_shows_progress_of_the_perplexities_and_prints_json(tmp_path, capsys):
    LlavaLiteModel.from_config(preset("tiny")).save_pretrained(tmp_path / "run")
    solid_image(tmp_path / "red.png", (255, 0, 0))
    (tmp_path / "plain.txt").write_text("The boats rocked slowly on the water of the quiet harbour. " * 6)
    instruct = instruct_records(tmp_path, ["red.png"])
    args = ["eval", "--model", str(tmp_path / "run"), "--instruct", instruct, "--text", str(tmp_path / "plain.txt")]
    assert main([*args, "--text-window", "16", "--json"]) == 0
    captured = capsys.readouterr()
    assert "response perplexity: 100%" in captured.err and "text perplexity: 100%" in captured.err
    printed = json.loads(captured.out)
    assert printed["model"] == str(tmp_path / "run") and printed["response_perplexity"]["records"] == 1
