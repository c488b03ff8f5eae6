"""Deleting a federation (``DELETE /v1/federations/F?confirm=NAME``), on SQLite and PostgreSQL: after
a whole cascade with clusters, pins, refinement and a late client, everything it stored goes (rows
and blob files), a federation sharing its backbone keeps it, the audit log keeps the deletion, its
tokens stop working, and a missing or wrong confirmation changes nothing."""

from __future__ import annotations

import pytest
from conftest import admin_headers, bearer, create_federation, register, tick
from sqlalchemy import func, select
from test_cascade_state_machine import GROUP_OF, group_directions, run_pending

from coordinator.models import AdapterVersion, Blob, Client, Cluster, ClusteringRun, Federation, Round, Task

pytestmark = pytest.mark.api


def counts(app, fid):
    with app.state.session_factory() as session:
        return {model.__name__: session.scalar(select(func.count()).select_from(model).where(
            model.federation_id == fid)) for model in (Client, Round, Task, AdapterVersion, Cluster, ClusteringRun)}


def test_deleting_a_federation_removes_what_it_stored_and_only_that(api, app):
    dirs = group_directions()
    fid, secret = create_federation(api, name="doomed", schedule={"min_clients": 6, "root_rounds": 1,
                                                                  "cluster_rounds": 1, "leaf_rounds": 1})
    other, other_secret = create_federation(api, name="keeper")   # the same backbone
    clients = {name: register(api, fid, secret, name) for name in GROUP_OF}
    register(api, other, other_secret, "k0")
    tick(app)
    for seed in range(6):
        if api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()["state"] == "serving":
            break
        run_pending(api, clients, dirs, seed=seed)
    label = api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()["clusters"][0]["label"]
    assert api.post(f"/v1/federations/{fid}/clusters/{label}/pin", json={"version": 1},
                    headers=admin_headers()).status_code == 200
    assert all(n > 0 for n in counts(app, fid).values())
    with app.state.session_factory() as session:
        fed = session.get(Federation, fid)
        backbone = fed.backbone_sha256
        own = set(session.scalars(select(AdapterVersion.blob_sha256).where(AdapterVersion.federation_id == fid)))
        # content-addressed: the same initial root (same backbone, same seed) is also the other's
        shared = set(session.scalars(select(AdapterVersion.blob_sha256).where(AdapterVersion.federation_id == other)))
    assert shared & own
    shared_files = shared & own
    own -= shared
    blobs = app.state.blobs
    assert own and all(blobs.path(sha).exists() for sha in own)

    for confirm in (None, "Doomed", "keeper"):
        r = api.delete(f"/v1/federations/{fid}", params={} if confirm is None else {"confirm": confirm},
                       headers=admin_headers())
        assert r.status_code == 409 and r.json()["error"] == "confirmation_required", r.text
        assert "doomed" in r.json()["detail"]
    cid, token = clients["a0"]
    assert api.delete(f"/v1/federations/{fid}", params={"confirm": "doomed"}, headers=bearer(token)).status_code in (
        401, 403)
    assert all(n > 0 for n in counts(app, fid).values())

    r = api.delete(f"/v1/federations/{fid}", params={"confirm": "doomed"}, headers=admin_headers())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "doomed" and body["clients"] == 6 and body["adapter_versions"] >= 4
    assert body["blobs_deleted"] >= len(own) and body["bytes_freed"] > 0
    assert set(counts(app, fid).values()) == {0}
    with app.state.session_factory() as session:
        assert session.get(Federation, fid) is None
        assert not set(session.scalars(select(Blob.sha256).where(Blob.sha256.in_(own))))
        assert session.get(Blob, backbone) is not None   # "keeper" uses the same backbone
        assert all(session.get(Blob, sha) is not None for sha in shared_files)
    assert not any(blobs.path(sha).exists() for sha in own) and blobs.path(backbone).exists()
    assert all(blobs.path(sha).exists() for sha in shared_files)
    assert api.get(f"/v1/federations/{fid}", headers=admin_headers()).status_code == 404
    assert api.post(f"/v1/clients/{cid}/lease", headers=bearer(token)).status_code == 401
    with app.state.session_factory() as session:
        from coordinator.models import AuditEvent

        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "delete_federation")).one()
        assert event.federation_id == fid and event.detail["name"] == "doomed" and event.detail["clients"] == 6
    tick(app)   # the scheduler goes on with the other federation
    assert api.get(f"/v1/federations/{other}", headers=admin_headers()).json()["state"] == "enrolling"

    # the last federation using the backbone takes it along
    r = api.delete(f"/v1/federations/{other}", params={"confirm": "keeper"}, headers=admin_headers())
    assert r.status_code == 200 and r.json()["blobs_deleted"] >= 1
    with app.state.session_factory() as session:
        assert session.get(Blob, backbone) is None
    assert not blobs.path(backbone).exists()
    assert api.delete("/v1/federations/999", params={"confirm": "x"}, headers=admin_headers()).status_code == 404
