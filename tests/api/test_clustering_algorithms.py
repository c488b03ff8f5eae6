"""Every ``clustering.algorithm`` (lsac, kmeans-flat, lsac-paper) run by the coordinator on
simulated clients with two planted groups: the clusters, the late clients' assignment, the admin's
recluster, lsac-paper's EMA of the root-stage B (table client_features) against a slow reference,
its survival through garbage collection and its removal with the client; and refused settings."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import admin_headers, create_federation, register, tick, tiny_config, upload_backbone
from sqlalchemy import func, select
from test_cascade_state_machine import group_directions, run_pending

from coordinator.models import Blob, ClientFeature, Client, ClusteringRun, Round, Task
from coordinator.services.retention import collect_garbage
from shared.config import FederationConfig
from shared.manifest import AdapterManifest
from shared.probes import factor_pairs
from shared.subspace import (
    gram_kmeans_labels,
    lsac_paper,
    subspace_distance,
    top_left_singular_vectors,
    update_gram,
)
from shared.tensors import unpack_tensors

pytestmark = pytest.mark.api

ALGORITHMS = ["lsac", "kmeans-flat", "lsac-paper"]
# Unequal groups: with equal ones the paper's median-sigma kernel (lsac-paper) takes sigma from a
# between-group distance and picks K = 1 on any two clean groups (docs/method.md, "LSAC").
GROUP_OF = {"a0": 0, "a1": 0, "a2": 0, "a3": 0, "a4": 0, "b0": 1, "b1": 1}
LATE_GROUP = {"a-late": 0, "b-late": 1}
SCHEDULE = {"min_clients": 7, "root_rounds": 3, "cluster_rounds": 1, "leaf_rounds": 1, "unseen_leaf_rounds": 1}
N = len(GROUP_OF)


def status(api, fid: int) -> dict:
    return api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()


def partition(members_by_cluster) -> list[list[str]]:  # noqa: ANN001
    return sorted(sorted(m) for m in members_by_cluster)


PLANTED = [["a0", "a1", "a2", "a3", "a4"], ["b0", "b1"]]


def run_all(api, clients, dirs, seed: int, groups=GROUP_OF) -> list[dict]:  # noqa: ANN001
    """Every client runs its pending task, each with its own noise (seed, client index)."""
    ran = []
    for i, name in enumerate(sorted(clients)):
        ran += run_pending(api, {name: clients[name]}, dirs, seed=1000 * seed + i, groups=groups)
    return ran


def start(api, app, algorithm: str, **clustering):  # noqa: ANN201
    fid, secret = create_federation(api, schedule=SCHEDULE,
                                    clustering={"algorithm": algorithm, "k_max": 4, "knn": 2, **clustering})
    clients = {name: register(api, fid, secret, name) for name in GROUP_OF}
    tick(app)
    return fid, secret, clients


def config_of(app, fid: int) -> FederationConfig:
    from coordinator.models import Federation

    with app.state.session_factory() as s:
        return FederationConfig.model_validate(s.get(Federation, fid).config)


def blob_tensors(app, sha: str) -> dict[str, np.ndarray]:
    return unpack_tensors(app.state.blobs.get_bytes(sha))


def slow_normalised_b(manifest: AdapterManifest, upload: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """B / ||B||_F per target, the norm summed element by element in Python floats."""
    out = {}
    for t in manifest.targets:
        b = np.asarray(upload[f"{t.name}.lora_B"], dtype=np.float64)
        norm = sum(float(x) ** 2 for x in b.ravel()) ** 0.5
        out[t.name] = b / norm
    return out


def reference_emas(app, fid: int, manifest: AdapterManifest, lam: float) -> dict[int, tuple[int, dict]]:
    """client id -> (rounds, EMA) recomputed from the stored root-round uploads, round by round."""
    with app.state.session_factory() as s:
        rounds = list(s.scalars(select(Round).where(Round.federation_id == fid, Round.stage == "root",
                                                    Round.status == "done").order_by(Round.number)))
        uploads = [[(t.client_id, t.upload_sha256) for t in s.scalars(
            select(Task).where(Task.round_id == r.id, Task.status == "done").order_by(Task.client_id))]
            for r in rounds]
    ema: dict[int, tuple[int, dict]] = {}
    for per_round in uploads:
        for cid, sha in per_round:
            b = slow_normalised_b(manifest, blob_tensors(app, sha))
            if cid not in ema:
                ema[cid] = (1, b)
            else:
                n, previous = ema[cid]
                ema[cid] = (n + 1, {k: lam * previous[k] + (1 - lam) * b[k] for k in b})
    return ema


def stored_emas(app, fid: int) -> dict[int, tuple[int, str]]:
    with app.state.session_factory() as s:
        return {f.client_id: (f.rounds, f.blob_sha256) for f in s.scalars(
            select(ClientFeature).where(ClientFeature.federation_id == fid, ClientFeature.kind == "root_b_ema"))}


def expected_partition(app, fid: int, cfg: FederationConfig) -> list[list[str]]:
    """The partition the bench's code path gives on the same inputs (hilora/bench.py run_method)."""
    with app.state.session_factory() as s:
        probe = s.scalars(select(Round).where(Round.federation_id == fid, Round.stage == "probe",
                                              Round.scope == "all", Round.status == "done")).one()
        from coordinator.models import AdapterVersion

        root = blob_tensors(app, s.get(AdapterVersion, probe.input_root_version_id).blob_sha256)
        tasks = [(s.get(Client, t.client_id).name, t.client_id, t.upload_sha256) for t in s.scalars(
            select(Task).where(Task.round_id == probe.id, Task.status == "done").order_by(Task.client_id))]
    c = cfg.clustering
    if c.algorithm == "lsac-paper":
        emas = stored_emas(app, fid)
        r = cfg.manifest.tiers["root"].rank
        bases = [{k: top_left_singular_vectors(np.asarray(v, np.float64), r)
                  for k, v in blob_tensors(app, emas[cid][1]).items()} for _, cid, _ in tasks]
        labels = lsac_paper(subspace_distance(bases), k_min=c.k_min, k_max=c.k_max, seed=c.seed).labels
    else:
        probes = [blob_tensors(app, sha) for _, _, sha in tasks]
        gram = update_gram([factor_pairs(cfg.manifest, p) for p in probes], factor_pairs(cfg.manifest, root))
        labels = gram_kmeans_labels(gram, 2, seed=c.seed)
    groups: dict[int, list[str]] = {}
    for (name, _, _), label in zip(tasks, labels):
        groups.setdefault(int(label), []).append(name)
    return partition(groups.values())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_finds_the_planted_groups_places_late_clients_and_reclusters(api, app, algorithm):
    dirs = group_directions()
    fid, secret, clients = start(api, app, algorithm)
    for r in range(SCHEDULE["root_rounds"]):
        ran = run_all(api, clients, dirs, seed=r)
        assert {t["stage"] for t in ran} == {"root"} and len(ran) == N
    assert status(api, fid)["state"] == "probe"
    run_all(api, clients, dirs, seed=10)
    s = status(api, fid)
    assert s["state"] == "cluster" and s["clustering"]["k"] == 2
    assert partition(c["members"] for c in s["clusters"]) == PLANTED
    cfg = config_of(app, fid)
    if algorithm != "lsac":  # the bench's code path on the same inputs gives the same partition
        assert expected_partition(app, fid, cfg) == PLANTED
    with app.state.session_factory() as session:
        run = session.scalars(select(ClusteringRun).where(ClusteringRun.federation_id == fid)).one()
        assert (run.algorithm, run.features, run.k, run.num_clients) == (algorithm, "update", 2, N)
        assert run.affinity_sha256 is not None
        features = session.scalar(select(func.count()).select_from(ClientFeature)) or 0
    assert features == (N if algorithm == "lsac-paper" else 0)  # only lsac-paper keeps an EMA
    run_all(api, clients, dirs, seed=20)  # cluster round
    run_all(api, clients, dirs, seed=30)  # leaf round
    assert status(api, fid)["state"] == "serving"

    late = {name: register(api, fid, secret, name) for name in LATE_GROUP}
    tick(app)
    ran = run_all(api, late, dirs, seed=40, groups=LATE_GROUP)
    assert [t["stage"] for t in ran] == ["probe", "probe"]
    ran = run_all(api, late, dirs, seed=41, groups=LATE_GROUP)
    assert [t["stage"] for t in ran] == ["leaf", "leaf"]
    s = status(api, fid)
    assert partition(c["members"] for c in s["clusters"]) == [["a-late", *PLANTED[0]], ["b-late", *PLANTED[1]]]
    assert s["onboarding_pending"] == 0

    # the admin's recluster reruns the same algorithm: same partition, nobody moves
    r = api.post(f"/v1/federations/{fid}/recluster", json={"reason": algorithm}, headers=admin_headers())
    assert r.status_code == 200, r.text
    assert r.json()["run"]["k"] == 2 and r.json()["moves"] == [] and r.json()["clusters_kept"] == [0, 1]
    with app.state.session_factory() as session:
        runs = list(session.scalars(select(ClusteringRun).where(ClusteringRun.federation_id == fid)))
    assert [x.algorithm for x in runs] == [algorithm, algorithm]
    # a forced K is honoured by every algorithm
    r = api.post(f"/v1/federations/{fid}/recluster", json={"force_k": 3}, headers=admin_headers())
    assert r.status_code == 200, r.text
    assert r.json()["run"]["k"] == 3 and len(r.json()["clusters_created"]) == 1


def test_lsac_paper_keeps_the_ema_of_each_clients_unit_norm_root_b(api, app, clock):
    lam = 0.7
    dirs = group_directions()
    fid, _secret, clients = start(api, app, "lsac-paper", ema=lam)
    cfg = config_of(app, fid)
    ids = {name: cid for name, (cid, _token) in clients.items()}
    for r in range(SCHEDULE["root_rounds"]):
        run_all(api, clients, dirs, seed=r)
        stored = stored_emas(app, fid)
        assert sorted(stored) == sorted(ids.values()) and {n for n, _ in stored.values()} == {r + 1}
        reference = reference_emas(app, fid, cfg.manifest, lam)
        for cid, (rounds, sha) in stored.items():
            assert rounds == reference[cid][0]
            ema = blob_tensors(app, sha)
            assert sorted(ema) == sorted(t.name for t in cfg.manifest.targets)
            for name, value in reference[cid][1].items():
                np.testing.assert_allclose(ema[name], value, rtol=1e-5, atol=1e-6)
        with app.state.session_factory() as s:
            kinds = {b.sha256: b.kind for b in s.scalars(select(Blob))}
        assert all(kinds[sha] == "client_feature" for _, sha in stored.values())
        clock.advance(10)
    assert status(api, fid)["state"] == "probe"

    # garbage collection with no retention: the root uploads and the superseded EMAs go, the
    # current EMAs stay (rows and files)
    current = {sha for _, sha in stored_emas(app, fid).values()}
    report = collect_garbage(app.state.session_factory, app.state.blobs, clock(), retention_seconds=0,
                             grace_seconds=0)
    assert report.uploads_released == N * SCHEDULE["root_rounds"]
    with app.state.session_factory() as s:
        left = set(s.scalars(select(Blob.sha256).where(Blob.kind == "client_feature")))
    assert left == current and len(current) == N
    assert all(app.state.blobs.exists(sha) for sha in current)
    assert report.blobs_deleted == N * SCHEDULE["root_rounds"] + N * (SCHEDULE["root_rounds"] - 1)

    # lsac-paper clusters on the kept EMAs (the root uploads are gone)
    run_all(api, clients, dirs, seed=10)
    s = status(api, fid)
    assert s["state"] == "cluster" and partition(c["members"] for c in s["clusters"]) == PLANTED
    assert expected_partition(app, fid, cfg) == PLANTED
    clock.advance(10)
    collect_garbage(app.state.session_factory, app.state.blobs, clock(), retention_seconds=0, grace_seconds=0)
    r = api.post(f"/v1/federations/{fid}/recluster", headers=admin_headers())
    assert r.status_code == 200, r.text
    assert r.json()["moves"] == [] and r.json()["run"]["k"] == 2

    # deleting a client deletes its EMA row, and its blob is freed
    sha = stored_emas(app, fid)[ids["a0"]][1]
    r = api.delete(f"/v1/federations/{fid}/clients/{ids['a0']}", headers=admin_headers())
    assert r.status_code == 200, r.text
    assert ids["a0"] not in stored_emas(app, fid) and len(stored_emas(app, fid)) == N - 1
    with app.state.session_factory() as s:
        assert s.get(Blob, sha) is None
    assert not app.state.blobs.exists(sha)


@pytest.mark.parametrize("clustering, root, expected", [
    ({"algorithm": "spectral"}, None, "clustering.algorithm"),
    ({"algorithm": "lsac-paper", "ema": 1.0}, None, "clustering.ema"),
    ({"ema": -0.1}, None, "clustering.ema"),
    ({"algorithm": "lsac-paper"}, {"B": "local", "aggregation": "factor_avg"}, "root.B is 'aggregate'"),
])
def test_bad_clustering_settings_are_refused_on_create(api, clustering, root, expected):
    sha = upload_backbone(api)
    config = tiny_config("bad", sha, clustering=clustering)
    if root is not None:
        config["root"] = root
    r = api.post("/v1/federations", json={"config": config}, headers=admin_headers())
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_request" and expected in r.json()["detail"], r.text
    assert api.get("/v1/federations", headers=admin_headers()).json() == []


def test_manual_clustering_takes_the_admins_labels_and_places_the_rest_by_probe(api, app):
    """'manual': the named clients get the given labels (which become the clusters' labels); b1,
    not named, and the late b-late join the named cluster their probe is closest to; a-late, named,
    joins its label's cluster directly."""
    dirs = group_directions()
    assignment = {"a0": 5, "a1": 5, "a2": 5, "a3": 5, "a4": 5, "b0": 7, "a-late": 5}
    fid, secret, clients = start(api, app, "manual", assignment=assignment)
    for r in range(SCHEDULE["root_rounds"]):
        run_all(api, clients, dirs, seed=r)
    run_all(api, clients, dirs, seed=10)
    s = status(api, fid)
    assert s["state"] == "cluster" and s["clustering"]["k"] == 2
    assert {c["label"]: sorted(c["members"]) for c in s["clusters"]} == {5: PLANTED[0], 7: PLANTED[1]}
    with app.state.session_factory() as session:
        run = session.scalars(select(ClusteringRun).where(ClusteringRun.federation_id == fid)).one()
        assert (run.algorithm, run.k, run.num_clients) == ("manual", 2, N) and run.affinity_sha256 is not None
    run_all(api, clients, dirs, seed=20)
    run_all(api, clients, dirs, seed=30)
    late = {name: register(api, fid, secret, name) for name in LATE_GROUP}
    tick(app)
    run_all(api, late, dirs, seed=40, groups=LATE_GROUP)
    run_all(api, late, dirs, seed=41, groups=LATE_GROUP)
    s = status(api, fid)
    assert {c["label"]: sorted(c["members"]) for c in s["clusters"]} == {
        5: sorted(["a-late", *PLANTED[0]]), 7: sorted(["b-late", *PLANTED[1]])}
    unseen = {u["name"]: u for u in api.get(f"/v1/federations/{fid}/unseen-clients", headers=admin_headers()).json()}
    assert unseen["a-late"]["similarity"] is None            # named: no probe comparison
    assert unseen["b-late"]["similarity"] is not None        # placed by its probe
    # an admin's recluster keeps the manual clusters: nobody moves
    r = api.post(f"/v1/federations/{fid}/recluster", json={"reason": "manual"}, headers=admin_headers())
    assert r.status_code == 200, r.text
    assert r.json()["moves"] == [] and r.json()["clusters_kept"] == [5, 7]


@pytest.mark.parametrize("clustering, expected", [
    ({"algorithm": "manual"}, "needs an assignment"),
    ({"algorithm": "manual", "assignment": {}}, "needs an assignment"),
    ({"algorithm": "manual", "assignment": {"a0": -1}}, "labels must be integers"),
    ({"algorithm": "manual", "assignment": {"a0": "x"}}, "clustering.assignment"),
    ({"assignment": {"a0": 0}}, "only for algorithm 'manual'"),
])
def test_bad_manual_assignments_are_refused_on_create(api, clustering, expected):
    sha = upload_backbone(api)
    r = api.post("/v1/federations", json={"config": tiny_config("bad", sha, clustering=clustering)},
                 headers=admin_headers())
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_request" and expected in r.json()["detail"], r.text


def test_above_approximate_above_lsac_takes_its_approximate_path(api, app):
    """7 clients > approximate_above = 3: the probes are sketched from their memory-mapped blobs and
    clustered on a sparse kNN graph; the planted groups come out as with the exact path, and the
    run keeps no dense matrix (the dashboard's affinity view says so)."""
    dirs = group_directions()
    fid, secret, clients = start(api, app, "lsac", approximate_above=3)
    for r in range(SCHEDULE["root_rounds"]):
        run_all(api, clients, dirs, seed=r)
    run_all(api, clients, dirs, seed=10)
    s = status(api, fid)
    assert s["state"] == "cluster" and s["clustering"]["k"] == 2
    assert partition(c["members"] for c in s["clusters"]) == PLANTED
    with app.state.session_factory() as session:
        run = session.scalars(select(ClusteringRun).where(ClusteringRun.federation_id == fid)).one()
        assert (run.algorithm, run.k, run.num_clients, run.affinity_sha256) == ("lsac", 2, N, None)
    r = api.get(f"/v1/federations/{fid}/clustering-runs/{run.id}/affinity", headers=admin_headers())
    assert r.status_code == 404 and r.json()["error"] == "affinity_not_found"


def test_other_algorithms_are_refused_above_approximate_above(api, app):
    r = api.post("/v1/federations", headers=admin_headers(), json={"config": tiny_config(
        "big", upload_backbone(api), schedule=SCHEDULE, clustering={"algorithm": "kmeans-flat", "approximate_above": 5})})
    assert r.status_code == 422 and "approximate_above" in r.text and "'lsac'" in r.text
    # fewer clients expected than the limit, but more came: the clustering itself refuses, in one line
    dirs = group_directions()
    fid, secret = create_federation(api, schedule={**SCHEDULE, "min_clients": 3},
                                    clustering={"algorithm": "kmeans-flat", "k_max": 4, "knn": 2,
                                                "approximate_above": 5})
    clients = {name: register(api, fid, secret, name) for name in GROUP_OF}
    tick(app)
    for r in range(SCHEDULE["root_rounds"]):
        run_all(api, clients, dirs, seed=r)
    run_all(api, clients, dirs, seed=10)
    s = status(api, fid)
    assert s["state"] == "probe" and "approximate_above = 5" in (s["last_failure"] or "")
