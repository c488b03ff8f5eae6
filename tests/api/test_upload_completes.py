"""An upload that also completes its task (``X-Hilora-Complete``): one request, one transaction;
replays are harmless; a bad completion is refused before the body is stored, and nothing changes.
Runs on every backend of the ``database_url`` fixture."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import bearer, create_federation, register, tick
from conftest import tiny_root_body as root_body
from sqlalchemy import select

from coordinator.models import Blob, Round, Task
from shared.schemas import COMPLETE_HEADER

pytestmark = pytest.mark.api


def task_row(app, task_id: int) -> Task:
    with app.state.session_factory() as s:
        t = s.get(Task, task_id)
        s.expunge(t)
        return t


def upload_rows(app) -> list[tuple[str, int]]:
    with app.state.session_factory() as s:
        return [(b.sha256, b.size) for b in s.scalars(select(Blob).where(Blob.kind == "upload"))]


def leased_root_tasks(api, app, n: int = 2) -> list[tuple[dict, str]]:
    fid, secret = create_federation(api)
    clients = [register(api, fid, secret, f"c{i}") for i in range(n)]
    tick(app)
    out = []
    for cid, token in clients:
        r = api.post(f"/v1/clients/{cid}/lease", headers=bearer(token))
        assert r.status_code == 200, r.text
        out.append((r.json()["task"], token))
    return out


def put(api, task: dict, token: str, body: bytes, completion: object | None):
    headers = bearer(token)
    if completion is not None:
        headers[COMPLETE_HEADER] = completion if isinstance(completion, str) else json.dumps(completion)
    return api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]}, content=body,
                   headers=headers)


def test_an_upload_with_its_completion_finishes_the_task_in_one_request(api, app):
    (task, token), _ = leased_root_tasks(api, app)
    body = root_body(1)
    sha = hashlib.sha256(body).hexdigest()
    completion = {"num_samples": 9, "metrics": {"acc_root": 0.25, "time_compute": 1.5}}

    r = put(api, task, token, body, completion)
    assert r.status_code == 200, r.text
    assert r.json() == {"task_id": task["task_id"], "sha256": sha, "bytes": len(body), "status": "done"}
    row = task_row(app, task["task_id"])
    assert (row.status, row.lease_id, row.upload_sha256, row.upload_bytes, row.num_samples) == (
        "done", task["lease_id"], sha, len(body), 9)
    assert row.finished_at is not None
    # the worker's metrics as sent, and the coordinator's own time_upload (the worker cannot know it yet)
    assert {k: row.metrics[k] for k in ("acc_root", "time_compute")} == {"acc_root": 0.25, "time_compute": 1.5}
    assert set(row.metrics) == {"acc_root", "time_compute", "time_upload"}
    assert 0 < row.metrics["time_upload"] < 60
    assert upload_rows(app) == [(sha, len(body))]

    # a replay (the worker did not see the answer): the same answer, nothing changes
    again = put(api, task, token, body, completion)
    assert again.status_code == 200 and again.json() == r.json()
    replayed = task_row(app, task["task_id"])
    assert (replayed.status, replayed.metrics, replayed.finished_at) == ("done", row.metrics, row.finished_at)
    # a plain completion after it, too (a worker falling back): the task stays as it is
    plain = api.post(f"/v1/tasks/{task['task_id']}/complete",
                     json={"lease_id": task["lease_id"], "num_samples": 3, "metrics": {}}, headers=bearer(token))
    assert plain.status_code == 200 and plain.json()["status"] == "done"
    assert task_row(app, task["task_id"]).num_samples == 9
    # a different body under the finished lease is refused, with or without a completion
    other = put(api, task, token, root_body(2), completion)
    assert other.status_code == 409 and other.json()["error"] == "task_finished", other.text
    assert upload_rows(app) == [(sha, len(body))]


def test_a_time_upload_the_worker_sends_is_kept(api, app):
    (task, token), _ = leased_root_tasks(api, app)
    r = put(api, task, token, root_body(1), {"num_samples": 4, "metrics": {"time_upload": 0.125}})
    assert r.status_code == 200, r.text
    assert task_row(app, task["task_id"]).metrics == {"time_upload": 0.125}


def test_an_upload_without_the_header_leaves_the_task_leased(api, app):
    (task, token), _ = leased_root_tasks(api, app)
    r = put(api, task, token, root_body(1), None)
    assert r.status_code == 200 and "status" not in r.json()
    assert task_row(app, task["task_id"]).status == "leased"


@pytest.mark.parametrize(("completion", "code", "names"), [
    ("{not json", "bad_completion", "X-Hilora-Complete"),
    ({"metrics": {"loss": 1.0}}, "bad_completion", "num_samples: Field required"),
    ({"num_samples": 0}, "bad_completion", "num_samples: Input should be greater than or equal to 1"),
    ({"num_samples": 3, "lease_id": "x"}, "bad_completion", "lease_id: Extra inputs are not permitted"),
    ('{"num_samples": 3, "metrics": {"loss": NaN}}', "bad_completion", "metrics.loss"),
    ({"num_samples": 3, "metrics": {"loss": "high"}}, "bad_completion", "metrics.loss"),
    ({"num_samples": 3, "metrics": {"x" * 65: 1.0}}, "bad_metrics", "names up to 64 characters"),
])
def test_a_bad_completion_is_refused_before_the_body_is_stored(api, app, completion, code, names):
    (task, token), _ = leased_root_tasks(api, app)
    r = put(api, task, token, root_body(1), completion)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == code and names in r.json()["detail"], r.json()
    assert "\n" not in r.json()["detail"]
    row = task_row(app, task["task_id"])
    assert (row.status, row.upload_sha256, row.num_samples) == ("leased", None, None)
    assert upload_rows(app) == []
    assert list((app.state.blobs.root / "tmp").iterdir()) == []
    # nothing lost: the same task takes its result afterwards
    ok = put(api, task, token, root_body(1), {"num_samples": 2, "metrics": {}})
    assert ok.status_code == 200 and ok.json()["status"] == "done", ok.text


def test_a_task_that_takes_no_upload_is_refused_with_or_without_a_completion(api, app):
    """An eval (or leaf) task completes on /complete; a completion header does not change that."""
    from test_final_evaluation import flat_federation

    _fid, _secret, clients = flat_federation(api, app)
    cid, token = clients[0]
    task = api.post(f"/v1/clients/{cid}/lease", headers=bearer(token)).json()["task"]
    assert task is not None and task["stage"] == "eval"
    refused = put(api, task, token, root_body(1), {"num_samples": 2, "metrics": {}})
    assert refused.status_code == 409 and refused.json()["error"] == "no_upload_expected", refused.text
    assert task_row(app, task["task_id"]).status == "leased"


def test_the_completing_upload_of_a_rounds_last_task_wakes_the_scheduler(api, app, monkeypatch):
    leased = leased_root_tasks(api, app, n=3)
    woken = []   # from here on: registrations and the first round's opening wake it too
    monkeypatch.setattr(app.state.scheduler, "wake", lambda: woken.append(1))
    for i, (task, token) in enumerate(leased):
        r = put(api, task, token, root_body(i), {"num_samples": 5, "metrics": {"loss": 0.5}})
        assert r.status_code == 200 and r.json()["status"] == "done", r.text
        assert len(woken) == (1 if i == len(leased) - 1 else 0), f"upload {i + 1} of {len(leased)}"
    tick(app)
    with app.state.session_factory() as s:
        first = s.scalars(select(Round).order_by(Round.id)).first()
        assert first.status == "done"


def test_the_token_and_the_lease_are_checked_before_the_completion(api, app):
    (task, token), _ = leased_root_tasks(api, app)
    r = put(api, task, "not-a-token", root_body(1), "{not json")
    assert r.status_code == 401, r.text
    stale = dict(task, lease_id="0" * 32)
    r = put(api, stale, token, root_body(1), "{not json")
    assert r.status_code == 409 and r.json()["error"] == "stale_lease", r.text
    assert task_row(app, task["task_id"]).status == "leased"


def test_a_completing_upload_after_an_earlier_body_replaces_it_and_frees_the_old_one(api, app):
    """The first body without a completion, then a different one with it (a worker that retried
    after a crash): the task takes the second body and completes; the first body's row and file go."""
    (task, token), _ = leased_root_tasks(api, app)
    first, second = root_body(1), root_body(2)
    assert put(api, task, token, first, None).status_code == 200
    first_sha = hashlib.sha256(first).hexdigest()
    assert app.state.blobs.exists(first_sha)
    r = put(api, task, token, second, {"num_samples": 6, "metrics": {"loss": 0.5}})
    assert r.status_code == 200 and r.json()["status"] == "done", r.text
    sha = hashlib.sha256(second).hexdigest()
    row = task_row(app, task["task_id"])
    assert (row.status, row.upload_sha256, row.upload_count, row.num_samples) == ("done", sha, 2, 6)
    assert upload_rows(app) == [(sha, len(second))]
    assert not app.state.blobs.exists(first_sha) and app.state.blobs.exists(sha)


def test_a_completing_upload_to_another_clients_task_is_refused_and_stores_nothing(api, app):
    (task, _token), (_other_task, other_token) = leased_root_tasks(api, app)
    r = put(api, task, other_token, root_body(1), {"num_samples": 2, "metrics": {}})
    assert r.status_code == 403 and r.json()["error"] == "not_your_task", r.text
    row = task_row(app, task["task_id"])
    assert (row.status, row.upload_sha256) == ("leased", None)
    assert upload_rows(app) == []
    assert not app.state.blobs.exists(hashlib.sha256(root_body(1)).hexdigest())


def test_a_completing_upload_from_a_revoked_client_is_refused(api, app):
    from conftest import admin_headers

    (task, token), _ = leased_root_tasks(api, app)
    cid = task["client_id"]
    fid = task["federation_id"]
    assert api.post(f"/v1/federations/{fid}/clients/{cid}/revoke", json={}, headers=admin_headers()).status_code == 200
    r = put(api, task, token, root_body(1), {"num_samples": 2, "metrics": {}})
    assert r.status_code == 403 and r.json()["error"] == "revoked", r.text
    assert task_row(app, task["task_id"]).upload_sha256 is None
    assert upload_rows(app) == []


def test_a_lease_that_expires_under_the_completing_upload_changes_nothing(app):
    """``attach_and_complete`` itself, with a clock past the lease's expiry (the plan checked the
    lease before the body arrived; the body took longer than the lease had left): 409
    lease_expired, and the rollback leaves the task leased, without body or blob row."""
    from datetime import timedelta

    from coordinator.errors import Conflict, Unauthorized
    from coordinator.services.tasks import attach_and_complete
    from fastapi.testclient import TestClient

    api = TestClient(app)
    (task, token), _ = leased_root_tasks(api, app)
    body = root_body(1)
    sha = hashlib.sha256(body).hexdigest()
    fd, tmp = app.state.blobs.temp_file()
    with open(fd, "wb") as fh:
        fh.write(body)
    row = task_row(app, task["task_id"])
    late = row.lease_expires_at + timedelta(seconds=1)
    with pytest.raises(Conflict) as refused:
        with app.state.session_factory() as s, s.begin():
            attach_and_complete(s, app.state.blobs, token, task["task_id"], task["lease_id"], tmp, sha, len(body), 3,
                                {}, late)
    assert refused.value.code == "lease_expired"
    after = task_row(app, task["task_id"])
    assert (after.status, after.upload_sha256, after.num_samples) == ("leased", None, None)
    assert upload_rows(app) == [] and not app.state.blobs.exists(sha)
    # an unknown token, before anything is written
    with pytest.raises(Unauthorized):
        with app.state.session_factory() as s, s.begin():
            attach_and_complete(s, app.state.blobs, "not-a-token", task["task_id"], task["lease_id"], tmp, sha,
                                len(body), 3, {}, late)
    # the same call before the expiry applies, and answers the task's round
    with app.state.session_factory() as s, s.begin():
        assert attach_and_complete(s, app.state.blobs, token, task["task_id"], task["lease_id"], tmp, sha, len(body),
                                   3, {"loss": 0.5}, row.lease_expires_at - timedelta(seconds=1)) == row.round_id
    done = task_row(app, task["task_id"])
    assert (done.status, done.upload_sha256, done.num_samples, done.metrics) == ("done", sha, 3, {"loss": 0.5})


def complete(api, task: dict, token: str, num_samples: int = 3, metrics: dict | None = None):
    return api.post(f"/v1/tasks/{task['task_id']}/complete", headers=bearer(token),
                    json={"lease_id": task["lease_id"], "num_samples": num_samples, "metrics": metrics or {}})


def test_a_completion_of_a_task_that_takes_no_upload_finishes_it_and_a_replay_changes_nothing(api, app):
    from test_final_evaluation import flat_federation

    _fid, _secret, clients = flat_federation(api, app)
    cid, token = clients[0]
    task = api.post(f"/v1/clients/{cid}/lease", headers=bearer(token)).json()["task"]
    assert task["stage"] == "eval"
    r = complete(api, task, token, 7, {"acc_root": 0.5})
    assert r.status_code == 200 and r.json() == {"task_id": task["task_id"], "status": "done"}, r.text
    row = task_row(app, task["task_id"])
    assert (row.status, row.num_samples, row.metrics) == ("done", 7, {"acc_root": 0.5})
    assert row.finished_at is not None
    again = complete(api, task, token, 2, {"acc_root": 0.1})
    assert again.status_code == 200 and again.json() == r.json()
    assert (task_row(app, task["task_id"]).num_samples, task_row(app, task["task_id"]).metrics) == (7, {"acc_root": 0.5})


def test_a_completion_keeps_its_errors_and_their_order(api, app):
    (task, token), (other, other_token) = leased_root_tasks(api, app)
    # a root task without its body
    r = complete(api, task, token)
    assert r.status_code == 409 and r.json()["error"] == "upload_missing", r.text
    # a stale lease comes before bad metrics; with the lease right, the metrics are refused
    r = complete(api, dict(task, lease_id="0" * 32), token, metrics={"loss": 1.0, "x" * 65: 1.0})
    assert r.status_code == 409 and r.json()["error"] == "stale_lease", r.text
    assert put(api, task, token, root_body(1), None).status_code == 200
    r = complete(api, task, token, metrics={"x" * 65: 1.0})
    assert r.status_code == 422 and r.json()["error"] == "bad_metrics", r.text
    # someone else's task, an unknown token
    r = complete(api, other, token)
    assert r.status_code == 403 and r.json()["error"] == "not_your_task", r.text
    assert complete(api, task, "not-a-token").status_code == 401
    assert task_row(app, task["task_id"]).status == "leased" and task_row(app, other["task_id"]).status == "leased"
    # and the right one finishes the task, body attached
    r = complete(api, task, token, 4, {"loss": 0.5})
    assert r.status_code == 200 and r.json()["status"] == "done", r.text
    row = task_row(app, task["task_id"])
    assert (row.status, row.num_samples, row.upload_sha256) == ("done", 4, hashlib.sha256(root_body(1)).hexdigest())
    assert complete(api, other, other_token).json()["error"] == "upload_missing"


def test_a_completion_under_an_expired_lease_changes_nothing(app):
    from datetime import timedelta

    from coordinator.errors import Conflict
    from coordinator.services.tasks import complete_live
    from fastapi.testclient import TestClient

    api = TestClient(app)
    (task, token), _ = leased_root_tasks(api, app)
    assert put(api, task, token, root_body(1), None).status_code == 200
    row = task_row(app, task["task_id"])
    with pytest.raises(Conflict) as refused:
        with app.state.session_factory() as s, s.begin():
            complete_live(s, token, task["task_id"], task["lease_id"], 3, {}, row.lease_expires_at + timedelta(seconds=1))
    assert refused.value.code == "lease_expired"
    assert task_row(app, task["task_id"]).status == "leased"
    with app.state.session_factory() as s, s.begin():   # bad metrics: left to the general path
        assert complete_live(s, token, task["task_id"], task["lease_id"], 3, {"loss": float("nan")},
                             row.lease_expires_at) is None
    with app.state.session_factory() as s, s.begin():
        assert complete_live(s, token, task["task_id"], task["lease_id"], 3, {"loss": 0.5},
                             row.lease_expires_at) == row.round_id
    done = task_row(app, task["task_id"])
    assert (done.status, done.num_samples, done.metrics) == ("done", 3, {"loss": 0.5})
