"""/metrics: Prometheus exposition of request, lease, upload and database counters."""

from __future__ import annotations

import pytest
from conftest import bearer, create_federation, register, tick
from prometheus_client.parser import text_string_to_metric_families
from test_api import valid_root_upload

from shared.tensors import pack_tensors

pytestmark = pytest.mark.api


def scrape(api, headers=None) -> dict[tuple[str, tuple], float]:
    r = api.get("/metrics", headers=headers or {})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_count_requests_leases_uploads_and_rounds(api, app):
    fid, secret = create_federation(api, schedule={"min_clients": 2, "root_rounds": 1})
    (c0, t0), (c1, t1) = register(api, fid, secret, "a"), register(api, fid, secret, "b")
    assert api.post(f"/v1/clients/{c0}/lease", headers=bearer(t0)).json()["task"] is None  # enrolling
    tick(app)
    task = api.post(f"/v1/clients/{c0}/lease", headers=bearer(t0)).json()["task"]
    bad = api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                  content=b"not safetensors", headers=bearer(t0))
    assert bad.status_code == 422
    ok = api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                 content=pack_tensors(valid_root_upload()), headers=bearer(t0))
    assert ok.status_code == 200
    m = scrape(api)
    assert m[("hilora_leases_total", (("outcome", "empty"),))] == 1
    assert m[("hilora_leases_total", (("outcome", "granted"),))] == 1
    assert m[("hilora_uploads_total", (("reason", "corrupt"), ("result", "rejected")))] == 1
    assert m[("hilora_uploads_total", (("reason", ""), ("result", "accepted")))] == 1
    assert m[("hilora_upload_bytes_total", ())] == ok.json()["bytes"]
    key = ("hilora_http_requests_total", (("method", "PUT"), ("route", "/v1/tasks/{task_id}/upload"), ("status", "422")))
    assert m[key] == 1
    assert m[("hilora_rounds", (("stage", "root"), ("status", "open")))] == 1
    assert m[("hilora_tasks", (("status", "leased"),))] == 1
    assert m[("hilora_tasks", (("status", "pending"),))] == 1
    assert m[("hilora_federations", (("state", "root"),))] == 1
    assert m[("hilora_clients", (("status", "active"),))] == 2
    assert m[("hilora_database_up", ())] == 1
    # finish the round: the aggregation summary appears with count 1
    api.post(f"/v1/tasks/{task['task_id']}/complete", json={"lease_id": task["lease_id"], "num_samples": 3,
                                                             "metrics": {}}, headers=bearer(t0))
    t = api.post(f"/v1/clients/{c1}/lease", headers=bearer(t1)).json()["task"]
    api.put(f"/v1/tasks/{t['task_id']}/upload", params={"lease_id": t["lease_id"]},
            content=pack_tensors(valid_root_upload(1)), headers=bearer(t1))
    api.post(f"/v1/tasks/{t['task_id']}/complete", json={"lease_id": t["lease_id"], "num_samples": 3,
                                                          "metrics": {}}, headers=bearer(t1))
    tick(app)
    m = scrape(api)
    assert m[("hilora_aggregation_seconds_count", (("stage", "root"),))] == 1
    assert m[("hilora_aggregation_seconds_sum", (("stage", "root"),))] > 0
    assert m[("hilora_rounds", (("stage", "root"), ("status", "done")))] == 1


def test_unknown_paths_do_not_grow_label_cardinality(api):
    for i in range(5):
        assert api.get(f"/v1/nothing-{i}").status_code == 404
    m = scrape(api)
    unmatched = [k for k in m if k[0] == "hilora_http_requests_total" and ("route", "unmatched") in k[1]]
    assert len(unmatched) == 1 and m[unmatched[0]] == 5


def test_metrics_token_when_configured(settings, clock):
    from fastapi.testclient import TestClient

    from coordinator.app import create_app

    app = create_app(settings.model_copy(update={"metrics_token": "scrape-secret-0123456789"}), clock=clock)
    with TestClient(app) as api:
        r = api.get("/metrics")
        assert r.status_code == 401 and r.json()["error"] == "bad_metrics_token"
        assert api.get("/metrics", headers=bearer("wrong")).status_code == 401
        assert scrape(api, bearer("scrape-secret-0123456789"))[("hilora_database_up", ())] == 1
