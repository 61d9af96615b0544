"""The command line as a user meets it: help, inspect-data output, one-line errors with non-zero exits."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, fixture_path, solid_image

from llava_lite.cli import main
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset
from llava_lite.model.vision import VisionTower


def test_module_entry_point_prints_help():
    result = subprocess.run(
        [sys.executable, "-m", "llava_lite", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0
    assert "inspect-data" in result.stdout


def test_inspect_data_marks_trained_tokens_and_counts(capsys):
    path = fixture_path("data", "mllm_demo", "mllm_demo.json")
    assert main(["inspect-data", str(path), "--samples", "2", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- ") == 2
    assert "[[" in out and "<|im_end|>]]" in out
    assert "<image x16>" in out
    assert "records: 6 read, 6 considered, 6 usable; skipped: none" in out
    assert "images: 8 in all (128 image tokens)" in out


def test_inspect_data_colours_trained_tokens_on_request(capsys):
    path = fixture_path("data", "mllm_demo", "mllm_demo.json")
    main(["inspect-data", str(path), "--samples", "1", "--color", "always"])
    out = capsys.readouterr().out
    assert "\033[32m" in out and "[[" not in out


def test_inspect_data_counts_skipped_records_by_reason(tmp_path, capsys):
    solid_image(tmp_path / "red.png", (255, 0, 0))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    good = {
        "image": "red.png",
        "conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}],
    }
    records = [good, {**good, "image": "gone.png"}, {**good, "image": "bad.png"}, {"conversations": []}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    assert main(["inspect-data", str(path), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "1 usable; skipped: corrupt_image: 1, malformed: 1, missing_image: 1" in out


def recipe_yaml(tmp_path, body: str, recipe: str = "stage2") -> str:
    path = fixture_path("data", "mllm_demo", "mllm_demo.json")
    config = tmp_path / "r.yaml"
    config.write_text(
        f"recipe: {recipe}\noutput_dir: {tmp_path / 'run'}\n{body}data:\n  sources:\n    - path: {path}\n"
    )
    return str(config)


def test_inspect_data_reads_a_recipe_yaml(tmp_path, capsys):
    recipe = recipe_yaml(tmp_path, "model:\n  preset: tiny\n  chat_template: vicuna_v1\n")
    assert main(["inspect-data", recipe, "--samples", "1", "--color", "never"]) == 0
    assert "ASSISTANT:[[ " in capsys.readouterr().out  # the space after the prompt is the first trained token


def test_inspect_data_shows_how_a_packing_recipe_packs(tmp_path, capsys):
    recipe = recipe_yaml(tmp_path, "model: tiny\n")
    recipe_text = Path(recipe).read_text().replace("data:\n", "data:\n  packing: true\n  pack_length: 400\n")
    Path(recipe).write_text(recipe_text)
    assert main(["inspect-data", recipe, "--samples", "0", "--color", "never"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("packing:"))
    match = re.fullmatch(
        r"packing: 6 samples into (\d) rows of up to 400 tokens, ([\d.]+) % of the rows' tokens filled", line
    )
    assert match and 2 <= int(match.group(1)) < 6 and 30 < float(match.group(2)) <= 100


def test_inspect_data_shows_a_stage1_recipe_in_its_plain_data_template(tmp_path, capsys):
    recipe = recipe_yaml(tmp_path, "model: tiny\n", recipe="stage1")
    assert main(["inspect-data", recipe, "--samples", "1", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "template: plain" in out and "<|im_start|>" not in out


def test_inspect_data_takes_the_model_of_a_recipes_init_from_run(tmp_path, capsys):
    LlavaLiteModel.from_config(preset("tiny", chat_template="vicuna_v1")).save_pretrained(tmp_path / "stage1")
    recipe = recipe_yaml(tmp_path, f"init_from: {tmp_path / 'stage1'}\n")
    assert main(["inspect-data", recipe, "--samples", "1", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "template: vicuna_v1" in out and "ASSISTANT:[[ " in out


def test_inspect_data_reads_tokens_per_image_without_building_the_tower(monkeypatch, capsys):
    def no_tower(self, config):
        raise AssertionError("inspect-data built the vision tower")

    monkeypatch.setattr(VisionTower, "__init__", no_tower)
    path = fixture_path("data", "mllm_demo", "mllm_demo.json")
    assert main(["inspect-data", str(path), "--samples", "0", "--color", "never"]) == 0
    assert "16 tokens per image" in capsys.readouterr().out


def test_the_command_line_parser_imports_no_model_code():
    # `llava-lite --help` builds every command's parser; torch and transformers load only when a command runs.
    code = (
        "import sys; from llava_lite.cli import build_parser; build_parser(); "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_train_with_a_missing_data_file_fails_in_one_line_before_any_model_code_loads(tmp_path):
    missing = tmp_path / "data" / "missing.json"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"recipe: stage1\nmodel: tiny\noutput_dir: {tmp_path / 'run'}\ndata:\n  sources:\n    - path: {missing}\n"
    )
    code = (
        f"import sys; from llava_lite.cli import main; print(main(['train', {str(recipe)!r}]), 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.stdout.strip() == "2 False"
    assert result.stderr.strip() == f"llava-lite train: error: {missing}: no such data file or folder"


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_rank_of_a_launch_leaves_after_the_exit_handlers_without_the_interpreters_finalization(tmp_path, world_size):
    # `llava-lite` as a launcher's rank: the exit code and the exit handlers stay, the finalization (where gloo's
    # transport thread is torn down with the C++ statics) is skipped; a single process finalizes as usual.
    recipe, handled = tmp_path / "r.yaml", tmp_path / "handled.txt"
    missing = tmp_path / "missing.json"  # fails before any model code loads
    recipe.write_text(
        f"recipe: stage1\nmodel: tiny\noutput_dir: {tmp_path / 'run'}\ndata:\n  sources:\n    - path: {missing}\n"
    )
    code = (
        "import atexit, pathlib, sys\n"
        "from llava_lite import cli\n"
        f"atexit.register(pathlib.Path({str(handled)!r}).write_text, 'ran')\n"
        "class Finalized:\n"
        "    def __del__(self): print('finalized', flush=True)\n"
        "kept = Finalized()\n"
        f"sys.argv = ['llava-lite', 'train', {str(recipe)!r}]\n"
        "cli.run()\n"
    )
    env = {**os.environ, "WORLD_SIZE": world_size}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=99)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"llava-lite train: error: {missing}: no such data file or folder"
    assert handled.read_text() == "ran"
    assert ("finalized" in result.stdout) == (world_size == "1")


def test_a_relative_data_file_that_is_missing_is_not_looked_up_on_the_hub(tmp_path, monkeypatch, capsys):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("datasets.load_dataset was asked for a missing local file")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "recipe: stage1\nmodel: tiny\noutput_dir: run\ndata:\n  sources:\n    - path: data/gone.parquet\n"
    )
    assert main(["inspect-data", str(recipe)]) == 2
    assert "data/gone.parquet: no such data file or folder" in capsys.readouterr().err


def test_missing_file_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["inspect-data", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("llava-lite inspect-data: error:") and "nope.json" in err


def test_bad_config_key_is_one_line_naming_it(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("recipe: stage1\nmodel: tiny\noutput_dir: run\ndata:\n  sources: []\n  max_lenght: 4\n")
    assert main(["inspect-data", str(recipe)]) == 2
    assert "max_lenght" in capsys.readouterr().err


def test_serve_api_key_comes_from_the_flag_before_the_environment(tmp_path, monkeypatch):
    from llava_lite.cli import build_parser
    from llava_lite.commands.serve import serve_config
    from llava_lite.serve.config import API_KEY_ENV

    def key(*flags):
        return serve_config(build_parser().parse_args(["serve", "--model", str(tmp_path), *flags])).api_key

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert key() is None
    assert key("--api-key", "from-flag") == "from-flag"
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert key() == "from-env"
    assert key("--api-key", "from-flag") == "from-flag"


def test_serve_with_an_image_root_that_is_not_a_folder_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    assert main(["serve", "--model", str(tmp_path), "--image-root", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"llava-lite serve: error: --image-root {missing} is not a folder"
