"""Observability of the coordinator: the operator's metrics after a real (fake-worker) cascade,
request ids, and structured JSON logs (HILORA_LOG_FORMAT=json)."""

from __future__ import annotations

import io
import json
import logging

import pytest
from conftest import admin_headers
from fastapi import FastAPI
from fastapi.testclient import TestClient
from test_admin_api import LATE, TRAIN, serving_federation
from test_metrics import scrape

from coordinator.logs import JsonFormatter, RequestContextMiddleware, log_context

pytestmark = pytest.mark.api


def test_operator_metrics_are_exported_after_a_cascade(api, app):
    # the app's own scheduler tick (as its background thread runs it), so clustering is timed
    fid, _secret = serving_federation(api, app, ticker=lambda a: a.state.scheduler.tick())
    k = api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()["clustering"]["k"]
    m = scrape(api)
    fed = ("federation", str(fid))
    assert m[("hilora_lease_seconds_count", (("outcome", "granted"),))] > 0
    assert m[("hilora_lease_seconds_sum", (("outcome", "granted"),))] > 0
    assert m[("hilora_lease_seconds_bucket", (("le", "+Inf"), ("outcome", "granted")))] == \
        m[("hilora_leases_total", (("outcome", "granted"),))]
    assert m[("hilora_clustering_seconds_count", (("features", "update"),))] == 1
    assert m[("hilora_clustering_seconds_sum", (("features", "update"),))] > 0
    assert m[("hilora_upload_bytes_total", ())] > 0
    assert m[("hilora_clients_online", (fed,))] == len(TRAIN) + len(LATE)
    assert m[("hilora_clusters_k", (fed,))] == k >= 2
    leaf = api.get(f"/v1/federations/{fid}/accuracy", headers=admin_headers()).json()["latest"]
    for tier in ("root", "cluster", "leaf"):
        value = m[("hilora_accuracy", (fed, ("tier", tier)))]
        assert value > 0 and value == pytest.approx(leaf[tier]["mean"])
    # an admin recluster is timed too
    assert api.post(f"/v1/federations/{fid}/recluster", json={"features": "subspace"},
                    headers=admin_headers()).status_code == 200
    assert scrape(api)[("hilora_clustering_seconds_count", (("features", "subspace"),))] == 1


def test_every_response_carries_a_request_id(api):
    r = api.get("/v1/healthz", headers={"X-Request-Id": "trace-42.a:b"})
    assert r.headers["x-request-id"] == "trace-42.a:b"
    generated = api.get("/v1/healthz").headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    for unsafe in ("has space", "x" * 200, "new\tline"):
        echoed = api.get("/v1/healthz", headers={"X-Request-Id": unsafe}).headers["x-request-id"]
        assert echoed != unsafe and len(echoed) == 32
    assert api.get("/v1/overview").headers["x-request-id"]  # errors too (401)


@pytest.mark.unit
def test_json_logs_carry_the_request_and_path_ids():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("hilora.test-json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    app = FastAPI()
    app.add_middleware(RequestContextMiddleware)

    @app.get("/v1/federations/{fid}/rounds-of/{x}")
    def sync_route(fid: int, x: str) -> dict:  # runs in a worker thread
        logger.info("sync route %s", x)
        return {}

    @app.post("/v1/tasks/{tid}/complete")
    async def async_route(tid: int) -> dict:
        logger.warning("async route")
        return {}

    try:
        with TestClient(app) as client:
            assert client.get("/v1/federations/7/rounds-of/a", headers={"X-Request-Id": "req-1"}).status_code == 200
            client.post("/v1/tasks/12/complete")
        with log_context(federation_id=3):
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                logger.exception("outside a request")
        logger.info("no context")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["message"] == "sync route a" and lines[0]["request_id"] == "req-1"
    assert lines[0]["federation_id"] == 7 and lines[0]["level"] == "info" and lines[0]["logger"] == "hilora.test-json"
    assert lines[1]["task_id"] == 12 and len(lines[1]["request_id"]) == 32 and "federation_id" not in lines[1]
    assert lines[2]["federation_id"] == 3 and "RuntimeError: boom" in lines[2]["exception"] and "request_id" not in lines[2]
    assert set(lines[3]) == {"time", "level", "logger", "message"} and lines[3]["time"].endswith("+00:00")


@pytest.mark.unit
def test_log_format_setting():
    from coordinator.settings import Settings

    assert Settings(admin_token="x" * 20).log_format == "text"
    assert Settings(admin_token="x" * 20, log_format="json").log_format == "json"
    with pytest.raises(ValueError):
        Settings(admin_token="x" * 20, log_format="xml")
