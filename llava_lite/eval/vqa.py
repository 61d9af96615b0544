"""VQA-style accuracy: short answers scored as VQAv2's evaluation scores them, and multiple choice.

Questions are JSONL, one per line:
    {"question_id": 1, "image": "a.jpg", "question": "How many dogs?", "answers": ["2", "two", ...]}
    {"question_id": 2, "image": "b.jpg", "question": "What is it?", "choices": ["cat", "dog"], "answer": "B"}
`id` may stand for `question_id`, `text` for `question`; `answer` (one reference) or `answers` (VQAv2's ten
human answers, as strings or `{"answer": ...}`); an optional `category` groups the results. A question with
`choices` is multiple choice: the options are listed as A., B., ... and the reference is a letter or the
option's text. Prompts follow LLaVA-1.5's evaluation: "Answer the question using a single word or phrase."
and "Answer with the option's letter from the given choices directly."

Answers and references are normalised as the VQAv2 evaluation does - case, punctuation (kept inside numbers,
dropped entirely when the text has a thousands comma), articles, number words to digits, contractions
without apostrophes - and then scored min(1, humans who gave the answer / 3), averaged over the ten ways of
leaving one human out. With a single reference this is exact match after normalisation.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from llava_lite.data.conversation import IMAGE_PLACEHOLDER, Conversation, Message
from llava_lite.data.errors import BadRecordError
from llava_lite.data.formats import read_json_objects

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've should've "
    "shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll "
    "someone's something'd something'd've something'll that's there'd there'd've there're there's they'd "
    "they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've "
    "when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
)


def _contraction_spellings() -> dict[str, str]:
    """Contractions as people type them without apostrophes ("dont", and "couldnt've", "couldn'tve" for
    the doubles) to their usual spelling, as VQAv2's evaluation maps them."""
    spellings = {}
    for word in _CONTRACTED.split():
        spellings[word.replace("'", "")] = word
        if word.count("'") == 2 and not word.startswith("'"):
            spellings[word.replace("'", "", 1)] = word
            spellings["".join(word.rsplit("'", 1))] = word
    return spellings


_CONTRACTIONS = _contraction_spellings()
_SPACED_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_THOUSANDS = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def normalize_answer(text: str) -> str:
    """An answer as VQAv2's evaluation compares it."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _strip_punctuation(text)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def _strip_punctuation(text: str) -> str:
    # A thousands comma ("1,000") or punctuation touching a space is removed outright; elsewhere it separates
    # words ("black-and-white" -> "black and white"). Periods go unless they sit inside a number ("3.5").
    remove_all = bool(_THOUSANDS.search(text))
    for mark in _SPACED_PUNCTUATION:
        if remove_all or f"{mark} " in text or f" {mark}" in text:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    return _PERIOD.sub("", text)


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """VQAv2's soft accuracy: each human answer left out in turn, min(1, matches among the rest / 3), averaged."""
    if not references:
        raise ValueError("no reference answers")
    answer = normalize_answer(prediction)
    normalized = [normalize_answer(r) for r in references]
    if len(normalized) == 1:
        return float(answer == normalized[0])
    scores = []
    for left_out in range(len(normalized)):
        matches = sum(1 for i, ref in enumerate(normalized) if i != left_out and ref == answer)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def choice_letter(prediction: str, choices: list[str]) -> str | None:
    """The option a free-text answer picks: a leading letter ("B", "(B)", "B. dog") or an option's exact text."""
    letters = string.ascii_uppercase[: len(choices)]
    match = re.match(r"^\s*\(?([A-Za-z])(?:[\).:,]|\s|$)", prediction)
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    normalized = normalize_answer(prediction)
    for letter, choice in zip(letters, choices):
        if normalize_answer(choice) == normalized:
            return letter
    return None


@dataclass
class Question:
    id: str
    image: str | None
    question: str
    references: list[str]
    choices: list[str] = field(default_factory=list)
    category: str | None = None

    @property
    def prompt(self) -> str:
        return f"{IMAGE_PLACEHOLDER}\n{self.text}" if self.image else self.text

    @property
    def text(self) -> str:
        """The prompt's words: the question and its instruction (and options), without the image placeholder."""
        if self.choices:
            options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(string.ascii_uppercase, self.choices))
            return f"{self.question}\n{options}\n{CHOICE_PROMPT}"
        return f"{self.question}\n{SHORT_ANSWER_PROMPT}"

    def conversation(self) -> Conversation:
        images = [self.image] if self.image else []
        return Conversation([Message("user", self.prompt)], images, self.id, f"question {self.id}")

    def score(self, prediction: str) -> float:
        if not self.choices:
            return vqa_accuracy(prediction, self.references)
        return float(choice_letter(prediction, self.choices) == self.correct_letter())

    def correct_letter(self) -> str:
        reference = self.references[0].strip()
        letters = string.ascii_uppercase[: len(self.choices)]
        if len(reference) == 1 and reference.upper() in letters:
            return reference.upper()
        for letter, choice in zip(letters, self.choices):
            if normalize_answer(choice) == normalize_answer(reference):
                return letter
        raise BadRecordError(self.id, "malformed", f"answer {reference!r} is neither a letter nor one of the choices")


def read_questions(path: str | Path, limit: int | None = None) -> list[Question]:
    questions = []
    for where, row in read_json_objects(path, "question"):
        questions.append(parse_question(row, where))
        if limit and len(questions) == limit:
            break
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def parse_question(row: dict, where: str) -> Question:
    """One question record (see the module docstring); a record that is not one is a BadRecordError at `where`."""
    text = row.get("question", row.get("text"))
    if not isinstance(text, str) or not text.strip():
        raise BadRecordError(where, "malformed", "needs a string `question` (or `text`)")
    raw = row.get("answers", row.get("answer"))
    raw = raw if isinstance(raw, list) else [raw]
    references = [r.get("answer") if isinstance(r, dict) else r for r in raw]
    if not references or not all(isinstance(r, str) for r in references):
        raise BadRecordError(where, "malformed", "needs `answer` (a string) or `answers` (strings or {answer})")
    image = row.get("image")
    if image is not None and not isinstance(image, str):
        raise BadRecordError(where, "malformed", "`image` must be a path string")
    choices = row.get("choices") or []
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or len(choices) > 26:
        raise BadRecordError(where, "malformed", "`choices` must be a list of at most 26 strings")
    question = Question(
        id=str(row.get("question_id", row.get("id", where))),
        image=image,
        question=text.replace(IMAGE_PLACEHOLDER, "").strip(),
        references=references,
        choices=choices,
        category=row.get("category"),
    )
    if choices:
        question.correct_letter()  # a reference that names no option is an error now, not a zero later
    return question


def summarize(questions: list[Question], predictions: list[str]) -> dict:
    """Accuracy overall, for open and multiple-choice questions, and by category; with every answer scored."""
    scores = [q.score(p) for q, p in zip(questions, predictions)]
    groups: dict[str, list[float]] = defaultdict(list)
    for question, score in zip(questions, scores):
        groups["multiple_choice" if question.choices else "open"].append(score)
    categories: dict[str, list[float]] = defaultdict(list)
    for question, score in zip(questions, scores):
        if question.category is not None:
            categories[str(question.category)].append(score)
    return {
        "accuracy": _mean(scores),
        "count": len(scores),
        **{f"{kind}_accuracy": _mean(values) for kind, values in sorted(groups.items())},
        "by_category": {name: {"accuracy": _mean(v), "count": len(v)} for name, v in sorted(categories.items())},
        "answers": [
            {"question_id": q.id, "prediction": p, "score": s} for q, p, s in zip(questions, predictions, scores)
        ],
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
