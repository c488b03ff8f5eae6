"""Read-only sessions on SQLite take no write lock; a lease's sessions on PostgreSQL run each
statement as its own transaction and leave the pooled connection transactional again; the parsed federation config
is cached by its content, never by id."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from sqlalchemy import text

from coordinator.db import (READ_ONLY, make_engine, make_lease_session_factory, make_read_session_factory,
                            make_session_factory)
from coordinator.models import Federation
from coordinator.services.federations import federation_config

pytestmark = pytest.mark.unit


def _run_in_thread(fn):
    done = threading.Event()
    errors: list[BaseException] = []

    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)
        finally:
            done.set()

    threading.Thread(target=target, daemon=True).start()
    return done, errors


def test_read_session_does_not_wait_for_the_write_lock_but_a_write_session_does(tmp_path):
    path = tmp_path / "db.sqlite"
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
        conn.execute(text("INSERT INTO t VALUES (7)"))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    holder.execute("INSERT INTO t VALUES (8)")
    seen: list[int] = []

    def read():
        with make_read_session_factory(engine)() as session, session.begin():
            seen.extend(session.scalars(text("SELECT x FROM t")))

    def write():
        with make_session_factory(engine)() as session, session.begin():
            session.execute(text("INSERT INTO t VALUES (9)"))

    try:
        read_done, read_errors = _run_in_thread(read)
        assert read_done.wait(10), "the read-only session queued behind the write lock"
        assert read_errors == [] and seen == [7]  # the holder's uncommitted row is not visible

        write_done, write_errors = _run_in_thread(write)
        assert not write_done.wait(0.5), "a write session must wait for the lock (BEGIN IMMEDIATE)"
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert write_done.wait(10) and write_errors == []
    with engine.connect() as conn:
        assert sorted(conn.scalars(text("SELECT x FROM t"))) == [7, 8, 9]
    engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_lease_session_commits_each_statement_on_postgres_and_the_pool_stays_transactional(backend, tmp_path,
                                                                                             request):
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    else:
        server = request.getfixturevalue("pg_server")
        url = server.create_database()
        request.addfinalizer(lambda: server.drop_database(url))
    autocommit = backend == "postgres"  # SQLite's lease sessions are ordinary transactions
    engine = make_engine(url)
    observer = make_engine(url)  # a second engine, its own connections, reading (on SQLite: no write lock)
    observing = observer.execution_options(**{READ_ONLY: True})
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))

    def others_see() -> list[int]:
        with observing.connect() as conn:
            return sorted(conn.scalars(text("SELECT x FROM t")))

    try:
        with make_lease_session_factory(engine)() as session, session.begin():
            session.execute(text("UPDATE t SET x = 2"))
            # PostgreSQL: committed by the statement itself, before the session ends
            assert others_see() == ([2] if autocommit else [1])
            session.execute(text("UPDATE t SET x = 3"))
            assert others_see() == ([3] if autocommit else [1])
        assert others_see() == [3]
        # the same pooled connection (one is checked out at a time) serves an ordinary session:
        # a transaction again, its writes unseen by others until the commit and undone by a rollback
        for _ in range(2):
            with make_session_factory(engine)() as session:
                with session.begin():
                    session.execute(text("UPDATE t SET x = 4"))
                    assert others_see() == [3]
                    session.rollback()
            assert others_see() == [3]
        assert engine.pool.checkedin() == 1
    finally:
        engine.dispose()
        observer.dispose()


def _config(name: str, quorum: int) -> dict:
    from shared.config import FederationConfig
    from shared.manifest import AdapterManifest, HeadSpec, TierSpec, qv_targets

    manifest = AdapterManifest(targets=qv_targets(2, 8), tiers={t: TierSpec(rank=2, alpha=2)
                                                              for t in ("root", "cluster", "leaf")},
                               head=HeadSpec(in_features=8, num_classes=3))
    return FederationConfig.model_validate({
        "name": name, "backbone": {"model": "vit_tiny_patch16_224", "model_kwargs": {}, "sha256": "0" * 64},
        "manifest": manifest.model_dump(), "schedule": {"min_clients": 2, "quorum_min_clients": quorum},
    }).model_dump(mode="json")


def test_federation_config_is_parsed_once_per_content_and_never_shared_by_id():
    one = Federation(id=1, name="a", config=_config("a", 1))
    same_content = Federation(id=5, name="a", config=_config("a", 1))
    other_db_same_id = Federation(id=1, name="b", config=_config("b", 2))

    first = federation_config(one)

    assert federation_config(same_content) is first
    other = federation_config(other_db_same_id)
    assert other is not first
    assert (first.name, first.schedule.quorum_min_clients) == ("a", 1)
    assert (other.name, other.schedule.quorum_min_clients) == ("b", 2)
