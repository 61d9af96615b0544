"""llava_lite as an lmms-eval model: found through its entry point, answering the shipped local tasks offline as
`llava-lite generate` answers and scoring as `llava-lite eval --vqa` scores, multiple choice by our own
log-likelihoods, in one process and in two under `accelerate launch`."""

from __future__ import annotations

import importlib
import json
import shutil
import string
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from harness_helpers import ROOT, free_port, lora_run, run_offline

from llava_lite.cli import main
from llava_lite.data.conversation import Conversation, Message
from llava_lite.data.images import load_image
from llava_lite.eval.vqa import read_questions
from llava_lite.inference.generator import Generator, SamplingSettings
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset
from llava_lite.model.processor_for_config import processor_for_config

SHIPPED = ROOT / "configs" / "eval" / "lmms_eval"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return lora_run(tmp_path_factory.mktemp("lmms") / "run")


@pytest.fixture(scope="module")
def vqa(run, tmp_path_factory) -> dict:
    """The shipped questions and images, with the references of two open questions made from our own answers, so
    that the score is neither 0 nor 1; the answers `llava-lite generate` gives in batches of 2 and of 1."""
    folder = tmp_path_factory.mktemp("vqa")
    images = shutil.copytree(SHIPPED / "data" / "images", folder / "images")
    questions = read_questions(SHIPPED / "data" / "questions.jsonl")
    prompts = folder / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": q.id, "image": q.image, "prompt": q.prompt}) + "\n" for q in questions)
    )
    answers = {}
    for size in (1, 2):
        out = folder / f"answers_{size}.jsonl"
        command = ["generate", "--model", str(run), "--input", str(prompts), "--output", str(out)]
        assert main([*command, "--image-folder", str(images), "--batch-size", str(size), "--max-new-tokens", "16"]) == 0
        answers[size] = [json.loads(line)["answer"] for line in out.read_text().splitlines()]
    rows = [json.loads(line) for line in (SHIPPED / "data" / "questions.jsonl").read_text().splitlines()]
    rows[0]["answer"] = answers[2][0]  # right: 1
    rows[1]["answers"] = [answers[2][1]] * 2 + ["a square"] * 8  # two humans of ten agree: 0.6
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tasks = folder / "tasks"
    tasks.mkdir()
    for name, shipped in (("test_vqa", "llava_lite_vqa.yaml"), ("test_vqa_choice", "llava_lite_vqa_choice.yaml")):
        task = {
            "include": str(SHIPPED / shipped),
            "task": name,
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "lmms_eval_specific_kwargs": {"default": {"image_folder": str(images)}},
        }
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump(task))
    return {"data": data, "images": images, "tasks": tasks, "answers": answers, "folder": folder}


def lmms_eval(run: Path, vqa: dict, out: Path, *options: str, launcher: tuple[str, ...] = ()) -> dict:
    """lmms-eval's command line on our model, offline; its results and its samples by task, by document."""
    command = [*launcher] if launcher else [sys.executable]
    command += ["-m", "lmms_eval", "--model", "llava_lite", "--model_args", f"pretrained={run}"]
    command += ["--include_path", str(vqa["tasks"]), "--log_samples", "--output_path", str(out), *options]
    output = run_offline(command, vqa["folder"])
    results = json.loads(next(out.rglob("*_results.json")).read_text())
    samples = {}
    for path in out.rglob("*_samples_*.jsonl"):
        task = path.stem.split("_samples_", 1)[1]
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        samples[task] = {row["doc_id"]: row for row in rows}
    return {"results": results, "samples": samples, "log": output.stdout + output.stderr}


def test_lmms_eval_finds_llava_lite_through_its_entry_point():
    from lmms_eval.models import get_model

    from llava_lite.eval.lmms_plugin.model import LlavaLiteChat, LlavaLiteSimple

    assert get_model("llava_lite") is LlavaLiteChat
    assert get_model("llava_lite", force_simple=True) is LlavaLiteSimple


def test_a_generation_task_answers_as_generate_and_scores_as_eval_vqa(run, vqa, tmp_path):
    got = lmms_eval(run, vqa, tmp_path / "out", "--tasks", "test_vqa", "--batch_size", "2", "--device", "cpu")
    assert got["results"]["config"]["model_backend"].endswith("LlavaLiteChat (chat)")
    samples = got["samples"]["test_vqa"]
    assert [samples[i]["filtered_resps"] for i in sorted(samples)] == vqa["answers"][2]
    assert len(set(vqa["answers"][2])) == len(vqa["answers"][2])  # varied answers, so agreeing means something
    out = tmp_path / "ours.json"
    command = ["eval", "--model", str(run), "--vqa", str(vqa["data"]), "--vqa-image-folder", str(vqa["images"])]
    assert main([*command, "--batch-size", "2", "--out", str(out)]) == 0
    ours = json.loads(out.read_text())["vqa"]["accuracy"]
    assert 0 < ours < 1
    assert got["results"]["results"]["test_vqa"]["vqa_accuracy,none"] == pytest.approx(ours, abs=1e-12)


def our_log_likelihood(model: LlavaLiteModel, prompt: str, image: Path, answer: str) -> float:
    """log P(answer and its end-of-turn marker | prompt) from the model's full logits (not the plugin's path)."""
    processor = processor_for_config(model.config, model.tokenizer)
    sample = processor.sample(Conversation([Message("user", prompt), Message("assistant", answer)], [str(image)]))
    with torch.no_grad():
        logits = model(input_ids=sample["input_ids"][None], pixel_values=torch.stack(sample["pixel_values"])).logits[0]
    labels = sample["labels"]
    positions = [t for t in range(1, len(labels)) if labels[t] != -100]
    return sum(F.log_softmax(logits[t - 1].double(), dim=-1)[labels[t]].item() for t in positions)


def test_two_processes_answer_as_one_and_multiple_choice_is_our_log_likelihood(run, vqa, tmp_path):
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/ddp.yaml")
    launcher += ("--num_processes", "2", "--main_process_port", str(free_port()))
    options = ("--tasks", "test_vqa,test_vqa_choice", "--force_simple", "--batch_size", "1")
    got = lmms_eval(run, vqa, tmp_path / "out", *options, launcher=launcher)
    assert "Running on rank 1" in got["log"]
    assert got["results"]["config"]["model_backend"].endswith("LlavaLiteSimple (simple)")
    answers = got["samples"]["test_vqa"]
    assert [answers[i]["filtered_resps"] for i in sorted(answers)] == vqa["answers"][1]

    model = LlavaLiteModel.from_pretrained(run).eval()
    choice_questions = [q for q in read_questions(vqa["data"]) if q.choices]
    choices = got["samples"]["test_vqa_choice"]
    assert sorted(choices) == list(range(len(choice_questions)))
    right = []
    for doc_id, question in enumerate(choice_questions):
        letters = string.ascii_uppercase[: len(question.choices)]
        expected = [-our_log_likelihood(model, question.prompt, vqa["images"] / question.image, x) for x in letters]
        got_values = [float(value) for value, _ in choices[doc_id]["filtered_resps"]]
        assert got_values == pytest.approx(expected, rel=1e-5)
        right.append(letters[min(range(len(letters)), key=expected.__getitem__)] == question.correct_letter())
    accuracy = got["results"]["results"]["test_vqa_choice"]["acc,none"]
    assert accuracy == pytest.approx(sum(right) / len(right))


def test_a_batch_of_chat_requests_with_several_images_answers_as_the_generator(run):
    from lmms_eval.api.instance import Instance

    from llava_lite.eval.lmms_plugin.model import LlavaLiteChat

    pictures = [load_image(path) for path in sorted((SHIPPED / "data" / "images").glob("*.png"))]
    docs = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "url": pictures[0]},
                    {"type": "image", "url": str(SHIPPED / "data" / "images" / "red_circle.png")},
                    {"type": "text", "text": "Which of the two is red?"},
                ],
            }
        ],
        [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "First?"}, {"type": "image", "url": pictures[1]}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
            {"role": "user", "content": [{"type": "text", "text": "And a word about it?"}]},
        ],
        [{"role": "user", "content": [{"type": "text", "text": "Tell me about the harbour."}]}],
        [{"role": "user", "content": [{"type": "image", "url": pictures[2]}, {"type": "text", "text": "What is it?"}]}],
    ]
    expected_prompts = [
        (Conversation([Message("user", "<image>\n<image>\nWhich of the two is red?")]), [pictures[0], pictures[2]]),
        (
            Conversation(
                [
                    Message("system", "Be brief."),
                    Message("user", "<image>\nFirst?"),
                    Message("assistant", "A square."),
                    Message("user", "And a word about it?"),
                ]
            ),
            [pictures[1]],
        ),
        (Conversation([Message("user", "Tell me about the harbour.")]), []),
        (Conversation([Message("user", "<image>\nWhat is it?")]), [pictures[2]]),
    ]
    settings = [{"max_new_tokens": 12, "until": []}] * 3 + [{"max_new_tokens": 5, "temperature": 0, "until": []}]
    plugin = LlavaLiteChat(pretrained=str(run), device="cpu", batch_size=2)
    plugin.task_dict = {"t": {"test": docs}}
    requests = [
        Instance(
            "generate_until",
            ("", lambda doc: doc, settings[i], i, "t", "test"),
            0,
            {"task": "t", "doc_id": i, "repeats": 1},
        )
        for i in range(len(docs))
    ]
    answers = [result.text for result in plugin.generate_until(requests)]

    generator = Generator.from_folder(run, "cpu")
    batches = [([0, 1], SamplingSettings(12)), ([2], SamplingSettings(12)), ([3], SamplingSettings(5))]
    expected = [None] * len(docs)
    for indices, sampling in batches:  # the documents' order, in batches of 2, the settings apart
        texts = generator.generate(
            [expected_prompts[i][0] for i in indices], [expected_prompts[i][1] for i in indices], sampling
        )
        for i, text in zip(indices, texts):
            expected[i] = text
    assert answers == expected
    assert len(set(answers)) == len(answers)


def test_the_plugin_says_in_one_line_how_to_install_what_lmms_eval_lacks(monkeypatch):
    monkeypatch.delitem(sys.modules, "llava_lite.eval.lmms_plugin.model", raising=False)
    monkeypatch.setitem(sys.modules, "lmms_eval", None)
    with pytest.raises(ImportError) as missing:
        importlib.import_module("llava_lite.eval.lmms_plugin.model")
    assert str(missing.value) == (
        "the lmms-eval plugin needs lmms-eval, which is not installed: pip install 'llava_lite[lmms-eval]'"
    )
    monkeypatch.delitem(sys.modules, "lmms_eval")
    monkeypatch.setitem(sys.modules, "filelock._api", None)  # as filelock 4, which removed it
    with pytest.raises(
        ImportError, match=r"needs filelock<4, which is not installed: pip install 'llava_lite\[lmms-eval\]'$"
    ):
        importlib.import_module("llava_lite.eval.lmms_plugin.model")


def scored_model(kind: str, run: Path) -> LlavaLiteModel:
    if kind == "lora run":
        return LlavaLiteModel.from_pretrained(run)
    if kind == "anyres":
        return LlavaLiteModel.from_config(preset("tiny-hf-clip", vision_tower={"image_layout": "anyres"}))
    from peft import PromptTuningConfig, get_peft_model

    model = LlavaLiteModel.from_config(preset("tiny"))
    model.language_model = get_peft_model(
        model.language_model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    return model


@pytest.mark.parametrize("kind", ["lora run", "anyres", "prompt tuning"])
def test_a_batch_is_scored_as_each_answer_alone_and_as_response_perplexity_scores_it(kind, run, tmp_path):
    from llava_lite.eval.likelihood import LikelihoodScorer
    from llava_lite.eval.perplexity import response_perplexity

    model = scored_model(kind, run).eval()
    scorer = LikelihoodScorer(model)
    assert (scorer.split is None) == (kind == "prompt tuning")  # else the head runs only where scored
    wide = tmp_path / "wide.png"
    load_image(SHIPPED / "data" / "images" / "blue_square.png").resize((96, 40)).save(wide)
    conversations = [
        Conversation([Message("user", "<image>\nWhat shape?"), Message("assistant", "A square.")], [str(wide)]),
        Conversation([Message("user", "Name a colour."), Message("assistant", "Blue, I think.")]),
    ]
    pictures = [[load_image(path) for path in c.images] for c in conversations]
    batched = scorer.score(conversations, pictures)
    alone = [scorer.score([c], [p])[0] for c, p in zip(conversations, pictures)]
    assert [b.tokens for b in batched] == [a.tokens for a in alone] and batched[1].tokens > batched[0].tokens
    assert [b.log_likelihood for b in batched] == pytest.approx([a.log_likelihood for a in alone], rel=1e-5)
    for conversation, score in zip(conversations, batched):
        reference = response_perplexity(model, [conversation])
        assert reference.tokens == score.tokens
        assert -score.log_likelihood == pytest.approx(reference.mean_nll * reference.tokens, rel=1e-5)
