"""The README's test command on a machine without Chromium: `tools/test.sh` installs Debian's chromium with
apt-get, or fails in one line saying how to get it - never a silent skip. apt-get is a stand-in here."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SCRIPT = ROOT / "tools" / "test.sh"


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def run_script(tmp_path: Path, path_dirs: list[Path], *args: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": os.pathsep.join(str(d) for d in path_dirs),
        "LLAVA_LITE_CHROMIUM": str(tmp_path / "browser" / "chromium"),  # not there: a machine without it
        "TMPDIR": str(tmp_path),
        "HOME": str(tmp_path),
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )


def tools_dir(tmp_path: Path, sudo: bool = False) -> Path:
    """A PATH folder with only what the script itself calls, and this Python: no apt-get; with `sudo`, a
    password-less sudo (a stand-in that runs the command as it is), so the tests also pass when not run as root."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("bash", "dirname", "id", "tail", "env", "mkdir", "chmod"):  # the last two for apt-get stand-ins
        (folder / tool).symlink_to(shutil.which(tool))
    (folder / "python").symlink_to(sys.executable)
    if sudo:
        executable(folder / "sudo", '#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n')
    return folder


def test_the_readme_test_command_is_the_script_and_ci_runs_it_as_written():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert len(commands) == 2  # install and demo; the tests
    assert commands[1] == ". .venv/bin/activate && tools/test.sh"
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci_lines


def test_without_chromium_it_installs_debians_package_then_runs_pytest(tmp_path):
    tools = tools_dir(tmp_path, sudo=True)
    calls = tmp_path / "apt-calls"
    browser = tmp_path / "browser" / "chromium"
    executable(
        tools / "apt-get",
        f'#!/bin/sh\necho "$@" >> {calls}\n'
        f'if [ "$1" = install ]; then mkdir -p {browser.parent} && printf "#!/bin/sh\\n" > {browser} '
        f"&& chmod +x {browser}; fi\n",
    )
    result = run_script(tmp_path, [tools], "--version")
    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == ["update -qq", "install -y -qq chromium"]
    assert "installing Debian's chromium" in result.stdout
    assert "pytest" in result.stdout + result.stderr  # then it ran pytest with the arguments given


def test_when_apt_get_fails_it_says_why_and_how_in_one_line(tmp_path):
    tools = tools_dir(tmp_path, sudo=True)
    failing = '#!/bin/sh\n[ "$1" = update ] && exit 0\necho "E: Unable to locate package chromium"\nexit 100\n'
    executable(tools / "apt-get", failing)
    result = run_script(tmp_path, [tools])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("tools/test.sh: error: apt-get could not install chromium")
    assert "E: Unable to locate package chromium" in result.stderr
    assert "sudo apt-get install chromium" in result.stderr and "LLAVA_LITE_CHROMIUM" in result.stderr


def test_without_apt_get_it_says_how_to_get_chromium_in_one_line(tmp_path):
    result = run_script(tmp_path, [tools_dir(tmp_path)])
    assert result.returncode == 2
    assert result.stderr == (
        f"tools/test.sh: error: the chat-page test needs Chromium at {tmp_path / 'browser' / 'chromium'} and there is "
        "no apt-get here to install it; install Debian's chromium (sudo apt-get install chromium) or set "
        "LLAVA_LITE_CHROMIUM to a Chromium binary\n"
    )
