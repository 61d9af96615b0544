"""A run folder's names are spelled once, in `llava_lite.run_folder`, and agree with the names transformers and peft
write; its checkpoints are found by step number, and a run is finished when its final state reached its last step."""

from __future__ import annotations

import ast
import functools
import json
from pathlib import Path

import pytest
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llava_lite import run_folder
from llava_lite.run_folder import (
    CHECKPOINT_PREFIX,
    TRAINER_STATE_FILE,
    checkpoint_name,
    checkpoint_step,
    checkpoints,
    finished_at,
    newest_checkpoint,
    read_trainer_state,
)

PACKAGE = Path(run_folder.__file__).resolve().parent
NAMES = {key: value for key, value in vars(run_folder).items() if key.isupper() and isinstance(value, str)}


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring nodes of a module, its classes and functions: prose may name a file."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _joined_as_path(node: ast.AST, word: str) -> bool:
    """`folder / "word"`, `os.path.join(folder, "word")` or `folder.joinpath("word")`."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        operands = (node.left, node.right)
    elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("join", "joinpath"):
        operands = tuple(node.args)
    else:
        return False
    return any(isinstance(operand, ast.Constant) and operand.value == word for operand in operands)


def _named_constant(node: ast.AST, word: str) -> bool:
    """`SOME_DIR = "word"`: a module naming the folder for its own use."""
    return (
        isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and node.value.value == word
        and all(isinstance(target, ast.Name) and target.id.isupper() for target in node.targets)
    )


@functools.cache
def _package_code() -> list[tuple[str, list[ast.AST], set[int]]]:
    """(path, every node, the docstrings' ids) of each module of the package, parsed once."""
    code = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        code.append((str(path.relative_to(PACKAGE.parent)), list(ast.walk(tree)), _docstrings(tree)))
    return code


def modules_spelling(name: str) -> set[str]:
    """The package's modules whose code spells `name` as a path. A file name (`trainer_state.json`, `checkpoint-`) is
    spelled when any string in the code, docstrings aside, holds it. A folder named after a model part
    (`language_model`) is a word configs and weight names spell too: it is spelled when it is joined onto a path or
    given a constant's name."""
    spelled = set()
    for where, nodes, prose in _package_code():
        for node in nodes:
            if "." in name or "-" in name:
                hit = isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose
                hit = hit and name in node.value
            else:
                hit = _joined_as_path(node, name) or _named_constant(node, name)
            if hit:
                spelled.add(where)
                break
    return spelled


def test_the_names_cover_a_run_folder():
    expected = {"MODEL_CONFIG_FILE", "PROJECTOR_FILE", "TRAIN_CONFIG_FILE", "TRAINER_STATE_FILE", "CHECKPOINT_PREFIX"}
    assert expected < set(NAMES)
    assert len(set(NAMES.values())) == len(NAMES)  # no two names for one file


@pytest.mark.parametrize("key", sorted(NAMES))
def test_each_name_is_spelled_in_run_folder_alone(key):
    assert modules_spelling(NAMES[key]) == {"llava_lite/run_folder.py"}


def test_a_folder_joined_onto_a_path_is_found_and_a_word_alone_is_not():
    tree = ast.parse(
        'from pathlib import Path\nPath("run") / "language_model"\nos.path.join(run, "adapter")\nx = "tokenizer"\n'
    )
    assert any(_joined_as_path(node, "language_model") for node in ast.walk(tree))
    assert any(_joined_as_path(node, "adapter") for node in ast.walk(tree))
    assert not any(_joined_as_path(node, "tokenizer") for node in ast.walk(tree))


def test_the_names_the_trainer_and_peft_write_are_theirs():
    assert CHECKPOINT_PREFIX.removesuffix("-") == PREFIX_CHECKPOINT_DIR
    assert TRAINER_STATE_FILE == TRAINER_STATE_NAME
    assert run_folder.ADAPTER_WEIGHTS_FILE == SAFETENSORS_WEIGHTS_NAME


def test_checkpoints_are_ordered_by_step_number_and_only_the_trainers_count(tmp_path):
    for name in ("checkpoint-10", "checkpoint-2", "checkpoint-best", ".rotated-checkpoint-30"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-40").write_text("a file, not a checkpoint")
    assert checkpoints(tmp_path) == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-10"]
    assert newest_checkpoint(tmp_path) == tmp_path / checkpoint_name(10)
    assert checkpoint_step(tmp_path / "checkpoint-10") == 10 and checkpoint_step(tmp_path / "checkpoint-best") is None
    assert checkpoints(tmp_path / "absent") == [] and newest_checkpoint(tmp_path / "absent") is None


@pytest.mark.parametrize(
    ("state", "finished"),
    [
        (None, None),
        ({"global_step": 4, "max_steps": 4}, 4),
        ({"global_step": 3, "max_steps": 4}, None),  # stopped early by a callback
        ({"global_step": 0}, None),
    ],
)
def test_a_run_is_finished_when_its_final_state_reached_its_last_step(tmp_path, state, finished):
    if state is not None:
        (tmp_path / TRAINER_STATE_FILE).write_text(json.dumps(state))
    assert finished_at(tmp_path) == finished


def test_a_torn_trainer_state_is_named_in_one_line(tmp_path):
    (tmp_path / TRAINER_STATE_FILE).write_text('{"global_step": 4')
    with pytest.raises(ValueError, match=rf"^{tmp_path / TRAINER_STATE_FILE}: not a trainer state \("):
        read_trainer_state(tmp_path)
