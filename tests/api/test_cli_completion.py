"""Shell completion (issue 19): ``hilora --show-completion`` prints a script for the shell, and the
installed ``hilora`` script answers completion requests (the ``_HILORA_COMPLETE`` protocol that
script uses) with the real commands; ``--help`` lists both options."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.api, pytest.mark.timeout(120)]

SCRIPT = shutil.which("hilora", path=str(Path(sys.executable).parent))


def _hilora(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HILORA_", "_HILORA_"))}
    full.update(env)
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=60, env=full)


@pytest.fixture(autouse=True)
def _installed():
    if SCRIPT is None:
        pytest.skip("the hilora script is not installed in this venv (pip install -e .)")


def test_help_lists_the_completion_options():
    proc = _hilora("--help")
    assert proc.returncode == 0, proc.stderr
    assert "--install-completion" in proc.stdout and "--show-completion" in proc.stdout


@pytest.mark.parametrize(("shell", "marker"), [("bash", "complete -o default -F _hilora_completion hilora"),
                                               ("zsh", "#compdef hilora"), ("fish", "complete --command hilora")])
def test_show_completion_prints_the_shell_script(shell, marker):
    # typer's own switch to name the shell instead of detecting it from the parent processes
    proc = _hilora("--show-completion", shell, _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    assert proc.returncode == 0, proc.stderr
    assert marker in proc.stdout and "_HILORA_COMPLETE" in proc.stdout, proc.stdout


def test_show_completion_detects_the_calling_shell():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on this machine")
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HILORA_", "_HILORA_", "_TYPER_"))}
    proc = subprocess.run([bash, "-c", f'"{SCRIPT}" --show-completion; true'], capture_output=True, text=True,
                          timeout=60, env=full)
    assert "complete -o default -F _hilora_completion hilora" in proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_the_script_completes_commands_and_subcommands():
    proc = _hilora(COMP_WORDS="hilora ad", COMP_CWORD="1", _HILORA_COMPLETE="complete_bash")
    assert proc.returncode == 0 and proc.stdout.split() == ["admin"], proc.stdout + proc.stderr
    proc = _hilora(COMP_WORDS="hilora admin st", COMP_CWORD="2", _HILORA_COMPLETE="complete_bash")
    assert proc.returncode == 0 and {"status", "start"} <= set(proc.stdout.split()), proc.stdout + proc.stderr
