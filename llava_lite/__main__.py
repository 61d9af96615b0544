"""`python -m llava_lite` is the `llava-lite` command."""

import sys

from llava_lite.cli import main

sys.exit(main())
