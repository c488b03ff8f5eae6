"""bench/gpu_check.py, the unattended GPU check of issue 17, runs here as its CPU smoke version (no
GPU in CI): every contender and precision is timed and the worker's training function runs; without
--cpu-smoke and without a GPU it refuses in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.unit, pytest.mark.timeout(180)]

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=170,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_the_cpu_smoke_version_times_every_contender_and_the_worker_path():
    proc = run("--cpu-smoke", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(r["contender"], r["precision"]) for r in report["results"]] == [
        (c, p) for c in ("fused", "fused-qkv", "peft") for p in ("fp32", "bf16")]
    assert all(r["images_per_s"] > 0 and r["peak_gib"] is None for r in report["results"])
    assert set(report["fused_qkv_over_peft"]) == {"fp32", "bf16"} and all(
        v > 0 for v in report["reduced_over_fp32"].values())
    smoke = report["smoke"]
    assert smoke["precision"] == "fp32" and smoke["steps"] == 8 and smoke["train_loss"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the real check would run")
def test_without_a_gpu_the_check_refuses_in_one_line():
    proc = run("--quick")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith("error: no CUDA device") and "--cpu-smoke" in proc.stderr
