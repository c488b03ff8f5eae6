"""PATCH /v1/federations/F/schedule (issue 16, "Operating it"): schedule fields of a live federation
change from the next round, validated as at creation (a config that would wedge the scheduler is
refused on change as on creation, issue 15), audited; a round count below what the current stage
has done is refused. On SQLite and Postgres."""

from __future__ import annotations

import pytest
from conftest import admin_headers, bearer, create_federation, register, tick
from sqlalchemy import select
from test_quorum import finish, lease, rounds

from coordinator.models import Task

pytestmark = pytest.mark.api


def _patch(api, fid, changes, reason="", headers=None):
    return api.patch(f"/v1/federations/{fid}/schedule", json={"changes": changes, "reason": reason},
                     headers=admin_headers() if headers is None else headers)


def _started(api, app, n=4, **schedule):
    fid, secret = create_federation(api, schedule={"min_clients": n, "root_rounds": 3, **schedule})
    clients = [register(api, fid, secret, f"c{i}") for i in range(n)]
    tick(app)
    return fid, clients


def test_a_change_applies_from_the_next_round_and_is_audited(api, app, clock):
    fid, clients = _started(api, app, lease_seconds=30)
    first = rounds(app)[-1]
    r = _patch(api, fid, {"clients_per_round": {"fraction": 0.5}, "quorum_min_clients": 2,
                          "round_deadline_seconds": 900, "root_rounds": 4}, reason="halve the rounds' cost")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["changes"] == {"clients_per_round": [{"fraction": 1.0, "min": 2, "max": None},
                                                     {"fraction": 0.5, "min": 2, "max": None}],
                               "quorum_min_clients": [1, 2], "round_deadline_seconds": ["auto", 900],
                               "root_rounds": [3, 4]}
    assert body["schedule"]["clients_per_round"]["fraction"] == 0.5
    # the open round keeps what it opened with
    assert len([t for t in (lease(api, c, tok) for c, tok in clients) if t]) == 4
    again = rounds(app)[-1]
    assert (again.id, again.quorum, again.sample_seed, again.deadline_at) == (first.id, 1, None, None)
    with app.state.session_factory() as s:  # finish round 1 with the tasks leased above
        tasks = {t.client_id: t for t in s.scalars(select(Task).where(Task.round_id == first.id))}
    for cid, tok in clients:
        t = tasks[cid]
        finish(api, {"task_id": t.id, "lease_id": t.lease_id, "upload": ["A", "B", "head"]}, tok, seed=cid)
    tick(app)
    second = rounds(app)[-1]
    assert second.number == 2 and second.sampled_from == 4 and second.quorum == 2
    assert (second.deadline_at - second.created_at).total_seconds() == 900
    cfg = api.get(f"/v1/federations/{fid}/config", headers=admin_headers()).json()
    assert cfg["schedule"]["root_rounds"] == 4 and cfg["schedule"]["quorum_min_clients"] == 2
    [event] = [e for e in api.get(f"/v1/federations/{fid}/audit", headers=admin_headers()).json()
               if e["action"] == "change_schedule"]
    assert event["detail"]["reason"] == "halve the rounds' cost" and event["detail"]["changes"]["root_rounds"] == [3, 4]
    # the same values again: nothing changes, still audited as an (empty) change
    same = _patch(api, fid, {"root_rounds": 4})
    assert same.status_code == 200 and same.json()["changes"] == {}


@pytest.mark.parametrize("changes, expected", [
    ({"root_rounds": -1}, "root_rounds"),
    ({"lease_seconds": 0}, "lease_seconds"),
    ({"clients_per_round": {"fraction": 0}}, "clients_per_round.fraction"),
    ({"clients_per_round": {"min": 5, "max": 2}}, "max (2) is below min (5)"),
    ({"round_deadline_seconds": "soon"}, "round_deadline_seconds"),
    ({"no_such_field": 1}, "no_such_field"),
    ({"max_consecutive_failures": 0}, "max_consecutive_failures"),
    ({}, "at least one schedule field"),
])
def test_bad_changes_are_refused_and_change_nothing(api, app, changes, expected):
    fid, _clients = _started(api, app)
    before = api.get(f"/v1/federations/{fid}/config", headers=admin_headers()).json()
    r = _patch(api, fid, changes)
    assert r.status_code == 422, r.text
    assert r.json()["error"] in ("invalid_schedule", "invalid_request") and expected in r.json()["detail"], r.text
    assert api.get(f"/v1/federations/{fid}/config", headers=admin_headers()).json() == before


def test_a_round_count_below_what_the_stage_did_is_refused(api, app, clock):
    fid, clients = _started(api, app, n=2)
    for _ in range(2):
        for cid, tok in clients:
            finish(api, lease(api, cid, tok), tok, seed=cid)
        tick(app)
    assert [r.status for r in rounds(app)] == ["done", "done", "open"]
    r = _patch(api, fid, {"root_rounds": 1})
    assert r.status_code == 409 and r.json()["error"] == "stage_passed" and "at least 2" in r.json()["detail"]
    ok = _patch(api, fid, {"root_rounds": 2})  # equal to what is done: the open round is the last
    assert ok.status_code == 200, ok.text
    for cid, tok in clients:
        finish(api, lease(api, cid, tok), tok, seed=cid)
    tick(app)
    assert api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()["state"] != "root"


def test_only_the_admin_changes_a_schedule(api, app):
    fid, clients = _started(api, app)
    assert _patch(api, fid, {"root_rounds": 9}, headers={}).status_code == 401
    assert _patch(api, fid, {"root_rounds": 9}, headers=bearer(clients[0][1])).status_code in (401, 403)
    assert _patch(api, 999, {"root_rounds": 9}).status_code == 404
    r = api.patch(f"/v1/federations/{fid}/schedule", json={"changes": {"root_rounds": 9}, "extra": 1},
                  headers=admin_headers())
    assert r.status_code == 422
