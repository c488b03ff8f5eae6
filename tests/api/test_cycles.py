"""Cycles of a living federation (schedule.cycle_*, POST /v1/federations/F/cycle), on SQLite and
PostgreSQL, with simulated clients: a new latent group arrives while serving and starts a cycle
by its arrival; the cycle reprobes everyone, keeps the old clusters' ids and adapters, makes a
cluster for the newcomers, trains leaves only for clients that need one and evaluates everyone;
a timer starts the next one; inactive clients are asked again; bad requests are refused."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DEPTH, DIM, RANK, admin_headers, bearer, create_federation, register, tick
from sqlalchemy import select, update
from test_cascade_state_machine import run_pending

from coordinator.models import AdapterVersion, Client, Cluster
from coordinator.services.federations import federation_config, get_federation
from shared.aggregate import merge_adapters
from shared.manifest import qv_targets
from shared.tensors import unpack_tensors

pytestmark = pytest.mark.api

GROUPS = {"a0": 0, "a1": 0, "a2": 0, "b0": 1, "b1": 1, "b2": 1}
NEW = {"c0": 2, "c1": 2, "c2": 2}


def directions(seed: int = 7) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    # small: every cluster round multiplies the adapter by about (1 + |direction|), over many rounds
    return [{t.name: 0.05 * rng.normal(size=(DIM, RANK)) for t in qv_targets(DEPTH, DIM)} for _ in range(3)]


def status(api, fid):
    return api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()


def drive(api, clients, dirs, groups, until, first_seed: int, fid: int | None = None) -> list[dict]:
    ran = []
    for i in range(30):
        if until():
            return ran
        ran += run_pending(api, clients, dirs, seed=first_seed + i, groups=groups)
    where = status(api, fid) if fid else {}
    raise AssertionError(f"the federation did not get there in 30 passes: {where.get('state')}, cycle "
                         f"{where.get('cycle')}, failure {where.get('last_failure')}, open rounds "
                         f"{[(r['stage'], r['scope'], r['tasks_done'], r['tasks_total']) for r in where.get('rounds', []) if r['status'] == 'open']}")


def settled(api, fid, cycle):
    s = status(api, fid)
    return s["state"] == "serving" and s["cycle"] == cycle and all(r["status"] != "open" for r in s["rounds"])


def audit(api, fid, action):
    return [e for e in api.get(f"/v1/federations/{fid}/audit", headers=admin_headers()).json() if e["action"] == action]


def test_a_new_group_arrives_and_a_cycle_gives_it_a_cluster(api, app, clock):
    dirs = directions()
    fid, secret = create_federation(api, schedule={"min_clients": 6, "root_rounds": 1, "cluster_rounds": 1,
                                                   "leaf_rounds": 1, "unseen_leaf_rounds": 1,
                                                   "cycle_min_new_clients": 3})
    clients = {n: register(api, fid, secret, n) for n in GROUPS}
    tick(app)
    drive(api, clients, dirs, GROUPS, lambda: settled(api, fid, 0), 0)
    before = {c["label"]: c for c in status(api, fid)["clusters"]}
    assert sorted(sorted(c["members"]) for c in before.values()) == [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    assert status(api, fid)["cycle"] == 0

    # three clients of a new group arrive; the third starts the cycle (cycle_min_new_clients = 3)
    late = {}
    for n in NEW:
        late[n] = register(api, fid, secret, n)
        if len(late) < 3:
            # a newcomer below the threshold is onboarded as usual meanwhile
            drive(api, late, dirs, {**GROUPS, **NEW}, lambda: status(api, fid)["onboarding_pending"] == 0, 100)
    tick(app)
    s = status(api, fid)
    assert s["cycle"] == 1 and s["state"] == "probe" and s["cycle_started_at"] is not None
    assert [e["detail"]["trigger"] for e in audit(api, fid, "cycle_start")] == ["arrivals"]
    everyone = {**clients, **late}
    table = {c["name"]: c for c in api.get(f"/v1/federations/{fid}/clients", headers=admin_headers()).json()}
    assert {table[n]["onboarding"] for n in NEW} == {"cycle"}   # the newcomers train in the cycle

    ran = drive(api, everyone, dirs, {**GROUPS, **NEW}, lambda: settled(api, fid, 1), 200, fid)
    stages = [t["stage"] for t in ran]
    assert stages.count("probe") == 9 and stages.count("cluster") == 9 and stages.count("eval") == 9
    # fresh leaves for the newcomers only: c0 and c1 were onboarded into an old cluster and moved to
    # their group's new one, c2 had none; the a's and b's kept their cluster and their leaf
    assert sorted(t["client_id"] for t in ran if t["stage"] == "leaf") == sorted(late[n][0] for n in NEW)
    assert all(t["reset_leaf"] for t in ran if t["stage"] == "leaf")
    after = {c["label"]: c for c in status(api, fid)["clusters"]}
    assert len(after) == 3
    for label, c in before.items():  # the old clusters keep their id, label and adapter history
        assert after[label]["id"] == c["id"] and sorted(after[label]["members"]) == sorted(c["members"])
        assert after[label]["adapter_version"] == c["adapter_version"] + 1
    new_label = (set(after) - set(before)).pop()
    assert sorted(after[new_label]["members"]) == ["c0", "c1", "c2"] and after[new_label]["adapter_version"] == 1
    runs = api.get(f"/v1/federations/{fid}/clustering-runs", headers=admin_headers()).json()
    assert [r["cycle"] for r in runs] == [1, 0]
    assert {r["cycle"] for r in status(api, fid)["rounds"]} == {0, 1}
    table = {c["name"]: c for c in api.get(f"/v1/federations/{fid}/clients", headers=admin_headers()).json()}
    assert {table[n]["onboarding"] for n in NEW} == {"ready"}

    # a timer starts the next cycle; an inactive client is asked again
    assert api.patch(f"/v1/federations/{fid}/schedule", json={"changes": {"cycle_every_seconds": 100}},
                     headers=admin_headers()).status_code == 200
    with app.state.session_factory() as session, session.begin():
        session.execute(update(Client).where(Client.name == "a0").values(inactive_since=clock(), missed_rounds=3))
    tick(app)
    assert status(api, fid)["cycle"] == 1
    clock.advance(101)
    tick(app)
    assert status(api, fid)["cycle"] == 2 and sorted(
        e["detail"]["trigger"] for e in audit(api, fid, "cycle_start")) == ["arrivals", "timer"]
    with app.state.session_factory() as session:
        assert session.scalars(select(Client.inactive_since).where(Client.name == "a0")).one() is None
    ran = drive(api, everyone, dirs, {**GROUPS, **NEW}, lambda: settled(api, fid, 2), 300, fid)
    assert not [t for t in ran if t["stage"] == "leaf"]   # nobody moved, everyone has a leaf
    assert sum(1 for t in ran if t["stage"] == "eval") == 9
    assert len(status(api, fid)["clusters"]) == 3
    assert sorted(e["detail"]["moved"] for e in audit(api, fid, "cycle_recluster")) == [0, 3]


def test_groups_that_converge_merge_into_one_cluster_warm_started_from_both(api, app):
    """Group b's data comes to look like group a's: the cycle finds one cluster, keeps the id it
    overlaps (a tie of 3 and 3: the assignment problem's choice), and starts its cluster rounds from
    both old adapters combined in product space, weighted by the members each brings."""
    dirs = directions()
    fid, secret = create_federation(api, schedule={"min_clients": 6, "root_rounds": 1, "cluster_rounds": 1,
                                                   "leaf_rounds": 1, "unseen_leaf_rounds": 1})
    clients = {n: register(api, fid, secret, n) for n in GROUPS}
    tick(app)
    drive(api, clients, dirs, GROUPS, lambda: settled(api, fid, 0), 0)
    before = {c["label"]: c for c in status(api, fid)["clusters"]}
    assert sorted(c["adapter_version"] for c in before.values()) == [1, 1]
    assert api.post(f"/v1/federations/{fid}/cycle", json={}, headers=admin_headers()).status_code == 200
    tick(app)
    ran = drive(api, clients, dirs, {n: 0 for n in GROUPS}, lambda: settled(api, fid, 1), 100, fid)
    after = {c["label"]: c for c in status(api, fid)["clusters"]}
    kept = next(label for label, c in after.items() if c["members"])
    emptied = 1 - kept
    assert sorted(after[kept]["members"]) == sorted(GROUPS) and after[emptied]["members"] == []
    # version 2 is the merge, version 3 the cycle's cluster round on top of it; the emptied one stays
    assert after[kept]["adapter_version"] == 3 and after[emptied]["adapter_version"] == 1
    (event,) = audit(api, fid, "cycle_recluster")
    assert event["detail"]["clusters_merged"] == {str(kept): {"0": 3, "1": 3}} and event["detail"]["moved"] == 3
    with app.state.session_factory() as session:
        def tensors(label, version):
            cluster = session.scalars(select(Cluster).where(Cluster.federation_id == fid, Cluster.label == label)).one()
            row = session.scalars(select(AdapterVersion).where(AdapterVersion.cluster_id == cluster.id,
                                                               AdapterVersion.version == version)).one()
            return unpack_tensors(app.state.blobs.get_bytes(row.blob_sha256))

        manifest = federation_config(get_federation(session, fid)).manifest
        expected = merge_adapters(manifest, "cluster", [tensors(0, 1), tensors(1, 1)], [3.0, 3.0])
        merged = tensors(kept, 2)
    assert sorted(merged) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(merged[name], expected[name])
    # the moved clients get a fresh leaf on their new cluster; everyone is evaluated
    assert sorted(t["client"] for t in ran if t["stage"] == "leaf") == sorted(n for n in GROUPS if GROUPS[n] != kept)


def serving_with_short_leases(api, app):
    """Groups a and b to serving in a federation whose rounds end at a deadline soon after a client
    stops answering (10 s leases, one attempt, inactive after one missed round)."""
    dirs = directions()
    fid, secret = create_federation(api, schedule={"min_clients": 6, "root_rounds": 1, "cluster_rounds": 1,
                                                   "leaf_rounds": 1, "unseen_leaf_rounds": 1, "lease_seconds": 10,
                                                   "max_attempts": 1, "max_consecutive_failures": 1})
    clients = {n: register(api, fid, secret, n) for n in GROUPS}
    tick(app)
    drive(api, clients, dirs, GROUPS, lambda: settled(api, fid, 0), 0)
    return dirs, fid, secret, clients


def drive_while_away(api, app, clock, fid, present, dirs, groups, first_seed: int) -> None:
    """Run the ``present`` clients until cycle 1 is settled; whenever nobody had work, the clock
    moves a minute on so that the absent clients' tasks end at their round's deadline."""
    for i in range(40):
        if settled(api, fid, 1):
            break
        if not run_pending(api, present, dirs, seed=first_seed + i, groups=groups):
            clock.advance(60)
            tick(app)
    assert settled(api, fid, 1)


def test_an_absent_client_follows_its_group_and_ids_follow_the_clustered_groups(api, app, clock):
    """The newcomers were onboarded into b's cluster (their first probes looked like b's); in the
    cycle they form a group of their own while b2 is away. b's cluster id stays with b0 and b1 (the
    group the clustering made it for), not with the three newcomers who outnumber them in it now;
    the newcomers get a new cluster, warm-started from b's adapter; b2, not probed, stays with its
    group."""
    dirs, fid, secret, clients = serving_with_short_leases(api, app)
    before = {c["label"]: sorted(c["members"]) for c in status(api, fid)["clusters"]}
    b_label = next(label for label, m in before.items() if "b0" in m)
    late = {n: register(api, fid, secret, n) for n in NEW}
    looks_like_b = {**GROUPS, **{n: 1 for n in NEW}}
    drive(api, late, dirs, looks_like_b, lambda: status(api, fid)["onboarding_pending"] == 0, 100)
    assert {c["label"]: sorted(c["members"]) for c in status(api, fid)["clusters"]}[b_label] == [
        "b0", "b1", "b2", "c0", "c1", "c2"]

    assert api.post(f"/v1/federations/{fid}/cycle", json={}, headers=admin_headers()).status_code == 200
    tick(app)
    present = {n: v for n, v in {**clients, **late}.items() if n != "b2"}
    drive_while_away(api, app, clock, fid, present, dirs, {**GROUPS, **NEW}, first_seed=200)
    after = {c["label"]: sorted(c["members"]) for c in status(api, fid)["clusters"]}
    assert after[b_label] == ["b0", "b1", "b2"]
    (new_label,) = set(after) - set(before)
    assert after[new_label] == ["c0", "c1", "c2"]
    (event,) = audit(api, fid, "cycle_recluster")
    assert event["detail"]["clusters_created"] == {str(new_label): b_label} and event["detail"]["followed"] == 0
    table = {c["name"]: c for c in api.get(f"/v1/federations/{fid}/clients", headers=admin_headers()).json()}
    assert table["b2"]["inactive_since"] is not None and table["b2"]["cluster_label"] == b_label


def test_an_absent_client_follows_its_group_into_a_merge(api, app, clock):
    """b's data comes to look like a's while b2 is away: the cycle merges b0 and b1 into a's cluster
    (it overlaps 3 to 2) and b2, with no probe of its own, goes where its group went rather than
    staying alone in a cluster without members."""
    dirs, fid, secret, clients = serving_with_short_leases(api, app)
    a_label = next(c["label"] for c in status(api, fid)["clusters"] if "a0" in c["members"])
    assert api.post(f"/v1/federations/{fid}/cycle", json={}, headers=admin_headers()).status_code == 200
    tick(app)
    present = {n: v for n, v in clients.items() if n != "b2"}
    drive_while_away(api, app, clock, fid, present, dirs, {n: 0 for n in GROUPS}, first_seed=300)
    members = {c["label"]: sorted(c["members"]) for c in status(api, fid)["clusters"]}
    assert members[a_label] == sorted(GROUPS) and members[1 - a_label] == []
    (event,) = audit(api, fid, "cycle_recluster")
    assert event["detail"]["followed"] == 1 and event["detail"]["moved"] == 3
    assert {"client_id": clients["b2"][0], "from": 1 - a_label, "to": a_label} in event["detail"]["moves"]


def test_cycle_requests_are_checked(api, app):
    fid, secret = create_federation(api, schedule={"min_clients": 2, "root_rounds": 1, "cluster_rounds": 1,
                                                   "leaf_rounds": 1})
    r = api.post(f"/v1/federations/{fid}/cycle", json={}, headers=admin_headers())
    assert r.status_code == 409 and r.json()["error"] == "not_started"
    assert api.post("/v1/federations/999/cycle", json={}, headers=admin_headers()).status_code == 404
    assert api.post(f"/v1/federations/{fid}/cycle", json={"extra": 1}, headers=admin_headers()).status_code == 422
    flat, flat_secret = create_federation(api, name="flat", cluster={"enabled": False},
                                          schedule={"min_clients": 1, "root_rounds": 1, "leaf_rounds": 0})
    register(api, flat, flat_secret, "x")
    tick(app)
    r = api.post(f"/v1/federations/{flat}/cycle", json={}, headers=admin_headers())
    assert r.status_code == 409 and r.json()["error"] == "nothing_to_cycle"
    cid, token = register(api, fid, secret, "a")
    register(api, fid, secret, "b")
    tick(app)
    r = api.post(f"/v1/federations/{fid}/cycle", json={}, headers=bearer(token))
    assert r.status_code in (401, 403)
    # a request during training waits for serving; it is recorded and audited
    r = api.post(f"/v1/federations/{fid}/cycle", json={"reason": "new data"}, headers=admin_headers())
    assert r.status_code == 200 and r.json()["state"] == "root" and r.json()["cycle"] == 0
    assert r.json()["cycle_requested_at"] is not None
    assert [e["detail"]["reason"] for e in audit(api, fid, "request_cycle")] == ["new data"]
    for bad in ({"cycle_every_seconds": 0}, {"cycle_min_new_clients": 0}, {"cycle_root_rounds": -1}):
        r = api.patch(f"/v1/federations/{fid}/schedule", json={"changes": bad}, headers=admin_headers())
        assert r.status_code == 422, (bad, r.text)
