"""Questions whose answers are true of an image's boxes: counts, presence, where things are, sizes, orders.

A question about one object of a category is asked only when the image has exactly one of that category, so
"the dog" is never ambiguous; a comparison is asked only when the boxes differ by a clear margin, so the
answer does not hang on a few pixels of annotation. Crowd boxes (many objects in one box) are never counted.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from llava_lite.data.annotations import Box

SIDE_MARGIN = 0.1  # centres this far apart (of the image's width or height) make "left of" or "above" clear
REGION_MARGIN = 0.03  # a centre this close to a third's border is not called left, centre or right
SIZE_RATIO = 1.5  # one box this much larger than another in area "looks bigger"
ORDER_GAP = 0.05  # neighbours in a left-to-right order are at least this far apart
HALF_MARGIN = 0.02  # a centre this close to the middle line is not said to be in either half

NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)
IRREGULAR_PLURALS = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep", "skis": "skis"}
UNCOUNTABLE = {"broccoli", "scissors", "skis"}


@dataclass(frozen=True)
class QA:
    fact: str  # count, presence, where, left_right, above_below, size, order, total
    question: str
    answer: str


def plural(category: str) -> str:
    head, _, last = category.rpartition(" ")
    if last in IRREGULAR_PLURALS or last in UNCOUNTABLE:
        word = IRREGULAR_PLURALS.get(last, last)
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        word = last + "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def how_many(n: int, category: str) -> str:
    """`one dog`, `three people`."""
    return f"one {category}" if n == 1 else f"{number_word(n)} {plural(category)}"


def counts(boxes: list[Box]) -> Counter:
    return Counter(box.category for box in boxes)


def countable(boxes: list[Box]) -> Counter:
    """Counts of the categories that have no crowd box (whose count is therefore known)."""
    crowded = {box.category for box in boxes if box.crowd}
    return Counter({cat: n for cat, n in counts(boxes).items() if cat not in crowded})


def single_objects(boxes: list[Box]) -> list[Box]:
    """The boxes that are the only one of their category: each can be called `the CATEGORY`."""
    seen = counts(boxes)
    return [box for box in boxes if seen[box.category] == 1 and not box.crowd]


def region(box: Box) -> str | None:
    """`upper left`, `centre`, `lower right`, ...: the third of the image the centre falls in; None near a border."""
    cx, cy = box.centre
    if any(abs(value - border) < REGION_MARGIN for value in (cx, cy) for border in (1 / 3, 2 / 3)):
        return None
    column = "left" if cx < 1 / 3 else "centre" if cx < 2 / 3 else "right"
    row = "upper" if cy < 1 / 3 else "middle" if cy < 2 / 3 else "lower"
    return "centre" if (row, column) == ("middle", "centre") else f"{row} {column}"


# ----- single questions -------------------------------------------------------------------------------------------


def count_questions(boxes: list[Box]) -> list[QA]:
    qas = []
    for category, n in countable(boxes).items():
        verb = "is" if n == 1 else "are"
        answer = f"There {verb} {how_many(n, category)} in the image."
        qas.append(QA("count", f"How many {plural(category)} are there in the image?", answer))
    return qas


def presence_questions(boxes: list[Box], vocabulary: list[str], rng: random.Random) -> list[QA]:
    """One yes-question per category present; a few no-questions about categories the annotations lack."""
    present = counts(boxes)
    known = countable(boxes)
    qas = []
    for category in present:
        # No number here: a count question may follow in the same conversation.
        if known.get(category) == 1:
            answer = f"Yes, there is {article(category)} {category} in the image."
        else:
            answer = f"Yes, there are {plural(category)} in the image."
        qas.append(QA("presence", f"Is there {article(category)} {category} in the image?", answer))
    absent = sorted(set(vocabulary) - set(present))
    if boxes:  # "no" is only known when the image was annotated with boxes at all
        for category in rng.sample(absent, min(2, len(absent))):
            question = f"Is there {article(category)} {category} in the image?"
            qas.append(QA("presence", question, f"No, there is no {category} in the image."))
    return qas


def position_questions(boxes: list[Box]) -> list[QA]:
    qas = []
    singles = single_objects(boxes)
    for box in singles:
        where = region(box)
        if where is not None:
            place = "the centre of the image" if where == "centre" else f"the {where} part of the image"
            qas.append(QA("where", f"Where is the {box.category} in the image?", f"The {box.category} is in {place}."))
    for a, b in _pairs(singles):
        (ax, ay), (bx, by) = a.centre, b.centre
        if abs(ax - bx) >= SIDE_MARGIN:
            side = "left" if ax < bx else "right"
            question = f"Is the {a.category} to the left or to the right of the {b.category}?"
            qas.append(QA("left_right", question, f"The {a.category} is to the {side} of the {b.category}."))
        if abs(ay - by) >= SIDE_MARGIN:
            side = "above" if ay < by else "below"
            question = f"Is the {a.category} above or below the {b.category}?"
            qas.append(QA("above_below", question, f"The {a.category} is {side} the {b.category}."))
    return qas


def size_questions(boxes: list[Box]) -> list[QA]:
    qas = []
    for a, b in _pairs(single_objects(boxes)):
        big, small = (a, b) if a.area >= b.area else (b, a)
        if small.area > 0 and big.area / small.area >= SIZE_RATIO:
            question = f"Which looks bigger in the image, the {a.category} or the {b.category}?"
            qas.append(QA("size", question, f"The {big.category} looks bigger than the {small.category}."))
    return qas


# ----- questions that take a few steps ----------------------------------------------------------------------------


def order_question(boxes: list[Box], rng: random.Random) -> QA | None:
    """Left to right order of three or four single objects whose centres are clearly apart."""
    chosen = _spread_out(single_objects(boxes), rng)
    if chosen is None:
        return None
    asked = rng.sample(chosen, len(chosen))
    ordered = sorted(chosen, key=lambda box: box.centre[0])
    names = [f"the {box.category}" for box in ordered]
    question = f"Going from left to right, in what order do {_listing([f'the {b.category}' for b in asked])} appear?"
    middle = ", then ".join(names[1:-1])
    answer = (
        f"Looking at where each one sits across the picture: {names[0]} is furthest to the left, then comes "
        f"{middle}, and {names[-1]} is furthest to the right. So from left to right the order is: "
        f"{', '.join(names)}."
    )
    return QA("order", question, answer)


def total_question(boxes: list[Box], rng: random.Random) -> QA | None:
    """How many of two or three categories together, counted out one by one."""
    known = countable(boxes)
    if len(known) < 2:
        return None
    chosen = rng.sample(sorted(known), min(len(known), rng.choice((2, 3))))
    total = sum(known[c] for c in chosen)
    question = f"How many {_listing([plural(c) for c in chosen])} are there in the image altogether?"
    parts = _listing([how_many(known[c], c) for c in chosen])
    answer = f"Counting each kind in turn, there are {parts}, so {number_word(total)} altogether."
    return QA("total", question, answer)


def halves_question(boxes: list[Box]) -> QA | None:
    """Whether the left or the right half holds more objects of the most numerous category, counted out."""
    known = countable(boxes)
    if not known:
        return None
    category, n = known.most_common(1)[0]
    centres = [box.centre[0] for box in boxes if box.category == category]
    if n < 2 or any(abs(x - 0.5) < HALF_MARGIN for x in centres):
        return None
    left = sum(x < 0.5 for x in centres)
    right = n - left
    if left == right:
        return None
    more = "left" if left > right else "right"
    question = f"Are there more {plural(category)} in the left half or in the right half of the image?"
    answer = (
        f"Counting them side by side: there {'is' if left == 1 else 'are'} {number_word(left)} in the left half "
        f"and {number_word(right)} in the right half, so the {more} half has more {plural(category)}."
    )
    return QA("halves", question, answer)


def object_summary(boxes: list[Box]) -> str:
    """`The image shows two people, a dog and many cars.` (empty without boxes)."""
    if not boxes:
        return ""
    known = countable(boxes)
    parts = []
    for category in counts(boxes):
        if category not in known:
            parts.append(f"many {plural(category)}")
        elif known[category] == 1:
            parts.append(f"{article(category)} {category}")
        else:
            parts.append(how_many(known[category], category))
    return f"The image shows {_listing(parts)}."


def _pairs(boxes: list[Box]) -> list[tuple[Box, Box]]:
    return [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]]


def _spread_out(boxes: list[Box], rng: random.Random) -> list[Box] | None:
    ordered = sorted(boxes, key=lambda box: box.centre[0])
    kept: list[Box] = []
    for box in ordered:
        if not kept or box.centre[0] - kept[-1].centre[0] >= ORDER_GAP:
            kept.append(box)
    if len(kept) < 3:
        return None
    return rng.sample(kept, min(len(kept), 4))


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
