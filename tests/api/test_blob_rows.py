"""``ensure_blob_row``, the one way a blob's row is recorded (uploads, adapter versions, affinities,
client features, backbones): idempotent, and race-safe between two transactions on both backends."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from coordinator.models import Blob
from coordinator.services.adapters import ensure_blob_row

pytestmark = pytest.mark.api


def test_recording_a_blob_twice_keeps_one_row_and_its_first_kind(app, clock):
    with app.state.session_factory() as s, s.begin():
        ensure_blob_row(s, "a" * 64, 10, "upload", clock())
        ensure_blob_row(s, "a" * 64, 10, "adapter", clock())
    with app.state.session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Blob).where(Blob.sha256 == "a" * 64)) == 1
        assert s.get(Blob, "a" * 64).kind == "upload"


def test_two_transactions_recording_the_same_blob_at_once_both_succeed(app, clock):
    """The second INSERT waits for the first transaction (a row lock on Postgres, the write lock on
    SQLite) and then does nothing: no unique violation (a 500 before it was race-safe)."""
    sha = "b" * 64
    first = app.state.session_factory()
    first.begin()
    ensure_blob_row(first, sha, 20, "upload", clock())  # not committed yet
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with app.state.session_factory() as s, s.begin():
                ensure_blob_row(s, sha, 20, "upload", clock())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(timeout=0.5)  # it waits on the first transaction
    first.commit()
    first.close()
    thread.join(timeout=30)
    assert not thread.is_alive() and errors == []
    with app.state.session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Blob).where(Blob.sha256 == sha)) == 1
