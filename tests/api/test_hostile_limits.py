"""Limits (coordinator.limits, docs/security.md): request body size, lease rate per client,
uploads in flight per client and per replica; input bounds that used to reach the database or
overflow; norm clipping recorded on the round."""

from __future__ import annotations

import asyncio
import hashlib

import httpx
import numpy as np
import pytest
from conftest import (
    ADMIN_TOKEN,
    admin_headers,
    bearer,
    create_federation,
    register,
    tick,
    tiny_config,
)
from fastapi.testclient import TestClient
from sqlalchemy import select
from support.hostile import build_world, rejected, scrape, valid_root_upload

from coordinator.app import create_app
from shared.tensors import pack_tensors

pytestmark = pytest.mark.api


@pytest.fixture
def limited(settings, clock):
    """An app with small limits: 4 KiB JSON bodies, 1 lease/s with a burst of 3, one upload in
    flight per client and two per replica."""
    app = create_app(settings.model_copy(update={
        "max_json_body_bytes": 4096, "lease_rate_per_second": 1.0, "lease_burst": 3,
        "max_uploads_in_flight_per_client": 1, "max_uploads_in_flight": 2}), clock=clock)
    with TestClient(app) as api:
        yield api, app
    app.state.engine.dispose()


async def _asgi(app, *requests):
    """Send requests concurrently straight into the ASGI app (bodies may be async generators)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await asyncio.gather(*(client.request(**r) for r in requests))


# ---------------------------------------------------------------- body size

def test_json_bodies_over_the_limit_are_refused_before_anything_reads_them(limited):
    api, app = limited
    world = build_world(api, app, victims=0)
    url = f"/v1/federations/{world.federation_id}/clients"
    big = b'{"name": "x", "num_samples": 1, "pad": "' + b"a" * 8000 + b'"}'
    for headers in ({}, bearer("wrong"), bearer(world.secret)):  # refused before the credentials matter
        r = api.post(url, content=big, headers={**headers, "Content-Type": "application/json"})
        assert (r.status_code, r.json()["error"]) == (413, "body_too_large"), r.text
    # streamed without a length: refused once 4 KiB passed, the rest is never read
    pulled = {"n": 0}

    async def endless():
        for _ in range(1000):
            pulled["n"] += 1024
            yield b" " * 1024

    (r,) = asyncio.run(_asgi(app, {"method": "POST", "url": url, "content": endless(),
                                   "headers": {**bearer(world.secret), "Content-Type": "application/json"}}))
    assert (r.status_code, r.json()["error"]) == (413, "body_too_large")
    assert pulled["n"] <= 4096 + 1024
    # a normal body still works
    assert api.post(url, json={"name": "small"}, headers=bearer(world.secret)).status_code == 201


def test_a_body_that_is_not_utf8_is_a_422(api, app):
    world = build_world(api, app, victims=0)
    r = api.post(f"/v1/tasks/{world.task_a}/heartbeat", content=b"\xff\xfe\x00{",
                 headers={**bearer(world.token_a), "Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]) == (422, "invalid_request")


# ---------------------------------------------------------------- lease rate

def test_lease_rate_limit_per_client_with_retry_after(limited, clock):
    api, app = limited
    world = build_world(api, app, victims=0)
    from coordinator.limits import LeaseRateLimiter

    # the app's limiter with its settings (1/s, burst 3) but a frozen clock: no refill mid-test
    app.state.lease_limiter = LeaseRateLimiter(app.state.settings.lease_rate_per_second,
                                               app.state.settings.lease_burst, clock=lambda: 1000.0)
    a, b = (world.client_a, world.token_a), (world.client_b, world.token_b)
    # somebody hammers a's lease route with wrong tokens and b's token: a's bucket is untouched
    for _ in range(10):
        assert api.post(f"/v1/clients/{a[0]}/lease", headers=bearer("hlc_wrong")).status_code == 401
        assert api.post(f"/v1/clients/{a[0]}/lease", headers=bearer(b[1])).status_code == 403
    for _ in range(2):  # b's own bucket was spent by nothing: the 403s came before the limiter
        assert api.post(f"/v1/clients/{b[0]}/lease", headers=bearer(b[1])).status_code == 200
    codes = [api.post(f"/v1/clients/{a[0]}/lease", headers=bearer(a[1])) for _ in range(5)]
    assert [r.status_code for r in codes] == [200, 200, 200, 429, 429]
    refused = codes[3]
    assert refused.json()["error"] == "rate_limited" and int(refused.headers["Retry-After"]) >= 1
    assert api.post(f"/v1/clients/{b[0]}/lease", headers=bearer(b[1])).status_code == 200  # b's own bucket
    assert api.post(f"/v1/clients/{b[0]}/lease", headers=bearer(b[1])).status_code == 429


def test_rate_limiter_refills(limited):
    from coordinator.limits import LeaseRateLimiter

    now = {"t": 0.0}
    limiter = LeaseRateLimiter(rate=2.0, burst=2, clock=lambda: now["t"], max_keys=3)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.5]
    now["t"] += 0.5
    assert limiter.acquire("a") == 0.0
    for key in ("b", "c", "d", "e"):  # the table of buckets stays bounded
        limiter.acquire(key)
    assert len(limiter._buckets) == 3


# ---------------------------------------------------------------- uploads in flight

def test_concurrent_uploads_per_client_and_per_replica(limited):
    api, app = limited
    world = build_world(api, app, victims=1)
    vid, vtoken = world.victims[0]
    task_v = api.post(f"/v1/clients/{vid}/lease", headers=bearer(vtoken)).json()["task"]
    task_b = api.post(f"/v1/clients/{world.client_b}/lease", headers=bearer(world.token_b)).json()["task"]
    body_a = pack_tensors(valid_root_upload(1))

    async def scenario():
        release = asyncio.Event()
        started = asyncio.Event()

        async def slow(body):  # the first upload holds its slot until released
            started.set()
            await release.wait()
            yield body

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            def put(task, token, content):
                return client.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                                  content=content, headers=bearer(token))

            first = asyncio.ensure_future(put({"task_id": world.task_a, "lease_id": world.lease_a}, world.token_a,
                                              slow(body_a)))
            await started.wait()
            while app.state.upload_slots.in_flight < 1:
                await asyncio.sleep(0.01)
            # a's second upload at once: over the per-client limit of 1
            second = await put({"task_id": world.task_a, "lease_id": world.lease_a}, world.token_a, body_a)
            # b's upload takes the replica's second slot; hold it too
            release_b = asyncio.Event()

            async def slow_b(body):
                await release_b.wait()
                yield body

            third = asyncio.ensure_future(put(task_b, world.token_b, slow_b(pack_tensors(valid_root_upload(2)))))
            while app.state.upload_slots.in_flight < 2:
                await asyncio.sleep(0.01)
            fourth = await put(task_v, vtoken, pack_tensors(valid_root_upload(3)))  # replica full
            release.set()
            release_b.set()
            return second, fourth, await first, await third

    second, fourth, first, third = asyncio.run(scenario())
    assert (second.status_code, second.json()["error"]) == (429, "too_many_uploads")
    assert int(second.headers["Retry-After"]) >= 1
    assert (fourth.status_code, fourth.json()["error"]) == (503, "uploads_busy")
    assert int(fourth.headers["Retry-After"]) >= 1
    assert first.status_code == 200 and third.status_code == 200, (first.text, third.text)
    assert app.state.upload_slots.in_flight == 0
    m = scrape(api)
    assert rejected(m, "too_many_uploads") == 1 and rejected(m, "uploads_busy") == 1
    # the slots are free again: the refused upload goes through now
    r = api.put(f"/v1/tasks/{task_v['task_id']}/upload", params={"lease_id": task_v["lease_id"]},
                content=pack_tensors(valid_root_upload(3)), headers=bearer(vtoken))
    assert r.status_code == 200


# ---------------------------------------------------------------- bounds that used to be 5xx

def test_out_of_range_ids_are_422_not_a_database_error(api, app):
    world = build_world(api, app, victims=0)
    for url in (f"/v1/federations/{2**40}", f"/v1/federations/{-2**40}/config", f"/v1/adapters/{2**63}",
                f"/v1/federations/{world.federation_id}/clusters/{2**40}/model"):
        r = api.get(url, headers=admin_headers())
        assert r.status_code == 422, (url, r.status_code, r.text)
    r = api.post(f"/v1/clients/{2**40}/lease", headers=bearer(world.token_a))
    assert r.status_code == 422
    # the operator view bounds its ids like every route (DbId): refused before the database
    r = api.get(f"/v1/federations/{2**31}/timeline", headers=admin_headers())
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    r = api.post(f"/v1/federations/{world.federation_id}/clients", json={"name": "big", "num_samples": 10**12},
                 headers=bearer(world.secret))
    assert r.status_code == 422


def test_a_database_refusal_of_a_value_is_422_not_500(app):
    """The fallback for a value no route bounds: the database's DataError becomes 422 invalid_value."""
    from sqlalchemy.exc import DataError

    def refused_by_the_database():
        raise DataError("INSERT ...", {}, Exception("integer out of range"))

    app.add_api_route("/v1/test-data-error", refused_by_the_database)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/v1/test-data-error")
    assert r.status_code == 422 and r.json()["error"] == "invalid_value"


@pytest.mark.parametrize("change", [
    {"schedule": {"lease_seconds": 1e308}},
    {"schedule": {"round_deadline_seconds": 1e300}},
    {"schedule": {"retry_after_seconds": 1e9}},
    {"training": {"lr": "Infinity"}},
    {"backbone_kwargs_nan": True},
    {"manifest_in_features": 10**9},
    {"root": {"clip_norm": "NaN"}},
    {"root": {"max_weight_ratio": 0.5}},
    {"cluster": {"max_weight_ratio": "Infinity"}},
])
def test_configs_that_would_overflow_or_poison_the_database_are_422(api, app, change):
    fid, _ = create_federation(api, name="base")  # uploads the backbone
    sha = api.get(f"/v1/federations/{fid}/config", headers=admin_headers()).json()["backbone"]["sha256"]
    config = tiny_config("hostile", sha)
    import json

    if "backbone_kwargs_nan" in change:
        text = json.dumps({"config": config}).replace('"model_kwargs": {}', '"model_kwargs": {"x": NaN}')
    elif "manifest_in_features" in change:
        config["manifest"]["targets"][0]["in_features"] = change["manifest_in_features"]
        text = json.dumps({"config": config})
    else:
        for section, values in change.items():
            config.setdefault(section, {}).update(values)
        text = json.dumps({"config": config}).replace('"Infinity"', "Infinity").replace('"NaN"', "NaN")
    r = api.post("/v1/federations", content=text, headers={**admin_headers(), "Content-Type": "application/json"})
    assert r.status_code == 422, r.text


def test_metrics_of_a_task_are_bounded(api, app):
    world = build_world(api, app, victims=0)
    api.put(f"/v1/tasks/{world.task_a}/upload", params={"lease_id": world.lease_a},
            content=pack_tensors(valid_root_upload(1)), headers=bearer(world.token_a))
    r = api.post(f"/v1/tasks/{world.task_a}/complete",
                 json={"lease_id": world.lease_a, "num_samples": 3, "metrics": {f"m{i}": 1.0 for i in range(300)}},
                 headers=bearer(world.token_a))
    assert r.status_code == 422
    r = api.post(f"/v1/tasks/{world.task_a}/complete", content=b'{"lease_id": "%s", "num_samples": 3, '
                 b'"metrics": {"acc": NaN}}' % world.lease_a.encode(),
                 headers={**bearer(world.token_a), "Content-Type": "application/json"})
    assert r.status_code == 422


def test_a_deadline_is_at_most_a_year_ahead(api, app):
    world = build_world(api, app, victims=0)
    r = api.post(f"/v1/rounds/{world.round_id}/deadline", json={"deadline_at": "9999-12-31T00:00:00Z"},
                 headers=admin_headers())
    assert (r.status_code, r.json()["error"]) == (422, "bad_deadline")


def test_admin_token_comparison_does_not_depend_on_length():
    from coordinator.security import constant_time_equals

    assert constant_time_equals(ADMIN_TOKEN, ADMIN_TOKEN)
    assert not constant_time_equals(ADMIN_TOKEN, ADMIN_TOKEN[:-1])
    assert not constant_time_equals("é" * 3, ADMIN_TOKEN)


def test_odd_authorization_headers_are_401(api, app):
    world = build_world(api, app, victims=0)
    for value in ("Bearer", "Bearer ", "Basic abc", "bearer " + world.token_a, "Bearer \u00e9\u00e9",
                  "Bearer " + "x" * 5000):
        r = api.get(f"/v1/federations/{world.federation_id}/config",
                    headers={"Authorization": value.encode("latin-1")})
        assert r.status_code == 401, (value[:20], r.status_code)


# ---------------------------------------------------------------- norm clipping in a real round

def test_norm_clipping_is_applied_and_recorded_on_the_round(api, app):
    from coordinator.models import AdapterVersion, Federation, Round
    from shared.aggregate import combine_tier_uploads
    from shared.config import FederationConfig
    from shared.robust import clip_uploads
    from shared.tensors import unpack_tensors

    fid, secret = create_federation(api, name="clipped", root={"clip_norm": 0.5, "clip_relative": None},
                                    schedule={"min_clients": 3, "root_rounds": 2})
    clients = [register(api, fid, secret, n, num_samples=5) for n in "abc"]
    tick(app)
    sent = {}
    for i, (cid, token) in enumerate(clients):
        task = api.post(f"/v1/clients/{cid}/lease", headers=bearer(token)).json()["task"]
        tensors = valid_root_upload(seed=i, scale=[0.001, 0.1, 100.0][i])  # c is an attacker
        sent[cid] = tensors
        assert api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                       content=pack_tensors(tensors), headers=bearer(token)).status_code == 200
        assert api.post(f"/v1/tasks/{task['task_id']}/complete", json={"lease_id": task["lease_id"], "num_samples": 5},
                        headers=bearer(token)).status_code == 200
    tick(app)
    info = api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()["rounds"][0]
    assert info["status"] == "done" and info["clipped_clients"] >= 1
    norms = {n["client_id"]: n for n in info["update_norms"]}
    assert set(norms) == set(sent)
    attacker = clients[2][0]
    assert norms[attacker]["norm"] > 0.5 and norms[attacker]["scale"] == pytest.approx(0.5 / norms[attacker]["norm"])
    with app.state.session_factory() as s:
        rnd = s.scalars(select(Round).where(Round.federation_id == fid, Round.number == 1)).one()
        cfg = FederationConfig.model_validate(s.get(Federation, fid).config)
        prev = unpack_tensors(app.state.blobs.get_bytes(s.get(AdapterVersion, rnd.input_root_version_id).blob_sha256))
        new_sha = s.get(AdapterVersion, rnd.result_version_id).blob_sha256
    uploads = [sent[c] for c in sorted(sent)]
    clipped, report = clip_uploads(cfg.manifest, "root", cfg.root, prev, uploads)
    reference = combine_tier_uploads(cfg.manifest, "root", cfg.root, prev, clipped, [5.0] * 3)
    assert hashlib.sha256(pack_tensors(reference)).hexdigest() == new_sha
    assert report.clipped == info["clipped_clients"]
    np.testing.assert_allclose([norms[c]["norm"] for c in sorted(sent)], report.norms)


# ------------------------------------------------------------- weight capping in a real round

@pytest.mark.parametrize("ratio", [None, 2.0, "default"])
def test_inflated_num_samples_are_capped_and_every_weight_is_recorded(api, app, ratio):
    from coordinator.models import AdapterVersion, Federation, Round
    from shared.aggregate import combine_tier_uploads
    from shared.config import FederationConfig
    from shared.tensors import unpack_tensors

    root = {} if ratio == "default" else {"max_weight_ratio": ratio}  # None: off; the default is 10
    fid, secret = create_federation(api, name=f"capped-{ratio}", root=root,
                                    schedule={"min_clients": 3, "root_rounds": 2})
    clients = [register(api, fid, secret, n, num_samples=5) for n in "abc"]
    claims = [10, 20, 10**9]  # c lies about its data to dominate the average
    tick(app)
    sent = {}
    for i, (cid, token) in enumerate(clients):
        task = api.post(f"/v1/clients/{cid}/lease", headers=bearer(token)).json()["task"]
        sent[cid] = valid_root_upload(seed=i, scale=0.01)
        assert api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                       content=pack_tensors(sent[cid]), headers=bearer(token)).status_code == 200
        assert api.post(f"/v1/tasks/{task['task_id']}/complete",
                        json={"lease_id": task["lease_id"], "num_samples": claims[i]},
                        headers=bearer(token)).status_code == 200
    tick(app)

    info = api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()["rounds"][0]
    assert info["status"] == "done"
    used = {w["client_id"]: (w["reported"], w["weight"]) for w in info["aggregation_weights"]}
    liar = clients[2][0]
    expected_liar = {None: 10.0**9, 2.0: 2.0 * 20, "default": 10.0 * 20}[ratio]  # ratio x the median claim
    assert used == {clients[0][0]: (10.0, 10.0), clients[1][0]: (20.0, 20.0), liar: (1e9, expected_liar)}
    with app.state.session_factory() as s:
        rnd = s.scalars(select(Round).where(Round.federation_id == fid, Round.number == 1)).one()
        cfg = FederationConfig.model_validate(s.get(Federation, fid).config)
        prev = unpack_tensors(app.state.blobs.get_bytes(s.get(AdapterVersion, rnd.input_root_version_id).blob_sha256))
        new_sha = s.get(AdapterVersion, rnd.result_version_id).blob_sha256
    reference = combine_tier_uploads(cfg.manifest, "root", cfg.root, prev, [sent[c] for c in sorted(sent)],
                                     [used[c][1] for c in sorted(sent)])
    assert hashlib.sha256(pack_tensors(reference)).hexdigest() == new_sha

