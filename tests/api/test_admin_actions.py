"""Admin actions: revoke a client, pause and resume, move a deadline; each one audited."""

from __future__ import annotations

from datetime import timedelta

import pytest
from conftest import admin_headers, bearer, create_federation, register, tick
from sqlalchemy import select
from test_api import valid_root_upload

from coordinator.models import AdapterVersion, Round, Task
from shared.tensors import pack_tensors

pytestmark = pytest.mark.api


def lease(api, cid, tok):
    r = api.post(f"/v1/clients/{cid}/lease", headers=bearer(tok))
    assert r.status_code == 200, r.text
    return r.json()


def finish(api, task, tok, seed=0):
    r = api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                content=pack_tensors(valid_root_upload(seed)), headers=bearer(tok))
    assert r.status_code == 200, r.text
    r = api.post(f"/v1/tasks/{task['task_id']}/complete",
                 json={"lease_id": task["lease_id"], "num_samples": 4, "metrics": {}}, headers=bearer(tok))
    assert r.status_code == 200, r.text


def audit(api, fid):
    r = api.get(f"/v1/federations/{fid}/audit", headers=admin_headers())
    assert r.status_code == 200, r.text
    return r.json()


def test_revoke_ends_leases_refuses_uploads_keeps_contributions(api, app):
    fid, secret = create_federation(api, schedule={"min_clients": 3, "root_rounds": 2})
    clients = [register(api, fid, secret, n) for n in ("a", "b", "c")]
    tick(app)
    tasks = [lease(api, cid, tok)["task"] for cid, tok in clients]
    finish(api, tasks[0], clients[0][1])
    finish(api, tasks[1], clients[1][1], 1)
    # revoke c while it holds a lease
    r = api.post(f"/v1/federations/{fid}/clients/{clients[2][0]}/revoke", json={"reason": "left the consortium"},
                 headers=admin_headers())
    assert r.status_code == 200, r.text
    assert r.json() == {"client_id": clients[2][0], "name": "c", "status": "revoked", "tasks_cancelled": 1}
    # its token is refused everywhere, with the reason named
    r = api.post(f"/v1/clients/{clients[2][0]}/lease", headers=bearer(clients[2][1]))
    assert r.status_code == 403 and r.json()["error"] == "revoked"
    r = api.put(f"/v1/tasks/{tasks[2]['task_id']}/upload", params={"lease_id": tasks[2]["lease_id"]},
                content=pack_tensors(valid_root_upload(2)), headers=bearer(clients[2][1]))
    assert r.status_code == 403
    # the round completes with the two others; revoking twice is a conflict
    tick(app)
    with app.state.session_factory() as s:
        first = s.scalars(select(Round).order_by(Round.id)).first()
        assert first.status == "done"
        assert s.get(Task, tasks[2]["task_id"]).status == "cancelled"
        second = s.scalars(select(Round).where(Round.number == 2)).one()
        members = set(s.scalars(select(Task.client_id).where(Task.round_id == second.id)))
    assert members == {clients[0][0], clients[1][0]}
    again = api.post(f"/v1/federations/{fid}/clients/{clients[2][0]}/revoke", json={}, headers=admin_headers())
    assert again.status_code == 409 and again.json()["error"] == "already_revoked"
    assert api.post(f"/v1/federations/{fid}/clients/9999/revoke", json={}, headers=admin_headers()).status_code == 404
    assert api.post(f"/v1/federations/{fid}/clients/{clients[0][0]}/revoke", json={},
                    headers=bearer(clients[0][1])).status_code == 401
    events = audit(api, fid)
    assert [e["action"] for e in events] == ["revoke_client"]
    assert events[0]["detail"]["reason"] == "left the consortium" and events[0]["target"] == f"client:{clients[2][0]}"


def test_pause_stops_leases_and_transitions_resume_moves_deadlines(api, app, clock):
    fid, secret = create_federation(api, schedule={"min_clients": 2, "root_rounds": 2, "round_deadline_seconds": 100})
    clients = [register(api, fid, secret, n) for n in ("a", "b")]
    tick(app)
    t0 = lease(api, *clients[0])["task"]
    r = api.post(f"/v1/federations/{fid}/pause", json={"reason": "maintenance"}, headers=admin_headers())
    assert r.status_code == 200 and r.json()["paused_at"] is not None
    assert api.post(f"/v1/federations/{fid}/pause", json={}, headers=admin_headers()).json()["error"] == "already_paused"
    body = lease(api, *clients[1])
    assert body["task"] is None and body["client_state"] == "paused" and body["retry_after"] >= 5
    # a live lease may still finish while paused, but nothing is decided
    finish(api, t0, clients[0][1])
    clock.advance(500)  # far past the round deadline
    tick(app)
    with app.state.session_factory() as s:
        rnd = s.scalars(select(Round)).one()
        assert rnd.status == "open"
        old_deadline = rnd.deadline_at
    r = api.post(f"/v1/federations/{fid}/resume", headers=admin_headers())
    assert r.status_code == 200 and r.json()["paused_at"] is None
    with app.state.session_factory() as s:
        assert s.scalars(select(Round)).one().deadline_at == old_deadline + timedelta(seconds=500)
    t1 = lease(api, *clients[1])["task"]
    finish(api, t1, clients[1][1], 1)
    tick(app)
    with app.state.session_factory() as s:
        assert s.scalars(select(Round).order_by(Round.id)).first().status == "done"
        assert len(list(s.scalars(select(AdapterVersion)))) == 2
    assert api.post(f"/v1/federations/{fid}/resume", headers=admin_headers()).json()["error"] == "not_paused"
    assert [e["action"] for e in audit(api, fid)] == ["resume", "pause"]
    assert audit(api, fid)[0]["detail"]["paused_seconds"] == 500


def test_deadline_changes(api, app, clock):
    fid, secret = create_federation(api, schedule={"min_clients": 2, "root_rounds": 1})
    clients = [register(api, fid, secret, n) for n in ("a", "b")]
    tick(app)
    with app.state.session_factory() as s:
        rid = s.scalars(select(Round)).one().id
    r = api.post(f"/v1/rounds/{rid}/deadline", json={"extend_seconds": 60}, headers=admin_headers())
    assert r.status_code == 200, r.text
    assert r.json()["deadline_at"].startswith((clock.now + timedelta(seconds=60)).strftime("%Y-%m-%dT%H:%M:%S"))
    r = api.post(f"/v1/rounds/{rid}/deadline", json={"extend_seconds": 60}, headers=admin_headers())
    assert r.json()["deadline_at"].startswith((clock.now + timedelta(seconds=120)).strftime("%Y-%m-%dT%H:%M:%S"))
    past = (clock.now - timedelta(seconds=1)).isoformat()
    for body, code in [({"deadline_at": past}, "bad_deadline"), ({}, "bad_deadline"),
                       ({"deadline_at": "2030-01-01T00:00:00"}, "bad_deadline"),
                       ({"deadline_at": "2030-01-01T00:00:00Z", "extend_seconds": 5}, "bad_deadline")]:
        r = api.post(f"/v1/rounds/{rid}/deadline", json=body, headers=admin_headers())
        assert r.status_code == 422 and r.json()["error"] == code, (body, r.text)
    r = api.post(f"/v1/rounds/{rid}/deadline", json={"extend_seconds": -5}, headers=admin_headers())
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert api.post("/v1/rounds/9999/deadline", json={"extend_seconds": 5}, headers=admin_headers()).status_code == 404
    assert api.post(f"/v1/rounds/{rid}/deadline", json={"extend_seconds": 5},
                    headers=bearer(clients[0][1])).status_code == 401
    # the round closes (quorum 1, deadline passes with one upload): moving it is a conflict
    finish(api, lease(api, *clients[0])["task"], clients[0][1])
    clock.advance(200)
    tick(app)
    r = api.post(f"/v1/rounds/{rid}/deadline", json={"extend_seconds": 5}, headers=admin_headers())
    assert r.status_code == 409 and r.json()["error"] == "round_closed"
    assert [e["action"] for e in audit(api, fid)] == ["set_deadline", "set_deadline"]
