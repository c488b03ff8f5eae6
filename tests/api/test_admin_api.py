"""The operator's view (coordinator/routes_admin.py): every admin JSON endpoint of /dashboard, and
the recluster action, on a federation run by the in-process fake workers (tests/support)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import admin_headers, bearer, create_federation, register, tick
from sqlalchemy import select
from test_cascade_state_machine import GROUP_OF, group_directions, run_pending
from test_fake_worker import ThroughTestClient

from coordinator.models import Assignment, AuditEvent, Client, Cluster, ClusteringRun, Round, Task
from support.fake_worker import FakeWorker
from shared.schemas import TaskStatus

pytestmark = pytest.mark.api

TRAIN = ["a", "b", "c", "d", "e", "f"]
LATE = ["late-1", "late-2"]


def get(api, path: str, **params):
    r = api.get(path, headers=admin_headers(), params=params)
    assert r.status_code == 200, (path, r.text)
    return r.json()


def run_fake_workers(api, app, fid: int, secret: str, hosts: list[list[str]], prefix: str = "w",
                     ticker=tick) -> None:  # noqa: ANN001
    """Fake workers in threads over the in-process app until each hosted client is ready; the test
    thread runs the scheduler (``ticker(app)``) meanwhile."""
    workers = [FakeWorker(coordinator=str(api.base_url), federation_id=fid, secret=secret, clients=names,
                          max_seconds=60, poll_interval=0.01, emit=lambda _e: None, transport=ThroughTestClient(api),
                          worker_id=f"{prefix}{i}") for i, names in enumerate(hosts)]
    codes: dict[int, int] = {}
    threads = [threading.Thread(target=lambda i=i, w=w: codes.__setitem__(i, w.run()), daemon=True)
               for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(t.is_alive() for t in threads):
            ticker(app)
            time.sleep(0.02)
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(timeout=10)
    assert codes == {i: 0 for i in range(len(workers))}, codes


def serving_federation(api, app, late: list[str] = LATE, ticker=tick) -> tuple[int, str]:  # noqa: ANN001
    fid, secret = create_federation(api, schedule={"min_clients": len(TRAIN), "root_rounds": 2, "cluster_rounds": 1,
                                                   "leaf_rounds": 1, "unseen_leaf_rounds": 1},
                                    clustering={"k_min": 2, "k_max": 3, "knn": 2})
    run_fake_workers(api, app, fid, secret, [TRAIN[:3], TRAIN[3:]], ticker=ticker)
    if late:
        run_fake_workers(api, app, fid, secret, [late], prefix="late", ticker=ticker)
    return fid, secret


ROUTES = ["/v1/overview", "/v1/federations/{fid}/timeline", "/v1/federations/{fid}/clusters",
          "/v1/federations/{fid}/clustering-runs", "/v1/federations/{fid}/clustering-runs/1/affinity",
          "/v1/federations/{fid}/assignment-moves", "/v1/federations/{fid}/accuracy", "/v1/federations/{fid}/clients",
          "/v1/federations/{fid}/workers", "/v1/federations/{fid}/unseen-clients"]


def test_admin_routes_need_the_admin_token_and_name_what_is_missing(api, app):
    fid, secret = create_federation(api)
    _cid, client_token = register(api, fid, secret, "a")
    calls = [("GET", path.format(fid=fid)) for path in ROUTES] + [("POST", f"/v1/federations/{fid}/recluster")]
    for method, path in calls:
        r = api.request(method, path)
        assert r.status_code == 401 and r.json()["error"] == "missing_token", (path, r.text)
        for token in ("wrong-token-0123456789abcdef", client_token):
            r = api.request(method, path, headers=bearer(token))
            assert r.status_code == 401 and r.json()["error"] == "bad_admin_token", (path, r.text)
    for method, path in calls[1:]:
        r = api.request(method, path.replace(f"/federations/{fid}/", "/federations/999/"), headers=admin_headers())
        assert r.status_code == 404 and r.json()["error"] == "federation_not_found", (path, r.text)
    r = api.get(f"/v1/federations/{fid}/clustering-runs/1/affinity", headers=admin_headers())
    assert r.status_code == 404 and r.json()["error"] == "run_not_found"
    # before any probe round there is nothing to recluster; bad overrides are refused
    r = api.post(f"/v1/federations/{fid}/recluster", headers=admin_headers())
    assert r.status_code == 409 and r.json()["error"] == "no_probe_round"
    for body in ({"force_k": 0}, {"features": "pixels"}, {"knn": -1}, {"surprise": 1}):
        r = api.post(f"/v1/federations/{fid}/recluster", json=body, headers=admin_headers())
        assert r.status_code == 422, (body, r.text)
    # an empty federation reads as empty, not as an error
    assert get(api, f"/v1/federations/{fid}/clusters") == []
    assert get(api, f"/v1/federations/{fid}/clustering-runs") == []
    assert get(api, f"/v1/federations/{fid}/assignment-moves") == []
    assert get(api, f"/v1/federations/{fid}/accuracy") == {"steps": [], "latest": {}, "clients": []}
    assert get(api, f"/v1/federations/{fid}/workers") == {"workers": [], "leases": [], "failures": []}
    assert get(api, f"/v1/federations/{fid}/unseen-clients") == []
    timeline = get(api, f"/v1/federations/{fid}/timeline")
    assert [s["stage"] for s in timeline["stages"]] == ["enrolling"] and timeline["stages"][0]["ended_at"] is None
    [overview] = get(api, "/v1/overview")
    assert overview["state"] == "enrolling" and overview["clients_total"] == 1 and overview["current_round"] is None
    spec = api.get("/openapi.json").json()
    for path in ROUTES:
        assert path.replace("{fid}", "{federation_id}").replace("/1/", "/{run_id}/") in spec["paths"], path
    assert "/v1/federations/{federation_id}/recluster" in spec["paths"]


def test_the_operator_view_of_a_whole_cascade(api, app, clock):
    fid, _secret = serving_federation(api, app)
    with app.state.session_factory() as s:
        run = s.scalars(select(ClusteringRun)).one()
        tasks = list(s.scalars(select(Task).order_by(Task.id)))
        rounds = list(s.scalars(select(Round).order_by(Round.id)))
        clients = {c.id: c for c in s.scalars(select(Client))}
        labels = {c.id: c.label for c in s.scalars(select(Cluster))}
    by_name = {c.name: c for c in clients.values()}

    [overview] = get(api, "/v1/overview")
    assert overview["state"] == "serving" and overview["paused_at"] is None
    assert (overview["clients_total"], overview["clients_online"], overview["online_window_seconds"]) == (8, 8, 60)
    assert overview["k"] == run.k >= 2 and overview["open_rounds"] == 0 and overview["tasks_total"] == 0
    assert overview["last_aggregation_at"] is not None
    clock.advance(61)  # two lease lifetimes without a word: nobody is online
    assert get(api, "/v1/overview")[0]["clients_online"] == 0

    timeline = get(api, f"/v1/federations/{fid}/timeline")
    assert [s["stage"] for s in timeline["stages"]] == ["enrolling", "root", "probe", "cluster", "leaf", "serving"]
    assert all(s["ended_at"] for s in timeline["stages"][:-1]) and timeline["stages"][-1]["ended_at"] is None
    root_span = timeline["stages"][1]
    assert (root_span["rounds_done"], root_span["rounds_failed"]) == (2, 0)
    # while serving: each late client's probe and leaf round; no evaluation round, since the leaf
    # round that ended training evaluated every final version after training
    assert timeline["stages"][-1]["rounds_done"] == 2 * len(LATE)
    assert not [r for r in timeline["rounds"] if r["stage"] == "eval"]
    assert timeline["rounds_total"] == len(rounds) and [r["id"] for r in timeline["rounds"]] == [r.id for r in reversed(rounds)]
    first = timeline["rounds"][-1]
    assert first["stage"] == "root" and first["status"] == "done" and first["tasks_done"] == len(TRAIN)
    assert first["duration_seconds"] == (rounds[0].closed_at - rounds[0].created_at).total_seconds()
    assert len(get(api, f"/v1/federations/{fid}/timeline", limit=3)["rounds"]) == 3

    clusters = get(api, f"/v1/federations/{fid}/clusters")
    assert len(clusters) == run.k and sum(c["size"] for c in clusters) == len(TRAIN) + len(LATE)
    for c in clusters:
        assert c["created_run_id"] == run.id and c["adapter_version"] == 1 and c["age_seconds"] == 61
        assert sorted(c["members"]) == sorted(n for n, cl in by_name.items() if labels[cl.cluster_id] == c["label"])

    [run_row] = get(api, f"/v1/federations/{fid}/clustering-runs")
    assert (run_row["id"], run_row["k"], run_row["num_clients"], run_row["trigger"]) == (run.id, run.k, 6, "scheduler")
    assert run_row["eigengaps"] == run.eigengaps and run_row["has_affinity"]

    affinity = get(api, f"/v1/federations/{fid}/clustering-runs/{run.id}/affinity")
    n = len(TRAIN)
    assert sorted(affinity["names"]) == TRAIN and len(affinity["matrix"]) == n and all(len(r) == n for r in affinity["matrix"])
    assert affinity["labels"] == sorted(affinity["labels"])  # ordered by cluster
    assert affinity["labels"] == [labels[by_name[name].cluster_id] for name in affinity["names"]]
    matrix = np.array(affinity["matrix"])
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-5)
    assert get(api, f"/v1/federations/{fid}/assignment-moves") == []

    accuracy = get(api, f"/v1/federations/{fid}/accuracy")
    assert [s["label"] for s in accuracy["steps"]] == ["root 1", "root 2", "cluster 1", "leaf 1"]
    assert [sorted(s["tiers"]) for s in accuracy["steps"]] == [["root"], ["root"], ["cluster", "root"],
                                                                ["cluster", "leaf", "root"]]
    stage_of = {r.id: (r.stage, r.number, r.scope) for r in rounds}
    leaf = [t.metrics["acc_leaf"] for t in tasks if stage_of[t.round_id][0] == "leaf"
            and not stage_of[t.round_id][2].startswith("client:") and t.status == "done"]
    assert accuracy["steps"][-1]["tiers"]["leaf"] == pytest.approx(
        {"mean": float(np.mean(leaf)), "p10": float(np.percentile(leaf, 10)), "n": len(TRAIN)})
    assert accuracy["latest"] == accuracy["steps"][-1]["tiers"]
    assert len(accuracy["clients"]) == len(TRAIN) + len(LATE)
    assert all(c["acc_root"] is not None and c["acc_leaf"] is not None for c in accuracy["clients"])

    table = {c["name"]: c for c in get(api, f"/v1/federations/{fid}/clients")}
    assert sorted(table) == sorted(TRAIN + LATE)
    a = table["a"]
    assert (a["status"], a["cohort"], a["cluster_label"], a["online"]) == ("active", "train", labels[by_name["a"].cluster_id], False)
    assert a["tasks_done"] == 5 and a["num_samples"] == by_name["a"].num_samples  # 2 root, probe, cluster, leaf
    a_leaf = [t.metrics for t in tasks if t.client_id == by_name["a"].id and t.stage == "leaf"][-1]
    assert [a[f"acc_{t}"] for t in ("root", "cluster", "leaf")] == [a_leaf[f"acc_{t}"] for t in ("root", "cluster", "leaf")]
    assert table["late-1"]["cohort"] == "late" and table["late-1"]["onboarding"] == "ready"

    workers = get(api, f"/v1/federations/{fid}/workers")
    assert workers["leases"] == [] and workers["failures"] == []
    assert [w["worker_id"] for w in workers["workers"]] == ["late0", "w0", "w1"]
    assert sum(w["tasks_done"] for w in workers["workers"]) == sum(t.status == "done" for t in tasks)
    for w in workers["workers"]:  # the median of what its done tasks reported, phase by phase
        reported = [t.metrics["time_compute"] for t in tasks
                    if t.worker_id == w["worker_id"] and t.status == "done" and "time_compute" in (t.metrics or {})]
        assert reported and w["task_seconds"] == {"compute": pytest.approx(float(np.median(reported)))}

    unseen = get(api, f"/v1/federations/{fid}/unseen-clients")
    assert [u["name"] for u in unseen] == LATE
    for u in unseen:
        leaf_task = [t for t in tasks if t.client_id == u["client_id"] and t.stage == "leaf"][0]
        assert u["onboarding"] == "ready" and u["leaf_rounds_done"] == 1 and -1 <= u["similarity"] <= 1
        assert u["zero_shot"] == leaf_task.metrics["acc_cluster"] and u["after_leaf"] == leaf_task.metrics["acc_leaf"]
        assert u["cluster_label"] == labels[clients[u["client_id"]].cluster_id]


def test_recluster_matches_clusters_creates_the_rest_and_records_the_run(api, app):
    fid, _secret = serving_federation(api, app, late=["late-1"])
    with app.state.session_factory() as s:
        first = s.scalars(select(ClusteringRun)).one()
        before = {c.name: c.cluster_id for c in s.scalars(select(Client))}
    # the same settings again: the same partition, every cluster kept, nobody moves
    r = api.post(f"/v1/federations/{fid}/recluster", json={"reason": "check"}, headers=admin_headers())
    assert r.status_code == 200, r.text
    same = r.json()
    assert same["run"]["k"] == first.k and same["run"]["trigger"] == "admin"
    assert same["clusters_kept"] == list(range(first.k)) and same["clusters_created"] == [] and same["moves"] == []
    # one more cluster than before: new clusters get the next free labels and version 0; clients move
    r = api.post(f"/v1/federations/{fid}/recluster", json={"force_k": first.k + 1, "knn": 2}, headers=admin_headers())
    assert r.status_code == 200, r.text
    more = r.json()
    created = more["clusters_created"]
    assert more["run"]["k"] == first.k + 1 and created == list(range(first.k, first.k + len(created))) and created
    assert len(more["clusters_kept"]) + len(created) == first.k + 1 and set(more["clusters_kept"]) <= set(range(first.k))
    assert more["moves"] and more["tasks_cancelled"] == 0
    with app.state.session_factory() as s:
        run = s.get(ClusteringRun, more["run"]["id"])
        assert {c.created_run_id for c in s.scalars(select(Cluster).where(Cluster.label.in_(created)))} == {run.id}
        assignments = {a.client_id: a.cluster_id for a in s.scalars(
            select(Assignment).where(Assignment.clustering_run_id == run.id))}
        assert len(assignments) == len(TRAIN) and all(a.source == "lsac" for a in s.scalars(
            select(Assignment).where(Assignment.clustering_run_id == run.id)))
        now = {c.name: c for c in s.scalars(select(Client))}
        assert all(now[n].cluster_id == assignments[now[n].id] for n in TRAIN)
        assert now["late-1"].cluster_id == before["late-1"]  # late clients keep their cluster
        moved = sorted(m["name"] for m in more["moves"])
        assert moved == sorted(n for n in TRAIN if now[n].cluster_id != before[n]) and set(moved) <= set(TRAIN)
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.action == "recluster").order_by(AuditEvent.id)))
        assert [e.detail["run_id"] for e in events] == [same["run"]["id"], run.id]
        assert events[1].detail["overrides"] == {"force_k": first.k + 1, "knn": 2} and events[0].detail["reason"] == "check"
    clusters = {c["label"]: c for c in get(api, f"/v1/federations/{fid}/clusters")}
    for label in created:
        assert clusters[label]["adapter_version"] == 0 and set(clusters[label]["members"]) <= set(moved)
    runs = get(api, f"/v1/federations/{fid}/clustering-runs")
    assert [(x["id"], x["trigger"]) for x in runs] == [(run.id, "admin"), (same["run"]["id"], "admin"), (first.id, "scheduler")]
    transitions = get(api, f"/v1/federations/{fid}/assignment-moves")
    assert [(t["from_run_id"], t["to_run_id"]) for t in transitions] == [(same["run"]["id"], run.id),
                                                                        (first.id, same["run"]["id"])]
    assert transitions[0]["moves"] == more["moves"] and transitions[1]["moves"] == []
    assert transitions[0]["unchanged"] == len(TRAIN) - len(moved)
    affinity = get(api, f"/v1/federations/{fid}/clustering-runs/{run.id}/affinity")
    assert sorted(set(affinity["labels"])) == sorted(more["clusters_kept"] + created)
    # a late client registered now is assigned against the newest run
    assert get(api, "/v1/overview")[0]["k"] == first.k + 1


def _six_clients_training(api, app):  # noqa: ANN001, ANN202
    """A federation of the six simulated clients (two groups), 1/2/1 rounds, its root stage open."""
    dirs = group_directions()
    fid, secret = create_federation(api, schedule={"min_clients": 6, "root_rounds": 1, "cluster_rounds": 2,
                                                   "leaf_rounds": 1})
    clients = {name: register(api, fid, secret, name) for name in GROUP_OF}
    tick(app)
    return fid, clients, dirs


def _run_to_serving(api, fid: int, clients, dirs) -> None:  # noqa: ANN001
    for seed in range(20, 30):
        if get(api, f"/v1/federations/{fid}")["state"] == "serving":
            break
        run_pending(api, clients, dirs, seed=seed)


def test_recluster_during_the_cluster_stage_moves_open_work_to_the_new_clusters(api, app):
    fid, clients, dirs = _six_clients_training(api, app)
    run_pending(api, clients, dirs, seed=0)   # root
    run_pending(api, clients, dirs, seed=10)  # probe -> LSAC (K=2) -> cluster rounds open
    assert get(api, f"/v1/federations/{fid}")["state"] == "cluster"
    r = api.post(f"/v1/federations/{fid}/recluster", json={"force_k": 3}, headers=admin_headers())
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["clusters_created"] == [2] and result["moves"]
    # each moved client had one pending task in its old cluster's open round: cancelled
    assert result["tasks_cancelled"] == len(result["moves"])
    moved = {m["name"] for m in result["moves"]}
    with app.state.session_factory() as s:
        cancelled = list(s.scalars(select(Task).where(Task.status == TaskStatus.cancelled.value)))
        assert {s.get(Client, t.client_id).name for t in cancelled} == moved
        assert all("moved" in t.error for t in cancelled)
    tick(app)  # the new cluster gets its own cluster rounds in this stage
    with app.state.session_factory() as s:
        new = s.scalars(select(Cluster).where(Cluster.label == 2)).one()
        first_round = s.scalars(select(Round).where(Round.scope == f"cluster:{new.id}")).one()
        assert first_round.status == "open"
        assert {s.get(Client, t.client_id).name for t in s.scalars(select(Task).where(Task.round_id == first_round.id))} == moved
    _run_to_serving(api, fid, clients, dirs)
    status = get(api, f"/v1/federations/{fid}")
    assert status["state"] == "serving"
    versions = {c["label"]: c["adapter_version"] for c in status["clusters"]}
    assert versions == {0: 2, 1: 2, 2: 2}  # the new cluster trained its cluster_rounds too
    with app.state.session_factory() as s:
        leaf_scopes = {r.scope for r in s.scalars(select(Round).where(Round.stage == "leaf"))}
    assert leaf_scopes == {f"leaf:{c['id']}" for c in status["clusters"]}


def test_assign_by_hand_during_the_cluster_stage(api, app):
    fid, clients, dirs = _six_clients_training(api, app)
    r = api.post(f"/v1/federations/{fid}/recluster", json={"assignment": {"a0": 0}}, headers=admin_headers())
    assert r.status_code == 409 and r.json()["error"] == "no_probe_round"
    assert "clustering.algorithm 'manual'" in r.json()["detail"]
    run_pending(api, clients, dirs, seed=0)   # root
    run_pending(api, clients, dirs, seed=10)  # probe -> LSAC (K=2: a*, b*) -> cluster rounds open
    with app.state.session_factory() as s:
        label_of = {c.name: s.get(Cluster, c.cluster_id).label for c in s.scalars(select(Client))}
    a, b = label_of["a0"], label_of["b0"]
    assert {label_of[n] for n in ("a1", "a2")} == {a} and a != b
    # bad input: unknown clients, bad labels, assignment with force_k; nothing changes
    for body, code in (({"assignment": {"a0": 0, "zz": 1}}, "unknown_clients"),
                       ({"assignment": {"a0": -1}}, "bad_clustering"),
                       ({"assignment": {"a0": 0}, "force_k": 2}, "invalid_request")):
        r = api.post(f"/v1/federations/{fid}/recluster", json=body, headers=admin_headers())
        assert r.status_code == 422 and r.json()["error"] == code, (body, r.text)
    assert "zz" in api.post(f"/v1/federations/{fid}/recluster", json={"assignment": {"zz": 0}},
                            headers=admin_headers()).json()["detail"]
    # a2 goes to b's cluster, b2 to a new cluster 7; the others are not named: they stay
    r = api.post(f"/v1/federations/{fid}/recluster", json={"assignment": {"a2": b, "b2": 7}, "reason": "site map"},
                 headers=admin_headers())
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["clusters_created"] == [7] and sorted(result["clusters_kept"]) == sorted({a, b})
    assert sorted((m["name"], m["from_label"], m["to_label"]) for m in result["moves"]) == [("a2", a, b), ("b2", b, 7)]
    assert result["tasks_cancelled"] == 2 and result["run"]["algorithm"] == "manual"
    with app.state.session_factory() as s:
        now = {c.name: s.get(Cluster, c.cluster_id).label for c in s.scalars(select(Client))}
        run = s.get(ClusteringRun, result["run"]["id"])
        sources = {a.source for a in s.scalars(select(Assignment).where(Assignment.clustering_run_id == run.id))}
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "assign")).one()
    assert now == {"a0": a, "a1": a, "a2": b, "b0": b, "b1": b, "b2": 7}
    assert sources == {"manual"} and event.detail["assigned"] == 2 and event.detail["reason"] == "site map"
    _run_to_serving(api, fid, clients, dirs)
    status = get(api, f"/v1/federations/{fid}")
    assert status["state"] == "serving"
    assert {c["label"]: sorted(c["members"]) for c in status["clusters"]} == {
        a: ["a0", "a1"], b: ["a2", "b0", "b1"], 7: ["b2"]}
    assert {c["label"]: c["adapter_version"] for c in status["clusters"]} == {a: 2, b: 2, 7: 2}
