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
    # a folder's probes all come from one set of bench options: other options are refused, nothing rerun
    other = subprocess.run([sys.executable, str(SCRIPT), "generate", "--family", "smoke", "--seeds", "0",
                            "--out", str(out), "--bench-args", "--probe-loss ce"], capture_output=True, text=True,
                           timeout=120)
    assert other.returncode != 0 and "generated with bench options [], not ['--probe-loss', 'ce']" in other.stderr
    assert sorted(p.parent.name for p in out.glob("*/features.safetensors")) == cells
    bad = subprocess.run([sys.executable, str(SCRIPT), "evaluate", str(tmp_path / "nothing")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "no */features.safetensors" in bad.stderr
    # K rules on the same probes: the default rule is the service's K; a rule the script does not know fails
    kr = subprocess.run([sys.executable, str(SCRIPT), "k-rules", str(out), "--rules", "best,largest:0.05,minsize:2"],
                        capture_output=True, text=True, timeout=120)
    assert kr.returncode == 0, kr.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in kr.stdout.splitlines() if line.strip()}
    assert rows["best"][-1] == "1/1"           # K = 1 on the cell without structure
    clustering_features = bench_module("clustering_features.py")
    probe = clustering_features.distance(data["rounds"][-1], "classwise-mix")
    assert clustering_features.k_rule_labels(probe, "best").max() + 1 == data["service"]["k"]
    bad_rule = subprocess.run([sys.executable, str(SCRIPT), "k-rules", str(out), "--rules", "median"],
                              capture_output=True, text=True, timeout=120)
    assert bad_rule.returncode != 0 and "unknown K rule 'median'" in bad_rule.stderr


@pytest.mark.unit
@pytest.mark.timeout(60)
def test_k_rules_on_planted_distances():
    """Three tight groups of 5, 5 and 2 points far apart: every rule but minsize:3 finds them;
    minsize:3 may not keep the pair, so it merges it; noise alone stays one cluster."""
    import numpy as np

    k_rule_labels = bench_module("clustering_features.py").k_rule_labels
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = np.concatenate([centres[g] + 0.1 * rng.standard_normal((size, 2)) for g, size in enumerate((5, 5, 2))])
    truth = np.repeat([0, 1, 2], (5, 5, 2))
    D = np.linalg.norm(points[:, None] - points[None], axis=2)
    for rule in ("best", "smallest:0.05", "largest:0.05", "knn:3", "minsize:2"):
        labels = k_rule_labels(D, rule)
        assert len(set(zip(labels, truth))) == 3 and labels.max() == 2, rule
    merged = k_rule_labels(D, "minsize:3")
    assert np.bincount(merged).min() >= 3 and merged.max() + 1 == 2
    noise = np.abs(rng.standard_normal((12, 12)))
    noise = (noise + noise.T) / 2
    np.fill_diagonal(noise, 0)
    assert k_rule_labels(1.0 + 0.01 * noise, "best").max() == 0
    with pytest.raises(ValueError, match="unknown K rule"):
        k_rule_labels(D, "median")
