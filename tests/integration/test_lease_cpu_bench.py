"""Smoke run of ``bench/lease_cpu.py`` on SQLite with a few clients: a real serving coordinator,
every client leases, polls, uploads and completes once, and the bench reports the serving
process's CPU per request of each kind. No timing gates (the numbers are in docs/benchmarks.md):
the counts must be exact and the CPU figures real."""

from __future__ import annotations

import json

import pytest

from support import run_bench_script

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

def test_lease_cpu_bench_reports_every_request_kind(tmp_path):
    out = run_bench_script("lease_cpu.py", "--backend", "sqlite", "--clients", "20", "--empty-per-client", "2",
                           timeout=280)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    (res,) = json.loads(out.stdout)
    assert res["backend"] == "sqlite" and res["clients"] == 20
    # the first tenth (2 clients) warms each route up and is not counted
    assert res["granted"]["requests"] == 18 and res["empty"]["requests"] == 40
    # two thirds (14) upload and complete apart, a tenth of them (1) warming up; the last third (6)
    # uploads with the completion riding along, 1 warming up
    assert res["upload"]["requests"] == 13 and res["complete"]["requests"] == 13
    assert res["upload_complete"]["requests"] == 5
    assert res["upload"]["upload_bytes"] > 100_000          # the 1-block manifest's root tier
    for kind, key in (("granted", "cpu_ms_per_lease"), ("empty", "cpu_ms_per_lease"),
                      ("upload", "cpu_ms_per_request"), ("complete", "cpu_ms_per_request"),
                      ("upload_complete", "cpu_ms_per_request")):
        assert res[kind][key] >= 0 and res[kind]["wall_ms_per_" + key.split("_per_")[1]] > 0, kind
    # CPU is read in 10 ms ticks: one kind may round to 0, all of them together cannot (~0.3 s of work)
    total = sum(res[k]["requests"] * res[k]["cpu_ms_per_lease" if k in ("granted", "empty") else "cpu_ms_per_request"]
                for k in ("granted", "empty", "upload", "complete", "upload_complete"))
    assert total > 0 and res["healthz_cpu_ms_per_request"] >= 0
