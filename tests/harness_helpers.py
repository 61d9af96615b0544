"""Shared by the evaluation-harness tests (lmms-eval plugin, lm-eval bridge): a tiny LoRA run, offline subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset

ROOT = Path(__file__).resolve().parents[1]


def lora_run(folder: Path) -> Path:
    """A run folder with LoRA adapters that change the answers (random, not zero, B matrices), saved as training
    saves one: the base LM in language_model/, the adapters in adapter/. Larger random weights than the preset's
    give varied answers rather than one token repeated."""
    torch.manual_seed(0)
    model = LlavaLiteModel.from_config(preset("tiny", language_model={"model_config": {"initializer_range": 0.3}}))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model.language_model = get_peft_model(model.language_model, lora)
    model.save_pretrained(folder)
    return folder


def offline_env(tmp: Path) -> dict[str, str]:
    """The environment of a harness subprocess: no hub, a cache of its own, this checkout imported first."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp / "hf"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }


def run_offline(command: list[str], tmp: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, env=offline_env(tmp), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
