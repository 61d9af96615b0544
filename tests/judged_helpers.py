"""Shared by the judged evaluations' tests: a tiny run that answers in words, and a record of what it was asked."""

from __future__ import annotations

from pathlib import Path

import torch

from llava_lite.inference.generator import Generator
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset


def save_talkative_run(folder: Path, seed: int = 0) -> Path:
    """A tiny run whose greedy answers are words, not the plain preset's newlines: wide random weights."""
    torch.manual_seed(seed)
    config = preset("tiny", language_model={"model_config": {"initializer_range": 0.3}})
    LlavaLiteModel.from_config(config).save_pretrained(folder)
    return folder


def record_generations(monkeypatch) -> list:
    """Every conversation the model is asked from now on, with the answer it gave, in order."""
    asked = []
    generate = Generator.generate

    def recording(self, conversations, images, settings):
        answers = generate(self, conversations, images, settings)
        asked.extend(zip(conversations, answers))
        return answers

    monkeypatch.setattr(Generator, "generate", recording)
    return asked
