"""Scale harness smoke test (markers ``load`` and ``postgres``): bench/scale.py with 50 simulated
long-polling clients against a real uvicorn coordinator on a throwaway PostgreSQL database, through
3 root rounds, the probe round, the clustering and 1 cluster round. Asserts what the report says
about the run, not its speed (docs/benchmarks.md, "Scale", has the measured numbers)."""

from __future__ import annotations

import json

import pytest
from support import bench_module

pytestmark = [pytest.mark.load, pytest.mark.postgres, pytest.mark.timeout(300)]

N, ROOT_ROUNDS, CLUSTER_ROUNDS, GROUPS = 50, 3, 1, 4


def test_scale_harness_on_postgres(pg_server, tmp_path):
    url = pg_server.create_database()
    try:
        report = bench_module("scale.py").run(
            N, database_url=url, workdir=tmp_path / "scale", root_rounds=ROOT_ROUNDS, cluster_rounds=CLUSTER_ROUNDS,
            groups=GROUPS, wait=10.0, connections=1000, clustering_timeout=120.0, max_seconds=240.0,
            pg_server=pg_server)
    finally:
        pg_server.drop_database(url)
    print(json.dumps({k: report.get(k) for k in ("summary", "lease_latency_ms", "clustering", "rss_mb",
                                                 "wall_seconds", "problems")}))
    assert report["problems"] == [], report["problems"]
    assert report["backend"] == "postgres" and report["outcome"]["finished"]

    rounds = report["rounds"]
    root = [r for r in rounds if r["stage"] == "root"]
    probe = [r for r in rounds if r["stage"] == "probe"]
    cluster = [r for r in rounds if r["stage"] == "cluster"]
    # every round of the run closed, aggregated (root, cluster) or clustered (probe)
    assert [r["status"] for r in rounds] == ["done"] * len(rounds)
    assert [r["number"] for r in root] == list(range(1, ROOT_ROUNDS + 1))
    assert len(probe) == 1
    # every client leased, uploaded and completed in each root round and the probe round
    for r in root + probe:
        assert r["tasks"] == r["done"] == r["clients_leased"] == N, r
        assert 0 <= r["leasing_s"] <= r["uploads_s"] <= r["done_s"], r
    for r in root:
        assert r["aggregation_s"] is not None and r["aggregation_s"] > 0
        assert r["round_s"] >= r["done_s"] and r["close_s"] >= 0, r  # the next round opened after
    # the clustering found the planted groups, and each cluster ran its round
    clustering = report["clustering"]
    assert not clustering["timed_out"] and clustering["seconds_metric"] > 0
    assert clustering["k"] == GROUPS and clustering["ari_vs_planted"] in (None, 1.0)
    assert sorted({r["scope"] for r in cluster}) == sorted(f"cluster:{i}" for i in {
        int(r["scope"].split(":")[1]) for r in cluster}) and len(cluster) == GROUPS * CLUSTER_ROUNDS
    assert sum(r["clients_leased"] for r in cluster) == N

    # lease latency percentiles, measured by the simulated workers, are ordered
    for stage in ("root", "probe", "cluster", "all"):
        lat = report["lease_latency_ms"][stage]
        assert lat["n"] > 0 and 0 <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"], (stage, lat)
    assert report["lease_latency_ms"]["root"]["n"] == N * ROOT_ROUNDS
    granted = report["server_lease_seconds"]["granted"]
    assert granted["n"] >= N * (ROOT_ROUNDS + 1) and granted["p50_le_s"] <= granted["p99_le_s"]

    # coordinator CPU per lease (and Postgres CPU) over the root rounds; RSS sampled
    phase = report["phases"]["root"]
    assert phase["lease_requests"] >= N * ROOT_ROUNDS and phase["grants"] == N * ROOT_ROUNDS
    assert phase["coordinator_cpu_ms_per_lease"] > 0 and phase["coordinator_cpu_ms_per_task"] > 0
    assert phase["postgres_cpu_s"] is not None and phase["postgres_cpu_s"] >= 0
    assert report["rss_mb"]["hwm"] > 0 and report["phases"]["clustering"]["rss_peak_mb"] > 0
    # the probe uploads are on disk (the blobs are removed after the run)
    upload = report["disk"]["mean_upload_bytes"]
    assert report["disk"]["uploads_mb_by_stage"]["probe"] * 2**20 == pytest.approx(N * upload, rel=0.01)
    assert report["requests"]["statuses"].get("lease 200", 0) == report["requests"]["lease"]
