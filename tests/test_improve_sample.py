"""`data sample`: K candidates per prompt, the same for the same seed, and a SIGKILL mid-file costs nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT
from improve_helpers import corner_prompts, read_lines, tiny_run

from llava_lite.cli import main
from llava_lite.improve.sample import SampleSettings, journal_path, sample_file
from llava_lite.inference.generator import Generator

PROMPTS = 10
BATCH = 2  # five batches: a kill at the third leaves two in the journal


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sample")
    return {"run": tiny_run(folder / "run"), **corner_prompts(folder, PROMPTS)}


def argv(setup, output, seed=0) -> list[str]:
    return [
        "data", "sample", "--model", str(setup["run"]), "--input", str(setup["prompts"]), "--output", str(output),
        "--image-folder", str(setup["images"]), "--samples", "3", "--max-new-tokens", "6", "--batch-size", str(BATCH),
        "--seed", str(seed), "--device", "cpu",
    ]  # fmt: skip


def test_the_same_seed_gives_the_same_k_candidates_and_another_seed_others(setup, tmp_path):
    generator = Generator.from_folder(setup["run"], "cpu")
    settings = SampleSettings(samples=3, max_new_tokens=6, batch_size=BATCH, seed=7)
    outputs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        settings.seed = seed
        sample_file(generator, setup["prompts"], tmp_path / f"{name}.jsonl", settings, setup["images"])
        outputs.append(read_lines(tmp_path / f"{name}.jsonl"))
    first, again, other = outputs
    assert [row["id"] for row in first] == [row["id"] for row in read_lines(setup["prompts"])]
    assert all(len(row["candidates"]) == 3 for row in first)
    assert all(row["reference"] and row["image"] for row in first)  # the input's fields travel with the samples
    assert first == again
    texts = [c["text"] for row in first for c in row["candidates"]]
    assert len(set(texts)) > 1  # sampled, not greedy
    assert texts != [c["text"] for row in other for c in row["candidates"]]
    assert not journal_path(tmp_path / "a.jsonl").exists()  # gone once the output is whole


def test_a_sigkill_mid_file_and_a_rerun_give_the_uninterrupted_output_sampling_nothing_twice(
    setup, tmp_path, capsys, monkeypatch
):
    whole = tmp_path / "whole.jsonl"
    assert main(argv(setup, whole)) == 0
    killed = tmp_path / "killed.jsonl"
    # The third batch's generation kills its own process: a real SIGKILL, at a known point in the file.
    script = (
        "import os, signal, sys\n"
        "from llava_lite.inference.generator import Generator\n"
        "original, calls = Generator.complete, []\n"
        "def complete(self, *args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return original(self, *args, **kwargs)\n"
        "Generator.complete = complete\n"
        "from llava_lite.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *argv(setup, killed)], cwd=ROOT, capture_output=True)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert not killed.exists()
    assert len(journal_path(killed).read_text().splitlines()) == 1 + 2  # the header and two whole batches

    sampled = []
    original = Generator.complete

    def counting(self, conversations, *args, **kwargs):
        sampled.extend(c.source for c in conversations)
        return original(self, conversations, *args, **kwargs)

    monkeypatch.setattr(Generator, "complete", counting)
    capsys.readouterr()
    assert main(argv(setup, killed)) == 0
    assert f"{PROMPTS - 2 * BATCH} sampled now, {2 * BATCH} already done" in capsys.readouterr().out
    assert len(sampled) == (PROMPTS - 2 * BATCH) * 3  # the prompts the journal lacked, K times each, once
    assert killed.read_bytes() == whole.read_bytes()
    assert not journal_path(killed).exists()


def test_a_finished_output_is_not_sampled_again_without_overwrite(setup, tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    output.write_text("{}\n")
    assert main(argv(setup, output)) == 2
    assert "already exists" in capsys.readouterr().err
