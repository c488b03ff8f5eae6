"""Coordinator API in-process over ASGI: auth, registration, leases, upload validation."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    ADMIN_TOKEN,
    CLASSES,
    DEPTH,
    DIM,
    RANK,
    admin_headers,
    bearer,
    create_federation,
    register,
    tick,
    tiny_checkpoint,
    tiny_config,
)
from sqlalchemy import select

from coordinator.models import Blob, Task
from shared import PROTOCOL_VERSION
from shared.manifest import qv_targets
from shared.tensors import pack_tensors

pytestmark = pytest.mark.api


def valid_root_upload(seed: int = 0, scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {}
    for t in qv_targets(DEPTH, DIM):
        tensors[f"{t.name}.lora_A"] = rng.normal(size=(RANK, DIM)).astype(np.float32)
        tensors[f"{t.name}.lora_B"] = (scale * rng.normal(size=(DIM, RANK))).astype(np.float32)
    tensors["head.weight"] = rng.normal(size=(CLASSES, DIM)).astype(np.float32)
    tensors["head.bias"] = rng.normal(size=(CLASSES,)).astype(np.float32)
    return tensors


def raw_safetensors(tensors: dict[str, np.ndarray]) -> bytes:
    """Safetensors bytes without our pack's float32 cast and finiteness check (to craft bad bodies)."""
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def lease(api, cid: int, token: str) -> dict:
    r = api.post(f"/v1/clients/{cid}/lease", headers=bearer(token))
    assert r.status_code == 200, r.text
    return r.json()


def test_version_and_protocol_check(api):
    r = api.get("/v1/version")
    # 2: eval tasks; 3: probe steps and loss; 4: training.alone_epochs; 5: refine tasks; 6: classes
    assert r.status_code == 200 and r.json()["protocol"] == PROTOCOL_VERSION == 10
    r = api.get("/v1/version", headers={"X-Hilora-Protocol": "1"})  # a worker without eval tasks
    assert r.status_code == 426
    r = api.get("/v1/version", headers={"X-Hilora-Protocol": "3"})  # one that would ignore alone_epochs
    assert r.status_code == 426
    r = api.get("/v1/version", headers={"X-Hilora-Protocol": "4"})  # one that does not know refine tasks
    assert r.status_code == 426
    r = api.get("/v1/version", headers={"X-Hilora-Protocol": "5"})  # one that ignores the federation's classes
    assert r.status_code == 426
    r = api.get("/v1/version", headers={"X-Hilora-Protocol": "999"})
    assert r.status_code == 426
    assert r.json()["error"] == "protocol_mismatch"


def test_readyz_true_after_migration(api):
    r = api.get("/v1/readyz")
    assert r.status_code == 200 and r.json() == {"ready": True}


def test_settings_refuse_default_admin_token_outside_dev(tmp_path):
    from pydantic import ValidationError

    from coordinator.settings import DEFAULT_ADMIN_TOKEN, Settings

    with pytest.raises(ValidationError, match="HILORA_ADMIN_TOKEN"):
        Settings(admin_token=DEFAULT_ADMIN_TOKEN, dev=False)
    assert Settings(admin_token=DEFAULT_ADMIN_TOKEN, dev=True).dev is True


def test_admin_routes_need_the_admin_token(api):
    assert api.get("/v1/federations").status_code == 401
    assert api.get("/v1/federations", headers=bearer("wrong-token-wrong-token")).status_code == 401
    r = api.get("/v1/federations", headers=admin_headers())
    assert r.status_code == 200 and r.json() == []


def test_create_federation_needs_the_backbone_blob_first(api):
    r = api.post("/v1/federations", json={"config": tiny_config("x", "a" * 64)}, headers=admin_headers())
    assert r.status_code == 422
    assert r.json()["error"] == "backbone_missing"


def test_blob_upload_refuses_a_body_that_does_not_match_its_name(api):
    r = api.put("/v1/blobs/" + "b" * 64, content=b"hello", headers=admin_headers())
    assert r.status_code == 422 and r.json()["error"] == "sha256_mismatch"


def test_create_federation_makes_root_version_zero_with_the_backbone_head(api, app):
    fid, secret = create_federation(api)
    assert secret.startswith("hle_")
    r = api.get(f"/v1/federations/{fid}", headers=admin_headers())
    assert r.status_code == 200
    body = r.json()
    assert body["state"] == "enrolling" and body["root_version"] == 0
    from coordinator.models import AdapterVersion, Federation
    from shared.tensors import unpack_tensors

    with app.state.session_factory() as s:
        v0 = s.scalars(select(AdapterVersion).where(AdapterVersion.version == 0)).one()
        backbone_sha = s.get(Federation, fid).backbone_sha256
        root = unpack_tensors(app.state.blobs.get_bytes(v0.blob_sha256))
    head = unpack_tensors(tiny_checkpoint())
    np.testing.assert_array_equal(root["head.weight"], head["head.weight"])
    np.testing.assert_array_equal(root["head.bias"], head["head.bias"])
    b = root["blocks.0.attn.qkv.q.lora_B"]
    a = root["blocks.0.attn.qkv.q.lora_A"]
    assert b.shape == (DIM, RANK) and not b.any()  # the root starts as the identity update
    assert a.shape == (RANK, DIM) and a.any() and np.abs(a).max() <= 1 / np.sqrt(DIM)
    r = api.post("/v1/federations", json={"config": tiny_config("fed", backbone_sha)}, headers=admin_headers())
    assert r.status_code == 409 and r.json()["error"] == "name_taken"


def test_registration_with_a_wrong_secret_fails_and_creates_nothing(api):
    fid, secret = create_federation(api)
    r = api.post(f"/v1/federations/{fid}/clients", json={"name": "a"}, headers=bearer("hle_wrong"))
    assert r.status_code == 401 and r.json()["error"] == "bad_secret"
    r = api.get(f"/v1/federations/{fid}", headers=admin_headers())
    assert r.json()["clients_total"] == 0
    register(api, fid, secret, "a")
    r = api.post(f"/v1/federations/{fid}/clients", json={"name": "a"}, headers=bearer(secret))
    assert r.status_code == 409 and r.json()["error"] == "client_exists"
    r = api.post(f"/v1/federations/{fid}/clients", json={"name": "bad name!"}, headers=bearer(secret))
    assert r.status_code == 422


def test_a_client_cannot_lease_for_another_client(api, app):
    fid, secret = create_federation(api)
    a, token_a = register(api, fid, secret, "a")
    b, _ = register(api, fid, secret, "b")
    tick(app)
    r = api.post(f"/v1/clients/{b}/lease", headers=bearer(token_a))
    assert r.status_code == 403 and r.json()["error"] == "not_your_client"
    assert api.post(f"/v1/clients/{a}/lease").status_code == 401
    assert api.post(f"/v1/clients/{a}/lease", headers=bearer("hlc_nope")).status_code == 401


def test_lease_returns_the_root_task_with_its_adapter(api, app):
    fid, secret = create_federation(api)
    a, token_a = register(api, fid, secret, "a")
    register(api, fid, secret, "b")
    first = lease(api, a, token_a)
    assert first["task"] is None and first["client_state"] == "waiting"
    tick(app)
    body = lease(api, a, token_a)
    task = body["task"]
    assert body["federation_state"] == "root"
    assert task["stage"] == "root" and task["train_tier"] == "root" and task["attempt"] == 1
    assert task["root"]["version"] == 0 and task["cluster"] is None
    assert sorted(task["upload"]) == ["A", "B", "head"]
    # the adapter it names is readable by the client and matches its sha256
    r = api.get(f"/v1/adapters/{task['root']['id']}", headers=bearer(token_a))
    assert r.status_code == 200
    import hashlib

    assert hashlib.sha256(r.content).hexdigest() == task["root"]["sha256"]
    # no second task while this one is leased
    assert lease(api, a, token_a)["task"] is None


BAD_BODIES = {
    "wrong_shape": lambda t: {**t, "blocks.0.attn.qkv.q.lora_A": np.zeros((RANK, DIM + 1), np.float32)},
    "wrong_rank": lambda t: {**t, "blocks.0.attn.qkv.q.lora_B": np.zeros((DIM, RANK + 1), np.float32)},
    "missing_key": lambda t: {k: v for k, v in t.items() if k != "head.bias"},
    "extra_key": lambda t: {**t, "blocks.9.attn.qkv.q.lora_A": np.zeros((RANK, DIM), np.float32)},
    "nan": lambda t: {**t, "head.bias": np.array([np.nan] + [0.0] * (CLASSES - 1), np.float32)},
    "inf": lambda t: {**t, "head.bias": np.array([np.inf] + [0.0] * (CLASSES - 1), np.float32)},
    "float64": lambda t: {**t, "head.weight": t["head.weight"].astype(np.float64)},
    "int32": lambda t: {**t, "head.weight": t["head.weight"].astype(np.int32)},
}
EXPECTED_REASON = {"wrong_shape": "wrong_shape", "wrong_rank": "wrong_shape", "missing_key": "missing_key",
                   "extra_key": "extra_key", "nan": "non_finite", "inf": "non_finite", "float64": "wrong_dtype",
                   "int32": "wrong_dtype"}


@pytest.mark.parametrize("kind", sorted(BAD_BODIES))
def test_bad_uploads_are_refused_and_change_nothing(api, app, kind):
    fid, secret = create_federation(api)
    a, token_a = register(api, fid, secret, "a")
    register(api, fid, secret, "b")
    tick(app)
    task = lease(api, a, token_a)["task"]
    body = raw_safetensors(BAD_BODIES[kind](valid_root_upload()))
    r = api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]}, content=body,
                headers=bearer(token_a))
    assert r.status_code == 422, r.text
    assert r.json()["error"] == EXPECTED_REASON[kind]
    with app.state.session_factory() as s:
        row = s.get(Task, task["task_id"])
        assert row.upload_sha256 is None and row.status == "leased"
        assert s.scalars(select(Blob).where(Blob.kind == "upload")).first() is None
    # completion without a valid upload is refused too
    r = api.post(f"/v1/tasks/{task['task_id']}/complete",
                 json={"lease_id": task["lease_id"], "num_samples": 5}, headers=bearer(token_a))
    assert r.status_code == 409 and r.json()["error"] == "upload_missing"


def test_corrupt_and_oversized_bodies_are_refused(api, app):
    fid, secret = create_federation(api)
    a, token_a = register(api, fid, secret, "a")
    register(api, fid, secret, "b")
    tick(app)
    task = lease(api, a, token_a)["task"]
    url, params = f"/v1/tasks/{task['task_id']}/upload", {"lease_id": task["lease_id"]}
    good = pack_tensors(valid_root_upload())
    r = api.put(url, params=params, content=good[: len(good) // 2], headers=bearer(token_a))
    assert r.status_code == 422 and r.json()["error"] == "corrupt"
    r = api.put(url, params=params, content=b"\x00" * 65536, headers=bearer(token_a))
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    r = api.put(url, params=params, content=good, headers={**bearer(token_a), "X-Hilora-Sha256": "0" * 64})
    assert r.status_code == 422 and r.json()["error"] == "sha256_mismatch"
    with app.state.session_factory() as s:
        assert s.get(Task, task["task_id"]).upload_sha256 is None


def test_wrong_lease_and_other_clients_task_are_refused(api, app):
    fid, secret = create_federation(api)
    a, token_a = register(api, fid, secret, "a")
    b, token_b = register(api, fid, secret, "b")
    tick(app)
    task = lease(api, a, token_a)["task"]
    body = pack_tensors(valid_root_upload())
    url = f"/v1/tasks/{task['task_id']}/upload"
    r = api.put(url, params={"lease_id": "not-the-lease"}, content=body, headers=bearer(token_a))
    assert r.status_code == 409 and r.json()["error"] == "stale_lease"
    r = api.put(url, params={"lease_id": task["lease_id"]}, content=body, headers=bearer(token_b))
    assert r.status_code == 403 and r.json()["error"] == "not_your_task"
    r = api.post(f"/v1/tasks/{task['task_id']}/heartbeat", json={"lease_id": "x"}, headers=bearer(token_a))
    assert r.status_code == 409
    with app.state.session_factory() as s:
        assert s.get(Task, task["task_id"]).upload_sha256 is None


def test_upload_complete_is_idempotent_and_aggregates(api, app):
    fid, secret = create_federation(api)
    clients = [register(api, fid, secret, n, num_samples=10 * (i + 1)) for i, n in enumerate("ab")]
    tick(app)
    uploads = {}
    for i, (cid, token) in enumerate(clients):
        task = lease(api, cid, token)["task"]
        tensors = valid_root_upload(seed=i + 1)
        uploads[cid] = tensors
        body = pack_tensors(tensors)
        for _ in range(2):  # repeating the same upload under the same lease is harmless
            r = api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]}, content=body,
                        headers=bearer(token))
            assert r.status_code == 200, r.text
        done = {"lease_id": task["lease_id"], "num_samples": 10 * (i + 1), "metrics": {"acc_root": 0.5}}
        for _ in range(2):
            r = api.post(f"/v1/tasks/{task['task_id']}/complete", json=done, headers=bearer(token))
            assert r.status_code == 200 and r.json()["status"] == "done"
        r = api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                    content=pack_tensors(valid_root_upload(seed=99)), headers=bearer(token))
        assert r.status_code == 409 and r.json()["error"] == "task_finished"
    tick(app)
    status = api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()
    assert status["root_version"] == 1 and status["state"] == "root"
    # the new root is the rank-r SVD of the sample-weighted sum of B A, and the weighted head mean
    from coordinator.models import AdapterVersion
    from shared.tensors import unpack_tensors

    with app.state.session_factory() as s:
        v1 = s.scalars(select(AdapterVersion).where(AdapterVersion.version == 1)).one()
        new = unpack_tensors(app.state.blobs.get_bytes(v1.blob_sha256))
    w = np.array([10.0, 20.0]) / 30.0
    ids = sorted(uploads)
    name = "blocks.1.attn.qkv.v"
    dense = sum(wi * uploads[c][f"{name}.lora_B"].astype(np.float64) @ uploads[c][f"{name}.lora_A"]
                for wi, c in zip(w, ids))
    u, s_, vt = np.linalg.svd(dense)
    reference = (u[:, :RANK] * s_[:RANK]) @ vt[:RANK]
    np.testing.assert_allclose(new[f"{name}.lora_B"] @ new[f"{name}.lora_A"], reference, rtol=1e-4, atol=1e-5)
    head = sum(wi * uploads[c]["head.weight"] for wi, c in zip(w, ids))
    np.testing.assert_allclose(new["head.weight"], head, rtol=1e-5, atol=1e-6)


def test_expired_lease_is_requeued_and_the_old_lease_refused(api, app, clock):
    fid, secret = create_federation(api)
    a, token_a = register(api, fid, secret, "a")
    register(api, fid, secret, "b")
    tick(app)
    first = lease(api, a, token_a)["task"]
    clock.advance(31)  # lease_seconds is 30
    tick(app)
    second = lease(api, a, token_a)["task"]
    assert second["task_id"] == first["task_id"] and second["attempt"] == 2
    assert second["lease_id"] != first["lease_id"]
    r = api.put(f"/v1/tasks/{first['task_id']}/upload", params={"lease_id": first["lease_id"]},
                content=pack_tensors(valid_root_upload()), headers=bearer(token_a))
    assert r.status_code == 409
    # at the last attempt an expired lease fails the task (max_attempts = 2)
    clock.advance(31)
    tick(app)
    with app.state.session_factory() as s:
        assert s.get(Task, first["task_id"]).status == "failed"


def test_the_tick_names_the_clients_it_made_a_task_leasable_for(api, app, clock):
    """What the scheduler tells the held lease requests (``LeaseWaiters.poke``): the clients of a
    round it opened, a client whose expired lease it requeued; not one whose task failed at its last
    attempt, and nobody after a tick that changed nothing."""
    from coordinator.services.scheduling import scheduler_tick

    def tick_naming() -> tuple[int, set[int]]:
        leasable: set[int] = set()
        changes = scheduler_tick(app.state.session_factory, app.state.blobs, app.state.clock(), leasable=leasable)
        return changes, leasable

    fid, secret = create_federation(api)
    a, token_a = register(api, fid, secret, "a")
    b, _token_b = register(api, fid, secret, "b")
    assert tick_naming()[1] == {a, b}               # the first root round
    assert tick_naming() == (0, set())
    lease(api, a, token_a)
    clock.advance(31)  # lease_seconds is 30
    assert tick_naming() == (1, {a})                # requeued at attempt 1 of 2
    lease(api, a, token_a)
    clock.advance(31)
    changes, leasable = tick_naming()
    assert changes >= 1 and a not in leasable       # failed at its last attempt: nothing to lease


def test_heartbeat_extends_the_lease(api, app, clock):
    fid, secret = create_federation(api)
    a, token_a = register(api, fid, secret, "a")
    register(api, fid, secret, "b")
    tick(app)
    task = lease(api, a, token_a)["task"]
    clock.advance(20)
    r = api.post(f"/v1/tasks/{task['task_id']}/heartbeat", json={"lease_id": task["lease_id"]}, headers=bearer(token_a))
    assert r.status_code == 200
    clock.advance(20)  # 40 s after the lease, 20 s after the heartbeat
    tick(app)
    r = api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                content=pack_tensors(valid_root_upload()), headers=bearer(token_a))
    assert r.status_code == 200, r.text


def test_clients_of_other_federations_are_refused(api, app):
    fid, secret = create_federation(api)
    fid2, secret2 = create_federation(api, name="other")
    register(api, fid, secret, "a")
    _, token_other = register(api, fid2, secret2, "x")
    r = api.get(f"/v1/federations/{fid}/config", headers=bearer(token_other))
    assert r.status_code == 403
    r = api.get(f"/v1/federations/{fid}/backbone", headers=bearer(token_other))
    assert r.status_code == 403
    r = api.get(f"/v1/federations/{fid}/config", headers=bearer(ADMIN_TOKEN))
    assert r.status_code == 200 and r.json()["name"] == "fed"
