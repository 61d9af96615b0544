"""General text a tiny LM can learn in a minute on a CPU: plain sentences about a harbour town, in paragraphs.

Each sentence follows one pattern (who, did what, to what, where, when) with the words drawn at random, so the
text has structure to learn and a floor of surprise it cannot learn away. It is what the forgetting experiment
(`llava_lite.demo.forgetting`) pretrains on, replays, and measures: general text, unlike the image questions
of stage 2.
"""

from __future__ import annotations

import random

PEOPLE = (
    "the old fisherman",
    "a young teacher",
    "my neighbour",
    "the baker",
    "a tired student",
    "the ferry captain",
    "our grandmother",
    "the postman",
)
ACTIONS = ("carried", "painted", "sold", "found", "mended", "cleaned", "counted", "opened")
THINGS = (
    "a wooden boat",
    "the green gate",
    "a basket of apples",
    "two heavy boxes",
    "an old map",
    "the kitchen window",
    "a bag of flour",
    "the garden chairs",
)
PLACES = ("near the harbour", "by the river", "in the village square", "behind the school", "on the hill")
TIMES = ("early in the morning", "after the storm", "before lunch", "on a quiet evening", "at the end of summer")


def sentence(rng: random.Random) -> str:
    place, time = rng.choice(PLACES), rng.choice(TIMES)
    where_when = f"{place} {time}" if rng.random() < 0.5 else f"{time} {place}"
    return f"{rng.choice(PEOPLE).capitalize()} {rng.choice(ACTIONS)} {rng.choice(THINGS)} {where_when}."


def paragraphs(count: int, seed: int) -> str:
    """`count` paragraphs of three to six sentences, separated by blank lines; the same text for the same seed."""
    rng = random.Random(seed)
    return "\n\n".join(" ".join(sentence(rng) for _ in range(rng.randint(3, 6))) for _ in range(count)) + "\n"
