"""Third-party imports that need care.

open_clip imports timm, and timm's training-summary helper imports wandb whenever wandb is installed (lmms-eval,
among others, installs it). wandb's public API builds its schema at import: 3 to 6 seconds of CPU at every start
of every process, for a logger we never call. So open_clip is imported with wandb hidden (`without_module`);
wandb itself stays importable, and the Trainer's wandb reporting imports it as usual when a run asks for it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def without_module(name: str) -> Iterator[None]:
    """Within the block, `import NAME` fails as if NAME were not installed; afterwards it imports as usual. Does
    nothing when NAME is already imported."""
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None  # the import system's own marker for "not importable"
    try:
        yield
    finally:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]
