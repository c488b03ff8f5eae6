"""The final evaluation: when training ends the scheduler opens eval rounds (one per cluster, like
the leaf rounds) on the final versions, for the active training clients; eval tasks train and
upload nothing; eval rounds have no quorum, close when all tasks are terminal or at the deadline,
and are never reopened."""

from __future__ import annotations

import pytest
from conftest import admin_headers, bearer, create_federation, register, tick
from sqlalchemy import select
from test_quorum import finish, lease

from coordinator.models import AdapterVersion, Round, Task
from shared.states import RoundStatus, Stage, TaskStatus

pytestmark = pytest.mark.api

FLAT = {"cluster": {"enabled": False}, "root": {"A": "aggregate", "B": "local", "head": "aggregate",
                                                "aggregation": "factor_avg"}}


def complete(api, task, token, metrics=None):
    return api.post(f"/v1/tasks/{task['task_id']}/complete",
                    json={"lease_id": task["lease_id"], "num_samples": 5, "metrics": metrics or {}},
                    headers=bearer(token))


def eval_rounds(app) -> list[Round]:
    with app.state.session_factory() as s:
        return list(s.scalars(select(Round).where(Round.stage == Stage.eval).order_by(Round.id)))


def flat_federation(api, app, n=3, **schedule):
    """A flat federation (FedSA-like: root B local, no cluster tier, no leaf rounds), trained to the
    end of its root rounds."""
    fid, secret = create_federation(api, schedule={"min_clients": n, "root_rounds": 1, "leaf_rounds": 0, **schedule},
                                    **FLAT)
    clients = [register(api, fid, secret, f"c{i}") for i in range(n)]
    tick(app)
    for i, (cid, tok) in enumerate(clients):
        finish(api, lease(api, cid, tok), tok, seed=i)
    tick(app)
    return fid, secret, clients


def test_a_flat_federation_evaluates_its_final_root(api, app):
    fid, secret, clients = flat_federation(api, app)
    assert api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()["state"] == "serving"
    [rnd] = eval_rounds(app)
    with app.state.session_factory() as s:
        final_root = s.scalars(select(AdapterVersion).where(AdapterVersion.tier == "root")
                               .order_by(AdapterVersion.version.desc())).first()
    assert (rnd.scope, rnd.status, rnd.quorum, rnd.number) == ("eval:none", RoundStatus.open, None, 1)
    assert rnd.input_root_version_id == final_root.id and final_root.version == 1  # the aggregate, never seen before
    assert rnd.input_cluster_version_id is None
    for i, (cid, tok) in enumerate(clients):
        task = lease(api, cid, tok)
        assert task["stage"] == "eval" and task["scope"] == "eval:none" and task["root"]["id"] == final_root.id
        assert (task["train_tier"], task["epochs"], task["trainable"], task["upload"]) == ("root", 0, [], [])
        assert task["local"] == ["B"] and task["cluster"] is None and task["reset_leaf"] is False
        r = api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                    content=b"x", headers=bearer(tok))
        assert r.status_code == 409 and r.json()["error"] == "no_upload_expected"
        r = complete(api, task, tok, {"acc_root": 0.5 + i / 10})
        assert r.status_code == 200 and r.json()["status"] == "done", r.text
    tick(app)
    [rnd] = eval_rounds(app)
    assert rnd.status == RoundStatus.done and rnd.closed_at is not None
    assert tick(app) == 0  # decided once, never reopened
    assert len(eval_rounds(app)) == 1
    accuracy = api.get(f"/v1/federations/{fid}/accuracy", headers=admin_headers()).json()
    assert [s["label"] for s in accuracy["steps"]] == ["eval 1"]  # these root tasks reported no accuracy
    assert accuracy["latest"]["root"]["n"] == 3 and accuracy["latest"]["root"]["mean"] == pytest.approx(0.6)
    timeline = api.get(f"/v1/federations/{fid}/timeline", headers=admin_headers()).json()
    assert [s["stage"] for s in timeline["stages"]] == ["enrolling", "root", "serving"]
    assert timeline["stages"][-1]["rounds_done"] == 1
    # a client registering now is late: it is onboarded, never asked to run the final evaluation
    late = register(api, fid, secret, "late")
    tick(app)
    task = lease(api, *late)
    assert task["stage"] == "leaf" and task["scope"] == f"client:{late[0]}"
    # its zero-shot accuracy (no cluster: the root's), one definition for the report and the view
    assert complete(api, task, late[1], {"acc_root": 0.4, "acc_leaf": 0.8}).status_code == 200
    tick(app)
    report = api.get(f"/v1/federations/{fid}/report", headers=admin_headers()).json()
    [row] = [c for c in report["clients"] if c["name"] == "late"]
    [unseen] = api.get(f"/v1/federations/{fid}/unseen-clients", headers=admin_headers()).json()
    assert row["zero_shot"] == unseen["zero_shot"] == 0.4 and unseen["after_leaf"] == 0.8
    assert unseen["onboarding"] == "ready"


def test_an_eval_round_is_decided_at_its_deadline_without_quorum_and_never_reopened(api, app, clock):
    fid, _secret, clients = flat_federation(api, app, n=3, round_deadline_seconds=100, lease_seconds=10)
    [rnd] = eval_rounds(app)
    assert rnd.deadline_at is not None
    first = lease(api, *clients[0])
    assert complete(api, first, clients[0][1], {"acc_root": 0.7}).status_code == 200
    lease(api, *clients[1])  # leased, never finished
    tick(app)
    assert eval_rounds(app)[0].status == RoundStatus.open  # tasks still open before the deadline
    clock.advance(101)
    tick(app)
    [rnd] = eval_rounds(app)
    assert rnd.status == RoundStatus.done  # one done task is enough: no quorum
    with app.state.session_factory() as s:
        statuses = sorted(t.status for t in s.scalars(select(Task).where(Task.round_id == rnd.id)))
    assert statuses == [TaskStatus.cancelled, TaskStatus.cancelled, TaskStatus.done]
    assert tick(app) == 0 and len(eval_rounds(app)) == 1


def test_an_eval_round_without_a_done_task_fails_and_is_not_reopened(api, app, clock):
    fid, _secret, clients = flat_federation(api, app, n=2, max_attempts=1, lease_seconds=10)
    for cid, tok in clients:
        lease(api, cid, tok)
    clock.advance(11)  # both leases expire at their last attempt: failed
    tick(app)
    [rnd] = eval_rounds(app)
    assert rnd.status == RoundStatus.failed and "0 accepted of 2" in rnd.failure
    assert tick(app) == 0 and len(eval_rounds(app)) == 1
    body = api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()
    assert body["state"] == "serving"


def test_no_eval_round_without_training_clients(api, app):
    fid, secret = create_federation(api, schedule={"min_clients": 1, "root_rounds": 1, "leaf_rounds": 0}, **FLAT)
    cid, tok = register(api, fid, secret, "only")
    tick(app)
    task = lease(api, cid, tok)
    finish(api, task, tok)
    r = api.post(f"/v1/federations/{fid}/clients/{cid}/revoke", json={}, headers=admin_headers())
    assert r.status_code == 200
    tick(app)
    assert api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()["state"] == "serving"
    assert eval_rounds(app) == []
