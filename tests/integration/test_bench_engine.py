"""``hilora bench`` runs the service itself: the in-process engine (the coordinator app through
Starlette's TestClient, the worker daemon's own task runner, scheduler ticks) and the same
federations as processes over loopback HTTP give identical adapter versions and accuracies; and the
engine's numbers on the tiny partition are what the cascade is for (two planted groups, a label
permutation the root cannot serve)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from hilora.bench import run_bench
from hilora.options import RunOptions

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

PARTITION = {
    "name": "tiny-unseen", "dataset": "digits", "seed": 0, "train_per_client": 40, "test_per_client": 30,
    "dirichlet_alpha": 1.0, "unseen_fraction": 0.25,
    "groups": [{"name": "upright", "clients": 4, "transforms": []},
               {"name": "permuted", "clients": 4, "transforms": [{"kind": "permute_labels", "seed": 1}]}],
}


def _versions(workdir: Path) -> dict[str, list[tuple]]:
    """Every adapter version of every federation in a run's database: federation name ->
    [(tier, cluster label, version, sha256)]."""
    from coordinator.db import make_engine
    from coordinator.models import AdapterVersion, Cluster, Federation

    engine = make_engine(f"sqlite:///{workdir / 'coordinator.db'}")
    try:
        with engine.connect() as conn:
            names = dict(conn.execute(select(Federation.id, Federation.name)).all())
            labels = dict(conn.execute(select(Cluster.id, Cluster.label)).all())
            out: dict[str, list[tuple]] = {}
            for fid, tier, cluster_id, version, sha in conn.execute(select(
                    AdapterVersion.federation_id, AdapterVersion.tier, AdapterVersion.cluster_id,
                    AdapterVersion.version, AdapterVersion.blob_sha256)):
                out.setdefault(names[fid], []).append((tier, labels.get(cluster_id, -1), version, sha))
    finally:
        engine.dispose()
    return {k: sorted(v) for k, v in out.items()}


def _accuracies(report: dict) -> dict:
    """Every accuracy the bench reports, per method: per client and tier, the per-round curve and
    the unseen clients' numbers."""
    out = {}
    for run in report["runs"]:
        out[run["method"]] = {
            "clients": [{k: v for k, v in row.items() if k.startswith("acc") or k in ("name", "final", "cluster")}
                        for row in run["clients"]],
            "unseen": [{k: row[k] for k in ("name", "cluster", "zero_shot", "after_leaf", "acc_root")}
                       for row in run["unseen_clients"]],
            "rounds": [(r["stage"], r["stage_round"], r["mean"], r["p10"]) for r in run["rounds"]],
            "clustering": None if run["clustering"] is None else
            {k: run["clustering"][k] for k in ("k", "labels", "affinity")},
            "bytes_uploaded": run["bytes_uploaded"],
        }
    return out


def test_in_process_bench_and_http_processes_give_identical_versions_and_accuracies(tmp_path):
    import torch

    torch.set_num_threads(1)
    partition = tmp_path / "partition.json"
    partition.write_text(json.dumps(PARTITION))
    base = RunOptions(partition=str(partition), root_rounds=2, cluster_rounds=1, leaf_rounds=1,
                      unseen_leaf_rounds=1, local_epochs=1, probe_epochs=1, knn=2, k_max=4, workers=2,
                      threads=1, timeout=300)
    methods = ["hilora", "fedsa"]
    runs = {}
    for transport in ("inprocess", "http"):
        workdir = tmp_path / transport
        runs[transport] = (run_bench(replace(base, transport=transport, workdir=str(workdir)), methods, [0]),
                           _versions(workdir))
    (inproc, inproc_versions), (http, http_versions) = runs["inprocess"], runs["http"]
    assert inproc["transport"] == "inprocess" and http["transport"] == "http"
    # every adapter version of every federation, byte for byte
    assert set(inproc_versions) == {"bench-hilora-seed0", "bench-fedsa-seed0"}
    assert inproc_versions == http_versions
    hilora = inproc_versions["bench-hilora-seed0"]
    assert [v[:3] for v in hilora if v[0] == "root"] == [("root", -1, 0), ("root", -1, 1), ("root", -1, 2)]
    assert sum(1 for v in hilora if v[0] == "cluster") == 2 * 2     # two clusters, versions 0 and 1
    # every accuracy the bench reports, exactly
    assert _accuracies(inproc) == _accuracies(http)
    for name in methods:
        assert len(_accuracies(inproc)[name]["unseen"]) == 2
        assert all(row["zero_shot"] is not None for row in _accuracies(inproc)[name]["unseen"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    opts = RunOptions(partition="tiny", seed=0, root_rounds=2, cluster_rounds=2, leaf_rounds=1, unseen_leaf_rounds=1,
                      local_epochs=2, probe_epochs=2, knn=2, k_max=4,
                      workdir=str(tmp_path_factory.mktemp("tiny-bench")))
    return run_bench(opts, ["hilora", "fedit", "oracle"], [0])


def _run(report: dict, method: str) -> dict:
    return next(r for r in report["runs"] if r["method"] == method)


def test_lsac_recovers_the_two_planted_groups(tiny_run):
    clustering = _run(tiny_run, "hilora")["clustering"]
    assert clustering["planted_groups"] == 2
    assert clustering["k"] == 2
    assert clustering["ari"] == pytest.approx(1.0)
    assert clustering["contrast_ratio"] >= 1.25
    by_group: dict[str, set[int]] = {}
    for row in _run(tiny_run, "hilora")["clients"]:
        by_group.setdefault(row["group"], set()).add(row["cluster"])
    assert all(len(clusters) == 1 for clusters in by_group.values())


def test_cluster_tier_serves_the_permuted_group_that_the_root_cannot(tiny_run):
    rows = _run(tiny_run, "hilora")["clients"]
    permuted = [r for r in rows if r["group"] == "permuted"]
    upright = [r for r in rows if r["group"] == "upright"]
    # one root shared by two label maps: at least one group is served badly
    assert min(np.mean([r["acc_root"] for r in permuted]), np.mean([r["acc_root"] for r in upright])) < 0.6
    # each cluster adapter learns its own group's labels
    assert np.mean([r["acc_cluster"] for r in permuted]) > 0.75
    assert np.mean([r["acc_cluster"] for r in upright]) > 0.75


def test_tier_means_are_ordered_and_the_final_numbers_are_the_last_leaf_rounds(tiny_run):
    run = _run(tiny_run, "hilora")
    tiers = run["tiers"]
    assert tiers["root"]["n"] == tiers["cluster"]["n"] == tiers["leaf"]["n"] == 6
    assert tiers["cluster"]["mean"] > tiers["root"]["mean"] + 0.15
    assert tiers["leaf"]["mean"] >= tiers["cluster"]["mean"] - 0.03
    assert tiers["leaf"]["p10"] > tiers["root"]["p10"]
    assert run["final"]["mean"] == pytest.approx(tiers["leaf"]["mean"])
    assert run["unseen"]["zero_shot"]["n"] == 0            # tiny holds out no client
    # a curve point per training round: 2 root, 2 cluster, 1 leaf
    assert [(r["stage"], r["stage_round"]) for r in run["rounds"]] == [
        ("root", 1), ("root", 2), ("cluster", 1), ("cluster", 2), ("leaf", 1)]


def test_a_flat_method_is_scored_on_its_final_root(tiny_run):
    run = _run(tiny_run, "fedit")
    assert run["clustering"] is None and set(run["tiers"]) == {"root"}
    # 5 root rounds (the same budget), each with a measured version, the last one by the final evaluation
    assert [(r["stage"], r["stage_round"]) for r in run["rounds"]] == [("root", i) for i in range(1, 6)]
    assert run["final"]["mean"] == pytest.approx(run["rounds"][-1]["mean"])
    assert run["bytes_uploaded"] > 0


def test_oracle_runs_hilora_on_the_planted_groups(tiny_run):
    oracle, hilora = _run(tiny_run, "oracle"), _run(tiny_run, "hilora")
    assert oracle["clustering"]["clusterer"] == "manual" and oracle["clustering"]["ari"] == pytest.approx(1.0)
    assert oracle["config"]["clustering"]["assignment"] == {"permuted-00": 0, "permuted-01": 0, "permuted-02": 0,
                                                            "upright-00": 1, "upright-01": 1, "upright-02": 1}
    # LSAC found the planted groups here too: the same partition of the clients
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(oracle["clustering"]["labels"], hilora["clustering"]["labels"]) == pytest.approx(1.0)
    assert oracle["tiers"]["cluster"]["mean"] > oracle["tiers"]["root"]["mean"] + 0.15


def test_root_aggregation_converges(tiny_run):
    # rho of round 2 relative to round 1 is finite and positive: the root moved but did not blow up
    rhos = [r for r in _run(tiny_run, "hilora")["root_rho"] if r is not None]
    assert len(rhos) == 1
    assert 0.0 < rhos[0] < 5.0


def test_the_model_trained_alone_is_a_candidate_of_each_clients_choice(tmp_path):
    """training.alone_epochs (issue 14): each client trains a model alone at its first leaf task
    and chooses among root, +cluster, +leaf and that one on its held-out part; the bench reports
    the chosen model's accuracy as the final number and the alone model's as a tier."""
    import torch

    torch.set_num_threads(1)
    opts = RunOptions(partition="tiny", seed=0, root_rounds=1, cluster_rounds=1, leaf_rounds=2, unseen_leaf_rounds=1,
                      local_epochs=2, probe_epochs=2, knn=2, k_max=4, validation_fraction=0.25, alone_epochs=8,
                      workdir=str(tmp_path / "work"))
    run = _run(run_bench(opts, ["hilora"], [0]), "hilora")
    assert run["final_tier"] == "selected" and run["config"]["training"]["alone_epochs"] == 8
    assert run["tiers"]["alone"]["n"] == 6
    for row in run["clients"]:
        candidates = [row[k] for k in ("acc_root", "acc_cluster", "acc_leaf", "acc_alone")]
        assert row["final"] == row["acc_selected"] and row["acc_selected"] in candidates
        assert 0.0 <= row["acc_alone"] <= 1.0
    # a model trained alone for 8 epochs on ~30 digits learns something (chance is 0.1)
    assert run["tiers"]["alone"]["mean"] > 0.3
    assert len(list((tmp_path / "work").rglob("alone.safetensors"))) >= 6
