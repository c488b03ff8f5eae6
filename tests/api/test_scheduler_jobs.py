"""The scheduler advances federations as jobs on PostgreSQL: one federation's long advance (a
clustering, an aggregation) does not hold up the others, is not started twice while it runs, and
is exclusive across replicas by the federation's advisory lock. SQLite advances them in turn."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import create_federation, register

import coordinator.services.scheduling as scheduling
from coordinator.app import Scheduler

pytestmark = [pytest.mark.api, pytest.mark.timeout(120)]


def _status(api, fid: int) -> dict:
    from conftest import admin_headers

    return api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()


def test_a_long_advance_of_one_federation_does_not_hold_up_another(api, app, monkeypatch, database_url):
    slow, _secret = create_federation(api, "slow", schedule={"min_clients": 1})
    fast, fast_secret = create_federation(api, "fast", schedule={"min_clients": 1})
    register(api, fast, fast_secret, "f0")
    inside, release = threading.Event(), threading.Event()
    calls: list[int] = []
    real = scheduling.advance_federation

    def advance(session, blobs, fid, now):  # noqa: ANN001, ANN202
        calls.append(fid)
        if fid == slow:
            inside.set()
            assert release.wait(60)
        return real(session, blobs, fid, now)

    monkeypatch.setattr(scheduling, "advance_federation", advance)
    scheduler: Scheduler = app.state.scheduler
    if database_url.startswith("sqlite"):
        assert scheduler._pool is None  # one writer: federations are advanced in turn, inside the tick
        return
    assert scheduler._pool is not None
    scheduler.tick(wait=False)
    assert inside.wait(20)
    deadline = time.monotonic() + 20
    while _status(api, fast)["state"] != "root" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _status(api, fast)["state"] == "root"  # its first round opened while 'slow' was still inside
    scheduler.tick(wait=False)  # 'slow' is still running: not started a second time
    time.sleep(0.3)
    assert calls.count(slow) == 1
    release.set()
    deadline = time.monotonic() + 20
    while slow in scheduler._running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow not in scheduler._running
    scheduler.tick(wait=False)
    deadline = time.monotonic() + 20
    while calls.count(slow) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert calls.count(slow) == 2


@pytest.mark.postgres
def test_the_federation_lock_keeps_two_advances_of_one_federation_apart(app, api, database_url):
    """While a transaction holds a federation's advisory lock (another replica advancing it),
    ``advance_one`` leaves the federation for the next tick."""
    if not database_url.startswith("postgresql"):
        pytest.skip("advisory locks are PostgreSQL's")
    from sqlalchemy import func, select

    fid, secret = create_federation(api, "locked", schedule={"min_clients": 1})
    register(api, fid, secret, "c0")
    factory = app.state.session_factory
    with factory() as other, other.begin():
        assert other.scalar(select(func.pg_try_advisory_xact_lock(scheduling.FEDERATION_LOCK_SPACE, fid)))
        assert scheduling.advance_one(factory, app.state.blobs, fid, app.state.clock()) == 0
        assert _status(api, fid)["state"] == "enrolling"
    assert scheduling.advance_one(factory, app.state.blobs, fid, app.state.clock()) > 0
    assert _status(api, fid)["state"] == "root"


def test_the_scheduler_tells_the_held_requests_whom_it_opened_tasks_for(api, app, database_url):
    """After a tick (on PostgreSQL: after each federation's job), the held lease requests are told
    the clients for which tasks opened, so that they are leased for without a query."""
    fid, secret = create_federation(api, "named", schedule={"min_clients": 2})
    a, _ = register(api, fid, secret, "a")
    b, _ = register(api, fid, secret, "b")
    told: list[set[int]] = []
    lock = threading.Lock()

    def on_change(clients):  # noqa: ANN001, ANN202
        with lock:
            told.append(None if clients is None else set(clients))

    scheduler: Scheduler = app.state.scheduler
    scheduler._on_change = on_change
    assert scheduler.tick(wait=True) >= 1
    deadline = time.monotonic() + 20
    while not any(t and {a, b} <= t for t in told) and time.monotonic() < deadline:
        time.sleep(0.05)   # a job's callback may run just after the tick has its result
    with lock:
        assert None not in told
        assert set().union(*told) == {a, b}
    assert _status(api, fid)["state"] == "root"
