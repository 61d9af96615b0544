"""`python -m llava_lite` is the `llava-lite` command."""

from llava_lite.cli import run

run()
