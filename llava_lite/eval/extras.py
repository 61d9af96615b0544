"""The optional extras that the evaluation harnesses need (see pyproject.toml), and the one line that says how to
install one that is missing."""

from __future__ import annotations

import importlib.util


def missing_extra(what: str, package: str, extra: str) -> str:
    return f"{what} needs {package}, which is not installed: pip install 'llava_lite[{extra}]'"


def is_installed(module: str) -> bool:
    """Whether `module` can be imported (a module hidden as None in sys.modules counts as missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or the module has no spec
        return False
