"""Engine and session factory. SQLite gets WAL, a busy timeout and foreign keys."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

READ_ONLY = "hilora_read_only"


class DatabaseUrlError(ValueError):
    """HILORA_DATABASE_URL cannot be used: not a URL SQLAlchemy knows, or its driver is not
    installed (``hilora[postgres]``); ``str()`` is one line saying what to do."""


def _shown(url: str) -> str:
    """The URL without its password (``make_url`` hides it), for an error message."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all
        return url.split("@")[-1][:200]


def make_engine(url: str) -> Engine:
    """The engine for ``url``.

    Raises:
        DatabaseUrlError: a URL SQLAlchemy does not know, or a driver that is not installed (the
            Postgres driver psycopg comes with ``pip install "hilora[postgres]"``).
    """
    try:
        return _make_engine(url)
    except ModuleNotFoundError as exc:
        module = (exc.name or "").split(".")[0]
        if module == "psycopg":
            hint = 'the PostgreSQL driver psycopg (3) is not installed: pip install "hilora[postgres]"'
        elif url.startswith(("postgresql", "postgres")):
            hint = (f"its driver ({module}) is not installed; hilora supports psycopg 3: write the URL as "
                    f'postgresql+psycopg://USER:PASSWORD@HOST/DB and pip install "hilora[postgres]"')
        else:
            hint = f"its driver ({module}) is not installed"
        raise DatabaseUrlError(f"HILORA_DATABASE_URL {_shown(url)}: {hint}") from exc
    except ArgumentError as exc:   # not a URL, or an unknown dialect (NoSuchModuleError is one)
        raise DatabaseUrlError(f"HILORA_DATABASE_URL {_shown(url)} is not a database URL hilora can use "
                               f"({' '.join(str(exc).split())}); e.g. sqlite:///./hilora-state/coordinator.db or "
                               f"postgresql+psycopg://USER:PASSWORD@HOST/DB") from exc


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            # Let SQLAlchemy, not the driver, open transactions (see _begin_immediate).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn):  # noqa: ANN001
            # Take the write lock at BEGIN: a deferred transaction that later writes can fail with
            # SQLITE_BUSY at once instead of waiting out busy_timeout. Read-only sessions
            # (make_read_session_factory) begin deferred: under WAL they take no lock at all.
            if conn.get_execution_options().get(READ_ONLY):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def make_read_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions for transactions that only read (an upload's plan): on SQLite they do not queue
    for the database's single write lock behind the writers. Writing in one is a bug; SQLite then
    takes the lock late and may answer SQLITE_BUSY. On Postgres they are ordinary sessions."""
    return sessionmaker(bind=engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)


def make_lease_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions for a lease. On PostgreSQL every statement is its own transaction: a lease's
    statements (the authentication read, the ``last_seen_at`` step, the guarded UPDATE that takes
    the task and reads the round's inputs with it) are each atomic alone and need no common
    snapshot (under READ COMMITTED they had none), so BEGIN and COMMIT, two of an empty poll's four
    round trips and two of a grant's six, are left out. A failure after the UPDATE (building the
    answer) leaves the task leased until its lease expires, as an answer lost on its way does.

    On SQLite (no round trips) the ordinary sessions: there a connection switched back from
    autocommit would run a PRAGMA and leave its transactions to the driver again, which
    ``_sqlite_pragmas`` turns off."""
    if engine.dialect.name != "postgresql":
        return make_session_factory(engine)
    return sessionmaker(bind=engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)
