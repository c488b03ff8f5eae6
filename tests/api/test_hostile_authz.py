"""Authorization matrix: every route of the OpenAPI schema (and /metrics) x every credential.

Credentials, in this order: no Authorization header, a wrong token, client a's token, client b's
token (another client of the same federation), the federation's enrollment secret, the admin token.
Path ids name client a's own objects (its client id, its leased task, its federation), so the
"client b" column is always "another client's data".

Every route needs a row in ``MATRIX`` below, except routes whose handler depends on ``AdminAuth``
that have none: they are checked generically as admin-only (401 for every credential but the
admin's, and the admin gets past authorization: neither 401 nor 403 nor 5xx). A new route that is
not admin-only and has no row fails ``test_every_route_has_a_row``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import admin_headers, bearer, register, tick, tiny_checkpoint, tiny_config
from fastapi.routing import APIRoute
from support.hostile import CREDENTIALS, World, build_world, valid_root_upload

from shared.tensors import pack_tensors

pytestmark = pytest.mark.api

#            none wrong   a    b  secret admin
PUBLIC = (200, 200, 200, 200, 200, 200)
ADMIN = (401, 401, 401, 401, 401, 200)
MEMBERS = (401, 401, 200, 200, 401, 200)   # any client of the federation, and the admin
OWNER = (401, 401, 200, 403, 401, 401)     # only the client itself (b: 403 not_your_client/_task)


@dataclass
class Row:
    expected: tuple[int, int, int, int, int, int]
    path: Callable[[World], dict[str, Any]] = lambda w: {}
    json: Callable[[World], Any] | None = None
    content: Callable[[World], bytes] | None = None
    params: Callable[[World], dict] = lambda w: {}
    prepare: Callable[[Any, Any, World], None] = lambda api, app, w: None
    note: str = ""
    extra: dict = field(default_factory=dict)


def _fid(w):
    return {"federation_id": w.federation_id}


def _config(name: str, w: World) -> dict:
    return {"config": tiny_config(name, w.backbone_sha)}


def _register_one(api, app, w):
    register(api, w.enrolling_federation_id, w.enrolling_secret, "first")


def _pause(api, app, w):
    assert api.post(f"/v1/federations/{w.federation_id}/pause", json={}, headers=admin_headers()).status_code == 200


def _upload_a(api, app, w):
    r = api.put(f"/v1/tasks/{w.task_a}/upload", params={"lease_id": w.lease_a},
                content=pack_tensors(valid_root_upload(1)), headers=bearer(w.token_a))
    assert r.status_code == 200, r.text


_names = iter(range(10**6))

MATRIX: dict[tuple[str, str], Row] = {
    ("GET", "/v1/version"): Row(PUBLIC),
    ("GET", "/v1/healthz"): Row(PUBLIC),
    ("GET", "/v1/readyz"): Row(PUBLIC),
    ("GET", "/metrics"): Row(PUBLIC, note="open unless HILORA_METRICS_TOKEN is set (aggregate counts only)"),
    ("PUT", "/v1/blobs/{sha256}"): Row((401, 401, 401, 401, 401, 201), path=lambda w: {"sha256": w.backbone_sha},
                                       content=lambda w: tiny_checkpoint()),
    ("POST", "/v1/federations"): Row((401, 401, 401, 401, 401, 201),
                                     json=lambda w: _config(f"matrix-{next(_names)}", w)),
    ("GET", "/v1/federations"): Row(ADMIN),
    ("GET", "/v1/federations/{federation_id}"): Row(ADMIN, path=_fid),
    ("GET", "/v1/federations/{federation_id}/report"): Row(ADMIN, path=_fid),
    ("POST", "/v1/federations/{federation_id}/start"): Row(
        ADMIN, path=lambda w: {"federation_id": w.enrolling_federation_id}, prepare=_register_one),
    ("POST", "/v1/federations/{federation_id}/clients"): Row(
        (401, 401, 401, 401, 201, 401), path=_fid, json=lambda w: {"name": "newcomer", "num_samples": 3},
        note="the enrollment secret only registers; it is nothing else"),
    ("DELETE", "/v1/federations/{federation_id}/clients/{client_id}"): Row(
        ADMIN, path=lambda w: {"federation_id": w.federation_id, "client_id": w.victims[0][0]}),
    ("POST", "/v1/federations/{federation_id}/clients/{client_id}/revoke"): Row(
        ADMIN, path=lambda w: {"federation_id": w.federation_id, "client_id": w.victims[1][0]},
        json=lambda w: {"reason": "matrix"}),
    ("POST", "/v1/federations/{federation_id}/enrollment-secret"): Row(ADMIN, path=_fid, json=lambda w: {}),
    ("POST", "/v1/federations/{federation_id}/pause"): Row(ADMIN, path=_fid, json=lambda w: {}),
    ("POST", "/v1/federations/{federation_id}/resume"): Row(ADMIN, path=_fid, prepare=_pause),
    ("POST", "/v1/rounds/{round_id}/deadline"): Row(ADMIN, path=lambda w: {"round_id": w.round_id},
                                                    json=lambda w: {"extend_seconds": 60}),
    ("GET", "/v1/federations/{federation_id}/audit"): Row(ADMIN, path=_fid),
    ("GET", "/v1/federations/{federation_id}/config"): Row(MEMBERS, path=_fid),
    ("GET", "/v1/federations/{federation_id}/backbone"): Row(MEMBERS, path=_fid),
    ("GET", "/v1/adapters/{version_id}"): Row(MEMBERS, path=lambda w: {"version_id": w.root_version_id},
                                              note="root versions; cluster versions: test_cluster_adapters_..."),
    ("GET", "/v1/clients/{client_id}/adapters"): Row(OWNER, path=lambda w: {"client_id": w.client_a}),
    ("POST", "/v1/clients/{client_id}/lease"): Row(OWNER, path=lambda w: {"client_id": w.client_a}),
    ("POST", "/v1/tasks/{task_id}/heartbeat"): Row(OWNER, path=lambda w: {"task_id": w.task_a},
                                                   json=lambda w: {"lease_id": w.lease_a}),
    ("PUT", "/v1/tasks/{task_id}/upload"): Row(OWNER, path=lambda w: {"task_id": w.task_a},
                                               params=lambda w: {"lease_id": w.lease_a},
                                               content=lambda w: pack_tensors(valid_root_upload(1))),
    ("POST", "/v1/tasks/{task_id}/release"): Row(OWNER, path=lambda w: {"task_id": w.task_a},
                                                 json=lambda w: {"lease_id": w.lease_a}),
    ("POST", "/v1/tasks/{task_id}/complete"): Row(OWNER, path=lambda w: {"task_id": w.task_a}, prepare=_upload_a,
                                                  json=lambda w: {"lease_id": w.lease_a, "num_samples": 5}),
    ("GET", "/v1/federations/{federation_id}/root/model"): Row(
        (401, 401, 401, 401, 401, 409), path=_fid,
        note="admin only; 409 backbone_mismatch: the tiny test checkpoint lacks blocks.1 (past authorization)"),
    ("GET", "/v1/federations/{federation_id}/clusters/{label}/model"): Row(
        (401, 401, 401, 401, 401, 404), path=lambda w: {"federation_id": w.federation_id, "label": 0},
        note="admin only; 404: this federation has no cluster yet"),
}


def _walk(routes):
    """Every APIRoute, through included routers (FastAPI keeps them nested)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from _walk(route.original_router.routes)
        elif hasattr(route, "routes"):
            yield from _walk(route.routes)


def _schema_routes(app) -> list[tuple[str, str, APIRoute]]:
    """(METHOD, path, route) of every operation in the OpenAPI schema."""
    by_key = {(m, r.path): r for r in _walk(app.routes) for m in r.methods}
    out = []
    for path, item in app.openapi()["paths"].items():
        for method in item:
            if method.upper() in ("GET", "PUT", "POST", "DELETE", "PATCH"):
                route = by_key.get((method.upper(), path))
                assert route is not None, f"no route object for {method.upper()} {path}"
                out.append((method.upper(), path, route))
    return sorted(out, key=lambda x: (x[1], x[0]))


def _needs_admin(route: APIRoute) -> bool:
    from coordinator.routes import require_admin

    stack = [route.dependant]
    while stack:
        dep = stack.pop()
        if dep.call is require_admin:
            return True
        stack.extend(dep.dependencies)
    return False


def _call(api, method: str, path: str, row: Row, world: World, credential: str):
    url = path.format(**row.path(world))
    kwargs: dict[str, Any] = {"params": row.params(world), "headers": world.headers(credential)}
    if row.json is not None:
        kwargs["json"] = row.json(world)
    if row.content is not None:
        kwargs["content"] = row.content(world)
    return api.request(method, url, **kwargs)


def test_every_route_has_a_row(app):
    missing = [f"{m} {p}" for m, p, route in _schema_routes(app)
               if (m, p) not in MATRIX and not _needs_admin(route)]
    assert not missing, ("routes without a row in MATRIX (tests/api/test_hostile_authz.py): add one with the "
                         f"status each credential gets: {missing}")
    existing = {(m, p) for m, p, _route in _schema_routes(app)} | {("GET", "/metrics")}
    stale = [f"{m} {p}" for m, p in MATRIX if (m, p) not in existing]
    assert not stale, f"rows for routes that no longer exist: {stale}"


def test_authorization_matrix(api, app):
    failures = []
    for (method, path), row in MATRIX.items():
        world = build_world(api, app)
        row.prepare(api, app, world)
        got = tuple(_call(api, method, path, row, world, c).status_code for c in CREDENTIALS)
        if got != row.expected:
            failures.append(f"{method} {path}: expected {row.expected}, got {got}")
    assert not failures, "\n".join(failures)


def test_admin_only_routes_without_a_row(api, app):
    """Routes that depend on AdminAuth and have no row (e.g. the operator view): admin only."""
    world = build_world(api, app)
    ids = {"federation_id": world.federation_id, "client_id": world.client_a, "task_id": world.task_a,
           "round_id": world.round_id, "version_id": world.root_version_id, "run_id": 1, "label": 0,
           "invitation_id": 1,
           "sha256": world.backbone_sha}
    checked: set[tuple[str, str]] = set()
    for method, path, route in _schema_routes(app):
        if (method, path) in MATRIX or not _needs_admin(route):
            continue
        row = Row(ADMIN, path=lambda w, p=path: {k: v for k, v in ids.items() if "{" + k + "}" in p},
                  json=(lambda w: {}) if method in ("POST", "PUT", "PATCH") else None)
        got = [_call(api, method, path, row, world, c).status_code for c in CREDENTIALS]
        assert got[:5] == [401] * 5, f"{method} {path}: non-admin credentials got {got[:5]}"
        assert got[5] not in (401, 403) and got[5] < 500, f"{method} {path}: the admin got {got[5]}"
        checked.add((method, path))
    # Lower bound derived from the routes: every operation of the operator view's router
    # (coordinator.routes_admin.api, all AdminAuth) that has no row must have been checked here, so
    # a filter that skips routes (a broken _needs_admin, a path mismatch) cannot pass vacuously.
    from coordinator import routes_admin

    operator_view = {(m, r.path) for r in routes_admin.api.routes if isinstance(r, APIRoute)
                     for m in r.methods} - set(MATRIX)
    # 11 operations when this was written (overview, recluster and nine per-federation views); fewer
    # means the router moved or lost routes and this bound must be re-derived.
    assert len(operator_view) >= 11, f"the operator view lost admin routes: {sorted(operator_view)}"
    assert operator_view <= checked, f"admin-only routes not checked: {sorted(operator_view - checked)}"


def test_a_revoked_client_loses_its_leases_and_nothing_earlier(api, app, clock):
    """Revocation: the token is refused everywhere, the live lease ends (heartbeat, upload and
    complete refused), the task is cancelled; an upload accepted before stays, and the round is
    judged on the others."""
    world = build_world(api, app, victims=1, schedule={"min_clients": 3})
    cid_b, token_b = world.client_b, world.token_b
    lease_b = api.post(f"/v1/clients/{cid_b}/lease", headers=bearer(token_b)).json()["task"]
    # a finishes before the revocation; b has a live lease with an accepted (uncompleted) upload
    r = api.put(f"/v1/tasks/{world.task_a}/upload", params={"lease_id": world.lease_a},
                content=pack_tensors(valid_root_upload(1)), headers=bearer(world.token_a))
    assert r.status_code == 200
    assert api.post(f"/v1/tasks/{world.task_a}/complete", json={"lease_id": world.lease_a, "num_samples": 4},
                    headers=bearer(world.token_a)).status_code == 200
    r = api.put(f"/v1/tasks/{lease_b['task_id']}/upload", params={"lease_id": lease_b["lease_id"]},
                content=pack_tensors(valid_root_upload(2)), headers=bearer(token_b))
    assert r.status_code == 200
    r = api.post(f"/v1/federations/{world.federation_id}/clients/{cid_b}/revoke", json={"reason": "x"},
                 headers=admin_headers())
    assert r.status_code == 200 and r.json()["tasks_cancelled"] == 1
    for method, url, kw in [
        ("POST", f"/v1/tasks/{lease_b['task_id']}/heartbeat", {"json": {"lease_id": lease_b["lease_id"]}}),
        ("PUT", f"/v1/tasks/{lease_b['task_id']}/upload",
         {"params": {"lease_id": lease_b["lease_id"]}, "content": pack_tensors(valid_root_upload(3))}),
        ("POST", f"/v1/tasks/{lease_b['task_id']}/complete",
         {"json": {"lease_id": lease_b["lease_id"], "num_samples": 3}}),
        ("POST", f"/v1/clients/{cid_b}/lease", {}),
        ("GET", f"/v1/federations/{world.federation_id}/config", {}),
        ("GET", f"/v1/adapters/{world.root_version_id}", {}),
    ]:
        r = api.request(method, url, headers=bearer(token_b), **kw)
        assert (r.status_code, r.json()["error"]) == (403, "revoked"), (url, r.text)
    from coordinator.models import Task

    with app.state.session_factory() as s:
        assert s.get(Task, lease_b["task_id"]).status == "cancelled"
        assert s.get(Task, world.task_a).status == "done"
    # the victim finishes; the round aggregates a's and the victim's uploads, not b's
    vid, vtoken = world.victims[0]
    task = api.post(f"/v1/clients/{vid}/lease", headers=bearer(vtoken)).json()["task"]
    api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
            content=pack_tensors(valid_root_upload(4)), headers=bearer(vtoken))
    api.post(f"/v1/tasks/{task['task_id']}/complete", json={"lease_id": task["lease_id"], "num_samples": 4},
             headers=bearer(vtoken))
    tick(app)
    rounds = api.get(f"/v1/federations/{world.federation_id}", headers=admin_headers()).json()["rounds"]
    first = rounds[0]
    assert first["status"] == "done" and first["tasks_done"] == 2 and first["tasks_cancelled"] == 1
    assert rounds[1]["tasks_total"] == 2  # b is left out of later rounds


def test_revoking_every_client_does_not_spin_the_scheduler(api, app):
    """Regression: with every training client revoked, the scheduler used to open an empty round,
    fail it at once and open the next one, 64 per tick, forever."""
    world = build_world(api, app, victims=0)
    for cid in (world.client_a, world.client_b):
        assert api.post(f"/v1/federations/{world.federation_id}/clients/{cid}/revoke", json={},
                        headers=admin_headers()).status_code == 200
    assert tick(app) <= 2
    assert tick(app) == 0
    rounds = api.get(f"/v1/federations/{world.federation_id}", headers=admin_headers()).json()["rounds"]
    assert len(rounds) == 1 and rounds[0]["status"] == "failed"
    # a new client brings the federation back: the next root round opens for it
    cid, token = register(api, world.federation_id, world.secret, "fresh")
    tick(app)
    task = api.post(f"/v1/clients/{cid}/lease", headers=bearer(token)).json()["task"]
    assert task is not None and task["stage"] == "root"


def test_enrollment_secret_rotation(api, app):
    world = build_world(api, app, victims=0)
    r = api.post(f"/v1/federations/{world.federation_id}/enrollment-secret", json={"reason": "leaked"},
                 headers=admin_headers())
    assert r.status_code == 200
    new = r.json()["enrollment_secret"]
    assert new.startswith("hle_") and new != world.secret
    r = api.post(f"/v1/federations/{world.federation_id}/clients", json={"name": "x"}, headers=bearer(world.secret))
    assert (r.status_code, r.json()["error"]) == (401, "bad_secret")
    assert api.post(f"/v1/federations/{world.federation_id}/clients", json={"name": "x"},
                    headers=bearer(new)).status_code == 201
    # clients registered before keep their tokens
    assert api.post(f"/v1/clients/{world.client_a}/lease", headers=bearer(world.token_a)).status_code == 200
    audit = api.get(f"/v1/federations/{world.federation_id}/audit", headers=admin_headers()).json()
    assert audit[0]["action"] == "rotate_secret" and audit[0]["detail"] == {"reason": "leaked"}
    from coordinator.models import Federation

    with app.state.session_factory() as s:  # stored hashed, never in clear
        stored = s.get(Federation, world.federation_id).enrollment_secret_hash
    assert stored == hashlib.sha256(new.encode()).hexdigest() and new not in stored


def test_cluster_adapters_only_for_members_and_the_admin(api, app):
    """After clustering, a cluster's adapter versions are readable by its members and the admin,
    not by members of another cluster nor by clients of another federation."""
    from test_cascade_state_machine import GROUP_OF, group_directions, run_pending

    dirs = group_directions()
    fid, secret = __import__("conftest").create_federation(
        api, name="clustered", schedule={"min_clients": 6, "root_rounds": 1, "cluster_rounds": 1, "leaf_rounds": 1},
        clustering={"k_max": 4, "knn": 2, "force_k": 2})
    clients = {name: register(api, fid, secret, name) for name in GROUP_OF}
    tick(app)
    for i in range(3):  # root, probe, cluster
        run_pending(api, clients, dirs, seed=i)
    other_fid, other_secret = __import__("conftest").create_federation(api, name="elsewhere")
    _, outsider = register(api, other_fid, other_secret, "outsider")
    from sqlalchemy import select

    from coordinator.models import AdapterVersion, Client

    with app.state.session_factory() as s:
        versions = s.scalars(select(AdapterVersion).where(AdapterVersion.federation_id == fid,
                                                          AdapterVersion.tier == "cluster")).all()
        cluster_of = {c.name: c.cluster_id for c in s.scalars(select(Client).where(Client.federation_id == fid))}
    assert len({v.cluster_id for v in versions}) == 2
    for v in versions:
        for name, (_, token) in clients.items():
            r = api.get(f"/v1/adapters/{v.id}", headers=bearer(token))
            want = 200 if cluster_of[name] == v.cluster_id else 403
            assert r.status_code == want, (name, v.id, r.text)
            if want == 403:
                assert r.json()["error"] == "not_a_member"
        assert api.get(f"/v1/adapters/{v.id}", headers=admin_headers()).status_code == 200
        r = api.get(f"/v1/adapters/{v.id}", headers=bearer(outsider))
        assert (r.status_code, r.json()["error"]) == (403, "other_federation")
    # and no client can see another's task metrics or leaf: the report is admin only
    token_a = next(iter(clients.values()))[1]
    assert api.get(f"/v1/federations/{fid}/report", headers=bearer(token_a)).status_code == 401


def test_a_revocation_racing_the_scheduler_leaves_no_task_behind(api, app, clock):
    """Regression (found by the load test on Postgres): a round the scheduler was opening while a
    client was revoked got a pending task for the revoked client, which nobody could ever lease, so
    the round waited forever. Revocation now takes the federation's row lock, as the scheduler does."""
    import threading

    from coordinator.models import Task
    from coordinator.services import admin_actions
    from coordinator.services.federations import get_federation
    from coordinator.services.scheduling import open_round

    world = build_world(api, app, victims=0)
    factory = app.state.session_factory
    scheduler = factory()
    scheduler.begin()
    fed = get_federation(scheduler, world.federation_id, lock=True)  # what advance_federation holds
    revoked = threading.Event()

    def revoke():
        with factory() as session, session.begin():
            admin_actions.revoke_client(session, world.federation_id, world.client_b, clock(), "race")
        revoked.set()

    thread = threading.Thread(target=revoke)
    thread.start()
    try:
        assert not revoked.wait(0.5), "the revocation did not wait for the scheduler's transaction"
        rnd = open_round(scheduler, fed, "root", "root", [world.client_a, world.client_b], clock(),
                         world.root_version_id)  # b still looked active to the scheduler
        scheduler.commit()
    finally:
        scheduler.close()
        thread.join(30)
    assert revoked.is_set()
    with factory() as s:
        statuses = {t.client_id: t.status for t in s.query(Task).filter(Task.round_id == rnd.id)}
    assert statuses == {world.client_a: "pending", world.client_b: "cancelled"}
