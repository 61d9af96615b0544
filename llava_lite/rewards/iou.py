"""The `iou` reward: boxes read from the completion against the line's boxes, matched one to one.

Boxes are `[x1, y1, x2, y2]` anywhere in the completion (bare, in JSON such as Qwen's `{"bbox_2d": [...]}`, one or
many). `units` says how the completion writes them: `unit` (0 to 1 of the image), `pixels` (of the prompt's first
image), or `qwen` (0 to 1000, Qwen-VL's grid); the line's boxes (`field`, default `boxes`: a list of
`[x1, y1, x2, y2]`, or of objects with `bbox` / `box` / `bbox_2d`) are in `reference_units`, default `unit`.

Predicted and true boxes are matched one to one by the Hungarian algorithm on their IoU (scipy's
`linear_sum_assignment`), so the order they are written in does not matter and one box cannot answer for two.
`score: mean_iou` (default) is the matched IoUs' sum over the larger of the two counts: a missing box and an
extra box both cost; `score: f1` counts a matched pair with IoU at least `threshold` (0.5) as a hit and takes F1.
A bracket of four values that is no box (a value that is no number, x2 <= x1, y2 <= y1) is a predicted box that
matches nothing: it scores 0, never an exception. A line without the field is not scored (None)."""

from __future__ import annotations

import math
import re

import numpy as np

from llava_lite.rewards.base import RewardFunction, check_keys, choice, number, rows_of

UNITS = ("unit", "pixels", "qwen")
SCORES = ("mean_iou", "f1")
KEYS = ("field", "units", "reference_units", "score", "threshold")
QWEN_GRID = 1000.0
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")

Box = tuple[float, float, float, float] | None  # None: written as a box, but not one


def parse_boxes(text: str) -> list[Box]:
    """Every bracket of four comma-separated values in `text`, as a box, or None where the values make no box."""
    boxes: list[Box] = []
    for inside in _BRACKETS.findall(text):
        values = inside.split(",")
        if len(values) == 4:
            boxes.append(_box(values))
    return boxes


def _box(values: list) -> Box:
    try:
        x1, y1, x2, y2 = (float(str(v).strip()) for v in values)
    except ValueError:
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def to_unit(box: Box, units: str, image_size: tuple[int, int] | None) -> Box:
    """`box` as fractions of the image; `image_size` is (height, width), needed for pixels."""
    if box is None:
        return None
    if units == "qwen":
        return tuple(v / QWEN_GRID for v in box)
    if units == "pixels":
        height, width = image_size
        return box[0] / width, box[1] / height, box[2] / width, box[3] / height
    return box


def iou(a: Box, b: Box) -> float:
    if a is None or b is None:
        return 0.0
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def matched_ious(predicted: list[Box], true: list[Box]) -> list[float]:
    """The IoUs of the one-to-one matching of `predicted` to `true` boxes with the largest total IoU."""
    from scipy.optimize import linear_sum_assignment

    if not predicted or not true:
        return []
    table = np.array([[iou(p, t) for t in true] for p in predicted])
    rows, columns = linear_sum_assignment(table, maximize=True)
    return [float(table[r, c]) for r, c in zip(rows, columns)]


def box_score(predicted: list[Box], true: list[Box], score: str = "mean_iou", threshold: float = 0.5) -> float:
    """The completion's score: mean IoU over the larger set, or F1 of the matches at `threshold`."""
    if not predicted and not true:
        return 1.0  # nothing to find, and nothing claimed
    matched = matched_ious(predicted, true)
    if score == "mean_iou":
        return sum(matched) / max(len(predicted), len(true))
    hits = sum(value >= threshold for value in matched)
    if not hits:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(true)
    return 2 * precision * recall / (precision + recall)


def line_boxes(value, where: str) -> list[Box]:
    """The line's true boxes: `[x1, y1, x2, y2]`, a list of them, or of objects holding one (`bbox`, `box`,
    `bbox_2d`); ValueError naming the line for anything else."""
    if isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"{where}: boxes must be a list of [x1, y1, x2, y2], got {value!r}")
    boxes = []
    for item in value:
        if isinstance(item, dict):
            item = item.get("bbox", item.get("box", item.get("bbox_2d")))
        box = _box(item) if isinstance(item, list) and len(item) == 4 else None
        if box is None:
            raise ValueError(f"{where}: {item!r} is no box [x1, y1, x2, y2] with x1 < x2 and y1 < y2")
        boxes.append(box)
    return boxes


def check(spec: dict, where: str) -> None:
    check_keys(spec, KEYS, where)
    choice(spec, "units", UNITS, where)
    choice(spec, "reference_units", UNITS, where)
    choice(spec, "score", SCORES, where)
    if "threshold" in spec and not 0 < number(spec, "threshold", where) <= 1:
        raise ValueError(f"{where}.threshold: must be in (0, 1], got {spec['threshold']}")
    if not isinstance(spec.get("field", "boxes"), str):
        raise ValueError(f"{where}.field: expected the name of the lines' boxes field")


def build(spec: dict, where: str, context) -> RewardFunction:
    check(spec, where)
    field = spec.get("field", "boxes")
    units, reference_units = spec.get("units", "unit"), spec.get("reference_units", "unit")
    score, threshold = spec.get("score", "mean_iou"), float(spec.get("threshold", 0.5))
    needs_size = "pixels" in (units, reference_units)

    def iou_reward(prompts: list, completions: list[str], **columns) -> list[float | None]:
        scores: list[float | None] = []
        for completion, row in zip(completions, rows_of(columns, len(completions))):
            sizes = row.get("image_sizes") or []
            if field not in row or (needs_size and not sizes):
                scores.append(None)  # no boxes to compare with, or no image to measure pixels by
                continue
            size = tuple(sizes[0]) if sizes else None
            true = [to_unit(b, reference_units, size) for b in line_boxes(row[field], f"line {row.get('id')}")]
            predicted = [to_unit(b, units, size) for b in parse_boxes(completion)]
            scores.append(box_score(predicted, true, score, threshold))
        return scores

    return iou_reward
