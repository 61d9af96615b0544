"""Code that came with a model folder runs only when the person running the command says so: a run folder whose
config asks for `trust_remote_code` is refused in one line by every command that loads it, and nothing of its
`auto_map` modules runs; with `--trust-remote-code` on the command line it loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from llava_lite.cli import main
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset

PAYLOAD = """
from pathlib import Path

Path({marker!r}).write_text("the folder's code ran")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


class PayloadConfig(LlamaConfig):
    pass


class PayloadModel(LlamaForCausalLM):
    config_class = PayloadConfig


class PayloadTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def payload_folder(run: Path, marker: Path, asks: bool) -> Path:
    """A run folder whose LM and tokenizer carry an `auto_map` module that writes `marker` when imported; `asks`:
    its config asks for remote code."""
    LlavaLiteModel.from_config(preset("tiny")).save_pretrained(run)
    for part in ("language_model", "tokenizer"):
        (run / part / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    _edit_json(
        run / "language_model" / "config.json",
        auto_map={"AutoConfig": "payload.PayloadConfig", "AutoModelForCausalLM": "payload.PayloadModel"},
    )
    _edit_json(
        run / "tokenizer" / "tokenizer_config.json", auto_map={"AutoTokenizer": [None, "payload.PayloadTokenizer"]}
    )
    config = json.loads((run / "llava_lite_config.json").read_text())
    config["model"]["language_model"]["trust_remote_code"] = asks
    (run / "llava_lite_config.json").write_text(json.dumps(config))
    return run


@pytest.fixture(scope="module")
def payload_run(tmp_path_factory) -> tuple[Path, Path]:
    """A payload folder that asks for remote code, and its marker's path."""
    base = tmp_path_factory.mktemp("payload")
    return payload_folder(base / "run", base / "marker.txt", asks=True), base / "marker.txt"


def _text_data(folder: Path) -> Path:
    path = folder / "data.json"
    path.write_text(
        json.dumps([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}])
    )
    return path


def _commands(run: Path, tmp_path: Path) -> dict[str, list[str]]:
    recipe = tmp_path / "stage2.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "recipe": "stage2",
                "init_from": str(run),
                "output_dir": str(tmp_path / "out"),
                "data": {"sources": [{"path": str(_text_data(tmp_path))}]},
                "train": {"max_steps": 1, "report_to": "none"},
            }
        )
    )
    return {
        "chat": ["chat", "--model", str(run), "--prompt", "Hi", "--max-new-tokens", "2"],
        "serve": ["serve", "--model", str(run), "--port", "0"],
        "export": ["export", "--model", str(run), "--format", "hf", "--out", str(tmp_path / "hf")],
        "train": ["train", str(recipe)],
    }


@pytest.mark.parametrize("command", ["chat", "serve", "export", "train"])
def test_a_folder_asking_for_remote_code_is_refused_in_one_line_and_runs_nothing(
    command, payload_run, tmp_path, capsys
):
    run, marker = payload_run
    assert main(_commands(run, tmp_path)[command]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert str(run) in error and "trust_remote_code" in error and "--trust-remote-code" in error
    assert not marker.exists()


def test_an_auto_map_alone_runs_nothing(tmp_path):
    """With the config's flag off, the folder loads with transformers' own classes: its modules are never imported."""
    marker = tmp_path / "marker.txt"
    run = payload_folder(tmp_path / "run", marker, asks=False)
    assert main(["chat", "--model", str(run), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    assert not marker.exists()


def test_trust_remote_code_on_the_command_line_loads_the_folder(payload_run, tmp_path):
    run, marker = payload_run
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "llava_lite", "chat", "--model", str(run), "--prompt", "Hi"]
    result = subprocess.run(
        [*command, "--max-new-tokens", "2", "--trust-remote-code"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert marker.read_text() == "the folder's code ran"
    marker.unlink()
