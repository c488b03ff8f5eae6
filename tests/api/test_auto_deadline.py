"""The default 'auto' round deadline (shared.deadlines) and the late cohort of clients registered
after training began (issue 15): a client that heartbeats and never uploads cannot hold a round
open for ever, a slow but honest round is not cut, and the enrollment secret cannot add members to
a running training cohort. Driven with the injected clock, on SQLite and Postgres."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from conftest import admin_headers, bearer, create_federation, register, tick
from test_quorum import finish, lease, rounds

from shared import deadlines
from shared.config import Schedule

pytestmark = pytest.mark.api

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.mark.unit
def test_auto_is_the_default_and_null_still_means_none():
    assert Schedule().round_deadline_seconds == "auto"
    assert Schedule(round_deadline_seconds=None).round_deadline_seconds is None
    assert Schedule(round_deadline_seconds=30).round_deadline_seconds == 30
    # a federation stored before 'auto' existed carries an explicit null and keeps no deadline
    stored = Schedule(round_deadline_seconds=None).model_dump(mode="json")
    assert stored["round_deadline_seconds"] is None
    assert Schedule.model_validate(stored).round_deadline_seconds is None
    assert Schedule.model_validate_json(Schedule().model_dump_json()).round_deadline_seconds == "auto"
    for bad in ("soon", 0, -5, 367 * 86400, float("inf")):
        with pytest.raises(ValueError):
            Schedule(round_deadline_seconds=bad)


@pytest.mark.unit
@pytest.mark.parametrize("longest,lease,attempts,expected", [
    (None, 120, 3, None),          # no history: no deadline at opening
    (10.0, 120, 3, 480.0),         # fast tasks: the floor, every attempt's lease and one to be leased
    (200.0, 120, 3, 800.0),        # slow tasks: 4 x the slowest recent one
    (0.0, 1, 1, 2.0),
    (float("nan"), 120, 3, None),
])
def test_history_rule(longest, lease, attempts, expected):
    got = deadlines.from_history(T0, longest, lease, attempts)
    assert (None if got is None else (got - T0).total_seconds()) == expected


@pytest.mark.unit
@pytest.mark.parametrize("half_after,now_after,lease,attempts,expected", [
    (100.0, 100.0, 10, 1, 400.0),    # the rest get 3 x as long again as the first half took
    (10.0, 10.0, 120, 3, 480.0),     # ... but never less than the floor after opening
    (100.0, 395.0, 10, 1, 405.0),    # set late (a late tick, a resume): still one lease from now
])
def test_half_rule(half_after, now_after, lease, attempts, expected):
    got = deadlines.from_half(T0, T0 + timedelta(seconds=half_after), T0 + timedelta(seconds=now_after),
                              lease, attempts)
    assert (got - T0).total_seconds() == expected


@pytest.mark.unit
@pytest.mark.parametrize("n,need", [(0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (9, 5)])
def test_half_needed(n, need):
    assert deadlines.half_needed(n) == need


def _federation(api, app, n, name="fed", **schedule):
    fid, secret = create_federation(api, name, schedule={"min_clients": n, "root_rounds": 3, **schedule})
    clients = [register(api, fid, secret, f"c{i}") for i in range(n)]
    tick(app)
    return fid, secret, clients


def _heartbeat(api, task, token):
    r = api.post(f"/v1/tasks/{task['task_id']}/heartbeat", json={"lease_id": task["lease_id"]},
                 headers=bearer(token))
    assert r.status_code == 200, r.text


def test_a_heartbeating_holder_cannot_hold_rounds_open(api, app, clock):
    """Three clients; the third leases every task, heartbeats and never uploads. Round 1 (no
    history) is decided by the half rule, round 2 by the history rule; both aggregate the two
    honest uploads and cancel the holder's task."""
    fid, _secret, clients = _federation(api, app, 3, lease_seconds=60, max_attempts=2)
    for number in (1, 2):
        tasks = [lease(api, cid, tok) for cid, tok in clients]
        opened = rounds(app)[-1]
        if number == 1:
            assert opened.deadline_at is None  # no history yet
        else:  # history: the slowest done task of round 1 took 30 s (4 x: 120 s); the floor is 60 x 3
            assert opened.deadline_at == opened.created_at + timedelta(seconds=180)
        clock.advance(30)
        finish(api, tasks[0], clients[0][1], seed=0)
        finish(api, tasks[1], clients[1][1], seed=1)
        tick(app)
        current = rounds(app)[-1]
        assert current.status == "open"
        if number == 1:  # half (2 of 3) done after 30 s: the rest get 90 s more, at least the floor
            assert current.deadline_at == current.created_at + timedelta(seconds=180)
        for _ in range(14):  # the holder keeps its lease alive well past the deadline (180 s)
            clock.advance(15)
            if rounds(app)[number - 1].status == "open":
                _heartbeat(api, tasks[2], clients[2][1])
            tick(app)
        decided = rounds(app)[number - 1]
        assert decided.status == "done" and decided.result_version_id is not None
        r = api.put(f"/v1/tasks/{tasks[2]['task_id']}/upload", params={"lease_id": tasks[2]["lease_id"]},
                    content=b"x", headers=bearer(clients[2][1]))
        assert r.status_code == 409 and r.json()["error"] == "task_cancelled"


def test_a_slow_honest_round_is_not_cut(api, app, clock):
    """Every task takes 1000 s (a big model on a slow GPU) and heartbeats: far beyond the floor
    (180 s), nothing is cancelled, and the next round's deadline follows the measured pace."""
    fid, _secret, clients = _federation(api, app, 3, lease_seconds=60, max_attempts=2)
    for number in (1, 2):
        tasks = [lease(api, cid, tok) for cid, tok in clients]
        for step in range(20):  # 1000 s of training, heartbeating every 50 s
            clock.advance(50)
            for task, (_cid, tok) in zip(tasks, clients):
                _heartbeat(api, task, tok)
            tick(app)
        for i, (task, (_cid, tok)) in enumerate(zip(tasks, clients)):
            finish(api, task, tok, seed=i)  # all three accepted: none was cancelled
            for _ in range(2 if i < 2 else 1):  # the third finishes 200 s after the first
                clock.advance(50)
                for other, (_c, other_tok) in list(zip(tasks, clients))[i + 1:]:
                    _heartbeat(api, other, other_tok)
                tick(app)
        assert rounds(app)[number - 1].status == "done"
    nxt = rounds(app)[-1]
    assert nxt.status == "open" and nxt.number == 3
    # the slowest task of the last rounds finished 1200 s after its round opened
    assert nxt.deadline_at == nxt.created_at + timedelta(seconds=4 * 1200)


def test_null_keeps_rounds_open_and_an_admin_extension_stands(api, app, clock):
    fid, _secret, clients = _federation(api, app, 3, lease_seconds=60, max_attempts=1,
                                        round_deadline_seconds=None)
    tasks = [lease(api, cid, tok) for cid, tok in clients]
    finish(api, tasks[0], clients[0][1], seed=0)
    finish(api, tasks[1], clients[1][1], seed=1)
    for _ in range(20):
        clock.advance(50)
        _heartbeat(api, tasks[2], clients[2][1])
        tick(app)
    assert rounds(app)[0].status == "open" and rounds(app)[0].deadline_at is None

    fid2, _s2, clients2 = _federation(api, app, 3, name="second", lease_seconds=60, max_attempts=1)
    tasks2 = [lease(api, cid, tok) for cid, tok in clients2]
    rid = rounds(app)[-1].id
    r = api.post(f"/v1/rounds/{rid}/deadline", json={"extend_seconds": 5000}, headers=admin_headers())
    assert r.status_code == 200, r.text
    clock.advance(10)
    finish(api, tasks2[0], clients2[0][1], seed=0)
    finish(api, tasks2[1], clients2[1][1], seed=1)
    for _ in range(20):  # the half rule would give 60 s; the admin's 5000 s stand
        clock.advance(50)
        _heartbeat(api, tasks2[2], clients2[2][1])
        tick(app)
    mine = [x for x in rounds(app) if x.id == rid][0]
    assert mine.status == "open" and mine.deadline_at == mine.created_at + timedelta(seconds=5000)


def test_clients_registered_after_training_began_are_late(api, app, clock):
    fid, secret, clients = _federation(api, app, 2, lease_seconds=60)
    cid, token = register(api, fid, secret, "newcomer")
    table = {c["name"]: c for c in api.get(f"/v1/federations/{fid}/clients", headers=admin_headers()).json()}
    assert table["newcomer"]["cohort"] == "late" and table["c0"]["cohort"] == "train"
    tasks = [lease(api, c, t) for c, t in clients]
    assert api.post(f"/v1/clients/{cid}/lease", headers=bearer(token)).json()["task"] is None
    for i, (task, (_c, tok)) in enumerate(zip(tasks, clients)):
        finish(api, task, tok, seed=i)
    tick(app)
    second = rounds(app)[-1]
    assert second.number == 2 and second.status == "open"
    with app.state.session_factory() as s:
        from sqlalchemy import select

        from coordinator.models import Task
        members = set(s.scalars(select(Task.client_id).where(Task.round_id == second.id)))
    assert members == {c for c, _t in clients}  # the newcomer is in no root round
    assert api.post(f"/v1/clients/{cid}/lease", headers=bearer(token)).json()["task"] is None
