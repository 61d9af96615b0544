"""A LoRA run, trained by our recipe with evaluation every step: its merged copy answers as the adapters did, and
the evaluations sit in the training log beside the losses."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fixture_path
from PIL import Image

from llava_lite.cli import main
from llava_lite.config_io import from_dict
from llava_lite.eval.report import read_training_log
from llava_lite.interop.merge import export_merged
from llava_lite.model.config import load_model_config
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.train.config import TrainConfig
from llava_lite.train.run import run_training


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    data = str(fixture_path("data", "mllm_demo", "mllm_demo.json"))
    text = folder / "plain.txt"
    text.write_text("The harbour was quiet in the morning, and the boats rocked slowly on the water. " * 12)
    config = from_dict(
        TrainConfig,
        {
            "recipe": "stage2",
            "output_dir": str(folder / "run"),
            "model": "tiny",
            "data": {"sources": [{"path": data}]},
            "finetune": {"method": "lora", "lora": {"r": 4, "alpha": 8}},
            "train": {"max_steps": 2, "batch_size": 2, "report_to": "none", "learning_rate": 0.05, "logging_steps": 1},
            "eval": {"every_steps": 1, "instruct": data, "text": str(text), "text_window": 64, "limit": 2},
        },
    )
    return run_training(config)


def batch(model: LlavaLiteModel) -> dict:
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 24))
    ids[:, 4:20] = model.image_token_id
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32)}


def test_merged_lora_gives_the_logits_of_the_adapters(lora_run, tmp_path):
    export_merged(lora_run, tmp_path / "merged")
    adapted = LlavaLiteModel.from_pretrained(lora_run).eval()
    merged = LlavaLiteModel.from_pretrained(tmp_path / "merged").eval()
    assert adapted.uses_adapters and not merged.uses_adapters
    assert load_model_config(tmp_path / "merged").adapter is None
    assert not (tmp_path / "merged" / "adapter").exists()
    inputs = batch(adapted)
    with torch.no_grad():
        expected = adapted(**inputs).logits
        with adapted.language_model.disable_adapter():
            without = adapted(**inputs).logits
        got = merged(**inputs).logits
    assert (expected - without).abs().max() > 1e-3  # the adapters matter, so agreeing means something
    assert (got - expected).abs().max() < 1e-5


def test_merged_run_answers_like_the_adapters(lora_run, tmp_path):
    assert main(["export", "--model", str(lora_run), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    adapted = LlavaLiteModel.from_pretrained(lora_run).eval()
    merged = LlavaLiteModel.from_pretrained(tmp_path / "merged").eval()
    inputs = batch(adapted)
    mask = torch.ones_like(inputs["input_ids"])
    answers = [m.generate(**inputs, attention_mask=mask, max_new_tokens=12, do_sample=False) for m in (adapted, merged)]
    assert answers[0].shape == (2, 12)
    assert torch.equal(answers[0], answers[1])


def test_evaluations_are_logged_every_step_beside_the_losses(lora_run):
    log = read_training_log(lora_run)
    for step in (1, 2):
        entries = [entry for entry in log if entry.get("step") == step]
        assert any("loss" in entry for entry in entries), f"step {step} lost its loss"
        metrics = next(entry for entry in entries if "response_perplexity" in entry)
        assert metrics["response_perplexity"] > 1
        # Adapters switched off give the base LM: the forgetting ratio is measured without a base folder.
        assert metrics["text_perplexity_ratio"] == pytest.approx(
            metrics["text_perplexity"] / metrics["text_perplexity_base"]
        )
    base = [entry["text_perplexity_base"] for entry in log if "text_perplexity_base" in entry]
    assert base[0] == pytest.approx(base[1])  # the base LM does not train
    tuned = [entry["response_perplexity"] for entry in log if "response_perplexity" in entry]
    assert tuned[0] != tuned[1]  # the tuned model does


def test_training_curves_plot_to_a_png(lora_run, tmp_path, capsys):
    assert main(["eval", "--training-log", str(lora_run), "--plot", str(tmp_path / "curves.png")]) == 0
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_eval_command_reports_perplexities_of_a_lora_run_as_json(lora_run, tmp_path, capsys):
    data = fixture_path("data", "mllm_demo", "mllm_demo.json")
    text = tmp_path / "plain.txt"
    text.write_text("A small boat crossed the bay while gulls circled overhead. " * 20)
    out = tmp_path / "results.json"
    args = ["eval", "--model", str(lora_run), "--instruct", str(data), "--text", str(text), "--text-window", "48"]
    assert main([*args, "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["response_perplexity"]["records"] == 6
    assert results["text_perplexity"]["base_source"] == "adapters off"
    assert f"{results['response_perplexity']['perplexity']:.3f}" in printed
    assert "tuned / base" in printed
