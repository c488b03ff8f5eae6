"""Issue 15, weaknesses 1 and 2, on SQLite and Postgres: one poisoned federation never stalls the
others, and the safetensors validator is total and cheap.

| weakness | on the old main | now |
| --- | --- | --- |
| finite but huge values (1e20) | accepted; the aggregate overflowed float32 and every tick failed | 422 out_of_range (TierPolicy.max_abs_value, default 1e4) |
| such an upload where the bound allows it | the round could never aggregate | quarantined: left out, its client named (task error, audit), the round aggregates without it |
| a federation that raises while advancing | every federation after it stopped advancing | recorded on it, counted, the others advance; paused after 3 failures in a row with its reason |
| a header with hundreds of huge dims | seconds of a frozen process, then a 500 | 422 corrupt (dims bounded before any arithmetic) |
| a dtype that is a list or object | 500 (TypeError) | 422 corrupt |
| a body under a stale lease | parsed first (422 for a corrupt one) | 409 stale_lease before a byte is parsed |
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from conftest import admin_headers, bearer, create_federation, register, tick
from sqlalchemy import select
from support.hostile import raw_safetensors, scrape, valid_root_upload

from coordinator.models import AdapterVersion, AuditEvent, Federation, Round, Task
from coordinator.services import scheduling
from coordinator.services.adapters import load_version
from shared.aggregate import combine_tier_uploads
from shared.config import FederationConfig
from shared.tensors import pack_tensors

pytestmark = pytest.mark.api


class Fed:
    """A federation of clients a, b, c in its first root round."""

    def __init__(self, api, app, name: str, **overrides) -> None:
        self.api, self.app = api, app
        schedule = {"min_clients": 3, "root_rounds": 3, "max_attempts": 5, "lease_seconds": 30,
                    **overrides.pop("schedule", {})}
        self.fid, self.secret = create_federation(api, name=name, schedule=schedule, **overrides)
        self.clients = {n: register(api, self.fid, self.secret, n, num_samples=10) for n in "abc"}

    def lease(self, name: str) -> dict:
        cid, token = self.clients[name]
        r = self.api.post(f"/v1/clients/{cid}/lease", headers=bearer(token))
        assert r.status_code == 200, r.text
        assert r.json()["task"] is not None, r.text
        return r.json()["task"]

    def upload(self, name: str, task: dict, body: bytes, lease_id: str | None = None):
        return self.api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": lease_id or task["lease_id"]},
                            content=body, headers=bearer(self.clients[name][1]))

    def complete(self, name: str, task: dict) -> None:
        r = self.api.post(f"/v1/tasks/{task['task_id']}/complete",
                          json={"lease_id": task["lease_id"], "num_samples": 10}, headers=bearer(self.clients[name][1]))
        assert r.status_code == 200, r.text

    def finish(self, bodies: dict[str, bytes]) -> None:
        for name, body in bodies.items():
            task = self.lease(name)
            r = self.upload(name, task, body)
            assert r.status_code == 200, r.text
            self.complete(name, task)

    def status(self) -> dict:
        r = self.api.get(f"/v1/federations/{self.fid}", headers=admin_headers())
        assert r.status_code == 200, r.text
        return r.json()

    def root_versions(self) -> list[int]:
        with self.app.state.session_factory() as s:
            return list(s.scalars(select(AdapterVersion.version).where(
                AdapterVersion.federation_id == self.fid, AdapterVersion.tier == "root").order_by(AdapterVersion.version)))


def _huge(seed: int) -> dict[str, np.ndarray]:
    tensors = valid_root_upload(seed=seed)
    return {k: np.full_like(v, 1e20) for k, v in tensors.items()}


def test_a_huge_finite_upload_is_refused_at_the_door(api, app):
    fed = Fed(api, app, "huge")
    tick(app)
    task = fed.lease("a")
    r = fed.upload("a", task, pack_tensors(_huge(1)))
    assert (r.status_code, r.json()["error"]) == (422, "out_of_range"), r.text
    assert "1e+04" in r.json()["detail"] or "10000" in r.json()["detail"]
    # just inside the bound is accepted
    inside = {k: np.clip(v, -1e4, 1e4) for k, v in valid_root_upload(seed=2, scale=1e4).items()}
    r = fed.upload("a", task, pack_tensors(inside))
    assert r.status_code == 200, r.text


def test_max_abs_value_is_validated(api):
    from conftest import tiny_config, upload_backbone

    sha = upload_backbone(api)
    for bad in (0, -1, 1e31):
        cfg = tiny_config("bad-max-abs", sha, root={"max_abs_value": bad})
        r = api.post("/v1/federations", json={"config": cfg}, headers=admin_headers())
        assert r.status_code == 422, (bad, r.text)


def test_an_upload_that_overflows_the_aggregate_is_quarantined_and_the_round_aggregates_without_it(api, app):
    # the bound raised so far that 1e20 values get in, and relative clipping off: aggregation itself must cope
    fed = Fed(api, app, "quarantine", root={"max_abs_value": 1e30, "clip_relative": None})
    later = Fed(api, app, "after-it")  # a higher id: on the old main it stopped advancing too
    tick(app)
    good = {"b": valid_root_upload(seed=11), "c": valid_root_upload(seed=12)}
    fed.finish({"a": pack_tensors(_huge(1)), "b": pack_tensors(good["b"]), "c": pack_tensors(good["c"])})
    later.finish({n: pack_tensors(valid_root_upload(seed=20 + i)) for i, n in enumerate("abc")})
    tick(app)

    assert fed.root_versions() == [0, 1] and later.root_versions() == [0, 1]
    a_id = fed.clients["a"][0]
    with app.state.session_factory() as s:
        rnd = s.scalars(select(Round).where(Round.federation_id == fed.fid, Round.number == 1)).one()
        assert rnd.status == "done" and rnd.failure is None
        assert [w["client_id"] for w in rnd.aggregation_weights] == sorted(c for c, _ in
                                                                          (fed.clients["b"], fed.clients["c"]))
        task_a = s.scalars(select(Task).where(Task.round_id == rnd.id, Task.client_id == a_id)).one()
        assert task_a.status == "done" and task_a.quarantined_at is not None
        assert "quarantined at aggregation" in task_a.error and "float32" in task_a.error
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "quarantine")).one()
        assert (event.federation_id, event.target, event.actor) == (fed.fid, f"client:{a_id}", "scheduler")
        assert event.detail["max_abs"] == pytest.approx(1e20, rel=1e-6)
        cfg = FederationConfig.model_validate(s.get(Federation, fed.fid).config)
        v0, v1 = (s.scalars(select(AdapterVersion).where(AdapterVersion.federation_id == fed.fid,
                                                         AdapterVersion.version == v)).one() for v in (0, 1))
        previous, new = load_version(app.state.blobs, v0), load_version(app.state.blobs, v1)
    expected = combine_tier_uploads(cfg.manifest, "root", cfg.root, previous, [good["b"], good["c"]], [10.0, 10.0])
    for name in expected:
        np.testing.assert_array_equal(new[name], expected[name])
    assert fed.status()["failure_count"] == 0


def test_quarantine_below_the_quorum_fails_the_round_and_a_fresh_one_opens(api, app):
    fed = Fed(api, app, "quorum", root={"max_abs_value": 1e30, "clip_relative": None},
              schedule={"min_clients": 3, "root_rounds": 3, "quorum_min_clients": 3})
    tick(app)
    fed.finish({"a": pack_tensors(_huge(1)), "b": pack_tensors(valid_root_upload(seed=2)),
                "c": pack_tensors(valid_root_upload(seed=3))})
    tick(app)
    rounds = fed.status()["rounds"]
    assert [(r["number"], r["status"]) for r in rounds if r["stage"] == "root"] == [(1, "failed"), (2, "open")]
    failed = [r for r in rounds if r["number"] == 1][0]
    assert f"client {fed.clients['a'][0]}" in failed["failure"] and "quorum is 3" in failed["failure"]
    assert fed.root_versions() == [0]


def _break_blob_of_root_v0(app, fid: int) -> tuple[str, bytes]:
    """A lost adapter file: the federation cannot aggregate until an admin restores it."""
    with app.state.session_factory() as s:
        sha = s.scalars(select(AdapterVersion.blob_sha256).where(AdapterVersion.federation_id == fid)).one()
    path = app.state.blobs.path(sha)
    data = path.read_bytes()
    path.unlink()
    return sha, data


def test_a_federation_that_fails_to_advance_never_stalls_the_others_and_is_paused_after_three(api, app):
    broken = Fed(api, app, "broken")
    healthy = Fed(api, app, "healthy", training={"seed": 1})  # higher id; another version 0 (blob)
    tick(app)
    broken.finish({n: pack_tensors(valid_root_upload(seed=i)) for i, n in enumerate("abc")})
    sha, data = _break_blob_of_root_v0(app, broken.fid)
    for round_number in (1, 2, 3):
        healthy.finish({n: pack_tensors(valid_root_upload(seed=10 * round_number + i)) for i, n in enumerate("abc")})
        app.state.scheduler.tick()  # the app's own tick: metrics observed
        assert healthy.root_versions() == list(range(round_number + 1))
        status = broken.status()
        assert status["failure_count"] == round_number
        assert "BlobNotFound while advancing the root stage" in status["last_failure"]
        assert (status["paused_at"] is not None) == (round_number == 3)
    assert broken.root_versions() == [0]
    assert healthy.status()["state"] == "probe"  # three root rounds done, the cascade went on
    status = broken.status()
    assert status["paused_reason"].startswith("paused by the scheduler after 3 failed attempts")
    metrics = scrape(api)
    assert metrics[("hilora_scheduler_failures_total", (("stage", "root"),))] == 3
    with app.state.session_factory() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "auto_pause")).one()
        assert (event.federation_id, event.actor, event.detail["failures"]) == (broken.fid, "scheduler", 3)
    overview = {f["federation_id"]: f for f in api.get("/v1/overview", headers=admin_headers()).json()}
    assert overview[broken.fid]["paused_reason"] == status["paused_reason"]
    assert overview[healthy.fid]["paused_reason"] is None

    # paused: not retried every tick
    app.state.scheduler.tick()
    assert broken.status()["failure_count"] == 3

    # an admin restores the file and resumes: the record is cleared and the round aggregates
    app.state.blobs.path(sha).write_bytes(data)
    r = api.post(f"/v1/federations/{broken.fid}/resume", headers=admin_headers())
    assert r.status_code == 200, r.text
    status = broken.status()
    assert (status["paused_at"], status["paused_reason"], status["failure_count"]) == (None, None, 0)
    assert "BlobNotFound" in status["last_failure"]  # kept as history
    tick(app)
    assert broken.root_versions() == [0, 1]


def test_a_good_tick_resets_the_failure_count(api, app, monkeypatch):
    fed = Fed(api, app, "flaky")
    tick(app)
    real = scheduling._advance_root
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError("transient")
        return real(*args, **kwargs)

    monkeypatch.setattr(scheduling, "_advance_root", flaky)
    tick(app)
    tick(app)
    assert fed.status()["failure_count"] == 2
    tick(app)
    status = fed.status()
    assert (status["failure_count"], status["paused_at"]) == (0, None)
    assert status["last_failure"] == "RuntimeError while advancing the root stage: transient"


def test_a_pause_by_an_admin_keeps_its_reason(api, app):
    fed = Fed(api, app, "paused")
    r = api.post(f"/v1/federations/{fed.fid}/pause", json={"reason": "maintenance window"}, headers=admin_headers())
    assert r.status_code == 200, r.text
    assert fed.status()["paused_reason"] == "maintenance window"


# --------------------------------------------------------------------------- the validator


def _header_body(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("case", ["many_huge_dims", "dtype_list", "dtype_object", "long_header", "huge_offsets"])
def test_crafted_headers_get_a_4xx_with_a_reason(api, app, case):
    fed = Fed(api, app, f"header-{case}")
    tick(app)
    task = fed.lease("a")
    name = sorted(valid_root_upload())[0]
    if case == "many_huge_dims":
        body = _header_body({name: {"dtype": "F32", "shape": [10**20] * 100, "data_offsets": [0, 0]}})
    elif case == "dtype_list":
        body = _header_body({name: {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    elif case == "dtype_object":
        body = _header_body({name: {"dtype": {"a": 1}, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    elif case == "long_header":
        body = _header_body({"__metadata__": {"pad": "x" * 200_000}})
    else:
        body = _header_body({name: {"dtype": "F32", "shape": [1], "data_offsets": [10**30, 10**30 + 4]}})
    r = fed.upload("a", task, body)
    if case == "long_header" and r.status_code == 413:  # the body limit may refuse it first
        assert r.json()["error"] == "too_large"
        return
    assert (r.status_code, r.json()["error"]) == (422, "corrupt"), r.text
    assert len(r.json()["detail"]) < 1000
    # the task is unharmed: a valid body is still accepted under the same lease
    r = fed.upload("a", task, pack_tensors(valid_root_upload(seed=5)))
    assert r.status_code == 200, r.text


def test_the_lease_is_checked_before_the_body_is_parsed(api, app):
    fed = Fed(api, app, "lease-first")
    tick(app)
    task = fed.lease("a")
    garbage = b"\xff" * 64  # would be 422 corrupt if it were parsed
    r = fed.upload("a", task, garbage, lease_id="not-the-lease")
    assert (r.status_code, r.json()["error"]) == (409, "stale_lease"), r.text
    r = fed.upload("a", task, garbage)
    assert (r.status_code, r.json()["error"]) == (422, "corrupt"), r.text
    # a finished task answers the same body idempotently and a different one with task_finished
    body = pack_tensors(valid_root_upload(seed=1))
    assert fed.upload("a", task, body).status_code == 200
    fed.complete("a", task)
    assert fed.upload("a", task, body).status_code == 200
    r = fed.upload("a", task, raw_safetensors(valid_root_upload(seed=2)))
    assert (r.status_code, r.json()["error"]) == (409, "task_finished"), r.text


# --------------------------------------------------------------------------- one body per task


def _upload_rows(app) -> dict[str, bool]:
    """sha256 -> whether its file is in the store, for every blob row of kind upload."""
    from coordinator.models import Blob

    with app.state.session_factory() as s:
        shas = list(s.scalars(select(Blob.sha256).where(Blob.kind == "upload")))
    return {sha: app.state.blobs.path(sha).exists() for sha in shas}


def test_a_new_body_under_the_lease_replaces_the_stored_one_and_frees_it_at_once(api, app):
    fed = Fed(api, app, "one-body")
    tick(app)
    task = fed.lease("a")
    shas = []
    for seed in range(16):
        r = fed.upload("a", task, pack_tensors(valid_root_upload(seed=100 + seed)))
        assert r.status_code == 200, r.text
        shas.append(r.json()["sha256"])
        assert _upload_rows(app) == {shas[-1]: True}  # the superseded body is gone, row and file
        for old in shas[:-1]:
            assert not app.state.blobs.path(old).exists()
    r = fed.upload("a", task, pack_tensors(valid_root_upload(seed=100 + 15)))  # the same body again: free
    assert (r.status_code, r.json()["sha256"]) == (200, shas[-1])
    r = fed.upload("a", task, pack_tensors(valid_root_upload(seed=999)))  # a 17th different body
    assert (r.status_code, r.json()["error"]) == (409, "upload_quota"), r.text
    assert _upload_rows(app) == {shas[-1]: True}
    with app.state.session_factory() as s:
        row = s.get(Task, task["task_id"])
        assert (row.upload_sha256, row.upload_count) == (shas[-1], 16)
    fed.complete("a", task)  # the stored body still completes the task


def test_a_superseded_body_that_another_task_holds_is_kept(api, app):
    fed = Fed(api, app, "shared-bytes")
    tick(app)
    same = pack_tensors(valid_root_upload(seed=7))
    task_b = fed.lease("b")
    assert fed.upload("b", task_b, same).status_code == 200
    task_a = fed.lease("a")
    sha_same = fed.upload("a", task_a, same).json()["sha256"]
    sha_new = fed.upload("a", task_a, pack_tensors(valid_root_upload(seed=8))).json()["sha256"]
    rows = _upload_rows(app)
    assert rows == {sha_same: True, sha_new: True}
    with app.state.session_factory() as s:
        assert s.get(Task, task_b["task_id"]).upload_sha256 == sha_same


def test_made_up_http_methods_share_one_metrics_label(api):
    for i in range(5):
        r = api.request(f"BREW{i}", "/v1/health")
        assert r.status_code in (404, 405)
    methods = {dict(labels).get("method") for (name, labels) in scrape(api) if name == "hilora_http_requests_total"}
    assert "other" in methods
    assert not any(m and m.startswith("BREW") for m in methods)


# --------------------------------------------------------------------------- configs and settings


def _nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


@pytest.mark.parametrize("override", [
    {"clustering": {"k_max": 4, "knn": 2, "seed": -1}},
    {"clustering": {"k_max": 4, "knn": 2, "seed": 2**32}},
    {"training": {"seed": -5}},
    {"backbone_kwargs": _nested(5)},
    {"backbone_kwargs": _nested(300)},
    {"backbone_kwargs": {"pad": "x" * 20_000}},
])
def test_configs_that_would_wedge_the_scheduler_are_refused_at_creation(api, override):
    from conftest import tiny_config, upload_backbone

    sha = upload_backbone(api)
    override = dict(override)
    kwargs = override.pop("backbone_kwargs", None)
    cfg = tiny_config("wedge", sha, **override)
    if kwargs is not None:
        cfg["backbone"]["model_kwargs"] = kwargs
    r = api.post("/v1/federations", json={"config": cfg}, headers=admin_headers())
    assert r.status_code == 422, r.text
    assert api.get("/v1/federations", headers=admin_headers()).json() == []


def test_the_public_dev_token_is_allowed_on_loopback_only():
    from pydantic import ValidationError

    from coordinator.settings import DEFAULT_ADMIN_TOKEN, Settings

    for host in ("127.0.0.1", "localhost", "::1"):
        assert Settings(admin_token=DEFAULT_ADMIN_TOKEN, dev=True, host=host).host == host
    for host in ("0.0.0.0", "10.1.2.3", "::"):
        with pytest.raises(ValidationError, match="loopback"):
            Settings(admin_token=DEFAULT_ADMIN_TOKEN, dev=True, host=host)
    assert Settings(admin_token="a-real-secret-of-some-length", dev=True, host="0.0.0.0").host == "0.0.0.0"


def test_docs_are_served_without_any_script(api):
    r = api.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'none'" in r.headers["content-security-policy"]
    page = r.text
    assert "<script" not in page.lower() and "cdn" not in page.lower()
    assert "/v1/tasks/{task_id}/upload" in page and "/v1/federations" in page
    assert api.get("/redoc").status_code == 404
    assert api.get("/openapi.json").status_code == 200


# --------------------------------------------------------------------------- work before authentication


def _app_with(settings, clock, **changes):
    from coordinator.app import create_app

    return create_app(settings.model_copy(update=changes), clock=clock)


def _stalled_request(app, method: str, url: str, first: bytes, stall: float, headers=None, params=None):
    """Send ``first``, then nothing for ``stall`` seconds, then the rest (if still listened to)."""
    import asyncio

    import httpx

    async def body():
        yield first
        await asyncio.sleep(stall)
        yield b"}"

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.request(method, url, content=body(), headers=headers or {}, params=params)

    return asyncio.run(go())


def test_a_stalled_json_body_is_refused_with_408(settings, clock):
    app = _app_with(settings, clock, body_read_timeout_seconds=0.3)
    r = _stalled_request(app, "POST", "/v1/federations/1/clients", b'{"name": "x"', stall=2.0,
                         headers={"Authorization": "Bearer hle_whatever", "Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]) == (408, "body_timeout"), r.text
    assert r.headers["connection"] == "close"
    assert app.state.body_budget.held == 0
    app.state.engine.dispose()


def test_a_stalled_upload_body_is_refused_with_408_and_frees_its_slot(settings, clock):
    from fastapi.testclient import TestClient

    app = _app_with(settings, clock, body_read_timeout_seconds=0.3)
    with TestClient(app) as api:
        fed = Fed(api, app, "stalled-upload")
        tick(app)
        task = fed.lease("a")
        r = _stalled_request(app, "PUT", f"/v1/tasks/{task['task_id']}/upload", b"\x10" + b"\0" * 100, stall=2.0,
                             headers=bearer(fed.clients["a"][1]), params={"lease_id": task["lease_id"]})
        assert (r.status_code, r.json()["error"]) == (408, "body_timeout"), r.text
        assert app.state.upload_slots.in_flight == 0
        tmp = app.state.blobs.root / "tmp"
        assert not tmp.exists() or not list(tmp.iterdir())  # the partial body's temp file is gone
        r = fed.upload("a", task, pack_tensors(valid_root_upload(seed=1)))  # the task is unharmed
        assert r.status_code == 200, r.text
    app.state.engine.dispose()


def test_json_bodies_held_at_once_are_bounded(settings, clock):
    from fastapi.testclient import TestClient

    app = _app_with(settings, clock)
    with TestClient(app) as api:
        app.state.body_budget.held = app.state.body_budget.limit  # as if other bodies were being received
        r = api.post("/v1/federations/1/clients", json={"name": "x"}, headers=bearer("hle_x"))
        assert (r.status_code, r.json()["error"]) == (503, "busy"), r.text
        assert r.headers["retry-after"] == "1"
        app.state.body_budget.held = 0
        r = api.post("/v1/federations/1/clients", json={"name": "x"}, headers=bearer("hle_x"))
        assert r.status_code == 404, r.text  # past the budget: the route answers (no such federation)
        assert app.state.body_budget.held == 0
    app.state.engine.dispose()


def test_one_federation_cannot_hold_every_upload_slot():
    from coordinator.errors import ServiceUnavailable
    from coordinator.limits import UploadSlots

    slots = UploadSlots(per_client=2, total=10, per_federation=2)
    with slots.slot(1, 7), slots.slot(2, 7):
        with pytest.raises(ServiceUnavailable, match="HILORA_MAX_UPLOADS_IN_FLIGHT_PER_FEDERATION"):
            with slots.slot(3, 7):
                pass
        with slots.slot(4, 8):  # another federation still gets in
            assert (slots.in_flight, slots.in_flight_in(7), slots.in_flight_in(8)) == (3, 2, 1)
    assert (slots.in_flight, slots.in_flight_in(7)) == (0, 0)


# --------------------------------------------------------------------------- what the shared secret can mint


def test_registrations_stop_at_the_federations_client_cap(api):
    fid, secret = create_federation(api, name="capped", schedule={"min_clients": 2, "max_clients": 3})
    for name in "abc":
        register(api, fid, secret, name)
    r = api.post(f"/v1/federations/{fid}/clients", json={"name": "d", "num_samples": 10}, headers=bearer(secret))
    assert (r.status_code, r.json()["error"]) == (409, "federation_full"), r.text
    r = api.get(f"/v1/federations/{fid}/clients", headers=admin_headers())
    assert sorted(c["name"] for c in r.json()) == ["a", "b", "c"]


def test_registrations_are_rate_limited_per_federation_for_holders_of_the_secret(settings, clock):
    from fastapi.testclient import TestClient

    app = _app_with(settings, clock, registration_rate_per_second=0.001, registration_burst=3)
    with TestClient(app) as api:
        fid, secret = create_federation(api, name="throttled")
        other, other_secret = create_federation(api, name="other")
        for i in range(5):  # wrong secrets spend nothing
            r = api.post(f"/v1/federations/{fid}/clients", json={"name": f"g{i}"}, headers=bearer("hle_wrong"))
            assert r.status_code == 401
        for name in "abc":
            register(api, fid, secret, name)
        r = api.post(f"/v1/federations/{fid}/clients", json={"name": "d"}, headers=bearer(secret))
        assert (r.status_code, r.json()["error"]) == (429, "rate_limited"), r.text
        assert "per federation" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
        register(api, other, other_secret, "d")  # another federation has its own bucket
    app.state.engine.dispose()


def test_with_the_default_relative_clip_a_huge_update_is_clipped_not_quarantined(api, app):
    fed = Fed(api, app, "clipped", root={"max_abs_value": 1e30})  # clip_relative 3 (the default) stays on
    tick(app)
    fed.finish({"a": pack_tensors(_huge(1)), "b": pack_tensors(valid_root_upload(seed=11)),
                "c": pack_tensors(valid_root_upload(seed=12))})
    tick(app)
    assert fed.root_versions() == [0, 1]
    with app.state.session_factory() as s:
        rnd = s.scalars(select(Round).where(Round.federation_id == fed.fid, Round.number == 1)).one()
        norms = {n["client_id"]: n for n in rnd.update_norms}
        a, b, c = (fed.clients[x][0] for x in "abc")
        assert rnd.clipped_clients == 1 and norms[a]["scale"] < 1e-15 and norms[b]["scale"] == norms[c]["scale"] == 1.0
        assert s.scalars(select(Task).where(Task.quarantined_at.is_not(None))).first() is None
