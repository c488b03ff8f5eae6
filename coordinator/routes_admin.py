"""The operator's view: the admin JSON API under /v1 that ``/dashboard`` reads, the recluster
action, and the dashboard's static page itself (docs/dashboard.md).

Every /v1 route here needs the admin token (``AdminAuth``); the page and its assets are public
(they hold no data: the page asks for the token and sends it as a Bearer header).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, RedirectResponse

from coordinator.errors import NotFound
from coordinator.routes import AdminAuth, DbId, SessionDep, check_protocol
from coordinator.services import admin_actions, admin_views, clustering
from coordinator.services.federations import get_federation
from shared.schemas import (
    AccuracyView,
    AffinityMatrix,
    AssignmentMove,
    ClientRow,
    ClusteringRunRow,
    ClusterPin,
    ClusterRow,
    ErrorBody,
    FederationOverview,
    FederationTimeline,
    ReclusterRequest,
    ReclusterResult,
    RunTransition,
    UnseenClientRow,
    WorkersView,
)

_errors = {s: {"model": ErrorBody} for s in (401, 404, 409, 422)}
api = APIRouter(prefix="/v1", dependencies=[Depends(check_protocol)], responses=_errors, tags=["operator view"])
pages = APIRouter(include_in_schema=False)
router = APIRouter()

def _now(request: Request):  # noqa: ANN202
    return request.app.state.clock()


@api.get("/overview", response_model=list[FederationOverview])
def overview(request: Request, session: SessionDep, _admin: AdminAuth) -> list[FederationOverview]:
    """Every federation at a glance: stage, open round and its progress, clients online, K,
    last aggregation, paused."""
    with session.begin():
        return admin_views.federations_overview(session, _now(request))


@api.get("/federations/{federation_id}/timeline", response_model=FederationTimeline)
def timeline(federation_id: DbId, session: SessionDep, _admin: AdminAuth,
             limit: Annotated[int, Query(ge=1, le=5000)] = 200) -> FederationTimeline:
    """Stages with their start and end, and the newest ``limit`` rounds (status, quorum, deadline,
    duration, failure reason)."""
    with session.begin():
        return admin_views.federation_timeline(session, get_federation(session, federation_id), limit)


@api.get("/federations/{federation_id}/clusters", response_model=list[ClusterRow])
def clusters(federation_id: DbId, request: Request, session: SessionDep, _admin: AdminAuth) -> list[ClusterRow]:
    """Clusters with their active members, size, age and the clustering run that made them."""
    with session.begin():
        return admin_views.clusters(session, get_federation(session, federation_id), _now(request))


@api.get("/federations/{federation_id}/clustering-runs", response_model=list[ClusteringRunRow])
def clustering_runs(federation_id: DbId, session: SessionDep, _admin: AdminAuth) -> list[ClusteringRunRow]:
    """Every LSAC run, newest first: K, features, eigengaps, contrast ratio, clients, trigger."""
    with session.begin():
        return admin_views.clustering_runs(session, get_federation(session, federation_id))


@api.get("/federations/{federation_id}/clustering-runs/{run_id}/affinity", response_model=AffinityMatrix)
def affinity(federation_id: DbId, run_id: DbId, request: Request, session: SessionDep,
             _admin: AdminAuth) -> AffinityMatrix:
    """The affinity matrix of a run, ordered by cluster, with client names and labels."""
    with session.begin():
        return admin_views.affinity_matrix(session, request.app.state.blobs,
                                           get_federation(session, federation_id), run_id)


@api.get("/federations/{federation_id}/assignment-moves", response_model=list[RunTransition])
def assignment_moves(federation_id: DbId, session: SessionDep, _admin: AdminAuth) -> list[RunTransition]:
    """Clients that changed cluster between consecutive clustering runs, newest first."""
    with session.begin():
        return admin_views.assignment_moves(session, get_federation(session, federation_id))


@api.get("/federations/{federation_id}/accuracy", response_model=AccuracyView)
def accuracy(federation_id: DbId, session: SessionDep, _admin: AdminAuth) -> AccuracyView:
    """Mean and 10th percentile of acc_root / acc_cluster / acc_leaf per training round, and
    each client's latest values."""
    with session.begin():
        return admin_views.accuracy(session, get_federation(session, federation_id))


@api.get("/federations/{federation_id}/clients", response_model=list[ClientRow])
def clients(federation_id: DbId, request: Request, session: SessionDep, _admin: AdminAuth) -> list[ClientRow]:
    """Every client: status, cohort, cluster, last seen, samples, latest accuracies."""
    with session.begin():
        return admin_views.clients_table(session, get_federation(session, federation_id), _now(request))


@api.get("/federations/{federation_id}/workers", response_model=WorkersView)
def workers(federation_id: DbId, request: Request, session: SessionDep, _admin: AdminAuth) -> WorkersView:
    """Live leases (worker, task, client, expiry, attempt), workers seen, recent failed tasks."""
    with session.begin():
        return admin_views.workers(session, get_federation(session, federation_id), _now(request))


@api.get("/federations/{federation_id}/unseen-clients", response_model=list[UnseenClientRow])
def unseen_clients(federation_id: DbId, session: SessionDep, _admin: AdminAuth) -> list[UnseenClientRow]:
    """Clients onboarded while serving: onboarding state, probe similarity, zero-shot and
    after-leaf accuracy."""
    with session.begin():
        return admin_views.unseen_clients(session, get_federation(session, federation_id))


@api.post("/federations/{federation_id}/recluster", response_model=ReclusterResult)
def recluster(federation_id: DbId, request: Request, session: SessionDep, _admin: AdminAuth,
              body: ReclusterRequest | None = None) -> ReclusterResult:
    """Rerun LSAC on the newest done probe round of all clients (optionally with force_k,
    features or knn), keep matched clusters, create the others, move clients; audited. With an
    ``assignment`` (client name -> cluster label) the clients are assigned by hand instead.
    409 ``no_probe_round`` before a probe round is done. See docs/operations.md, Reclustering."""
    body = body or ReclusterRequest()
    with session.begin():
        outcome = clustering.recluster(session, request.app.state.blobs, federation_id, _now(request),
                                       force_k=body.force_k, features=body.features, knn=body.knn,
                                       assignment=body.assignment, reason=body.reason)
        result = ReclusterResult(
            run=admin_views.run_row(outcome.run, {outcome.run.id}), clusters_kept=outcome.clusters_kept,
            clusters_created=outcome.clusters_created,
            moves=[AssignmentMove(client_id=cid, name=name, from_label=a, to_label=b) for cid, name, a, b in outcome.moves],
            tasks_cancelled=outcome.tasks_cancelled)
    request.app.state.scheduler.wake()
    return result


@api.post("/federations/{federation_id}/clusters/{label}/pin", response_model=ClusterRow)
def pin_cluster(federation_id: DbId, label: Annotated[int, PathParam(ge=0, le=2**31 - 1)], body: ClusterPin,
                request: Request, session: SessionDep, _admin: AdminAuth) -> ClusterRow:
    """Serve a chosen version of a cluster's adapter (pin, or roll back to an older one), or its
    newest again (``version`` null); audited. Rounds opened from now on and every client's model
    follow it; the cluster's own training rounds go on from its newest. 404 unknown cluster; 422
    ``unknown_version``. See docs/operations.md, "Pinning and rolling back a cluster"."""
    with session.begin():
        cluster = admin_actions.pin_cluster(session, federation_id, label, body.version, _now(request), body.reason)
        fed = get_federation(session, federation_id)
        return next(row for row in admin_views.clusters(session, fed, _now(request)) if row.id == cluster.id)


# ---------------------------------------------------------------- the page

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboard"
ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@pages.get("/dashboard")
def dashboard_page() -> FileResponse:
    return FileResponse(DASHBOARD_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@pages.get("/dashboard/")
def dashboard_slash() -> RedirectResponse:
    return RedirectResponse("/dashboard", status_code=308)


@pages.get("/dashboard/assets/{name}")
def dashboard_asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise NotFound(f"no dashboard asset {name!r}", code="not_found")
    return FileResponse(DASHBOARD_DIR / name, media_type=ASSETS[name], headers=PAGE_HEADERS)


router.include_router(api)
router.include_router(pages)
