"""Refinement after clustering (``clustering.refine_rounds``), on SQLite and PostgreSQL: refine rounds
between cluster rounds, loss-based moves with the margin, unassigned clients (root + their own leaf),
the record (clustering runs, assignments, audit), the read rights of a refine task, bad reports,
and the onboarding of a late client against the refined clusters."""

from __future__ import annotations

import pytest
from conftest import admin_headers, bearer, create_federation, register, tick, tiny_config, upload_backbone
from sqlalchemy import select
from test_cascade_state_machine import group_directions
from test_cascade_state_machine import run_pending as cascade_run_pending

from coordinator.models import Assignment, AuditEvent, ClusteringRun

pytestmark = pytest.mark.api

# the planted groups: a* and b*; n0 fits no cluster (its own root loss is the lowest)
GROUPS = {"a0": 0, "a1": 0, "a2": 0, "b0": 1, "b1": 1, "b2": 1, "n0": 0}
# a wrong manual clustering: b2 is put with the a's, n0 too
WRONG = {"a0": 0, "a1": 0, "a2": 0, "b0": 1, "b1": 1, "b2": 0, "n0": 0}


def refine_losses(name: str, candidates: list[dict]) -> dict[str, float]:
    """What a client of GROUPS reports: its own group's cluster (found by its members' labels,
    0 = the a's, 1 = the b's) fits it best; n0 is best served by the root."""
    metrics = {"refine_loss_root": 0.3 if name == "n0" else 2.0}
    for c in candidates:
        fits = c["label"] == GROUPS[name]
        metrics[f"refine_loss_c{c['cluster_id']}"] = (0.5 if fits else 1.0) if name != "n0" else (0.6 if fits else 0.9)
    return metrics


def run_pending(api, clients, dirs, seed, losses=refine_losses, groups=GROUPS) -> list[dict]:
    return cascade_run_pending(api, clients, dirs, seed, groups=groups, losses=losses)


def status(api, fid):
    return api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()


def members(api, fid) -> dict[int, list[str]]:
    return {c["label"]: sorted(c["members"]) for c in status(api, fid)["clusters"]}


def start(api, app, refine_rounds=2, cluster_rounds=3, margin=0.05):
    dirs = group_directions()
    fid, secret = create_federation(api, schedule={"min_clients": 7, "root_rounds": 1, "cluster_rounds": cluster_rounds,
                                                   "leaf_rounds": 1, "unseen_leaf_rounds": 1},
                                    clustering={"algorithm": "manual", "assignment": WRONG,
                                                "refine_rounds": refine_rounds, "refine_margin": margin})
    clients = {name: register(api, fid, secret, name) for name in GROUPS}
    tick(app)
    run_pending(api, clients, dirs, seed=0)  # root
    run_pending(api, clients, dirs, seed=1)  # probe -> the manual (wrong) clusters
    assert members(api, fid) == {0: ["a0", "a1", "a2", "b2", "n0"], 1: ["b0", "b1"]}
    return fid, secret, clients, dirs


def test_refinement_moves_misplaced_clients_and_unassigns_one_that_fits_none(api, app):
    fid, secret, clients, dirs = start(api, app)
    ran = run_pending(api, clients, dirs, seed=2)  # cluster round 1 of both clusters
    assert {t["stage"] for t in ran} == {"cluster"} and len(ran) == 7
    s = status(api, fid)
    assert s["state"] == "cluster" and [r["stage"] for r in s["rounds"] if r["status"] == "open"] == ["refine"]

    ran = run_pending(api, clients, dirs, seed=3)  # refinement 1
    assert {t["stage"] for t in ran} == {"refine"} and len(ran) == 7
    assert all(t["upload"] == [] and t["trainable"] == [] and t["epochs"] == 0 for t in ran)
    assert {len(t["candidates"]) for t in ran} == {2} and {c["adapter"]["version"] for c in ran[0]["candidates"]} == {1}
    assert members(api, fid) == {0: ["a0", "a1", "a2"], 1: ["b0", "b1", "b2"]}
    s = status(api, fid)
    assert s["unassigned"] == 1 and s["clustering"]["algorithm"] == "refine" and s["clustering"]["k"] == 2
    table = {c["name"]: c for c in api.get(f"/v1/federations/{fid}/clients", headers=admin_headers()).json()}
    assert table["n0"]["unassigned"] and table["n0"]["cluster_label"] is None
    assert not any(c["unassigned"] for name, c in table.items() if name != "n0")

    ran = run_pending(api, clients, dirs, seed=4)  # cluster round 2: n0 trains no cluster; b2 trains with the b's
    assert sorted(t["client"] for t in ran) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    b2 = [t for t in ran if t["client"] == "b2"][0]
    assert b2["scope"] == f"cluster:{[c['id'] for c in status(api, fid)['clusters'] if c['label'] == 1][0]}"

    ran = run_pending(api, clients, dirs, seed=5)  # refinement 2: nothing moves
    assert {t["stage"] for t in ran} == {"refine"}
    assert members(api, fid) == {0: ["a0", "a1", "a2"], 1: ["b0", "b1", "b2"]}
    ran = run_pending(api, clients, dirs, seed=6)  # cluster round 3 (no refinement after it)
    assert {t["stage"] for t in ran} == {"cluster"}
    assert status(api, fid)["state"] == "leaf"
    ran = run_pending(api, clients, dirs, seed=7)  # leaf: n0 on the root alone
    n0 = [t for t in ran if t["client"] == "n0"][0]
    assert n0["stage"] == "leaf" and n0["cluster"] is None and n0["scope"] == "leaf:none"
    assert status(api, fid)["state"] == "serving"

    with app.state.session_factory() as session:
        runs = list(session.scalars(select(ClusteringRun).where(ClusteringRun.federation_id == fid)
                                    .order_by(ClusteringRun.id)))
        assert [r.algorithm for r in runs] == ["manual", "refine", "refine"]
        assert [r.num_clients for r in runs[1:]] == [7, 7] and runs[1].features == "loss"
        refined = list(session.scalars(select(Assignment).where(Assignment.clustering_run_id == runs[1].id)))
        assert len(refined) == 7 and sum(a.cluster_id is None for a in refined) == 1
        assert {a.source for a in refined} == {"refine"}
        events = list(session.scalars(select(AuditEvent).where(AuditEvent.federation_id == fid,
                                                               AuditEvent.action == "refine")
                                      .order_by(AuditEvent.id)))
        assert [e.detail["moved"] for e in events] == [2, 0] and events[0].detail["unassigned"] == 1
        assert sorted(((m["from"], m["to"]) for m in events[0].detail["moves"]), key=str) == [(0, 1), (0, None)]

    # a late b client is onboarded against the clusters as they are now (b2 counts among the b's)
    late = {"b-late": register(api, fid, secret, "b-late")}
    tick(app)
    late_groups = {"b-late": 1}
    assert [t["stage"] for t in run_pending(api, late, dirs, seed=40, groups=late_groups)] == ["probe"]
    assert [t["stage"] for t in run_pending(api, late, dirs, seed=41, groups=late_groups)] == ["leaf"]
    assert "b-late" in members(api, fid)[1]


def test_a_move_within_the_margin_does_not_happen(api, app):
    fid, secret, clients, dirs = start(api, app, refine_rounds=1, cluster_rounds=1, margin=0.6)
    run_pending(api, clients, dirs, seed=2)  # cluster round 1
    ran = run_pending(api, clients, dirs, seed=3)  # refinement: 0.5 vs 1.0 is a 50 % gain, below the 60 % margin
    assert {t["stage"] for t in ran} == {"refine"}
    # b2 stays; so does n0: its root's 0.3 is not below (1 - 0.6) x 0.6 with its cluster
    assert members(api, fid) == {0: ["a0", "a1", "a2", "b2", "n0"], 1: ["b0", "b1"]}
    assert status(api, fid)["state"] == "leaf" and status(api, fid)["unassigned"] == 0


def test_refine_reports_are_checked_and_a_refine_task_takes_no_upload(api, app):
    fid, secret, clients, dirs = start(api, app, refine_rounds=1, cluster_rounds=2)
    run_pending(api, clients, dirs, seed=2)
    cid, token = clients["a0"]
    task = api.post(f"/v1/clients/{cid}/lease", headers=bearer(token)).json()["task"]
    assert task["stage"] == "refine"
    r = api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]}, content=b"x",
                headers=bearer(token))
    assert r.status_code == 409 and r.json()["error"] == "no_upload_expected"
    complete = f"/v1/tasks/{task['task_id']}/complete"
    full = refine_losses("a0", task["candidates"])
    for bad in ({}, {"refine_loss_root": 1.0}, {**full, "refine_loss_root": -1.0}):
        r = api.post(complete, json={"lease_id": task["lease_id"], "num_samples": 10, "metrics": bad},
                     headers=bearer(token))
        assert r.status_code == 422 and r.json()["error"] == "bad_metrics", r.text
        assert "refine_loss" in r.json()["detail"]
    r = api.post(complete, json={"lease_id": task["lease_id"], "num_samples": 10, "metrics": full},
                 headers=bearer(token))
    assert r.status_code == 200 and r.json()["status"] == "done"


def test_cluster_adapters_stay_private_outside_a_refine_task(api, app):
    fid, secret, clients, dirs = start(api, app, refine_rounds=1, cluster_rounds=2)
    run_pending(api, clients, dirs, seed=2)  # cluster round 1: versions 1; the refine round is open now
    b_cluster = [c for c in status(api, fid)["clusters"] if c["label"] == 1][0]
    with app.state.session_factory() as session:
        from coordinator.models import AdapterVersion

        versions = {v.version: v.id for v in session.scalars(select(AdapterVersion).where(
            AdapterVersion.cluster_id == b_cluster["id"]))}
    cid, token = clients["a0"]
    # no refine task leased yet: the b cluster's adapter is not a0's to read
    assert api.get(f"/v1/adapters/{versions[1]}", headers=bearer(token)).status_code == 403
    task = api.post(f"/v1/clients/{cid}/lease", headers=bearer(token)).json()["task"]
    assert task["stage"] == "refine"
    assert api.get(f"/v1/adapters/{versions[1]}", headers=bearer(token)).status_code == 200
    # only the candidate (the newest trained version), not older versions
    assert api.get(f"/v1/adapters/{versions[0]}", headers=bearer(token)).status_code == 403
    r = api.post(f"/v1/tasks/{task['task_id']}/complete", json={"lease_id": task["lease_id"], "num_samples": 10,
                                                                "metrics": refine_losses("a0", task["candidates"])},
                 headers=bearer(token))
    assert r.status_code == 200
    assert api.get(f"/v1/adapters/{versions[1]}", headers=bearer(token)).status_code == 403


@pytest.mark.parametrize("clustering, schedule, message", [
    ({"refine_rounds": 3}, {"cluster_rounds": 2}, "at most schedule.cluster_rounds"),
    ({"refine_rounds": -1}, {}, "greater than or equal"),
    ({"refine_margin": 1.0}, {}, "less than 1"),
    ({"refine_rounds": 101}, {"cluster_rounds": 200}, "less than or equal"),
])
def test_bad_refinement_settings_are_refused(api, clustering, schedule, message):
    sha = upload_backbone(api)
    r = api.post("/v1/federations", json={"config": tiny_config("bad", sha, clustering=clustering,
                                                                schedule=schedule)}, headers=admin_headers())
    assert r.status_code == 422 and message in r.text, r.text


SPLIT_GROUPS = {"a0": 0, "a1": 0, "a2": 0, "b0": 1, "b1": 1, "b2": 1}


def split_losses(name: str, candidates: list[dict]) -> dict[str, float]:
    """The b's are served best by the root until a cluster of their own exists (label 1)."""
    b = name.startswith("b")
    metrics = {"refine_loss_root": 0.3 if b else 2.0}
    for c in candidates:
        own = c["label"] == (1 if b else 0)
        metrics[f"refine_loss_c{c['cluster_id']}"] = (0.2 if own else 0.6) if b else (0.5 if own else 1.0)
    return metrics


@pytest.mark.parametrize("cluster_rounds, refine_rounds, new_cluster", [(3, 2, 2), (1, 1, 2), (3, 2, 4)])
def test_clients_no_cluster_fits_form_a_new_one_when_rounds_follow(api, app, cluster_rounds, refine_rounds,
                                                                    new_cluster):
    dirs = group_directions()
    fid, secret = create_federation(api, schedule={"min_clients": 6, "root_rounds": 1, "cluster_rounds": cluster_rounds,
                                              "leaf_rounds": 1},
                               clustering={"algorithm": "manual", "assignment": {n: 0 for n in SPLIT_GROUPS},
                                           "refine_rounds": refine_rounds, "refine_new_cluster": new_cluster})
    clients = {name: register(api, fid, secret, name) for name in SPLIT_GROUPS}
    tick(app)
    for seed in range(12):
        if status(api, fid)["state"] == "serving":
            break
        run_pending(api, clients, dirs, seed=seed, losses=split_losses, groups=SPLIT_GROUPS)
    s = status(api, fid)
    assert s["state"] == "serving"
    versions = {c["label"]: c["adapter_version"] for c in s["clusters"]}
    if new_cluster <= 3 and refine_rounds < cluster_rounds:
        # the three b's formed cluster 1 at the first refinement; it trains the stage's remaining rounds
        assert members(api, fid) == {0: ["a0", "a1", "a2"], 1: ["b0", "b1", "b2"]} and s["unassigned"] == 0
        assert versions == {0: cluster_rounds, 1: cluster_rounds - 1}
        with app.state.session_factory() as session:
            event = session.scalars(select(AuditEvent).where(AuditEvent.federation_id == fid,
                                                             AuditEvent.action == "refine").order_by(AuditEvent.id)).first()
            assert event.detail["cluster_created"] == 1 and event.detail["unassigned"] == 0
    else:
        # too few of them, or no cluster round left to train a new cluster: they stay unassigned
        assert members(api, fid) == {0: ["a0", "a1", "a2"]} and s["unassigned"] == 3
        assert versions == {0: cluster_rounds}


def test_late_clients_are_assigned_by_loss_when_onboard_is_loss(api, app):
    dirs = group_directions()
    groups = {**SPLIT_GROUPS, "b-late": 1, "x-late": 0}
    fid, secret = create_federation(api, schedule={"min_clients": 6, "root_rounds": 1, "cluster_rounds": 1,
                                                   "leaf_rounds": 1, "unseen_leaf_rounds": 1},
                                    clustering={"algorithm": "manual", "onboard": "loss",
                                                "assignment": {n: g for n, g in SPLIT_GROUPS.items()}})
    clients = {name: register(api, fid, secret, name) for name in SPLIT_GROUPS}
    tick(app)
    for seed in range(6):
        if status(api, fid)["state"] == "serving":
            break
        run_pending(api, clients, dirs, seed=seed, groups=groups)
    assert status(api, fid)["state"] == "serving" and members(api, fid) == {0: ["a0", "a1", "a2"],
                                                                             1: ["b0", "b1", "b2"]}

    def late_losses(name: str, candidates: list[dict]) -> dict[str, float]:
        if name == "x-late":  # the root serves it clearly best
            return {"refine_loss_root": 0.2, **{f"refine_loss_c{c['cluster_id']}": 0.8 for c in candidates}}
        return split_losses("b0", candidates)

    late = {name: register(api, fid, secret, name) for name in ("b-late", "x-late")}
    tick(app)
    ran = run_pending(api, late, dirs, seed=40, losses=late_losses, groups=groups)
    assert [(t["stage"], t["scope"].split(":")[0], len(t["candidates"])) for t in ran] == [("refine", "client", 2)] * 2
    ran = run_pending(api, late, dirs, seed=41, groups=groups)
    by_name = {t["client"]: t for t in ran}
    assert by_name["b-late"]["stage"] == "leaf" and by_name["b-late"]["cluster"] is not None
    assert by_name["x-late"]["stage"] == "leaf" and by_name["x-late"]["cluster"] is None
    assert "b-late" in members(api, fid)[1]
    s = status(api, fid)
    assert s["onboarding_pending"] == 0 and s["unassigned"] == 1
    unseen = {u["name"]: u for u in api.get(f"/v1/federations/{fid}/unseen-clients", headers=admin_headers()).json()}
    assert unseen["b-late"]["cluster_label"] == 1 and unseen["b-late"]["similarity"] == pytest.approx(1 - 0.2 / 0.3)
    assert unseen["x-late"]["cluster_label"] is None and unseen["x-late"]["similarity"] is None
