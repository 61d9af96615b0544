"""Which process of a launch this is (torchrun, `accelerate launch`, mpirun), read from the launcher's environment.

Known before any process group exists, so the command line can keep every process but the main one quiet.
"""

from __future__ import annotations

import os

_RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def launch_rank() -> int:
    """This process's global rank; 0 when it was not started by a launcher."""
    for name in _RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def is_main_process() -> bool:
    return launch_rank() == 0
