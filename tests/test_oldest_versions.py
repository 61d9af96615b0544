"""The versions we say we support are the versions tested: tools/oldest_versions.txt (what tools/test_oldest.sh
installs) pins each package at the `>=` bound pyproject.toml gives it, and nothing caps the libraries whose newest
release `.ci/run` tests."""

from __future__ import annotations

import re

from conftest import ROOT
from packaging.requirements import Requirement

UNCAPPED = ["transformers", "peft", "accelerate", "datasets", "trl", "deepspeed"]


def declared_requirements() -> dict[str, Requirement]:
    """Every requirement string in pyproject.toml's dependency lists, by package name (self-references left out)."""
    text = (ROOT / "pyproject.toml").read_text()
    lists = text[text.index("\ndependencies = [") : text.index("\n[project.scripts]")]
    lines = [line for line in lists.splitlines() if not line.lstrip().startswith("#")]
    found = {}
    for quoted in re.findall(r'"([^"]+)"', "\n".join(lines)):
        requirement = Requirement(quoted)
        if requirement.name != "llava_lite":
            found[requirement.name.lower().replace("_", "-")] = requirement
    return found


def oldest_pins() -> dict[str, str]:
    lines = (ROOT / "tools" / "oldest_versions.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if line.strip() and not line.startswith("#")]
    return {name.strip().lower().replace("_", "-"): version.strip() for name, version in pins}


def test_each_oldest_pin_is_the_bound_pyproject_gives():
    declared = declared_requirements()
    for name, version in oldest_pins().items():
        assert name in declared, f"{name} is pinned in tools/oldest_versions.txt but not required in pyproject.toml"
        floors = [spec.version for spec in declared[name].specifier if spec.operator == ">="]
        assert floors, f"pyproject.toml gives {name} no >= bound"
        assert [version] == floors or version.startswith(floors[0] + "."), (name, version, floors)


def test_the_tested_libraries_have_no_upper_bound():
    declared = declared_requirements()
    for name in UNCAPPED:
        operators = {spec.operator for spec in declared[name].specifier}
        assert operators == {">="}, f"{name}: {declared[name]}"
        assert name in oldest_pins(), f"{name} has no oldest version to test in tools/oldest_versions.txt"
