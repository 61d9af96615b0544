"""The package's layers, lowest first. A module may import from its own layer and the layers below it, never from a
layer above: data flows up from records to commands, and nothing low reaches up for a name.

  0 foundation       config_io (typed configs), imports (third-party imports that need care), run_folder (the files
                     a run folder holds), the package's own __init__
  1 data             records -> conversations -> token ids, labels, image slots -> batches; the Processor
  2 model            vision tower, projector, LM, loss; a run folder saved and loaded; the processor for a config
  3 models at work   inference (answers from a model folder), llm (the LLM client: backends, retries, journal;
                     its local backend loads an LM as the model layer does)
  4 interop          transformers' Llava format, merged adapters, chat templates as jinja
  5 eval             perplexities, VQA, judged scores, preference accuracy, reports; the callback training calls
  6 rewards          what scores an answer (reference, format, IoU, length, judge, reward model, python): one
                     registry for `data score` and recipe rl
  7 train            the recipes (train/recipes/), the Trainer, resume, launch; evaluates as it trains (eval below)
  8 applications     improve (the self-improvement loop), curate (dedup, tag, rate, select), datagen (instruction
                     data from captions and boxes, with an LLM), serve, demo
  9 commands         the command line's subcommands: parse arguments, call the package
 10 entry            cli, __main__

Imports are read from the source (ast), those inside functions included. Every top-level module and folder of the
package has a layer: a new one fails here until it is added to `LAYERS` (and to ARCHITECTURE.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llava_lite"

# Lowest first; the index is the layer. "__init__" is the package's own llava_lite/__init__.py.
LAYERS: list[tuple[str, ...]] = [
    ("__init__", "config_io", "imports", "run_folder"),
    ("data",),
    ("model",),
    ("inference", "llm"),
    ("interop",),
    ("eval",),
    ("rewards",),
    ("train",),
    ("improve", "curate", "datagen", "serve", "demo"),
    ("commands",),
    ("cli", "__main__"),
]
LAYER_OF = {part: index for index, parts in enumerate(LAYERS) for part in parts}


def top_level_parts() -> set[str]:
    """The package's top-level modules (`cli`) and folders holding Python (`train`), and its `__init__`."""
    parts = {path.stem for path in PACKAGE.glob("*.py")}
    parts |= {path.name for path in PACKAGE.iterdir() if path.is_dir() and any(path.rglob("*.py"))}
    return parts


def part_of_module(dotted: str, parts: set[str]) -> str | None:
    """The top-level part a `llava_lite...` module name falls in; `__init__` for a name the package itself holds
    (`from llava_lite import __version__`); None for a module outside the package."""
    names = dotted.split(".")
    if names[0] != PACKAGE.name:
        return None
    if len(names) == 1 or names[1] not in parts:
        return "__init__"
    return names[1]


def imported_modules(source: str, package: list[str]) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in `source`, lazy ones inside functions included; `package` is the dotted
    path of the package the module sits in, for relative imports. `from a import b` yields `a.b` too, since `b` may
    be a module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def module_files() -> list[tuple[Path, str, list[str]]]:
    """(file, its top-level part, the dotted path of its package) for every module of the package."""
    files = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        part = relative.parts[0].removesuffix(".py")  # llava_lite/__init__.py is the part "__init__"
        files.append((path, part, [PACKAGE.name, *relative.parts[:-1]]))
    return files


def test_every_top_level_module_and_folder_has_a_layer():
    missing = sorted(top_level_parts() - set(LAYER_OF))
    assert not missing, (
        f"llava_lite/{missing[0]} has no layer: add it to LAYERS in tests/test_layers.py (and to ARCHITECTURE.md), "
        "above every part it imports and below every part that imports it"
    )


def test_no_module_imports_a_layer_above_its_own():
    parts = top_level_parts()
    climbs = {}  # one line per import statement
    for path, part, package in module_files():
        if part not in LAYER_OF:
            continue  # reported by the test above
        for line, module in imported_modules(path.read_text(encoding="utf-8"), package):
            target = part_of_module(module, parts)
            if target is not None and LAYER_OF.get(target, -1) > LAYER_OF[part]:
                where = f"{path.relative_to(PACKAGE.parent)}:{line}"
                climbs.setdefault(
                    where,
                    f"{where} ({part}, layer {LAYER_OF[part]}) imports {module} ({target}, layer {LAYER_OF[target]})",
                )
    assert not climbs, "imports that climb the layers:\n" + "\n".join(climbs.values())


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def f():\n    from llava_lite.train import run\n", "llava_lite.train.run"),
        ("from ..eval.report import table\n", "llava_lite.eval.report"),
        ("import llava_lite.serve.app as app\n", "llava_lite.serve.app"),
    ],
)
def test_the_reader_sees_lazy_relative_and_plain_imports(source, expected):
    found = {module for _, module in imported_modules(source, ["llava_lite", "data"])}
    assert expected in found


def test_a_name_from_the_package_itself_is_the_foundation_and_outside_modules_are_none():
    parts = top_level_parts()
    assert part_of_module("llava_lite.__version__", parts) == "__init__"
    assert part_of_module("llava_lite.train.run", parts) == "train"
    assert part_of_module("transformers.trainer", parts) is None
