"""Baselines are configurations of the same machinery: which tiers exist and which factors are
aggregated, kept local or frozen change what is uploaded and how it is combined."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import admin_headers, bearer, create_federation, register, tick
from sqlalchemy import select
from test_api import raw_safetensors, valid_root_upload

from coordinator.models import AdapterVersion
from shared.tensors import pack_tensors, unpack_tensors

pytestmark = pytest.mark.api


def _lease(api, cid, token):
    r = api.post(f"/v1/clients/{cid}/lease", headers=bearer(token))
    assert r.status_code == 200, r.text
    return r.json()["task"]


def _finish(api, task, token, tensors, num_samples):
    r = api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                content=pack_tensors(tensors), headers=bearer(token))
    assert r.status_code == 200, r.text
    r = api.post(f"/v1/tasks/{task['task_id']}/complete",
                 json={"lease_id": task["lease_id"], "num_samples": num_samples}, headers=bearer(token))
    assert r.status_code == 200, r.text


def _version(app, number):
    with app.state.session_factory() as s:
        row = s.scalars(select(AdapterVersion).where(AdapterVersion.tier == "root",
                                                     AdapterVersion.version == number)).one()
        return unpack_tensors(app.state.blobs.get_bytes(row.blob_sha256))


def test_fedit_averages_factors_and_skips_clustering(api, app):
    fid, secret = create_federation(api, schedule={"root_rounds": 1, "leaf_rounds": 1},
                                    root={"aggregation": "factor_avg"}, cluster={"enabled": False})
    clients = [register(api, fid, secret, n) for n in "ab"]
    tick(app)
    uploads = []
    for i, (cid, token) in enumerate(clients):
        task = _lease(api, cid, token)
        uploads.append(valid_root_upload(seed=i + 1))
        _finish(api, task, token, uploads[-1], num_samples=10 * (i + 1))
    tick(app)
    new = _version(app, 1)
    w = np.array([1.0, 2.0]) / 3.0
    for name in ("blocks.0.attn.qkv.q.lora_A", "blocks.0.attn.qkv.q.lora_B", "head.weight"):
        np.testing.assert_allclose(new[name], w[0] * uploads[0][name] + w[1] * uploads[1][name], rtol=1e-5, atol=1e-6)
    status = api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()
    assert status["state"] == "leaf" and status["clustering"] is None
    leaf = _lease(api, *clients[0])
    assert leaf["stage"] == "leaf" and leaf["cluster"] is None and leaf["upload"] == []


def test_fedsa_keeps_b_local_and_ffa_freezes_a(api, app):
    fid, secret = create_federation(api, schedule={"root_rounds": 1},
                                    root={"B": "local", "aggregation": "factor_avg"})
    cid, token = register(api, fid, secret, "a")
    register(api, fid, secret, "b")
    tick(app)
    task = _lease(api, cid, token)
    assert sorted(task["upload"]) == ["A", "head"] and task["local"] == ["B"]
    full = valid_root_upload()
    r = api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                content=raw_safetensors(full), headers=bearer(token))
    assert r.status_code == 422 and r.json()["error"] == "extra_key"  # B never leaves the client

    fid2, secret2 = create_federation(api, name="ffa", schedule={"root_rounds": 1},
                                      root={"A": "frozen", "aggregation": "factor_avg"})
    clients = [register(api, fid2, secret2, n) for n in "xy"]
    tick(app)
    for i, (c, t) in enumerate(clients):
        task = _lease(api, c, t)
        assert sorted(task["upload"]) == ["B", "head"] and "A" not in task["trainable"]
        up = {k: v for k, v in valid_root_upload(seed=i).items() if not k.endswith("lora_A")}
        _finish(api, task, t, up, num_samples=5)
    tick(app)
    with app.state.session_factory() as s:
        rows = s.scalars(select(AdapterVersion).where(AdapterVersion.federation_id == fid2)
                         .order_by(AdapterVersion.version)).all()
        before, after = (unpack_tensors(app.state.blobs.get_bytes(r.blob_sha256)) for r in rows)
    assert [r.version for r in rows] == [0, 1]
    np.testing.assert_array_equal(after["blocks.1.attn.qkv.v.lora_A"], before["blocks.1.attn.qkv.v.lora_A"])
    assert not np.allclose(after["blocks.1.attn.qkv.v.lora_B"], before["blocks.1.attn.qkv.v.lora_B"])
