"""`chat` and `generate` from a freshly saved run folder, in new processes, as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, fixture_path
from PIL import Image

from llava_lite.cli import main
from llava_lite.data.conversation import Conversation, Message
from llava_lite.inference.batch import generate_file, parse_request
from llava_lite.inference.generator import Generator, SamplingSettings
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("run") / "stage2"
    varied = preset("tiny", language_model={"model_config": {"initializer_range": 0.3}})
    LlavaLiteModel.from_config(varied).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def generator(run_folder) -> Generator:
    return Generator.from_folder(run_folder, device="cpu")


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "llava_lite", *args],
        capture_output=True,
        text=True,
        input=stdin,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def test_chat_prompt_answers_once_like_the_generator(run_folder, generator):
    image = fixture_path("images", "waterview.jpg")
    result = cli("chat", "--model", str(run_folder), "--image", str(image), "--prompt", "What is this?",
                 "--max-new-tokens", "10")  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = generator.generate(
        [Conversation([Message("user", "<image>\nWhat is this?")])],
        [[Image.open(image).convert("RGB")]],
        SamplingSettings(max_new_tokens=10),
    )[0]
    assert expected and result.stdout == expected + "\n"  # the streamed pieces, as the answer: no whitespace around


def test_interactive_chat_keeps_history_changes_image_and_resets(run_folder):
    image = fixture_path("images", "waterview.jpg")
    other = fixture_path("images", "extreme_ironing.jpg")
    script = f"Hello\n/image {other}\nAnd now?\n/image missing.png\n/reset\nAgain\n/quit\n"
    result = cli("chat", "--model", str(run_folder), "--image", str(image), "--max-new-tokens", "4", stdin=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 3
    assert "will go with your next message" in result.stderr
    assert "cannot use that image" in result.stderr and "missing.png" in result.stderr
    assert "(started over)" in result.stderr


def write_questions(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_generate_answers_every_line_and_reports_bad_ones(run_folder, tmp_path):
    shutil.copyfile(fixture_path("images", "waterview.jpg"), tmp_path / "lake.jpg")
    questions = write_questions(
        tmp_path / "q.jsonl",
        [
            {"id": "a", "image": "lake.jpg", "prompt": "What is this?"},
            "{broken json",
            {"id": "b", "prompt": "Just text."},
            {"id": "c", "image": "../escape.jpg", "prompt": "Outside?"},
            {"id": "d", "messages": [{"role": "user", "content": "Hi"}]},
        ],
    )
    out = tmp_path / "answers.jsonl"
    result = cli("generate", "--model", str(run_folder), "--input", str(questions), "--output", str(out),
                 "--max-new-tokens", "4", "--batch-size", "2")  # fmt: skip
    assert result.returncode == 1  # bad lines were reported
    assert "3 answered, 0 already done, 2 bad line(s)" in result.stdout
    assert "q.jsonl line 2" in result.stderr and "q.jsonl line 4" in result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "d"]
    assert rows[0]["prompt"] == "What is this?" and isinstance(rows[0]["answer"], str)
    assert not out.with_name("answers.jsonl.partial").exists()


def test_generate_batches_give_the_same_answers_as_single_requests(generator, tmp_path):
    shutil.copyfile(fixture_path("images", "waterview.jpg"), tmp_path / "lake.jpg")
    lines = [{"id": str(i), "image": "lake.jpg", "prompt": "Describe " * (i + 1)} for i in range(5)]
    questions = write_questions(tmp_path / "q.jsonl", lines)
    settings = SamplingSettings(max_new_tokens=6)
    generate_file(generator, questions, tmp_path / "batched.jsonl", settings, batch_size=4)
    generate_file(generator, questions, tmp_path / "single.jsonl", settings, batch_size=1)
    assert (tmp_path / "batched.jsonl").read_text() == (tmp_path / "single.jsonl").read_text()


def test_generate_resumes_an_interrupted_output_without_redoing_answers(generator, tmp_path):
    questions = write_questions(tmp_path / "q.jsonl", [{"id": str(i), "prompt": f"Q{i}"} for i in range(4)])
    out = tmp_path / "answers.jsonl"
    partial = tmp_path / "answers.jsonl.partial"
    # What a killed run leaves: two finished lines and one torn in half.
    partial.write_text(
        json.dumps({"id": "0", "answer": "kept"})
        + "\n"
        + json.dumps({"id": "1", "answer": "kept"})
        + '\n{"id": "2", "ans'
    )
    report = generate_file(generator, questions, out, SamplingSettings(max_new_tokens=3))
    assert report.already_done == 2 and report.answered == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[0]["answer"] == rows[1]["answer"] == "kept"


def test_generate_refuses_to_overwrite_a_finished_output_unless_asked(generator, tmp_path):
    questions = write_questions(tmp_path / "q.jsonl", [{"id": "0", "prompt": "Q"}, {"id": "1", "prompt": "R"}])
    out = tmp_path / "answers.jsonl"
    out.write_text(json.dumps({"id": "0", "answer": "old"}) + "\n")
    with pytest.raises(FileExistsError, match="--resume"):
        generate_file(generator, questions, out, SamplingSettings(max_new_tokens=2))
    report = generate_file(generator, questions, out, SamplingSettings(max_new_tokens=2), resume=True)
    assert report.answered == 1 and json.loads(out.read_text().splitlines()[0])["answer"] == "old"
    generate_file(generator, questions, out, SamplingSettings(max_new_tokens=2), overwrite=True)
    assert json.loads(out.read_text().splitlines()[0])["answer"] != "old"


def test_chat_with_a_missing_model_folder_is_one_line(tmp_path):
    result = cli("chat", "--model", str(tmp_path / "none"), "--prompt", "hi")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "llava_lite_config.json" in result.stderr


def one_line_error(capsys, argv: list[str], *fragments: str) -> None:
    """`llava-lite ARGV` ends with exit status 2 and one error line holding every fragment."""
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith(f"llava-lite {argv[0]}: error: ")
    for fragment in fragments:
        assert fragment in error


def test_generate_checks_its_paths_before_loading_the_model(tmp_path, capsys):
    # The model folder does not exist: an error about it would mean the model was loaded first.
    questions = write_questions(tmp_path / "q.jsonl", [{"id": "0", "prompt": "Q"}])
    (tmp_path / "done.jsonl").write_text("")
    command = ["generate", "--model", str(tmp_path / "no-model"), "--input", str(questions)]
    one_line_error(capsys, [*command[:3], "--input", str(tmp_path / "none.jsonl"), "--output", "o"], "none.jsonl")
    one_line_error(capsys, [*command, "--output", str(tmp_path / "done.jsonl")], "done.jsonl exists", "--resume")
    one_line_error(capsys, [*command, "--output", str(tmp_path / "no-dir" / "a.jsonl")], "no-dir")
    no_images = ["--output", str(tmp_path / "a.jsonl"), "--image-folder", str(tmp_path / "no-images")]
    one_line_error(capsys, [*command, *no_images], "no-images")


@pytest.mark.parametrize("spelling", ["same path", "relative path", "symlink", "hard link", "partial file"])
def test_generate_never_writes_over_its_input_even_with_overwrite(tmp_path, capsys, monkeypatch, spelling):
    """The output (or the partial file it is written to first) may not be the input, however it is spelt."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    name = "answers.jsonl.partial" if spelling == "partial file" else "q.jsonl"
    questions = write_questions(tmp_path / name, [{"id": "0", "prompt": "Q"}])
    before = questions.read_bytes()
    output = {
        "same path": questions,
        "relative path": Path("sub") / ".." / "q.jsonl",
        "symlink": tmp_path / "link.jsonl",
        "hard link": tmp_path / "hard.jsonl",
        "partial file": tmp_path / "answers.jsonl",  # answers go to answers.jsonl.partial first
    }[spelling]
    if spelling == "symlink":
        output.symlink_to(questions)
    if spelling == "hard link":
        os.link(questions, output)
    command = ["generate", "--model", str(tmp_path / "no-model"), "--input", str(questions), "--output", str(output)]
    for flags in ([], ["--overwrite"], ["--resume"]):
        one_line_error(capsys, [*command, *flags], "is the input")
    assert questions.read_bytes() == before


def test_chat_checks_its_image_before_loading_the_model(tmp_path, capsys):
    chat = ["chat", "--model", str(tmp_path / "no-model"), "--prompt", "hi", "--image", str(tmp_path / "gone.png")]
    one_line_error(capsys, chat, "gone.png", "does not exist")


@pytest.mark.parametrize("bad_line", ['{"answer": "no id"}', "not json", "[1, 2]"])
def test_generate_names_a_bad_line_of_earlier_answers(generator, tmp_path, bad_line):
    questions = write_questions(tmp_path / "q.jsonl", [{"id": "0", "prompt": "Q"}, {"id": "1", "prompt": "R"}])
    out = tmp_path / "answers.jsonl"
    partial = tmp_path / "answers.jsonl.partial"
    partial.write_text(json.dumps({"id": "0", "answer": "kept"}) + "\n" + bad_line + "\n")
    with pytest.raises(ValueError, match=r"answers\.jsonl\.partial line 2: ") as error:
        generate_file(generator, questions, out, SamplingSettings(max_new_tokens=2))
    assert "\n" not in str(error.value)
    out.write_text(bad_line + "\n")  # a finished output being resumed
    partial.unlink()
    with pytest.raises(ValueError, match=r"answers\.jsonl line 1: "):
        generate_file(generator, questions, out, SamplingSettings(max_new_tokens=2), resume=True)


def test_prompt_lines_put_each_image_on_a_line_before_the_text(image_folder):
    line = json.dumps({"id": "x", "image": ["a.jpg", "b.jpg"], "prompt": "What differs?"})
    request = parse_request(line, "q.jsonl line 1", image_folder)
    assert request.conversation.messages[-1].content == "<image>\n<image>\nWhat differs?"
    assert len(request.images) == 2
