"""Quorum, deadlines, cancellation and voluntary release of leases, driven with the injected clock."""

from __future__ import annotations

import pytest
from conftest import admin_headers, bearer, create_federation, register, tick
from sqlalchemy import func, select
from test_api import valid_root_upload

from coordinator.models import AdapterVersion, Round, Task
from shared.config import Schedule
from shared.tensors import pack_tensors

pytestmark = pytest.mark.api


def lease(api, cid, token):
    r = api.post(f"/v1/clients/{cid}/lease", headers=bearer(token))
    assert r.status_code == 200, r.text
    return r.json()["task"]


def finish(api, task, token, seed=0):
    tensors = valid_root_upload(seed)
    keep = {k: v for k, v in tensors.items()
            if (k.endswith("lora_A") and "A" in task["upload"]) or (k.endswith("lora_B") and "B" in task["upload"])
            or (k.startswith("head.") and "head" in task["upload"])}
    r = api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                content=pack_tensors(keep), headers=bearer(token))
    assert r.status_code == 200, r.text
    r = api.post(f"/v1/tasks/{task['task_id']}/complete",
                 json={"lease_id": task["lease_id"], "num_samples": 5, "metrics": {}}, headers=bearer(token))
    assert r.status_code == 200, r.text


def rounds(app, stage="root"):
    with app.state.session_factory() as s:
        return list(s.scalars(select(Round).where(Round.stage == stage).order_by(Round.id)))


def root_versions(app) -> int:
    with app.state.session_factory() as s:
        return s.scalar(select(func.count()).select_from(AdapterVersion).where(AdapterVersion.tier == "root"))


@pytest.mark.unit
@pytest.mark.parametrize("n,min_clients,fraction,expected", [
    (10, 8, 0.0, 8), (3, 8, 0.0, 3), (10, 1, 0.5, 5), (10, 1, 0.55, 6), (10, 2, 0.1, 2), (1, 1, 0.0, 1),
    (7, 1, 1.0, 7),
])
def test_quorum_formula(n, min_clients, fraction, expected):
    assert Schedule(quorum_min_clients=min_clients, quorum_min_fraction=fraction).quorum(n) == expected


def setup_clients(api, app, n, **schedule):
    fid, secret = create_federation(api, schedule={"min_clients": n, "root_rounds": 2, **schedule})
    clients = [register(api, fid, secret, f"c{i}") for i in range(n)]
    tick(app)
    return fid, clients


def test_round_below_quorum_fails_and_reopens_never_aggregates(api, app, clock):
    fid, clients = setup_clients(api, app, 4, quorum_min_clients=3, max_attempts=1, lease_seconds=10)
    tasks = [lease(api, cid, tok) for cid, tok in clients]
    assert rounds(app)[0].quorum == 3
    finish(api, tasks[0], clients[0][1])
    finish(api, tasks[1], clients[1][1])
    clock.advance(11)  # the other two leases expire at their last attempt -> failed
    tick(app)
    first, second = rounds(app)
    assert (first.status, second.status, second.number) == ("failed", "open", 2)
    assert "2 accepted of 4" in first.failure and "quorum is 3" in first.failure
    assert root_versions(app) == 1  # only version 0: nothing aggregated below quorum
    assert second.input_root_version_id == first.input_root_version_id
    body = api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()
    assert body["state"] == "root"


def test_quorum_met_aggregates_when_rest_fails(api, app, clock):
    fid, clients = setup_clients(api, app, 4, quorum_min_clients=3, max_attempts=1, lease_seconds=10)
    tasks = [lease(api, cid, tok) for cid, tok in clients]
    for i in range(3):
        finish(api, tasks[i], clients[i][1], seed=i)
    tick(app)
    assert rounds(app)[0].status == "open"  # the 4th task is still leased and may finish
    clock.advance(11)
    tick(app)
    first = rounds(app)[0]
    assert first.status == "done" and first.result_version_id is not None
    assert root_versions(app) == 2


def test_deadline_aggregates_with_quorum_and_cancels_the_rest(api, app, clock):
    fid, clients = setup_clients(api, app, 4, quorum_min_fraction=0.5, round_deadline_seconds=60,
                                 lease_seconds=600)
    tasks = [lease(api, cid, tok) for cid, tok in clients]
    finish(api, tasks[0], clients[0][1])
    finish(api, tasks[1], clients[1][1], seed=1)
    tick(app)
    assert rounds(app)[0].status == "open"
    clock.advance(61)
    tick(app)
    first = rounds(app)[0]
    assert first.status == "done" and root_versions(app) == 2
    # a straggler's upload after the deadline is refused and changes nothing
    r = api.put(f"/v1/tasks/{tasks[3]['task_id']}/upload", params={"lease_id": tasks[3]["lease_id"]},
                content=pack_tensors(valid_root_upload(3)), headers=bearer(clients[3][1]))
    assert r.status_code == 409 and r.json()["error"] == "task_cancelled"
    with app.state.session_factory() as s:
        t = s.get(Task, tasks[3]["task_id"])
        assert (t.status, t.upload_sha256) == ("cancelled", None)


def test_deadline_without_quorum_fails_and_reopens(api, app, clock):
    fid, clients = setup_clients(api, app, 4, quorum_min_clients=3, round_deadline_seconds=60,
                                 lease_seconds=600)
    tasks = [lease(api, cid, tok) for cid, tok in clients]
    finish(api, tasks[0], clients[0][1])
    clock.advance(61)
    tick(app)
    first, second = rounds(app)
    assert (first.status, second.status) == ("failed", "open")
    assert "deadline" in first.failure
    assert second.deadline_at is not None and second.deadline_at > clock.now
    assert root_versions(app) == 1


def test_release_requeues_without_spending_an_attempt(api, app, clock):
    fid, clients = setup_clients(api, app, 2, max_attempts=1, lease_seconds=10)
    cid, tok = clients[0]
    task = lease(api, cid, tok)
    r = api.post(f"/v1/tasks/{task['task_id']}/release", json={"lease_id": task["lease_id"]}, headers=bearer(tok))
    assert r.status_code == 200 and r.json() == {"task_id": task["task_id"], "status": "pending"}
    again = api.post(f"/v1/tasks/{task['task_id']}/release", json={"lease_id": task["lease_id"]}, headers=bearer(tok))
    assert again.status_code == 409 and again.json()["error"] == "stale_lease"
    # the old lease can no longer upload
    r = api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                content=pack_tensors(valid_root_upload()), headers=bearer(tok))
    assert r.status_code == 409
    second = lease(api, cid, tok)
    assert second["task_id"] == task["task_id"] and second["attempt"] == 2
    # max_attempts is 1 and the release did not count: 2 leases - 1 release = 1 attempt spent, so
    # this lease expiring is the last attempt -> failed
    clock.advance(11)
    tick(app)
    with app.state.session_factory() as s:
        assert s.get(Task, task["task_id"]).status == "failed"
    # another client cannot release someone else's task
    other = clients[1]
    t2 = lease(api, *other)
    r = api.post(f"/v1/tasks/{t2['task_id']}/release", json={"lease_id": t2["lease_id"]}, headers=bearer(tok))
    assert r.status_code == 403


def test_expired_then_released_lease_counts_one_attempt(api, app, clock):
    fid, clients = setup_clients(api, app, 2, max_attempts=2, lease_seconds=10)
    cid, tok = clients[0]
    first = lease(api, cid, tok)
    clock.advance(11)
    tick(app)  # attempt 1 spent by expiry -> pending
    second = lease(api, cid, tok)
    assert second["attempt"] == 2
    api.post(f"/v1/tasks/{second['task_id']}/release", json={"lease_id": second["lease_id"]}, headers=bearer(tok))
    third = lease(api, cid, tok)
    assert third["attempt"] == 3
    clock.advance(11)
    tick(app)  # 3 leases - 1 release = 2 = max_attempts -> failed
    with app.state.session_factory() as s:
        assert s.get(Task, first["task_id"]).status == "failed"


def test_a_completion_wakes_the_scheduler_only_when_its_round_waits_on_no_other_task(api, app, monkeypatch):
    """Every other completion leaves the round waiting (``_verdict``): waking the scheduler for it is
    a tick that finds nothing to do; the periodic tick still catches deadlines."""
    fid, clients = setup_clients(api, app, 3)
    woken = []
    monkeypatch.setattr(app.state.scheduler, "wake", lambda: woken.append(1))
    leased = [(lease(api, cid, token), token) for cid, token in clients]
    assert all(task is not None for task, _ in leased)
    for i, (task, token) in enumerate(leased):
        finish(api, task, token, seed=i)
        assert len(woken) == (1 if i == len(leased) - 1 else 0), f"completion {i + 1} of {len(leased)}"
    # a repeated completion of the last task (a retried request) decides nothing new but is harmless
    task, token = leased[-1]
    r = api.post(f"/v1/tasks/{task['task_id']}/complete",
                 json={"lease_id": task["lease_id"], "num_samples": 5, "metrics": {}}, headers=bearer(token))
    assert r.status_code == 200 and len(woken) == 2
    tick(app)
    assert [r.status for r in rounds(app)][:1] == ["done"]
