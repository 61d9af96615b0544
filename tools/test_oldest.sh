#!/usr/bin/env bash
# The test suite on the oldest versions we support (tools/oldest_versions.txt: the `>=` bounds of pyproject.toml),
# where `.ci/run` tests the newest releases: `tools/test_oldest.sh [pytest arguments]`.
#
# It makes (or reuses) a virtual environment of its own - $LLAVA_LITE_OLDEST_VENV, by default .venv-oldest - installs
# the package with its dev extras under those constraints (pip picks the newest of everything else that fits), prints
# the versions it got, and runs tools/test.sh with the arguments given, so a few files can be run as well as all.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${LLAVA_LITE_OLDEST_VENV:-.venv-oldest}"
constraints="tools/oldest_versions.txt"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
# --upgrade-strategy eager: a reused environment is brought to exactly what a fresh one would resolve.
"$venv/bin/python" -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]" -c "$constraints"
"$venv/bin/python" - "$constraints" <<'PY'
import sys
from importlib.metadata import version

pinned = [line.split("==")[0] for line in open(sys.argv[1]) if "==" in line and not line.startswith("#")]
print("tools/test_oldest.sh: " + ", ".join(f"{name} {version(name)}" for name in pinned))
PY

. "$venv/bin/activate"
exec tools/test.sh "$@"
