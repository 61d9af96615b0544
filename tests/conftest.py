"""Shared test material: the real fixtures beside the checkout, real tokenizers, tiny models."""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

from llava_lite.data.conversation import Conversation, Message
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
REAL_TOKENIZERS = ["qwen2.5", "llama3.2", "llama2", "tinyllama-chat"]


def fixture_path(*parts: str) -> Path:
    """A file under ../shared/fixtures; a clear failure (never a skip) when the fixtures are not there."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"test fixture {path} is missing: these tests need ../shared/fixtures beside the checkout")
    return path


@pytest.fixture(scope="session")
def real_tokenizers() -> dict:
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(fixture_path("tokenizers", name)) for name in REAL_TOKENIZERS}


@pytest.fixture
def tiny_model() -> LlavaLiteModel:
    return LlavaLiteModel.from_config(preset("tiny"))


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A folder with two real fixture images (named a.jpg and b.jpg)."""
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copyfile(fixture_path("images", "extreme_ironing.jpg"), folder / "a.jpg")
    shutil.copyfile(fixture_path("images", "waterview.jpg"), folder / "b.jpg")
    return folder


def image_conversation(folder: Path, images: tuple[str, ...] = ("a.jpg",)) -> Conversation:
    placeholders = "<image>\n" * len(images)
    return Conversation(
        messages=[
            Message("user", f"{placeholders}What is unusual about this picture?"),
            Message("assistant", "A man is ironing clothes on the back of a moving taxi."),
            Message("user", "Is it safe?"),
            Message("assistant", "No, it is dangerous."),
        ],
        images=[str(folder / name) for name in images],
        source="test record",
    )


def text_conversation() -> Conversation:
    return Conversation(
        messages=[Message("user", "Name a colour."), Message("assistant", "Blue.")],
        source="text record",
    )


def processor_for(model: LlavaLiteModel, **settings):
    """The processor for `model`, built as training and generation build it (no weights involved)."""
    from llava_lite.model.processor_for_config import processor_for_config

    return processor_for_config(model.config, model.tokenizer, **settings)


class StopAt(TrainerCallback):
    """Ends training after `step`, with its checkpoint saved, as a killed run would have."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


def run_tool(script: str, *args: str, timeout: float = 900) -> str:
    """`python tools/SCRIPT ARGS...` from the repository root, as the README writes it; its stdout, once it has
    exited 0 (the test fails with the ends of its output otherwise)."""
    done = subprocess.run(
        [sys.executable, f"tools/{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def solid_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


class LargestTensor(TorchDispatchMode):
    """The most elements any operation produced while it was active, and the operations' names."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.operations: set[str] = set()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operations.add(func.overloadpacket.__name__)
        self.calls[func.overloadpacket.__name__] += 1
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out
