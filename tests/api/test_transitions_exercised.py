"""Every transition of the table (shared.states) happens in a real run: eight small federations
whose schedules skip different stages (so every edge of the federation machine is taken), late
clients onboarded with and without clusters, a revoked client, a failed round, a released and an
expired lease. ``move`` is watched, so each pair it makes is recorded; the guarded task UPDATEs
are watched through the targets they ask the table for."""

from __future__ import annotations

import pytest
from conftest import admin_headers, bearer, create_federation, register, tick

import coordinator.services.tasks as task_service
import shared.states as states
from shared.config import FederationConfig
from shared.schemas import TaskAssignment
from shared.states import TRANSITIONS, Machine
from support.fake_worker import client_num_samples, deterministic_body, deterministic_metrics

pytestmark = pytest.mark.api

NAMES = ["a", "b", "c", "d"]
NO_CLUSTER = {"cluster": {"enabled": False}}
# (root_rounds, cluster tier, cluster_rounds, leaf_rounds) -> the federation edges it takes
SCHEDULES = {
    "full": (1, True, 1, 1),            # enrolling>root>probe>cluster>leaf>serving
    "probe-only": (0, True, 0, 0),      # enrolling>probe>serving
    "leaf-only": (0, False, 0, 1),      # enrolling>leaf>serving
    "nothing": (0, False, 0, 0),        # enrolling>serving
    "root-leaf": (1, False, 0, 1),      # root>leaf
    "root-only": (1, False, 0, 0),      # root>serving
    "no-cluster-rounds": (1, True, 0, 1),  # probe>leaf
    "no-leaf": (1, True, 1, 0),         # cluster>serving
}


def state(api, fid: int) -> str:
    return api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()["state"]


def run_once(api, app, cfg: FederationConfig, clients: dict[str, tuple[int, str]]) -> int:
    """Every client leases and finishes its task, as a worker would; then one scheduler tick."""
    ran = 0
    for name, (cid, token) in clients.items():
        body = api.post(f"/v1/clients/{cid}/lease", headers=bearer(token)).json()
        if body["task"] is None:
            continue
        task = TaskAssignment.model_validate(body["task"])
        if task.upload:
            r = api.put(f"/v1/tasks/{task.task_id}/upload", params={"lease_id": task.lease_id},
                        content=deterministic_body(cfg.manifest, name, task), headers=bearer(token))
            assert r.status_code == 200, r.text
        r = api.post(f"/v1/tasks/{task.task_id}/complete", headers=bearer(token),
                     json={"lease_id": task.lease_id, "num_samples": client_num_samples(name),
                           "metrics": deterministic_metrics(name, task, has_leaf=True)})
        assert r.status_code == 200, r.text
        ran += 1
    tick(app)
    return ran


def drive(api, app, cfg, clients, done) -> None:  # noqa: ANN001
    for _ in range(40):
        if run_once(api, app, cfg, clients) == 0 and done():
            return
    raise AssertionError("the federation did not finish")


def settled(api, fid: int, cycle: int) -> bool:
    """Serving in ``cycle`` with no open round (its evaluation decided)."""
    s = api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()
    return s["state"] == "serving" and s["cycle"] == cycle and all(r["status"] != "open" for r in s["rounds"])


def federation(api, name: str, schedule: tuple, **extra) -> tuple[int, str, FederationConfig]:
    root_rounds, cluster, cluster_rounds, leaf_rounds = schedule
    fid, secret = create_federation(
        api, name=name, schedule={"min_clients": len(NAMES), "root_rounds": root_rounds,
                                  "cluster_rounds": cluster_rounds, "leaf_rounds": leaf_rounds,
                                  "unseen_leaf_rounds": 1, **extra},
        **({} if cluster else NO_CLUSTER))
    cfg = FederationConfig.model_validate(api.get(f"/v1/federations/{fid}/config", headers=admin_headers()).json())
    return fid, secret, cfg


def test_every_transition_of_the_table_happens(api, app, clock, monkeypatch):
    moved: set[tuple[Machine, str, str]] = set()
    asked: set[str] = set()
    check, sources = states.check, task_service.sources

    def watched_check(machine, current, new):  # noqa: ANN001, ANN202
        out = check(machine, current, new)
        moved.add((Machine(machine), str(current), str(out)))
        return out

    def watched_sources(machine, target):  # noqa: ANN001, ANN202
        asked.add(str(target))
        return sources(machine, target)

    monkeypatch.setattr(states, "check", watched_check)
    monkeypatch.setattr(task_service, "sources", watched_sources)
    # the lease's and the completion's guarded UPDATEs are built once at import (tasks._LEASE_STATEMENTS),
    # from the same table
    for target, statement in task_service.PREBUILT_GUARDS.items():
        froms = sources(Machine.task, target)
        sql = str(task_service._LEASE_STATEMENTS[statement].compile())
        assert "tasks.status" in sql and len(froms) >= 1
        bound = [v for v in task_service._LEASE_STATEMENTS[statement].compile().params.values()
                 for v in (v if isinstance(v, (list, tuple)) else [v])]
        assert {str(f) for f in froms} <= {str(v) for v in bound}, (target, froms, bound)   # the table's sources
        asked.add(str(target))

    for name, schedule in SCHEDULES.items():
        fid, secret, cfg = federation(api, name, schedule, max_attempts=1)
        clients = {n: register(api, fid, secret, f"{name}-{n}") for n in NAMES}
        tick(app)
        if name == "full":
            # a released lease (leased -> pending), then one that expires at the last attempt (-> failed)
            cid, token = clients["a"]
            task = api.post(f"/v1/clients/{cid}/lease", headers=bearer(token)).json()["task"]
            r = api.post(f"/v1/tasks/{task['task_id']}/release", json={"lease_id": task["lease_id"]},
                         headers=bearer(token))
            assert r.status_code == 200 and r.json()["status"] == "pending"
            assert api.post(f"/v1/clients/{cid}/lease", headers=bearer(token)).json()["task"] is not None
            clock.advance(31)
            tick(app)
        if name == "nothing":
            # serving at once; a late client without clusters: waiting -> leaf -> ready. Then every
            # training client is revoked, so the final evaluation round fails (open -> failed)
            assert state(api, fid) == "serving"
            late = {"late": register(api, fid, secret, f"{name}-late")}
            tick(app)
            drive(api, app, cfg, late, lambda: True)
            for cid, _token in clients.values():
                r = api.post(f"/v1/federations/{fid}/clients/{cid}/revoke", json={}, headers=admin_headers())
                assert r.status_code == 200, r.text
            tick(app)
            rounds = api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()["rounds"]
            assert [(r["stage"], r["status"]) for r in rounds if r["stage"] == "eval"] == [("eval", "failed")]
            continue
        drive(api, app, cfg, clients, lambda fid=fid: state(api, fid) == "serving")
        if name == "full":
            # a late client with clusters: waiting -> probe -> leaf -> ready
            late = {"late": register(api, fid, secret, f"{name}-late")}
            tick(app)
            drive(api, app, cfg, late, lambda: True)
            assert api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()["onboarding_pending"] == 0
            # cycles (an admin's request): the onboarded late client (ready -> cycle -> ready) and one
            # still waiting (waiting -> cycle) take part; the first goes serving -> probe, the second,
            # with cycle root rounds, serving -> root
            everyone = {**clients, **late, "late2": register(api, fid, secret, f"{name}-late2")}
            for cycle, changes in ((1, None), (2, {"cycle_root_rounds": 1})):
                if changes:
                    assert api.patch(f"/v1/federations/{fid}/schedule", json={"changes": changes},
                                     headers=admin_headers()).status_code == 200
                r = api.post(f"/v1/federations/{fid}/cycle", json={"reason": "test"}, headers=admin_headers())
                assert r.status_code == 200 and r.json()["cycle_requested_at"] is not None, r.text
                tick(app)
                drive(api, app, cfg, everyone, lambda fid=fid, c=cycle: settled(api, fid, c))

    for machine in (Machine.federation, Machine.round, Machine.client, Machine.onboarding):
        made = {(a, b) for m, a, b in moved if m == machine}
        listed = {(a.value, b.value) for a, b in TRANSITIONS[machine].pairs}
        assert made == listed, f"{machine}: never made {listed - made}"
    task_targets = {b.value for _a, b in TRANSITIONS[Machine.task].pairs}
    assert asked == task_targets, f"task transitions never asked for: {task_targets - asked}"
