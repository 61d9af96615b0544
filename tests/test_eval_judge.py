"""The LLaVA-Bench judged score, end to end: the real bench files, our model's answers, and a judge behind a real
chat-completions server on 127.0.0.1 that scores by category, so the relative scores can be worked out here."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import fixture_path, solid_image
from PIL import Image
from rubric_server import RepliesServer

from llava_lite.cli import main
from llava_lite.data.errors import BadRecordError
from llava_lite.eval.callback import EvaluationCallback
from llava_lite.eval.config import EvalConfig
from llava_lite.eval.judge import judge_answers, load_bench, parse_scores, summarize_reviews
from llava_lite.eval.suite import EvalSuite
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset

# (reference score, our score) the judge gives in each category.
SCORES = {"conv": (8, 6), "detail": (8, 4), "complex": (10, 5)}


class JudgeServer(RepliesServer):
    """Answers chat completions with the category's two scores on the first line; one chosen reference gets a
    review with no score line."""

    def __init__(self, categories_by_reference: dict[str, str], unscored: str | None = None):
        super().__init__(lambda body: (200, self.review(body)))
        self.categories = categories_by_reference
        self.unscored = unscored

    def review(self, body: dict) -> str:
        reference = reference_in(body)
        if reference == self.unscored:
            return "Both answers are fine.\nAssistant 1: 8, Assistant 2: 7"
        ours, theirs = SCORES[self.categories[reference]][1], SCORES[self.categories[reference]][0]
        return f"{theirs} {ours}\nAssistant 1 follows the context more closely."


def reference_in(body: dict) -> str:
    """The reference answer a judge request shows as Assistant 1."""
    content = body["messages"][-1]["content"]
    return content.split("[Assistant 1]\n", 1)[1].split("\n\n[End of Assistant 1]", 1)[0]


def rows(*parts: str) -> list[dict]:
    return [json.loads(line) for line in fixture_path(*parts).read_text().splitlines() if line.strip()]


def expected_summary(questions: list[dict], unscored_id) -> dict:
    scored = [q for q in questions if q["question_id"] != unscored_id]
    by_category = {}
    for category, (reference, ours) in SCORES.items():
        count = sum(1 for q in scored if q["category"] == category)
        by_category[category] = {"relative": 100 * ours / reference, "count": count}
    reference_sum = sum(SCORES[q["category"]][0] for q in scored)
    ours_sum = sum(SCORES[q["category"]][1] for q in scored)
    return {"relative": 100 * ours_sum / reference_sum, "judged": len(scored), "by_category": by_category}


def test_bench_in_the_wild_is_answered_judged_and_summarised_by_category(tmp_path, capsys):
    bench = fixture_path("eval", "llava_bench_wild")
    questions = rows("eval", "llava_bench_wild", "questions.jsonl")
    references = {str(r["question_id"]): r["text"] for r in rows("eval", "llava_bench_wild", "answers_gpt4.jsonl")}
    captions = {r["image"]: r["caption"] for r in rows("eval", "llava_bench_wild", "context.jsonl")}
    images = tmp_path / "images"
    images.mkdir()
    for number, name in enumerate(sorted({q["image"] for q in questions})):
        solid_image(images / name, (10 * number, 255 - 10 * number, 128))
    LlavaLiteModel.from_config(preset("tiny")).save_pretrained(tmp_path / "run")
    categories = {references[str(q["question_id"])]: q["category"] for q in questions}
    out, plot = tmp_path / "results.json", tmp_path / "bench.png"
    with JudgeServer(categories, unscored=references["0"]) as judge:
        code = main(
            [
                "eval",
                "--model",
                str(tmp_path / "run"),
                "--bench",
                str(bench),
                "--bench-images",
                str(images),
                "--judge-base-url",
                judge.url,
                "--judge-model",
                "judge-1",
                "--max-new-tokens",
                "4",
                "--batch-size",
                "20",
                "--out",
                str(out),
                "--plot",
                str(plot),
            ]
        )
    assert code == 0
    result = json.loads(out.read_text())["bench"]
    expected = expected_summary(questions, unscored_id=0)
    assert result["failed"] == 1 and result["judged"] == expected["judged"] == 59
    assert result["relative"] == pytest.approx(expected["relative"])
    for category, numbers in expected["by_category"].items():
        assert result["by_category"][category]["relative"] == pytest.approx(numbers["relative"])
        assert result["by_category"][category]["count"] == numbers["count"]
    # Every question reached the judge once, with its image's context, its reference answer and our answer.
    assert len(judge.bodies) == 60
    sent = {reference_in(request): request for request in judge.bodies}
    for question, review in zip(questions, result["reviews"]):
        request = sent[references[str(question["question_id"])]]
        content = request["messages"][-1]["content"]
        assert f"[Context]\n{captions[question['image']]}\n" in content
        assert f"[Question]\n{question['text']}\n" in content
        assert f"[Assistant 2]\n{review['answer']}\n" in content
        assert request["model"] == "judge-1" and request["temperature"] == 0.2
    captured = capsys.readouterr()
    assert "bench relative score" in captured.out and "complex" in captured.out
    assert "judge: 100%" in captured.err  # the network-bound part shows its progress
    with Image.open(plot) as image:
        assert image.format == "PNG"


def test_coco_bench_uses_captions_and_boxes_as_context_and_answers_given_in_advance(tmp_path):
    bench = fixture_path("eval", "llava_bench_coco")
    context = fixture_path("data", "caps_boxes_coco2014_val_80.jsonl")
    questions = rows("eval", "llava_bench_coco", "qa90_questions.jsonl")
    references = {str(r["question_id"]): r["text"] for r in rows("eval", "llava_bench_coco", "qa90_gpt4_answer.jsonl")}
    items = load_bench(bench, context)
    assert [item.question_id for item in items] == [str(q["question_id"]) for q in questions]
    categories = {references[str(q["question_id"])]: q["category"] for q in questions}
    with JudgeServer(categories) as judge:
        reviews = judge_answers(items, [f"answer {i.question_id}" for i in items], judge.url, "judge-2", concurrency=8)
    summary = summarize_reviews(reviews)
    assert summary["failed"] == 0 and summary["judged"] == 90
    assert summary["by_category"]["detail"]["relative"] == pytest.approx(50.0)
    assert summary["relative"] == pytest.approx(100 * (30 * 6 + 30 * 4 + 30 * 5) / (30 * 8 + 30 * 8 + 30 * 10))
    first = next(r for r in judge.bodies if "[Assistant 2]\nanswer 0\n" in r["messages"][-1]["content"])
    content = first["messages"][-1]["content"]
    boxes = {row["image"]: row for row in rows("data", "caps_boxes_coco2014_val_80.jsonl")}[questions[0]["image"]]
    assert boxes["captions"][0] in content
    box = boxes["instances"][0]
    assert f"{box['category']}: [{', '.join(f'{v:.3f}' for v in box['bbox'])}]" in content
    assert "object boxes" in content


@pytest.mark.parametrize(
    ("review", "scores"),
    [
        ("8 6\nreasons", (8.0, 6.0)),
        ("8, 6", (8.0, 6.0)),
        ("\n  7.5 9 \nreasons", (7.5, 9.0)),
        ("Assistant 1: 8\nAssistant 2: 6", None),
        ("8 6 7", None),
        ("", None),
    ],
)
def test_scores_are_read_from_the_first_line_only(review, scores):
    assert parse_scores(review) == scores


def test_a_bench_folder_without_references_is_an_error_naming_it(tmp_path):
    (tmp_path / "questions.jsonl").write_text(
        '{"question_id": 0, "image": "a.jpg", "text": "Hi", "category": "conv"}\n'
    )
    (tmp_path / "context.jsonl").write_text('{"image": "a.jpg", "caption": "A cat."}\n')
    with pytest.raises(ValueError, match="no reference answers file"):
        load_bench(tmp_path)


def test_a_bad_context_line_is_a_one_line_error_naming_its_file_and_line(tmp_path):
    bench = fixture_path("eval", "llava_bench_coco")
    good = fixture_path("data", "caps_boxes_coco2014_val_80.jsonl").read_text().splitlines()
    context = tmp_path / "boxes.jsonl"
    broken = {"image": "x.jpg", "captions": ["A cat."], "instances": [{"category": "cat"}]}  # a box without bbox
    context.write_text("\n".join([good[0], json.dumps(broken), *good[1:]]) + "\n")
    with pytest.raises(ValueError, match=rf"{context}.*{context} line 2 instance 0: bbox None") as caught:
        load_bench(bench, context)
    assert "\n" not in str(caught.value)
    # The In-the-Wild folder's own context file: a line without its caption.
    for name in ("questions.jsonl", "answers_gpt4.jsonl"):
        (tmp_path / name).write_text(fixture_path("eval", "llava_bench_wild", name).read_text())
    (tmp_path / "context.jsonl").write_text('{"image": "001.jpg", "caption": "A view."}\n{"image": "002.jpg"}\n')
    with pytest.raises(ValueError, match=r"context.jsonl line 2: a context line needs `image` and `caption`"):
        load_bench(tmp_path)


def bench_config(judge_url: str, **settings) -> EvalConfig:
    return EvalConfig(
        bench=str(fixture_path("eval", "llava_bench_wild")), judge_base_url=judge_url, judge_model="judge-3", **settings
    )


def test_a_missing_bench_image_is_an_error_naming_the_question_before_anything_is_generated(tmp_path, tiny_model):
    (tmp_path / "images").mkdir()
    config = bench_config("http://127.0.0.1:9/v1", bench_images=str(tmp_path / "images"), limit=2)
    with pytest.raises(BadRecordError, match=r"bench question 0: image .*001.jpg does not exist"):
        EvalSuite(tiny_model, config)


@pytest.mark.parametrize("shards_weights", [False, True])
def test_during_training_only_the_main_process_calls_the_judge(tmp_path, tiny_model, shards_weights):
    """Where every process holds the whole model the others do not evaluate at all; where the engine splits the
    weights they evaluate with it (each forward needs them all) but never call the judge."""
    questions = rows("eval", "llava_bench_wild", "questions.jsonl")[:2]
    references = {str(r["question_id"]): r["text"] for r in rows("eval", "llava_bench_wild", "answers_gpt4.jsonl")}
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": q["question_id"], "text": "ours"}) + "\n" for q in questions))
    categories = {references[str(q["question_id"])]: q["category"] for q in questions}
    with JudgeServer(categories) as judge:
        config = bench_config(judge.url, bench_answers=str(answers), limit=2, every_steps=1)
        logged: list[dict] = []
        trainer = SimpleNamespace(model=tiny_model, log=logged.append, shards_weights=shards_weights)
        callback = EvaluationCallback(config, trainer)
        control = SimpleNamespace(should_log=False)
        for step, main_process in ((1, False), (2, True)):
            state = SimpleNamespace(global_step=step, is_world_process_zero=main_process)
            callback.on_step_end(None, state, control, model=tiny_model)
            if not main_process:
                assert judge.bodies == [] and logged == ([{}] if shards_weights else [])
    assert len(judge.bodies) == 2
    assert logged[-1]["bench_relative"] == pytest.approx(100 * (6 + 4) / (8 + 8))
