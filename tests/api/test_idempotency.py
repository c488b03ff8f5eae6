"""Replays are harmless: the same upload (same lease, same body) sent three times is stored once
and answered three times alike; a different body under a finished lease is refused and changes
nothing. Runs on every backend of the ``database_url`` fixture."""

from __future__ import annotations

import hashlib

import pytest
from conftest import bearer, create_federation, register, tick
from conftest import tiny_root_body as root_body
from sqlalchemy import func, select

from coordinator.models import Blob, Task

pytestmark = pytest.mark.api


def upload_rows(app) -> list[Blob]:
    with app.state.session_factory() as s:
        return list(s.scalars(select(Blob).where(Blob.kind == "upload")))


def task_row(app, task_id: int) -> tuple:
    with app.state.session_factory() as s:
        t = s.get(Task, task_id)
        return t.status, t.lease_id, t.upload_sha256, t.upload_bytes, t.attempt, t.num_samples


def test_replayed_upload_is_stored_once_and_answered_alike(api, app):
    fid, secret = create_federation(api)
    a, token = register(api, fid, secret, "a")
    register(api, fid, secret, "b")
    tick(app)
    task = api.post(f"/v1/clients/{a}/lease", headers=bearer(token)).json()["task"]
    url, params = f"/v1/tasks/{task['task_id']}/upload", {"lease_id": task["lease_id"]}
    body = root_body(1)
    sha = hashlib.sha256(body).hexdigest()

    replies = [api.put(url, params=params, content=body, headers=bearer(token)) for _ in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 200], [r.text for r in replies]
    assert replies[0].json() == replies[1].json() == replies[2].json()
    assert replies[0].json() == {"task_id": task["task_id"], "sha256": sha, "bytes": len(body)}
    rows = upload_rows(app)
    assert [(b.sha256, b.size) for b in rows] == [(sha, len(body))]
    assert task_row(app, task["task_id"])[:4] == ("leased", task["lease_id"], sha, len(body))
    blobs = app.state.blobs
    assert blobs.path(sha).read_bytes() == body
    assert list((blobs.root / "tmp").iterdir()) == []  # no temp file left behind by the replays

    done = {"lease_id": task["lease_id"], "num_samples": 7, "metrics": {"loss": 0.5}}
    completions = [api.post(f"/v1/tasks/{task['task_id']}/complete", json=done, headers=bearer(token))
                   for _ in range(3)]
    assert [r.status_code for r in completions] == [200, 200, 200]
    assert completions[0].json() == completions[1].json() == completions[2].json()
    assert completions[0].json()["status"] == "done"
    finished = task_row(app, task["task_id"])
    assert finished == ("done", task["lease_id"], sha, len(body), 1, 7)

    # the same body once more, after completion: the same answer, still one row
    again = api.put(url, params=params, content=body, headers=bearer(token))
    assert again.status_code == 200 and again.json() == replies[0].json()

    # a different body under the finished lease: refused, and nothing changes
    other = root_body(2)
    r = api.put(url, params=params, content=other, headers=bearer(token))
    assert r.status_code == 409 and r.json()["error"] == "task_finished", r.text
    assert task_row(app, task["task_id"]) == finished
    assert [(b.sha256, b.size) for b in upload_rows(app)] == [(sha, len(body))]
    assert not blobs.exists(hashlib.sha256(other).hexdigest())
    assert list((blobs.root / "tmp").iterdir()) == []
    # a completion with other numbers under the finished lease answers the first result
    r = api.post(f"/v1/tasks/{task['task_id']}/complete", json={**done, "num_samples": 99}, headers=bearer(token))
    assert r.status_code == 200 and task_row(app, task["task_id"]) == finished
    with app.state.session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Task).where(Task.upload_sha256 == sha)) == 1
