"""Which process of a launch this is (torchrun, `accelerate launch`, mpirun), and which engine `accelerate launch`
was given, read from the launcher's environment.

Known before any process group exists, so the command line can keep every process but the main one quiet, and a
run the engine cannot do is refused before any model is built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

_RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def launch_rank() -> int:
    """This process's global rank; 0 when it was not started by a launcher."""
    for name in _RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def is_main_process() -> bool:
    return launch_rank() == 0


def sharding_engine() -> str | None:
    """The engine of an `accelerate launch` that splits the weights themselves over the processes: "FSDP" or
    "DeepSpeed ZeRO-3"; None for DDP, ZeRO-1/2 and one process."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and Path(config_file).is_file():  # a DeepSpeed file decides its own stage
        stage = json.loads(Path(config_file).read_text(encoding="utf-8")).get("zero_optimization", {}).get("stage")
    return "DeepSpeed ZeRO-3" if str(stage) == "3" else None
