"""bench/clustering_features.py end to end on the smoke family: the probes it stores through real
bench runs are clustered offline exactly as the service clustered them."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from support import bench_module

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "clustering_features.py"


def test_generate_then_evaluate_the_smoke_family(tmp_path):
    out = tmp_path / "probes"
    gen = subprocess.run([sys.executable, str(SCRIPT), "generate", "--family", "smoke", "--seeds", "0",
                          "--out", str(out)], capture_output=True, text=True, timeout=540)
    assert gen.returncode == 0, gen.stderr[-3000:]
    cells = sorted(p.parent.name for p in out.glob("*/features.safetensors"))
    assert cells == ["n20-none-1x4-d1-s0", "n20-perm-2x3-d1-s0"]
    data = bench_module("clustering_features.py").load_features(out / "n20-perm-2x3-d1-s0")
    assert sorted(data["groups"]) == ["identity"] * 3 + ["perm-1"] * 3
    assert [r["stage"] for r in data["rounds"]][-1] == "probe" and len(data["rounds"]) == 7  # 6 root rounds, the probe
    assert data["rounds"][-1]["head_weight"].shape[:2] == (6, 10)
    ev = subprocess.run([sys.executable, str(SCRIPT), "evaluate", str(out), "--distances", "update,classwise-mix"],
                        capture_output=True, text=True, timeout=120)
    assert ev.returncode == 0, ev.stderr[-3000:]
    lines = {line.split()[0]: line for line in ev.stdout.splitlines() if line.strip()}
    assert "K = 1 (no structure)" in ev.stdout and lines["n20-none-1x4-d1-s0"].count("K1 ") == 2
    # the service clustered the same probes with its default distance, the offline classwise-mix: same K
    assert data["service"]["classwise_weight"] == 0.5
    update_k, mix_k = (int(k) for k in re.findall(r"\bK(\d+) ARI", lines["n20-perm-2x3-d1-s0"]))
    assert mix_k == data["service"]["k"] and update_k >= 1
    bad = subprocess.run([sys.executable, str(SCRIPT), "evaluate", str(tmp_path / "nothing")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "no */features.safetensors" in bad.stderr
