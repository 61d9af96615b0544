"""On a tiny LM first pretrained on general text, stage 2 with replay or with a KL to the base forgets less of that
text than plain full fine-tuning (fixed seeds; the direction is asserted, not the size)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llava_lite.demo.forgetting import ForgettingSettings, plot, run_forgetting, table

SMALL = {
    "corpus_paragraphs": 100,
    "pretrain_steps": 60,
    "pretrain_batch_size": 8,
    "pretrain_lr": 5e-3,
    "train_images": 16,
    "stage2_steps": 15,
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    settings = ForgettingSettings(tmp_path_factory.mktemp("forgetting"), **SMALL)
    # Models this small gain nothing from a second thread, and on a busy shared CPU lose many times over to
    # waiting for it (about 8 s against 100 s here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return settings, {r.run: r for r in run_forgetting(settings, log=lambda message: None)}
    finally:
        torch.set_num_threads(threads)


def test_plain_stage2_forgets_general_text_and_learns_the_task(measured):
    _, runs = measured
    assert runs["plain"].ratio > 1.2
    assert runs["plain"].answer_perplexity < runs["base"].answer_perplexity / 4


def test_replay_and_kl_to_the_base_each_forget_less_than_plain_tuning(measured):
    _, runs = measured
    assert runs["replay"].ratio < runs["plain"].ratio
    assert runs["kl"].ratio < runs["plain"].ratio
    for method in ("replay", "kl"):  # and the task is still learnt
        assert runs[method].answer_perplexity < runs["base"].answer_perplexity / 4


def test_the_results_make_a_table_and_a_plot(measured, tmp_path):
    settings, runs = measured
    text = table(list(runs.values()), settings)
    lines = text.splitlines()
    assert len(lines) == 6 and lines[0].startswith("| run |")
    assert f"{runs['replay'].ratio:.3f}" in lines[4] and "replay" in lines[4]
    plot(list(runs.values()), tmp_path / "forgetting.png")
    with Image.open(tmp_path / "forgetting.png") as image:
        assert image.format == "PNG"
