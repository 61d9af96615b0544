"""The functions behind the lmms-eval tasks shipped in `configs/eval/lmms_eval/`: questions in the format of
`llava-lite eval --vqa` (`llava_lite.eval.vqa`), asked with the same prompts and scored the same way, so a
task's score equals `eval --vqa`'s on the same file.

A task YAML names them as `!function llava_lite.eval.lmms_plugin.tasks.NAME`, and says where the images are in
`lmms_eval_specific_kwargs: {default: {image_folder: DIR}}` (a relative folder counts from the working
directory); image paths stay inside that folder. Any lmms-eval model can run these tasks, not only ours.
"""

from __future__ import annotations

import string

from PIL import Image

from llava_lite.data.images import load_image, resolve_image_path
from llava_lite.eval.vqa import Question, parse_question


def question(doc: dict) -> Question:
    """A document as a question; `datasets` fills fields a record lacks with None, which are left out here."""
    row = {key: value for key, value in doc.items() if value is not None}
    return parse_question(row, f"question {row.get('question_id', row.get('id', '?'))}")


def doc_to_visual(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[Image.Image]:
    item = question(doc)
    if not item.image:
        return []
    folder = (lmms_eval_specific_kwargs or {}).get("image_folder")
    if not folder:
        raise ValueError("the task names no image folder: set lmms_eval_specific_kwargs.default.image_folder")
    where = f"question {item.id}"
    return [load_image(resolve_image_path(folder, item.image, where), where)]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question with LLaVA-1.5's instruction (and its options); models put the image before it."""
    return question(doc).text


def doc_to_target(doc: dict, model_specific_target_kwargs: dict | None = None) -> str:
    """The first reference answer (what few-shot examples would show)."""
    return question(doc).references[0]


def process_results(doc: dict, results: list[str]) -> dict:
    """VQAv2's soft accuracy of an open answer, or whether a multiple-choice answer picked the right letter."""
    return {"vqa_accuracy": question(doc).score(results[0])}


# ----- multiple choice through loglikelihood -------------------------------------------------------------------
def choice_docs(dataset):
    """Only the questions with options."""
    return dataset.filter(lambda doc: bool(doc.get("choices")))


def doc_to_choice(doc: dict) -> list[str]:
    """The options' letters: the model is asked for a letter, as LLaVA-1.5's evaluation asks."""
    return list(string.ascii_uppercase[: len(question(doc).choices)])


def doc_to_choice_index(doc: dict, model_specific_target_kwargs: dict | None = None) -> int:
    """Which of `doc_to_choice`'s letters is right."""
    return string.ascii_uppercase.index(question(doc).correct_letter())
