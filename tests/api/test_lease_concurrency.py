"""Leases under real concurrency, on SQLite and on PostgreSQL: many threads, each with its own
session, lease the tasks of the same clients at once. Every task is handed out exactly once per
attempt; after the leases expire, every task is handed out exactly once more, at attempt 2."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from conftest import create_federation, register
from sqlalchemy import create_engine, select

from coordinator.models import Client, Federation, Task
from coordinator.services.adapters import latest_version
from coordinator.services.scheduling import open_round
from coordinator.services.tasks import expire_leases, lease_task

pytestmark = pytest.mark.api

LEASE_SECONDS = 30
CLIENTS = 50
THREADS_PER_CLIENT = 4  # threads start in groups of this size on the same client, to contend
# backend: (threads, rounds); 50 clients x rounds = tasks
SIZES = {"sqlite": (16, 10), "postgresql": (64, 21)}
DEADLINE_S = 180


def _setup(api, app, clock, rounds: int) -> list[int]:
    fid, secret = create_federation(api, "lease-race",
                                    schedule={"min_clients": 10_000, "lease_seconds": LEASE_SECONDS,
                                              "max_attempts": 3})
    client_ids = [register(api, fid, secret, f"c{i:03d}")[0] for i in range(CLIENTS)]
    with app.state.session_factory() as session, session.begin():
        fed = session.get(Federation, fid)
        root = latest_version(session, fid, "root")
        assert root is not None
        for _ in range(rounds):
            open_round(session, fed, "root", "root", client_ids, clock(), root.id)
    return client_ids


def _lease_everything(session_factory, client_ids: list[int], threads: int, now, total: int) -> list[tuple]:
    """``threads`` threads lease concurrently. They go in groups of THREADS_PER_CLIENT, each group
    over a window of clients starting on the same one; the windows overlap so that every client is
    drained by at least two groups at once. A thread leases from a client until it answers 'no
    task', then moves on. Returns (task_id, attempt, lease_id, assigned client, asked client) for
    every task handed out."""
    leased: list[tuple] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads, timeout=60)
    groups = max(1, threads // THREADS_PER_CLIENT)
    window = min(len(client_ids), 2 * -(-len(client_ids) // groups))
    max_calls = total + 2 * len(client_ids) + 50  # one thread could, at worst, lease everything
    deadline = time.monotonic() + DEADLINE_S

    def run(t: int) -> None:
        try:
            start = (t // THREADS_PER_CLIENT % groups) * len(client_ids) // groups
            order = (client_ids[start:] + client_ids[:start])[:window]
            barrier.wait()
            calls = 0
            for cid in order:
                while True:
                    calls += 1
                    if calls > max_calls or time.monotonic() > deadline:
                        raise AssertionError(f"thread {t} still leasing after {calls} calls")
                    with session_factory() as session, session.begin():
                        client = session.get(Client, cid)
                        resp = lease_task(session, client, f"worker-{t}", now)
                    if resp.task is None:
                        break
                    a = resp.task
                    with lock:
                        leased.append((a.task_id, a.attempt, a.lease_id, a.client_id, cid))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            with lock:
                errors.append(f"thread {t}: {type(exc).__name__}: {exc}")
            barrier.abort()

    pool = [threading.Thread(target=run, args=(t,), name=f"leaser-{t}") for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=max(1.0, deadline - time.monotonic() + 30))
    assert not any(th.is_alive() for th in pool), "leasing threads did not finish in time"
    assert not errors, "\n".join(errors[:20])
    for cid in client_ids:  # drained: every client now answers 'no task'
        with session_factory() as session, session.begin():
            resp = lease_task(session, session.get(Client, cid), "checker", now)
        assert resp.task is None, f"client {cid} still had task {resp.task.task_id}"
    return leased


def _assert_each_once(leased: list[tuple], task_ids: set[int], attempt: int) -> None:
    counts = Counter(x[0] for x in leased)
    duplicates = {tid: n for tid, n in counts.items() if n > 1}
    assert not duplicates, f"tasks leased more than once: {sorted(duplicates.items())[:20]}"
    missing = task_ids - set(counts)
    assert not missing, f"{len(missing)} tasks never leased: {sorted(missing)[:20]}"
    assert set(counts) == task_ids
    assert {x[1] for x in leased} == {attempt}
    assert len({x[2] for x in leased}) == len(leased), "a lease id was handed out twice"
    wrong = [x for x in leased if x[3] != x[4]]
    assert not wrong, f"tasks leased to another client: {wrong[:10]}"


@pytest.mark.timeout(600)
def test_concurrent_leases_hand_every_task_out_exactly_once(api, app, clock):
    engine = app.state.engine
    backend = engine.dialect.name
    threads, rounds = SIZES[backend]
    factory = app.state.session_factory
    extra_engine = None
    if backend == "postgresql":
        # The app's pool (10 + 20 overflow) would cap the claimers below 64: give them one
        # connection each, so 64 transactions really run at once.
        extra_engine = create_engine(engine.url, pool_size=threads, max_overflow=0, pool_timeout=60)
        factory = lambda: app.state.session_factory(bind=extra_engine)  # noqa: E731
    try:
        client_ids = _setup(api, app, clock, rounds)
        with app.state.session_factory() as session:
            task_ids = set(session.scalars(select(Task.id)))
        total = len(task_ids)
        assert total == CLIENTS * rounds
        if backend == "postgresql":
            assert total > 1000

        first = _lease_everything(factory, client_ids, threads, clock(), total)
        _assert_each_once(first, task_ids, attempt=1)
        with app.state.session_factory() as session:
            rows = session.execute(select(Task.status, Task.attempt, Task.lease_id)).all()
        assert Counter((s, a) for s, a, _ in rows) == {("leased", 1): total}
        assert {lid for _, _, lid in rows} == {x[2] for x in first}

        clock.advance(LEASE_SECONDS + 1)
        with app.state.session_factory() as session, session.begin():
            assert expire_leases(session, clock()) == total
        with app.state.session_factory() as session:
            assert Counter(session.scalars(select(Task.status))) == {"pending": total}

        second = _lease_everything(factory, client_ids, threads, clock(), total)
        _assert_each_once(second, task_ids, attempt=2)
        assert not {x[2] for x in first} & {x[2] for x in second}, "a lease id was reused"
        with app.state.session_factory() as session:
            assert Counter(session.execute(select(Task.status, Task.attempt)).all()) == {("leased", 2): total}
    finally:
        if extra_engine is not None:
            extra_engine.dispose()
