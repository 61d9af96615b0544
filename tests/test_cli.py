"""The command line as a user meets it: help, inspect-data output, one-line errors with non-zero exits."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, fixture_path, solid_image

from llava_lite.cli import main


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


def test_inspect_data_reads_a_recipe_yaml(tmp_path, capsys):
    path = fixture_path("data", "mllm_demo", "mllm_demo.json")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  preset: tiny\n  chat_template: vicuna_v1\ndata:\n  sources:\n    - path: {path}\n")
    assert main(["inspect-data", str(recipe), "--samples", "1", "--color", "never"]) == 0
    assert "ASSISTANT:[[ " in capsys.readouterr().out  # the space after the prompt is the first trained token


def test_missing_file_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["inspect-data", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("llava-lite inspect-data: error:") and "nope.json" in err


def test_bad_config_key_is_one_line_naming_it(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  sources: []\n  max_lenght: 4\n")
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
