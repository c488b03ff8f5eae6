"""``hilora bench --family``: the smoke family through the CLI writes one result per cell, seed and
method, and a second run into the same folder resumes (runs only what is missing; ``--resume`` is
for single-partition reports and refused here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _bench(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HILORA_")}
    env["OMP_NUM_THREADS"] = "1"
    if "HILORA_CACHE_DIR" in os.environ:
        env["HILORA_CACHE_DIR"] = os.environ["HILORA_CACHE_DIR"]
    return subprocess.run([sys.executable, "-m", "hilora.cli", "bench", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=280, env=env, check=False)


def test_family_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "family"
    first = _bench("--family", "smoke", "--quick", "--rounds", "1/1/1", "-m", "local", "--out", str(out),
                   "--report", str(tmp_path / "family-report.json"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "\x1b[" not in first.stdout + first.stderr             # not a terminal: no progress bars
    assert json.loads((tmp_path / "family-report.json").read_text()) == json.loads((out / "family.json").read_text())
    cells = sorted(p.name for p in (out / "results").iterdir())
    assert cells == ["n20-none-1x4-d1", "n20-perm-2x3-d1"]
    assert (out / "results" / "n20-perm-2x3-d1" / "seed0" / "local.json").is_file()
    # the second run adds hilora only: local's results are found and not run again
    second = _bench("--family", "smoke", "--quick", "--rounds", "1/1/1", "-m", "local,hilora", "--out", str(out),
                    "--cells", "n20-perm-2x3-d1", "--plots", str(tmp_path / "plots"))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "cell n20-perm-2x3-d1 seed 0: hilora" in second.stderr
    assert "local: trained" not in second.stderr
    report = json.loads((out / "family.json").read_text())
    row = report["table"]["n20-perm-2x3-d1"]
    assert set(row) == {"local", "hilora"} and 0.0 <= row["hilora"]["mean"] <= 1.0
    assert row["hilora"]["k"] >= 1 and -1.0 <= row["hilora"]["ari"] <= 1.0
    assert report["complete"] == 3 and report["expected"] == 4     # the no-structure cell has no hilora yet
    assert "| n20-perm-2x3-d1 |" in second.stdout and (out / "family.md").is_file()
    assert (tmp_path / "plots" / "family_heatmap.png").read_bytes().startswith(b"\x89PNG")
    # a third run has nothing left to do for the cells it names
    third = _bench("--family", "smoke", "--quick", "--rounds", "1/1/1", "-m", "local", "--out", str(out))
    assert third.returncode == 0 and " seed 0: " not in third.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--family", "smoke"], "--family needs --out"),
    (["--family", "huge", "--out", "X"], "--family must be one of"),
    (["--family", "smoke", "--out", "X", "--partition", "demo"], "--family excludes --partition"),
    (["--family", "smoke", "--out", "X", "--cells", "n1"], "no cell 'n1'"),
    (["--cells", "n1"], "--cells and --out go with --family"),
    (["--standard", "--quick"], "--standard excludes --quick and --full"),
    (["--family", "smoke", "--out", "X", "--resume", "X"], "--family resumes from its --out folder by itself"),
])
def test_family_refuses_bad_flags(tmp_path, args, message):
    args = [str(tmp_path / a) if a == "X" else a for a in args]
    proc = _bench(*args)
    assert proc.returncode == 2 and message in proc.stderr + proc.stdout


def test_a_resumed_family_run_must_use_the_same_settings(tmp_path):
    out = tmp_path / "family"
    first = _bench("--family", "smoke", "--quick", "--rounds", "1/1/1", "-m", "local", "--out", str(out),
                   "--cells", "n20-none-1x4-d1")
    assert first.returncode == 0, first.stdout + first.stderr
    other = _bench("--family", "smoke", "--quick", "--rounds", "1/1/1", "-m", "local", "--out", str(out),
                   "--probe-loss", "ce")
    assert other.returncode == 1 and "other settings (probe_loss" in other.stderr + other.stdout
    assert len(list((out / "results").rglob("*.json"))) == 1
