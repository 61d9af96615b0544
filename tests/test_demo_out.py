"""`llava-lite demo --out`: the demo writes its data, configs and runs under fixed names, so it writes only into a
folder that is missing, empty or an earlier demo's - never into a folder of the user's, whose files it would mix
with and replace."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_lite.cli import main
from llava_lite.commands.demo import DEMO_MARKER
from llava_lite.demo import pipeline


@pytest.fixture
def demo_runs(monkeypatch) -> list[Path]:
    """The folders the demo ran in; the run itself is a stand-in (the real one trains for minutes)."""
    ran: list[Path] = []

    def run_demo(settings, log=print):
        ran.append(settings.out)
        (settings.out / "stage1.yaml").write_text("made by the demo\n")

    monkeypatch.setattr(pipeline, "run_demo", run_demo)
    monkeypatch.setattr(pipeline, "report", lambda result: "report")
    return ran


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys, demo_runs):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "stage1.yaml").write_text("my own config\n")
    assert main(["demo", "--out", str(mine)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and DEMO_MARKER in error and str(mine) in error, error
    assert demo_runs == []
    assert sorted(path.name for path in mine.iterdir()) == ["stage1.yaml"]
    assert (mine / "stage1.yaml").read_text() == "my own config\n"


def test_demo_writes_into_a_new_folder_and_again_into_its_own(tmp_path, demo_runs):
    out = tmp_path / "runs" / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    assert (out / DEMO_MARKER).is_file() and (out / "stage1.yaml").is_file()
    assert main(["demo", "--out", str(out)]) == 0  # a rerun over the demo's own folder
    assert demo_runs == [out.resolve(), out.resolve()]
