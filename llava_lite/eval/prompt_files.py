"""The question files of the judged evaluations, read and checked: MT-Bench's multi-turn questions, and the
single-turn prompts of a pairwise comparison in AlpacaEval's or WildVision-Bench's shape.

- MT-Bench (`question.jsonl`): `question_id`, `category` (default `general`), `turns` (the user's messages, in
  order), optional `reference` (a reference answer per turn, shown to the judge for the categories that need one),
  optional `image` / `images` (visual questions: the pictures go with the first turn).
- AlpacaEval (a JSON list, or JSONL): `instruction`, and in a file of reference answers `output` (and `generator`);
  its `dataset` field serves as the category when there is no `category`. WildVision-Bench's rows are the same
  with `image` / `images` and a `question_id`. A row's id is `question_id`, else `id`, else its position.

Images are paths inside the image folder (the file's own folder unless one is named); a path that leaves it, or a
picture that is not there, is an error naming the row before any model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llava_lite.data.formats import checked_image_path, image_list, read_json_objects

DEFAULT_CATEGORY = "general"


@dataclass
class MtBenchQuestion:
    question_id: str
    category: str
    turns: list[str]
    references: list[str] = field(default_factory=list)  # one per turn, or none
    images: list[str] = field(default_factory=list)  # resolved paths


@dataclass
class PairwisePrompt:
    prompt_id: str
    instruction: str
    category: str
    images: list[str] = field(default_factory=list)  # resolved paths
    output: str | None = None  # the file's own answer (a reference answer file), if it has one


def read_rows(path: str | Path, what: str) -> list[tuple[str, dict]]:
    """(`FILE line N` or `FILE record N`, row) for a JSONL file or a JSON list of objects."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such {what} file")
    if path.suffix.lower() != ".json":
        return list(read_json_objects(path, what))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a JSON {what} file must hold a list of objects")
    rows = []
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise ValueError(f"{path} record {index}: each record must be a JSON object")
        rows.append((f"{path} record {index}", row))
    return rows


def read_mt_bench(
    path: str | Path, image_folder: str | Path | None = None, limit: int | None = None
) -> list[MtBenchQuestion]:
    """The questions of an MT-Bench file (see the module doc), checked; the first `limit` of them."""
    folder = Path(image_folder) if image_folder else Path(path).parent
    questions: list[MtBenchQuestion] = []
    seen: set[str] = set()
    for where, row in read_rows(path, "MT-Bench questions"):
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise ValueError(f"{where}: `turns` must be a non-empty list of questions (strings)")
        question_id = _row_id(row, where, None)
        if question_id in seen:
            raise ValueError(f"{where}: question_id {question_id} appears twice")
        seen.add(question_id)
        references = row.get("reference") or []
        if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
            raise ValueError(f"{where}: `reference` must be a list of answers (strings), one per turn")
        images = _images(row, where, folder)
        questions.append(MtBenchQuestion(question_id, _category(row, where), list(turns), list(references), images))
        if limit and len(questions) == limit:
            break
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def read_pairwise_prompts(
    path: str | Path, image_folder: str | Path | None = None, limit: int | None = None
) -> list[PairwisePrompt]:
    """The prompts of an AlpacaEval- or WildVision-shaped file (see the module doc), checked."""
    folder = Path(image_folder) if image_folder else Path(path).parent
    prompts: list[PairwisePrompt] = []
    seen: set[str] = set()
    for index, (where, row) in enumerate(read_rows(path, "prompts")):
        instruction = row.get("instruction", row.get("prompt"))
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"{where}: needs an `instruction` (the prompt, a non-empty string)")
        prompt_id = _row_id(row, where, index)
        if prompt_id in seen:
            raise ValueError(f"{where}: id {prompt_id} appears twice")
        seen.add(prompt_id)
        output = row.get("output")
        if output is not None and not isinstance(output, str):
            raise ValueError(f"{where}: `output` must be a string (the reference answer)")
        category = _category(row, where, also=("dataset",))
        prompts.append(PairwisePrompt(prompt_id, instruction, category, _images(row, where, folder), output))
        if limit and len(prompts) == limit:
            break
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def baseline_outputs(path: str | Path, prompts: list[PairwisePrompt]) -> list[str]:
    """The answers of a reference-answer file for `prompts`: matched by id where the file's rows carry one
    (`question_id` or `id`), else by the instruction's text, as AlpacaEval matches them."""
    by_id: dict[str, str] = {}
    by_instruction: dict[str, str] = {}
    for where, row in read_rows(path, "reference answers"):
        output = row.get("output")
        if not isinstance(output, str):
            raise ValueError(f"{where}: a reference answer needs `output` (a string)")
        if "question_id" in row or "id" in row:
            by_id[_row_id(row, where, None)] = output
        instruction = row.get("instruction", row.get("prompt"))
        if isinstance(instruction, str):
            by_instruction[instruction] = output
    outputs = []
    for prompt in prompts:
        found = by_id.get(prompt.prompt_id, by_instruction.get(prompt.instruction))
        if found is None:
            raise ValueError(f"{path}: no reference answer for prompt {prompt.prompt_id} ({prompt.instruction[:60]!r})")
        outputs.append(found)
    return outputs


def _row_id(row: dict, where: str, position: int | None) -> str:
    value = row.get("question_id", row.get("id", position))
    if value is None:
        raise ValueError(f"{where}: needs a `question_id`")
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ValueError(f"{where}: the id must be a string or an integer, got {value!r}")
    return str(value)


def _category(row: dict, where: str, also: tuple[str, ...] = ()) -> str:
    for key in ("category", *also):
        if key in row:
            if not isinstance(row[key], str) or not row[key]:
                raise ValueError(f"{where}: `{key}` must be a non-empty string")
            return row[key]
    return DEFAULT_CATEGORY


def _images(row: dict, where: str, folder: Path) -> list[str]:
    names = image_list(row.get("images", row.get("image")), where)
    return [checked_image_path(folder, name, where, check_exists=True) for name in names]
