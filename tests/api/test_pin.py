"""Pinning and rolling back the version a cluster serves (``POST /v1/federations/F/clusters/L/pin``),
on SQLite and PostgreSQL: what clients get (leaf rounds, their adapters, merged models) follows the
pin, training goes on from the newest, unpinning serves the newest again, bad input is refused and
every change is audited."""

from __future__ import annotations

import hashlib

import pytest
from conftest import admin_headers, bearer, create_federation, register, tick
from test_cascade_state_machine import GROUP_OF, group_directions, run_pending

pytestmark = pytest.mark.api


def status(api, fid):
    return api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()


def pin(api, fid, label, version, reason=""):
    return api.post(f"/v1/federations/{fid}/clusters/{label}/pin", json={"version": version, "reason": reason},
                    headers=admin_headers())


def model_etag(api, fid, adapters) -> str:
    """The ETag of the merged model of these root and cluster versions (coordinator/routes_models.py)."""
    from shared.merge import MODEL_FORMAT

    backbone = api.get(f"/v1/federations/{fid}/config", headers=admin_headers()).json()["backbone"]["sha256"]
    key = "/".join([MODEL_FORMAT, str(fid), backbone, adapters["root"]["sha256"], adapters["cluster"]["sha256"]])
    return f'"{hashlib.sha256(key.encode()).hexdigest()}"'


def model(api, fid, label, etag):
    return api.get(f"/v1/federations/{fid}/clusters/{label}/model",
                   headers={**admin_headers(), "If-None-Match": etag})


def started(api, app, cluster_rounds: int, leaf_rounds: int):
    """A federation of GROUP_OF's six clients (one root round), training started."""
    fid, secret = create_federation(api, schedule={"min_clients": 6, "root_rounds": 1, "cluster_rounds": cluster_rounds,
                                                   "leaf_rounds": leaf_rounds})
    clients = {name: register(api, fid, secret, name) for name in GROUP_OF}
    tick(app)
    return fid, clients, group_directions()


def test_a_pinned_version_is_what_clients_get_until_unpinned(api, app):
    fid, clients, dirs = started(api, app, cluster_rounds=3, leaf_rounds=3)
    run_pending(api, clients, dirs, seed=0)  # root
    run_pending(api, clients, dirs, seed=1)  # probe
    run_pending(api, clients, dirs, seed=2)  # cluster round 1
    a_label = [c for c in status(api, fid)["clusters"] if "a0" in c["members"]][0]["label"]
    r = pin(api, fid, a_label, 1, reason="round 2 looked worse")
    assert r.status_code == 200, r.text
    assert r.json()["pinned_version"] == 1 and r.json()["adapter_version"] == 1
    run_pending(api, clients, dirs, seed=3)  # cluster rounds 2 and 3: training goes on from the newest
    run_pending(api, clients, dirs, seed=4)
    s = status(api, fid)
    assert s["state"] == "leaf"
    a_cluster = [c for c in s["clusters"] if c["label"] == a_label][0]
    assert a_cluster["adapter_version"] == 3 and a_cluster["pinned_version"] == 1
    # the leaf round of the a's is on version 1; the b's on their newest
    ran = run_pending(api, clients, dirs, seed=5)
    versions = {t["scope"]: t["cluster"]["version"] for t in ran}
    assert sorted(versions.values()) == [1, 3]
    cid, token = clients["a0"]
    adapters = api.get(f"/v1/clients/{cid}/adapters", headers=bearer(token)).json()
    assert adapters["cluster"]["version"] == 1
    # the merged model is made of the pinned version: its ETag (a hash of its parts) answers 304
    pinned_etag = model_etag(api, fid, adapters)
    assert model(api, fid, a_label, pinned_etag).status_code == 304
    # unpin: the newest again, for the next leaf round and for the client's adapters
    r = pin(api, fid, a_label, None)
    assert r.status_code == 200 and r.json()["pinned_version"] is None
    assert api.get(f"/v1/clients/{cid}/adapters", headers=bearer(token)).json()["cluster"]["version"] == 3
    assert model(api, fid, a_label, pinned_etag).status_code != 304
    newest = api.get(f"/v1/clients/{cid}/adapters", headers=bearer(token)).json()
    assert model(api, fid, a_label, model_etag(api, fid, newest)).status_code == 304
    ran = run_pending(api, clients, dirs, seed=6)  # the leaf round opened before the unpin keeps version 1
    assert sorted({t["cluster"]["version"] for t in ran}) == [1, 3]
    ran = run_pending(api, clients, dirs, seed=7)
    assert {t["cluster"]["version"] for t in ran} == {3} and status(api, fid)["state"] == "serving"
    events = [e for e in api.get(f"/v1/federations/{fid}/audit", headers=admin_headers()).json()
              if e["action"] in ("pin", "unpin")]
    assert sorted((e["action"], e["detail"]["version"], e["detail"]["before"]) for e in events) == [
        ("pin", 1, None), ("unpin", None, 1)]
    assert [e["detail"]["reason"] for e in events if e["action"] == "pin"] == ["round 2 looked worse"]


def test_bad_pins_are_refused_and_change_nothing(api, app):
    fid, clients, dirs = started(api, app, cluster_rounds=1, leaf_rounds=1)
    assert pin(api, fid, 0, 0).json()["error"] == "cluster_not_found"   # no cluster yet
    for seed in range(3):
        run_pending(api, clients, dirs, seed=seed)
    label = status(api, fid)["clusters"][0]["label"]
    r = pin(api, fid, label, 7)
    assert r.status_code == 422 and r.json()["error"] == "unknown_version" and "0..1" in r.json()["detail"]
    assert pin(api, fid, 99, 0).status_code == 404
    assert pin(api, 999, label, 0).status_code == 404
    assert pin(api, fid, label, -1).status_code == 422
    r = api.post(f"/v1/federations/{fid}/clusters/{label}/pin", json={"version": 0, "extra": 1},
                 headers=admin_headers())
    assert r.status_code == 422
    cid, token = clients["a0"]
    r = api.post(f"/v1/federations/{fid}/clusters/{label}/pin", json={"version": 0}, headers=bearer(token))
    assert r.status_code in (401, 403)
    assert all(c["pinned_version"] is None for c in status(api, fid)["clusters"])
    assert not [e for e in api.get(f"/v1/federations/{fid}/audit", headers=admin_headers()).json()
                if e["action"] == "pin"]
