"""A LLaVA-Bench-style judged score: a judge model reads the image's context (captions, and object boxes for the
COCO set), the question, a reference answer and ours, and scores both 1-10; we report our score relative to
the reference's, per category (conv, detail, complex) and overall, as LLaVA's `summarize_gpt_review` does.

A bench folder holds LLaVA's own files:
- questions: `questions.jsonl` (In-the-Wild) or `qa90_questions.jsonl` (COCO) - `question_id`, `image`,
  `text`, `category`;
- reference answers: `answers_gpt4.jsonl` or `qa90_gpt4_answer.jsonl` - `question_id`, `text`;
- context: `context.jsonl` (`image`, `caption`) in the folder, or a captions-and-boxes file (`image`,
  `captions`, `instances: [{category, bbox}]`, LLaVA's `caps_boxes_coco2014_val_80.jsonl`) given apart.
The judge is any OpenAI-compatible chat-completions server. Its reply must open with a line holding the two
scores, reference first; a reply without one is counted as failed and left out of the means.
"""

from __future__ import annotations

import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from llava_lite.data.annotations import build_context, load_annotations
from llava_lite.data.conversation import IMAGE_PLACEHOLDER, Conversation, Message
from llava_lite.data.formats import read_json_objects
from llava_lite.llm.backends import BackendSettings, build_backend
from llava_lite.llm.chat import ChatRequest

QUESTION_FILES = ("questions.jsonl", "qa90_questions.jsonl")
REFERENCE_FILES = ("answers_gpt4.jsonl", "qa90_gpt4_answer.jsonl")
CONTEXT_FILES = ("context.jsonl",)

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
# Our own wording of the review instruction LLaVA-Bench uses: two scores on the first line, then the reasons.
JUDGE_INSTRUCTION = (
    "We would like your feedback on the performance of two AI assistants answering the user question above. "
    "The user asks the question while looking at an image; the image is described to you in the context "
    "above, in words{boxes}.\n"
    "Please rate the helpfulness, relevance, accuracy and level of detail of each response. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score means better overall performance.\n"
    "On the first line, write only the two scores, for Assistant 1 and Assistant 2 in that order, separated "
    "by a space. From the next line on, explain your evaluation impartially, making sure the order in which "
    "the responses were presented does not affect your judgment."
)
_BOXES_NOTE = " and as object boxes with normalised coordinates [x1, y1, x2, y2]"
_SCORES = re.compile(r"^\s*(\d+(?:\.\d+)?)[\s,]+(\d+(?:\.\d+)?)\s*$")


@dataclass
class BenchItem:
    question_id: str
    image: str
    question: str
    category: str
    reference: str
    context: str
    has_boxes: bool

    def conversation(self) -> Conversation:
        message = Message("user", f"{IMAGE_PLACEHOLDER}\n{self.question}")
        return Conversation([message], [self.image], self.question_id, f"bench question {self.question_id}")


def load_bench(folder: str | Path, context_file: str | Path | None = None, limit: int | None = None) -> list[BenchItem]:
    """The bench's questions with their references and contexts; anything missing is an error naming it."""
    folder = Path(folder)
    questions_path = _one_of(folder, QUESTION_FILES, "questions")
    references_path = _one_of(folder, REFERENCE_FILES, "reference answers")
    references = {
        str(row.get("question_id")): row["text"]
        for _, row in read_json_objects(references_path, "reference answers")
        if "text" in row
    }
    if context_file:
        context_path = Path(context_file)
        contexts = boxes_contexts(context_path)
    else:
        context_path = _one_of(folder, CONTEXT_FILES, "context (or --bench-context)")
        contexts = caption_contexts(context_path)
    items = []
    for where, row in read_json_objects(questions_path, "questions"):
        missing = [key for key in ("question_id", "image", "text", "category") if key not in row]
        if missing:
            raise ValueError(f"{where}: lacks {', '.join(missing)}")
        qid = str(row["question_id"])
        if qid not in references:
            raise ValueError(f"{where}: no reference answer for question {qid} in {references_path}")
        if row["image"] not in contexts:
            raise ValueError(f"{where}: no context for image {row['image']} in {context_path}")
        context, has_boxes = contexts[row["image"]]
        items.append(BenchItem(qid, row["image"], row["text"], row["category"], references[qid], context, has_boxes))
        if limit and len(items) == limit:
            break
    return items


def caption_contexts(path: Path) -> dict[str, tuple[str, bool]]:
    """In-the-Wild's `context.jsonl`: image -> (its caption, False: no boxes)."""
    contexts = {}
    for where, row in read_json_objects(path, "context"):
        if not isinstance(row.get("image"), str) or not isinstance(row.get("caption"), str):
            raise ValueError(f"{where}: a context line needs `image` and `caption` strings")
        contexts[row["image"]] = (row["caption"], False)
    return contexts


def boxes_contexts(path: Path) -> dict[str, tuple[str, bool]]:
    """A captions-and-boxes file (COCO's): image -> (its captions and one `category: [x1, y1, x2, y2]` line per
    box, whether it has boxes), as data generation shows them; any unusable line is an error."""
    images, report = load_annotations([str(path)])
    if report.problems:
        raise ValueError(f"{path}: unusable context ({'; '.join(report.lines())})")
    return {image.image: (build_context(image), bool(image.boxes)) for image in images}


def bench_review_messages(item: BenchItem, answer: str) -> list[dict[str, str]]:
    """The review request: the context, the question, the reference as Assistant 1 and our answer as Assistant 2."""
    instruction = JUDGE_INSTRUCTION.format(boxes=_BOXES_NOTE if item.has_boxes else "")
    content = (
        f"[Context]\n{item.context}\n\n[Question]\n{item.question}\n\n"
        f"[Assistant 1]\n{item.reference}\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n[System]\n{instruction}\n\n"
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


def parse_scores(review: str) -> tuple[float, float] | None:
    """The (reference, ours) scores from the first non-empty line of a review, or None."""
    for line in review.splitlines():
        if line.strip():
            match = _SCORES.match(line)
            return (float(match.group(1)), float(match.group(2))) if match else None
    return None


def judge_answers(
    items: list[BenchItem],
    answers: list[str],
    base_url: str,
    model: str,
    api_key_env: str = "OPENAI_API_KEY",
    concurrency: int = 4,
    temperature: float = 0.2,
    progress: bool = False,
) -> list[dict]:
    """One review per item: the judge's text and the two scores (None when the judge gave none)."""
    settings = BackendSettings(
        "openai", model, base_url, api_key_env=api_key_env, concurrency=concurrency, temperature=temperature
    )
    backend = build_backend(settings)

    def review(pair: tuple[BenchItem, str]) -> dict:
        item, answer = pair
        request = ChatRequest(item.question_id, "judge", bench_review_messages(item, answer))
        reply = backend.complete([request])[0]
        scores = parse_scores(reply.text) if reply.text else None
        return {
            "question_id": item.question_id,
            "category": item.category,
            "answer": answer,
            "review": reply.text,
            "error": reply.error if reply.text is None else None,
            "scores": list(scores) if scores else None,
        }

    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            reviews = pool.map(review, zip(items, answers))
            return list(tqdm(reviews, desc="judge", unit="answer", total=len(items), disable=not progress))
    finally:
        backend.close()


def summarize_reviews(reviews: list[dict]) -> dict:
    """Per category and overall: mean scores of reference and ours, and ours relative to it in percent."""
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for review in reviews:
        if review["scores"]:
            groups[review["category"]].append(tuple(review["scores"]))
            groups["all"].append(tuple(review["scores"]))
    summary = {name: _relative(scores) for name, scores in sorted(groups.items()) if name != "all"}
    overall = _relative(groups.get("all", []))
    return {
        "relative": overall["relative"],
        "ours": overall["ours"],
        "reference": overall["reference"],
        "judged": overall["count"],
        "failed": sum(1 for r in reviews if not r["scores"]),
        "by_category": summary,
    }


def _relative(scores: list[tuple[float, float]]) -> dict:
    if not scores:
        return {"relative": None, "ours": None, "reference": None, "count": 0}
    reference = sum(s[0] for s in scores) / len(scores)
    ours = sum(s[1] for s in scores) / len(scores)
    return {
        "relative": 100.0 * ours / reference if reference else None,
        "ours": ours,
        "reference": reference,
        "count": len(scores),
    }


def _one_of(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{folder}: no {what} file ({' or '.join(names)})")
