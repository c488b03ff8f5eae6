"""Retention and garbage collection of uploads and blobs; deleting a client."""

from __future__ import annotations

import os
import time

import pytest
from conftest import admin_headers, bearer, create_federation, register, tick
from sqlalchemy import func, select
from test_api import valid_root_upload

from coordinator.models import AdapterVersion, Blob, Client, Round, Task
from coordinator.services.retention import collect_garbage
from shared.tensors import pack_tensors

pytestmark = pytest.mark.api


def run_round(api, app, clients, seed0=0):
    for i, (cid, tok) in enumerate(clients):
        task = api.post(f"/v1/clients/{cid}/lease", headers=bearer(tok)).json()["task"]
        assert task is not None
        r = api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                    content=pack_tensors(valid_root_upload(seed0 + i)), headers=bearer(tok))
        assert r.status_code == 200, r.text
        r = api.post(f"/v1/tasks/{task['task_id']}/complete",
                     json={"lease_id": task["lease_id"], "num_samples": 4, "metrics": {"loss": 1.0}},
                     headers=bearer(tok))
        assert r.status_code == 200, r.text
    tick(app)


def blob_rows(app, kind):
    with app.state.session_factory() as s:
        return set(s.scalars(select(Blob.sha256).where(Blob.kind == kind)))


def gc(app, clock, retention, grace=0.0, dry_run=False):
    return collect_garbage(app.state.session_factory, app.state.blobs, clock(), retention_seconds=retention,
                           grace_seconds=grace, dry_run=dry_run)


def test_retention_releases_old_uploads_and_keeps_adapters(api, app, clock):
    fid, secret = create_federation(api, schedule={"min_clients": 2, "root_rounds": 3})
    clients = [register(api, fid, secret, n) for n in ("a", "b")]
    tick(app)
    run_round(api, app, clients, 0)
    clock.advance(100)
    run_round(api, app, clients, 10)
    uploads = blob_rows(app, "upload")
    adapters = blob_rows(app, "adapter")
    assert len(uploads) == 4 and len(adapters) == 3  # versions 0, 1, 2
    # nothing old enough yet: a dry run and a real run delete nothing
    assert gc(app, clock, retention=1000).blobs_deleted == 0
    # retention 50 s: the first round (closed 100 s ago) goes, the second stays
    dry = gc(app, clock, retention=50, dry_run=True)
    assert (dry.uploads_released, dry.blobs_deleted) == (2, 2)
    assert blob_rows(app, "upload") == uploads  # dry run changed nothing
    report = gc(app, clock, retention=50)
    assert (report.uploads_released, report.blobs_deleted) == (2, 2) and report.bytes_freed > 0
    left = blob_rows(app, "upload")
    assert len(left) == 2
    for sha in uploads - left:
        assert not app.state.blobs.exists(sha)
    for sha in left | adapters:
        assert app.state.blobs.exists(sha)
    assert blob_rows(app, "adapter") == adapters  # adapter versions are never collected
    # the federation still serves its adapters
    with app.state.session_factory() as s:
        vid = s.scalar(select(func.max(AdapterVersion.id)))
    assert api.get(f"/v1/adapters/{vid}", headers=admin_headers()).status_code == 200


def test_orphan_and_temp_files_go_only_after_grace(app, clock):
    blobs = app.state.blobs
    orphan = blobs.put_bytes(b"left by a crash between writing a blob and committing its row")
    fd, tmp = blobs.temp_file()
    os.close(fd)
    young = gc(app, clock, retention=None, grace=3600)
    assert (young.orphan_files_deleted, young.temp_files_deleted) == (0, 0)
    assert blobs.exists(orphan) and tmp.exists()
    past = time.time() - 7200
    os.utime(blobs.path(orphan), (past, past))
    os.utime(tmp, (past, past))
    old = gc(app, clock, retention=None, grace=3600)
    assert (old.orphan_files_deleted, old.temp_files_deleted) == (1, 1)
    assert not blobs.exists(orphan) and not tmp.exists()


def test_delete_client_removes_uploads_keeps_aggregates(api, app, clock):
    fid, secret = create_federation(api, schedule={"min_clients": 2, "root_rounds": 3})
    clients = [register(api, fid, secret, n) for n in ("a", "b", "c")]
    tick(app)
    run_round(api, app, clients, 0)
    with app.state.session_factory() as s:
        versions_before = {(v.version, v.blob_sha256) for v in s.scalars(select(AdapterVersion))}
        a_uploads = set(s.scalars(select(Task.upload_sha256).where(Task.client_id == clients[0][0],
                                                                    Task.upload_sha256.is_not(None))))
    r = api.delete(f"/v1/federations/{fid}/clients/{clients[0][0]}", headers=admin_headers())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "a" and body["uploads_released"] == 1 and body["blobs_deleted"] == 1
    assert body["tasks_deleted"] == 2  # the done task of round 1 and the pending one of round 2
    with app.state.session_factory() as s:
        assert s.get(Client, clients[0][0]) is None
        assert s.scalar(select(func.count()).select_from(Task).where(Task.client_id == clients[0][0])) == 0
        assert {(v.version, v.blob_sha256) for v in s.scalars(select(AdapterVersion))} == versions_before
        open_round = s.scalars(select(Round).where(Round.status == "open")).one()
        assert s.scalar(select(func.count()).select_from(Task).where(Task.round_id == open_round.id)) == 2
    for sha in a_uploads:
        assert not app.state.blobs.exists(sha)
    # the deleted client's token is dead; the others go on and the round completes
    assert api.post(f"/v1/clients/{clients[0][0]}/lease", headers=bearer(clients[0][1])).status_code == 401
    run_round(api, app, clients[1:], 20)
    with app.state.session_factory() as s:
        assert s.scalar(select(func.count()).select_from(AdapterVersion)) == 3
    # bad input
    assert api.delete(f"/v1/federations/{fid}/clients/{clients[0][0]}", headers=admin_headers()).status_code == 404
    assert api.delete(f"/v1/federations/999/clients/{clients[1][0]}", headers=admin_headers()).status_code == 404
    assert api.delete(f"/v1/federations/{fid}/clients/{clients[1][0]}", headers=bearer(clients[1][1])).status_code == 401


def test_gc_command(app, settings, monkeypatch):
    import json

    from typer.testing import CliRunner

    from hilora.cli import app as cli

    orphan = app.state.blobs.put_bytes(b"orphan bytes")
    past = time.time() - 7200
    os.utime(app.state.blobs.path(orphan), (past, past))
    monkeypatch.setenv("HILORA_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("HILORA_BLOB_DIR", str(settings.blob_dir))
    monkeypatch.setenv("HILORA_ADMIN_TOKEN", settings.admin_token)
    runner = CliRunner()
    dry = runner.invoke(cli, ["gc", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["orphan_files_deleted"] == 1 and app.state.blobs.exists(orphan)
    real = runner.invoke(cli, ["gc"])
    assert real.exit_code == 0 and json.loads(real.output)["orphan_files_deleted"] == 1
    assert not app.state.blobs.exists(orphan)
    monkeypatch.setenv("HILORA_ADMIN_TOKEN", "short")
    bad = runner.invoke(cli, ["gc"])
    assert bad.exit_code == 2 and "at least 16 characters" in bad.output
