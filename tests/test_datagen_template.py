"""The template backend: every answer it gives is checked against the fixture's own boxes, recomputed here."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from conftest import fixture_path

from llava_lite.cli import main
from llava_lite.datagen.facts import plural

# Written out here, not taken from the code under test.
SPELLED = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
WORDS = {word: n for n, word in enumerate(SPELLED)}


def number(word: str) -> int:
    return WORDS[word] if word in WORDS else int(word)


def centre(bbox: list[float]) -> tuple[float, float]:
    return (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2


def area(bbox: list[float]) -> float:
    return (bbox[2] - bbox[0]) * (bbox[3] - bbox[1])


class Truth:
    """One fixture image's annotations, read straight from the JSONL, and checks of claims about them."""

    def __init__(self, row: dict) -> None:
        self.captions = row["captions"]
        self.boxes = [(instance["category"], instance["bbox"]) for instance in row["instances"]]
        self.counts = Counter(category for category, _ in self.boxes)
        self.by_plural = {plural(category): category for category in self.counts}

    def only(self, category: str) -> list[float]:
        found = [bbox for name, bbox in self.boxes if name == category]
        assert len(found) == 1, f"'the {category}' is ambiguous: {len(found)} boxes"
        return found[0]

    def count_of(self, plural_name: str) -> int:
        return self.counts[self.by_plural[plural_name]] if plural_name in self.by_plural else 0


def check(truth: Truth, question: str, answer: str) -> str:
    """Assert the answer is true of the boxes; return which sort of question it was."""
    if m := re.fullmatch(r"How many (.+) are there in the image altogether\?", question):
        names = re.split(r", | and ", m.group(1))
        total = number(re.search(r"so (\w+) altogether", answer).group(1))
        assert total == sum(truth.count_of(name) for name in names)
        return "total"
    if m := re.fullmatch(r"How many (.+) are there in the image\?", question):
        said = number(re.fullmatch(r"There (?:is|are) (\w+) .+ in the image\.", answer).group(1))
        assert said == truth.count_of(m.group(1)) > 0
        return "count"
    if m := re.fullmatch(r"Is there an? (.+) in the image\?", question):
        assert answer.startswith("Yes") == (m.group(1) in truth.counts), (question, answer)
        return "presence"
    if m := re.fullmatch(r"Where is the (.+) in the image\?", question):
        x, y = centre(truth.only(m.group(1)))
        where = re.fullmatch(
            r"The .+ is in the (centre|(upper|middle|lower) (left|centre|right) part) of the image\.", answer
        )
        row, column = (where.group(2), where.group(3)) if where.group(2) else ("middle", "centre")
        assert {"upper": y < 1 / 3, "middle": 1 / 3 <= y < 2 / 3, "lower": y >= 2 / 3}[row]
        assert {"left": x < 1 / 3, "centre": 1 / 3 <= x < 2 / 3, "right": x >= 2 / 3}[column]
        return "where"
    if m := re.fullmatch(r"Is the (.+) to the left or to the right of the (.+)\?", question):
        (ax, _), (bx, _) = centre(truth.only(m.group(1))), centre(truth.only(m.group(2)))
        assert answer == f"The {m.group(1)} is to the {'left' if ax < bx else 'right'} of the {m.group(2)}."
        return "left_right"
    if m := re.fullmatch(r"Is the (.+) above or below the (.+)\?", question):
        (_, ay), (_, by) = centre(truth.only(m.group(1))), centre(truth.only(m.group(2)))
        assert answer == f"The {m.group(1)} is {'above' if ay < by else 'below'} the {m.group(2)}."
        return "above_below"
    if re.fullmatch(r"Which looks bigger in the image, the (.+) or the (.+)\?", question):
        big, small = re.fullmatch(r"The (.+) looks bigger than the (.+)\.", answer).groups()
        assert area(truth.only(big)) > area(truth.only(small))
        return "size"
    if re.fullmatch(r"Going from left to right, in what order do (.+) appear\?", question):
        names = re.search(r"the order is: (.+)\.$", answer).group(1).split(", ")
        xs = [centre(truth.only(name.removeprefix("the ")))[0] for name in names]
        assert xs == sorted(xs) and len(names) >= 3
        return "order"
    if m := re.fullmatch(r"Are there more (.+) in the left half or in the right half of the image\?", question):
        category = truth.by_plural[m.group(1)]
        left, right = (
            number(n) for n in re.search(r"(\w+) in the left half and (\w+) in the right half", answer).groups()
        )
        xs = [centre(bbox)[0] for name, bbox in truth.boxes if name == category]
        assert (left, right) == (sum(x < 0.5 for x in xs), sum(x >= 0.5 for x in xs))
        assert f"the {'left' if left > right else 'right'} half has more" in answer
        return "halves"
    if question == "What is happening in this image?":
        assert answer in truth.captions
        return "caption"
    raise AssertionError(f"a question the test does not know how to check: {question!r}")


def check_description(truth: Truth, description: str) -> None:
    """Captions first; then `The image shows two cars, a dog and ...`, every count as annotated."""
    assert description.lower().startswith(truth.captions[0].strip().lower()[:20])
    if not truth.boxes:
        assert "The image shows" not in description
        return
    shown = re.search(r"The image shows (.+)\.$", description).group(1)
    for item in re.split(r", | and ", shown):
        amount, name = item.split(" ", 1)
        n = 1 if amount in ("a", "an") else number(amount)
        category = name if n == 1 else truth.by_plural[name]
        assert truth.counts[category] == n, (item, dict(truth.counts))


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("template") / "out.json"
    assert (
        main(
            [
                "datagen",
                "--annotations",
                str(fixture_path("data", "caps_boxes_coco2014_val_80.jsonl")),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return json.loads(out.read_text())


def test_template_answers_are_true_of_the_boxes(generated):
    rows = [
        json.loads(line) for line in fixture_path("data", "caps_boxes_coco2014_val_80.jsonl").read_text().splitlines()
    ]
    truths = {row["id"]: Truth(row) for row in rows}
    checked = Counter()
    for record in generated:
        truth = truths[record["metadata"]["image_id"]]
        turns = record["conversations"]
        if record["metadata"]["kind"] == "detail":
            check_description(truth, turns[1]["value"])
            checked["detail"] += 1
            continue
        for human, gpt in zip(turns[::2], turns[1::2]):
            checked[check(truth, human["value"].removeprefix("<image>\n"), gpt["value"])] += 1
    # Every sort of question was asked often enough for the checks to mean something.
    assert checked["detail"] == 80
    for sort in ("count", "presence", "where", "left_right", "above_below", "size", "order", "total", "halves"):
        assert checked[sort] >= 3, (sort, checked)


def test_template_output_is_the_same_for_a_seed_and_differs_for_another(generated, tmp_path):
    again, other = tmp_path / "again.json", tmp_path / "other.json"
    caps = str(fixture_path("data", "caps_boxes_coco2014_val_80.jsonl"))
    assert main(["datagen", "--annotations", caps, "--out", str(again)]) == 0
    assert main(["datagen", "--annotations", caps, "--out", str(other), "--seed", "1"]) == 0
    assert json.loads(again.read_text()) == generated
    assert json.loads(other.read_text()) != generated


@pytest.mark.parametrize(
    "category, expected",
    [("person", "people"), ("bus", "buses"), ("knife", "knives"), ("sheep", "sheep"), ("wine glass", "wine glasses"),
     ("teddy bear", "teddy bears"), ("mouse", "mice"), ("dining table", "dining tables"),
     ("toothbrush", "toothbrushes")],
)  # fmt: skip
def test_plurals_of_coco_categories(category, expected):
    assert plural(category) == expected
