"""HTTP routes under /v1. Each route parses, authenticates, calls one service function inside one
transaction and maps domain errors (``coordinator.errors``) to HTTP codes (in ``app``)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from coordinator.blobs import InlineAdapters, fsync_file, start_writeback
from coordinator.errors import (
    BodyTimeout,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
    UpgradeRequired,
)
from coordinator.faults import fault_point
from coordinator.migrate import schema_is_at_head
from coordinator.models import AdapterVersion, Client
from coordinator.security import constant_time_equals
from coordinator.services import (
    adapters,
    admin_actions,
    federations,
    registration,
    reporting,
    retention,
    tasks,
)
from coordinator.services.scheduling import start_training
from shared import PROTOCOL_VERSION, __version__
from shared.config import FederationConfig
from shared.schemas import (
    COMPLETE_HEADER,
    HAVE_ADAPTERS_HEADER,
    PROTOCOL_HEADER,
    SHA256_HEADER,
    WORKER_ID_HEADER,
    AdminNote,
    AuditEventInfo,
    ClientRegister,
    ClientRegistered,
    DeadlineChange,
    ScheduleChange,
    ScheduleChanged,
    EnrollmentSecret,
    ErrorBody,
    FederationCreate,
    FederationCreated,
    FederationReport,
    FederationState,
    FederationStatus,
    Heartbeat,
    HeartbeatAck,
    InvitationCode,
    InvitationCreate,
    InvitationInfo,
    InvitationsCreated,
    LeaseResponse,
    RoundInfo,
    TaskComplete,
    TaskCompleted,
    TaskResult,
    TaskStatus,
    UploadAck,
    VersionInfo,
    parse_have_adapters,
)
from shared.validation import describe_validation_error

MAX_BLOB_BYTES = 4 * 1024**3
WRITEBACK_BYTES = 1 << 20  # start writing a streamed body to disk every MiB
CHUNK = 1 << 20


def check_protocol(x_hilora_protocol: Annotated[str | None, Header(alias=PROTOCOL_HEADER)] = None) -> None:
    """Workers send their protocol version; an incompatible one is refused with 426."""
    if x_hilora_protocol is not None and x_hilora_protocol.strip() != str(PROTOCOL_VERSION):
        raise UpgradeRequired(f"this coordinator speaks protocol {PROTOCOL_VERSION} (hilora {__version__}); "
                              f"the caller sent {x_hilora_protocol!r}: upgrade the worker or coordinator")


_errors = {s: {"model": ErrorBody} for s in (401, 403, 404, 409, 413, 422, 426)}
_busy = {429: {"model": ErrorBody, "description": "over a per-client limit; see Retry-After"},
         503: {"model": ErrorBody, "description": "this replica is at a global limit; see Retry-After"}}
router = APIRouter(prefix="/v1", dependencies=[Depends(check_protocol)], responses=_errors)

MAX_ID = 2**31 - 1
# Row ids are 32-bit integer columns: a larger id is refused here (422) instead of reaching the
# database, where PostgreSQL refuses an out-of-range integer parameter with an error (a 500).
DbId = Annotated[int, Path(ge=1, le=MAX_ID)]


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def bearer_token(authorization: Annotated[str | None, Header()] = None) -> str:
    if not authorization or not authorization.startswith("Bearer ") or not authorization[7:].strip():
        raise Unauthorized("missing 'Authorization: Bearer <token>' header", code="missing_token")
    return authorization[7:].strip()


Token = Annotated[str, Depends(bearer_token)]


def _is_admin(request: Request, token: str) -> bool:
    return constant_time_equals(token, request.app.state.settings.admin_token)


def require_admin(request: Request, token: Token) -> None:
    if not _is_admin(request, token):
        raise Unauthorized("this route needs the admin token", code="bad_admin_token")


AdminAuth = Annotated[None, Depends(require_admin)]


def _now(request: Request):  # noqa: ANN202
    return request.app.state.clock()


def _client_or_admin(request: Request, session: Session, token: str, federation_id: int) -> Client | None:
    """None for the admin; the client for a client token of this federation; else 403/401."""
    if _is_admin(request, token):
        return None
    client = registration.authenticate_client(session, token)
    if client.federation_id != federation_id:
        raise Forbidden(f"this client belongs to federation {client.federation_id}, not {federation_id}",
                        code="other_federation")
    return client


# ---------------------------------------------------------------- health and version

@router.get("/version", response_model=VersionInfo)
def version() -> VersionInfo:
    return VersionInfo(version=__version__, protocol=PROTOCOL_VERSION)


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request, response: Response) -> dict:
    try:
        ready = schema_is_at_head(request.app.state.engine)
    except Exception as exc:  # the database is down or unreachable: not ready, say why
        response.status_code = 503
        return {"ready": False, "detail": f"database: {type(exc).__name__}"}
    if not ready:
        response.status_code = 503
        return {"ready": False, "detail": "schema is not at the newest migration: run `hilora migrate`"}
    return {"ready": True}


# ---------------------------------------------------------------- admin

@router.put("/blobs/{sha256}", status_code=201)
async def put_blob(sha256: str, request: Request, _admin: AdminAuth) -> dict:
    """Upload a content-addressed blob (a backbone checkpoint); the body must hash to ``sha256``."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise Invalid("the blob name must be a lowercase hex sha256", code="bad_sha256")
    sha, size, tmp = await _stream_to_temp(request, MAX_BLOB_BYTES)
    if sha != sha256:
        tmp.unlink(missing_ok=True)
        raise Invalid(f"the body hashes to {sha}, not {sha256}", code="sha256_mismatch")

    def record() -> None:
        blobs = request.app.state.blobs
        blobs.adopt(tmp, sha)
        with request.app.state.session_factory() as session, session.begin():
            adapters.ensure_blob_row(session, sha, size, "backbone", _now(request))

    await run_in_threadpool(record)
    return {"sha256": sha, "bytes": size}


@router.post("/federations", response_model=FederationCreated, status_code=201)
def create_federation(body: FederationCreate, request: Request, session: SessionDep,
                      _admin: AdminAuth) -> FederationCreated:
    with session.begin():
        fed, secret = federations.create_federation(session, request.app.state.blobs, body.config,
                                                    _now(request))
        return FederationCreated(federation_id=fed.id, name=fed.name, state=FederationState(fed.state),
                                 enrollment_secret=secret)


@router.get("/federations", response_model=list[FederationStatus])
def list_federations(session: SessionDep, _admin: AdminAuth) -> list[FederationStatus]:
    with session.begin():
        return [reporting.federation_status(session, f) for f in federations.list_federations(session)]


@router.get("/federations/{federation_id}", response_model=FederationStatus)
def federation_status(federation_id: DbId, session: SessionDep, _admin: AdminAuth) -> FederationStatus:
    with session.begin():
        return reporting.federation_status(session, federations.get_federation(session, federation_id))


@router.get("/federations/{federation_id}/report", response_model=FederationReport)
def federation_report(federation_id: DbId, session: SessionDep, _admin: AdminAuth) -> FederationReport:
    with session.begin():
        return reporting.federation_report(session, federations.get_federation(session, federation_id))


@router.post("/federations/{federation_id}/start", response_model=FederationStatus)
def start_federation(federation_id: DbId, request: Request, session: SessionDep,
                     _admin: AdminAuth) -> FederationStatus:
    """Start training now, with the clients registered so far (instead of waiting for min_clients)."""
    with session.begin():
        fed = federations.get_federation(session, federation_id, lock=True)
        if fed.state != FederationState.enrolling:
            raise Conflict(f"federation {federation_id} is already {fed.state}", code="already_started")
        start_training(session, fed, federations.federation_config(fed), _now(request))
        status = reporting.federation_status(session, fed)
    request.app.state.scheduler.wake()
    return status


# ---------------------------------------------------------------- clients

@router.post("/federations/{federation_id}/clients", response_model=ClientRegistered, status_code=201)
def register_client(federation_id: DbId, body: ClientRegister, request: Request, session: SessionDep,
                    token: Token) -> ClientRegistered:
    """Register with the federation's enrollment secret; the client token is shown once."""
    limiter = request.app.state.registration_limiter
    with session.begin():  # throttled per federation once the secret matched (guesses spend nobody's bucket)
        client, client_token = registration.register_client(
            session, federation_id, token, body.name, body.num_samples, _now(request),
            throttle=lambda: limiter.check(("registration", federation_id), "registrations", per="federation"))
        result = ClientRegistered(federation_id=federation_id, client_id=client.id, name=client.name,
                                  token=client_token, cohort=client.cohort)
    request.app.state.scheduler.wake()
    return result


@router.delete("/federations/{federation_id}/clients/{client_id}")
def delete_client(federation_id: DbId, client_id: DbId, request: Request, session: SessionDep,
                  _admin: AdminAuth) -> dict:
    """Delete a client: its token stops working, its tasks, uploads and task metrics are removed;
    the adapter versions it contributed to are kept. Its upload blobs are freed at once."""
    with session.begin():
        federations.get_federation(session, federation_id, lock=True)  # serialised with the scheduler
        removed = retention.delete_client(session, federation_id, client_id)
        admin_actions.audit(session, _now(request), "delete_client", federation_id, f"client:{client_id}",
                            dict(removed))
    settings = request.app.state.settings
    gc = retention.collect_garbage(request.app.state.session_factory, request.app.state.blobs, _now(request),
                                   retention_seconds=None, grace_seconds=settings.gc_grace_seconds,
                                   sweep_files=False)
    request.app.state.scheduler.wake()
    return {**removed, "blobs_deleted": gc.blobs_deleted, "bytes_freed": gc.bytes_freed}


@router.delete("/federations/{federation_id}")
def delete_federation(federation_id: DbId, request: Request, session: SessionDep, _admin: AdminAuth,
                      confirm: Annotated[str | None, Query(max_length=200)] = None) -> dict:
    """Delete a federation and everything it stored (clients, rounds, tasks, uploads, adapters,
    clusters, runs, invitations) with the blobs only it referred to; ``?confirm=`` must repeat its
    name (409 ``confirmation_required``). The audit log keeps a ``delete_federation`` event."""
    with session.begin():
        summary, gone = retention.delete_federation(session, federation_id, confirm)
        admin_actions.audit(session, _now(request), "delete_federation", federation_id,
                            f"federation:{federation_id}", dict(summary))
    blobs = request.app.state.blobs
    for sha in gone:  # after commit: a crash in between leaves orphan files for the next collection
        try:
            os.unlink(blobs.path(sha))
        except FileNotFoundError:
            pass
    return summary


@router.post("/federations/{federation_id}/clients/{client_id}/revoke")
def revoke_client(federation_id: DbId, client_id: DbId, body: AdminNote, request: Request, session: SessionDep,
                  _admin: AdminAuth) -> dict:
    """Revoke a client: its token is refused from now on, its open tasks are cancelled (so its
    leases end and later uploads are refused); what it contributed so far is kept."""
    with session.begin():
        result = admin_actions.revoke_client(session, federation_id, client_id, _now(request), body.reason)
    request.app.state.scheduler.wake()
    return result


@router.post("/federations/{federation_id}/enrollment-secret", response_model=EnrollmentSecret)
def rotate_enrollment_secret(federation_id: DbId, body: AdminNote, request: Request, session: SessionDep,
                             _admin: AdminAuth) -> EnrollmentSecret:
    """Replace the federation's enrollment secret (shown once); the old one stops working at once.
    Registered clients keep their tokens."""
    with session.begin():
        secret = admin_actions.rotate_enrollment_secret(session, federation_id, _now(request), body.reason)
    return EnrollmentSecret(federation_id=federation_id, enrollment_secret=secret)


@router.post("/federations/{federation_id}/invitations", response_model=InvitationsCreated, status_code=201)
def create_invitations(federation_id: DbId, body: InvitationCreate, request: Request, session: SessionDep,
                       _admin: AdminAuth) -> InvitationsCreated:
    """One-time, expiring registration codes, one client each (shown once). A client registers with
    a code as its bearer token, as it would with the enrollment secret."""
    now = _now(request)
    with session.begin():
        made = registration.create_invitations(session, federation_id, body.count, body.expires_in_seconds,
                                               body.note, now)
        admin_actions.audit(session, now, "invite", federation_id, f"federation:{federation_id}",
                            {"count": body.count, "ids": [row.id for row, _ in made], "note": body.note,
                             "expires_in_seconds": body.expires_in_seconds})
        result = InvitationsCreated(federation_id=federation_id, invitations=[
            InvitationCode(id=row.id, code=code, expires_at=row.expires_at) for row, code in made])
    return result


def _invitation_info(row, now) -> InvitationInfo:  # noqa: ANN001
    return InvitationInfo(id=row.id, note=row.note, state=registration.invitation_state(row, now),
                          created_at=row.created_at, expires_at=row.expires_at, used_at=row.used_at,
                          client_id=row.client_id, revoked_at=row.revoked_at)


@router.get("/federations/{federation_id}/invitations", response_model=list[InvitationInfo])
def list_invitations(federation_id: DbId, request: Request, session: SessionDep,
                     _admin: AdminAuth) -> list[InvitationInfo]:
    """The federation's invitations and their state (never their codes)."""
    now = _now(request)
    with session.begin():
        return [_invitation_info(row, now) for row in registration.list_invitations(session, federation_id)]


@router.delete("/federations/{federation_id}/invitations/{invitation_id}", response_model=InvitationInfo)
def revoke_invitation(federation_id: DbId, invitation_id: DbId, request: Request, session: SessionDep,
                      _admin: AdminAuth) -> InvitationInfo:
    """Revoke an unused invitation: registering with it is refused from now on (409 if it was used)."""
    now = _now(request)
    with session.begin():
        row = registration.revoke_invitation(session, federation_id, invitation_id, now)
        admin_actions.audit(session, now, "revoke_invitation", federation_id, f"invitation:{invitation_id}", {})
        return _invitation_info(row, now)


@router.post("/federations/{federation_id}/pause", response_model=FederationStatus)
def pause_federation(federation_id: DbId, body: AdminNote, request: Request, session: SessionDep,
                     _admin: AdminAuth) -> FederationStatus:
    """Pause: no round opens or closes and no lease is handed out until resumed."""
    with session.begin():
        fed = admin_actions.pause_federation(session, federation_id, _now(request), body.reason)
        return reporting.federation_status(session, fed)


@router.post("/federations/{federation_id}/resume", response_model=FederationStatus)
def resume_federation(federation_id: DbId, request: Request, session: SessionDep,
                      _admin: AdminAuth) -> FederationStatus:
    """Resume a paused federation; open rounds' deadlines move back by the paused time."""
    with session.begin():
        fed = admin_actions.resume_federation(session, federation_id, _now(request))
        status = reporting.federation_status(session, fed)
    request.app.state.scheduler.wake()
    return status


@router.post("/federations/{federation_id}/cycle", response_model=FederationStatus)
def request_cycle(federation_id: DbId, body: AdminNote, request: Request, session: SessionDep,
                  _admin: AdminAuth) -> FederationStatus:
    """Ask for the next cycle (reprobe, recluster with stable ids, cluster rounds, leaves of moved
    and new clients, evaluation); it starts once the federation serves and nothing runs. 409
    ``not_started`` while enrolling, ``nothing_to_cycle`` without a cluster tier or cycle root rounds."""
    with session.begin():
        fed = admin_actions.request_cycle(session, federation_id, _now(request), body.reason)
        status = reporting.federation_status(session, fed)
    request.app.state.scheduler.wake()
    return status


@router.patch("/federations/{federation_id}/schedule", response_model=ScheduleChanged)
def change_schedule(federation_id: DbId, body: ScheduleChange, request: Request, session: SessionDep,
                    _admin: AdminAuth) -> ScheduleChanged:
    """Change schedule fields of a live federation (validated as at creation; a round count below
    what the current stage has done is 409 ``stage_passed``); effective from the next round."""
    with session.begin():
        fed, diff = admin_actions.change_schedule(session, federation_id, body.changes, _now(request), body.reason)
        result = ScheduleChanged(federation_id=fed.id, changes=diff, schedule=fed.config["schedule"])
    request.app.state.scheduler.wake()
    return result


@router.post("/rounds/{round_id}/deadline", response_model=RoundInfo)
def set_round_deadline(round_id: DbId, body: DeadlineChange, request: Request, session: SessionDep,
                       _admin: AdminAuth) -> RoundInfo:
    """Set or extend the deadline of an open round."""
    with session.begin():
        rnd = admin_actions.set_round_deadline(session, round_id, _now(request), deadline_at=body.deadline_at,
                                               extend_seconds=body.extend_seconds)
        return reporting.round_info(session, rnd)


@router.get("/federations/{federation_id}/audit", response_model=list[AuditEventInfo])
def audit_log(federation_id: DbId, session: SessionDep, _admin: AdminAuth,
              limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> list[AuditEventInfo]:
    """Admin actions on this federation, newest first."""
    with session.begin():
        federations.get_federation(session, federation_id)
        return [AuditEventInfo.model_validate(e, from_attributes=True)
                for e in admin_actions.audit_events(session, federation_id, limit)]


@router.get("/federations/{federation_id}/config", response_model=FederationConfig)
def federation_config(federation_id: DbId, request: Request, session: SessionDep, token: Token) -> FederationConfig:
    with session.begin():
        _client_or_admin(request, session, token, federation_id)
        return federations.federation_config(federations.get_federation(session, federation_id))


@router.get("/federations/{federation_id}/backbone", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
def backbone(federation_id: DbId, request: Request, session: SessionDep, token: Token) -> FileResponse:
    with session.begin():
        _client_or_admin(request, session, token, federation_id)
        sha = federations.get_federation(session, federation_id).backbone_sha256
    return FileResponse(request.app.state.blobs.path(sha), media_type="application/octet-stream",
                        headers={"ETag": f'"{sha}"', SHA256_HEADER: sha})


@router.get("/adapters/{version_id}", responses={200: {"content": {"application/octet-stream": {}}}})
def adapter(version_id: DbId, request: Request, session: SessionDep, token: Token,
            if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """An immutable adapter version as safetensors. Root versions: any client of the federation;
    cluster versions: members of that cluster only (and the admin), and a client with a live refine
    task for the cluster's newest version (``clustering.refine_rounds``)."""
    with session.begin():
        # credentials first: without them, whether a version id exists is nobody's business
        client = None if _is_admin(request, token) else registration.authenticate_client(session, token)
        version_row = session.get(AdapterVersion, version_id)
        if version_row is None:
            raise NotFound(f"adapter version {version_id} does not exist", code="adapter_not_found")
        if client is not None and client.federation_id != version_row.federation_id:
            raise Forbidden(f"this client belongs to federation {client.federation_id}, not "
                            f"{version_row.federation_id}", code="other_federation")
        if (client is not None and version_row.tier == "cluster" and client.cluster_id != version_row.cluster_id
                and not tasks.may_read_for_refinement(session, client, version_row)):
            raise Forbidden("cluster adapters are readable only by members of that cluster (and, while it holds a "
                            "refine task, by a client that evaluates the cluster's newest version)",
                            code="not_a_member")
        sha = version_row.blob_sha256
    etag = f'"{sha}"'
    if if_none_match == etag:
        return Response(status_code=304, headers={"ETag": etag})
    return Response(content=request.app.state.blobs.get_bytes(sha), media_type="application/octet-stream",
                    headers={"ETag": etag, SHA256_HEADER: sha, "Cache-Control": "private, max-age=31536000, immutable"})


# ---------------------------------------------------------------- tasks

@router.post("/clients/{client_id}/lease", response_model=LeaseResponse, responses={429: _busy[429]})
async def lease(client_id: DbId, request: Request, token: Token,
                worker_id: Annotated[str, Header(alias=WORKER_ID_HEADER, min_length=1, max_length=200)] = "anonymous",
                wait: Annotated[float, Query(ge=0, le=3600, description=(
                    "long polling: hold the request up to this many seconds (capped by the coordinator's "
                    "long_poll_max_seconds) and answer as soon as a task opens for the client; after a full "
                    "wait without one, retry_after is 0 (ask again at once)"))] = 0.0,
                have_adapters: Annotated[str | None, Header(alias=HAVE_ADAPTERS_HEADER, max_length=4096, description=(
                    "the adapter version ids the worker holds, comma-separated (may be empty): the task's other "
                    "input versions come inline when small (TaskAssignment.inline_adapters)"))] = None,
                ) -> LeaseResponse:
    """Lease the client's next task, or get 'no work, retry after N s'. With ``wait``, an empty
    answer comes only when the wait is over (or the federation is paused, the client revoked)."""
    app = request.app
    started = time.perf_counter()
    factory = app.state.session_factory
    try:
        have = parse_have_adapters(have_adapters)   # refused before anything is leased
    except ValueError as exc:
        raise Invalid(str(exc), code="bad_have_adapters") from None

    def attempt(first: bool) -> LeaseResponse:
        with app.state.lease_session_factory() as session, session.begin():
            client, fed, cfg, has_pending = tasks.authenticate_for_lease(session, token)
            if client.id != client_id:
                raise Forbidden(f"this token belongs to client {client.id}; it cannot lease for client {client_id}",
                                code="not_your_client")
            if first:  # keyed by the authenticated client, so nobody can spend another client's bucket
                app.state.lease_limiter.check(client.id)
            return tasks.lease_task(session, client, worker_id, _now(request), fed, cfg, has_pending)

    def give_back(task_id: int, lease_id: str) -> None:  # a release: pending again at once, no attempt lost
        with factory() as session, session.begin():
            tasks.release_task(session, registration.authenticate_client(session, token), task_id, lease_id,
                               _now(request))

    answer = await run_in_threadpool(attempt, True)
    wait = min(wait, app.state.settings.long_poll_max_seconds)
    if answer.task is None and wait > 0 and answer.client_state not in ("paused", "revoked"):
        waiters = app.state.lease_waiters
        deadline = time.monotonic() + wait
        await request.body()  # the (empty) body read: what arrives next on the connection is its end
        while (woken := await waiters.wait(client_id, deadline - time.monotonic(), worker_id)) is not None:
            # a held request's latency counts from the moment the change that opened its task was noticed
            started, granted = woken
            if await request.is_disconnected():  # the worker gave up (stopping): nothing for nobody
                if granted is not None and granted.task is not None:
                    await run_in_threadpool(give_back, granted.task.task_id, granted.task.lease_id)
                return Response(status_code=499)
            # leased for it with the other held requests (one transaction), or on its own
            answer = granted if granted is not None else await run_in_threadpool(attempt, False)
            if answer.task is not None:
                app.state.metrics.held_lease_seconds.observe(time.perf_counter() - started)
                break
            if answer.client_state in ("paused", "revoked"):
                break
        if answer.task is None and answer.client_state not in ("paused", "revoked") \
                and time.monotonic() >= deadline - 0.05:  # (asyncio's timers may fire a hair early)
            answer = answer.model_copy(update={"retry_after": 0.0})  # held in full: ask again at once
    if answer.task is not None and have is not None:
        answer = await _with_inline_adapters(app.state.inline_adapters, answer, have)
    outcome = "granted" if answer.task is not None else "empty"
    app.state.metrics.leases.labels(outcome).inc()
    app.state.metrics.lease_seconds.labels(outcome).observe(time.perf_counter() - started)
    # the model is already valid: serialized once, not validated again against response_model
    return Response(content=answer.model_dump_json(), media_type="application/json")


async def _with_inline_adapters(inline: InlineAdapters, answer: LeaseResponse, have: frozenset[int]) -> LeaseResponse:
    """The answer with the task's input versions the worker does not hold, where small enough, as
    base64 (read once per version: every held lease of a new round names the same one)."""
    task = answer.task
    texts: dict[int, str] = {}
    for ref in (task.root, task.cluster):
        if ref is None or ref.id in have or ref.id in texts:
            continue
        text = inline.cached(ref.sha256)
        if text is None:
            text = await run_in_threadpool(inline.load, ref.sha256)
        if text:
            texts[ref.id] = text
    if not texts:
        return answer
    return answer.model_copy(update={"task": task.model_copy(update={"inline_adapters": texts})})


@router.post("/tasks/{task_id}/heartbeat", response_model=HeartbeatAck)
def heartbeat(task_id: DbId, body: Heartbeat, request: Request, session: SessionDep, token: Token) -> HeartbeatAck:
    with session.begin():
        client = registration.authenticate_client(session, token)
        return HeartbeatAck(lease_expires_at=tasks.heartbeat(session, client, task_id, body.lease_id,
                                                             _now(request)))


async def _stream_to_temp(request: Request, limit: int) -> tuple[str, int, FilePath]:
    """Stream the body into a temp file of the blob store, hashing as it goes; never the whole
    body in memory. Refuses (413) as soon as the body passes ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit for this request is {limit}")
    fd, tmp = request.app.state.blobs.temp_file()
    digest = hashlib.sha256()
    size = written_back = 0
    timeout = request.app.state.settings.body_read_timeout_seconds
    chunks = request.stream().__aiter__()
    try:
        with os.fdopen(fd, "wb") as fh:
            while True:
                try:  # a stalled body holds an upload slot: not for longer than the timeout
                    chunk = await asyncio.wait_for(chunks.__anext__(), timeout)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise BodyTimeout(f"no part of the body arrived for {timeout:g} s after {size} bytes "
                                      f"(HILORA_BODY_READ_TIMEOUT_SECONDS)") from None
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the body passed the limit of {limit} bytes for this request")
                digest.update(chunk)
                fh.write(chunk)
                if size - written_back >= WRITEBACK_BYTES:  # the disk works while we receive
                    fh.flush()
                    start_writeback(fd, written_back, size - written_back)
                    written_back = size
    except ClientDisconnect:
        tmp.unlink(missing_ok=True)
        raise ServiceError(f"the client went away after {size} bytes", code="client_disconnected") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size, tmp


@router.put("/tasks/{task_id}/upload", response_model=UploadAck, response_model_exclude_none=True, responses=_busy,
            openapi_extra={"requestBody": {"required": True,
                                           "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload(task_id: DbId, request: Request, token: Token,
                 lease_id: Annotated[str, Query(min_length=1, max_length=64)],
                 declared_sha: Annotated[str | None, Header(alias=SHA256_HEADER)] = None,
                 complete_with: Annotated[str | None, Header(alias=COMPLETE_HEADER, description=(
                     "the completion's JSON ({num_samples, metrics}): the task completes with this upload, "
                     "in the same transaction (one request instead of upload, then /complete); without "
                     "time_upload in the metrics, the coordinator's own is recorded (the request's arrival "
                     "to its body stored)"))] = None) -> UploadAck:
    """Upload the task's tensors (safetensors body) under its lease. Checked against the manifest.
    With ``X-Hilora-Complete`` the task also completes (answered with ``status: done``)."""
    metrics = request.app.state.metrics
    started = time.perf_counter()
    try:
        ack = await _upload(task_id, request, token, lease_id, declared_sha, complete_with, started)
    except ServiceError as exc:
        metrics.uploads.labels("rejected", exc.code).inc()
        raise
    metrics.uploads.labels("accepted", "").inc()
    metrics.upload_bytes.inc(ack.bytes)
    fault_point("after_accept")
    return ack


def _completion_header(value: str | None) -> TaskResult | None:
    if value is None:
        return None
    try:
        result = TaskResult.model_validate_json(value)
    except ValidationError as exc:
        raise Invalid(describe_validation_error(exc, COMPLETE_HEADER), code="bad_completion") from None
    tasks.check_metrics(result.metrics)
    return result


async def _upload(task_id: int, request: Request, token: str, lease_id: str,
                  declared_sha: str | None, complete_with: str | None, started: float) -> UploadAck:
    factory = request.app.state.session_factory

    def plan() -> tuple[int, tasks.UploadPlan]:
        with request.app.state.read_session_factory() as session, session.begin():
            now = _now(request)
            usual = tasks.live_upload_plan(session, token, task_id, lease_id, now)  # the usual case, Core reads
            if usual is not None:
                return usual
            client = registration.authenticate_client(session, token)
            return client.id, tasks.upload_plan(session, client, task_id, lease_id, now)

    client_id, plan_ = await run_in_threadpool(plan)  # the lease is checked before the body is read
    if plan_.limit == 0:
        raise Conflict("this task takes no upload (a leaf never leaves the client; an eval task only "
                       "evaluates): complete it with metrics", code="no_upload_expected")
    result = _completion_header(complete_with)  # after the token and the lease, before the body
    # 429 / 503 when too many are in flight (for this client, its federation, this replica)
    with request.app.state.upload_slots.slot(client_id, plan_.federation_id):
        ack, decides = await _receive_upload(request, factory, task_id, token, lease_id, declared_sha, plan_,
                                             result, started)
    if decides:  # the round's last open task: the scheduler closes it now, not at its next periodic tick
        request.app.state.scheduler.wake()
    return ack


async def _receive_upload(request: Request, factory, task_id: int, token: str, lease_id: str,  # noqa: ANN001
                          declared_sha: str | None, plan_: tasks.UploadPlan, result: TaskResult | None,
                          started: float) -> tuple[UploadAck, bool]:
    sha, size, tmp = await _stream_to_temp(request, plan_.limit)
    if declared_sha is not None and declared_sha.lower() != sha:
        tmp.unlink(missing_ok=True)
        raise Invalid(f"the body hashes to {sha}, but {SHA256_HEADER} says {declared_sha}", code="sha256_mismatch")

    def check_and_accept() -> tuple[tasks.AcceptedUpload, TaskStatus | None, bool]:
        # parse and check the tensors before the transaction: no lock is held for a hostile body;
        # then make the body durable before the database may say it was accepted
        tasks.check_upload_body(tmp, plan_)
        fsync_file(tmp)
        status, decides = None, False
        blobs = request.app.state.blobs
        with factory() as session, session.begin():
            now = _now(request)
            if result is not None:  # and the completion, in the same transaction
                reported = result.metrics
                if "time_upload" not in reported:
                    reported = {**reported, "time_upload": time.perf_counter() - started}
                # the usual case in the fewest statements; any other, the general path below
                round_id = tasks.attach_and_complete(session, blobs, token, task_id, lease_id, tmp, sha, size,
                                                     result.num_samples, reported, now)
                if round_id is not None:
                    return (tasks.AcceptedUpload(sha, size), TaskStatus.done,
                            not tasks.others_open(session, round_id, task_id))
            client = registration.authenticate_client(session, token)
            accepted = tasks.accept_upload(session, blobs, client, task_id, lease_id, tmp, sha,
                                           size, now, request.app.state.settings.max_uploads_per_task)
            if result is not None:
                task = tasks.complete_task(session, client, task_id, lease_id, result.num_samples, reported, now)
                status = TaskStatus(task.status)
                decides = not tasks.round_waits_on_others(session, task)
        if accepted.freed is not None:  # the superseded body: its row is gone now that we committed
            request.app.state.blobs.path(accepted.freed).unlink(missing_ok=True)
        return accepted, status, decides

    try:  # one hop to the threadpool for both
        accepted, status, decides = await run_in_threadpool(check_and_accept)
    finally:
        tmp.unlink(missing_ok=True)
    return UploadAck(task_id=task_id, sha256=accepted.sha256, bytes=accepted.size, status=status), decides


@router.post("/tasks/{task_id}/release", response_model=TaskCompleted)
def release(task_id: DbId, body: Heartbeat, request: Request, session: SessionDep, token: Token) -> TaskCompleted:
    """Give the lease back (the worker is stopping): the task is pending again at once for another
    worker, and the release does not count toward max_attempts."""
    with session.begin():
        client = registration.authenticate_client(session, token)
        task = tasks.release_task(session, client, task_id, body.lease_id, _now(request))
        result = TaskCompleted(task_id=task.id, status=TaskStatus(task.status))
    request.app.state.lease_waiters.poke({client.id})  # pending again: a held lease of this client may take it
    return result


@router.post("/tasks/{task_id}/complete", response_model=TaskCompleted)
async def complete(task_id: DbId, body: TaskComplete, request: Request, token: Token) -> Response:
    factory = request.app.state.session_factory

    def work() -> tuple[TaskCompleted, bool]:  # one hop to the threadpool, one transaction
        with factory() as session, session.begin():
            now = _now(request)
            round_id = tasks.complete_live(session, token, task_id, body.lease_id, body.num_samples, body.metrics,
                                           now)   # the usual case in Core statements; any other, below
            if round_id is not None:
                return (TaskCompleted(task_id=task_id, status=TaskStatus.done),
                        not tasks.others_open(session, round_id, task_id))
            client = registration.authenticate_client(session, token)
            task = tasks.complete_task(session, client, task_id, body.lease_id, body.num_samples, body.metrics,
                                       now)
            return (TaskCompleted(task_id=task.id, status=TaskStatus(task.status)),
                    not tasks.round_waits_on_others(session, task))

    result, decides = await run_in_threadpool(work)
    if decides:  # the round's last open task: the scheduler closes it now, not at its next periodic tick
        request.app.state.scheduler.wake()
    # the model is already valid: serialized once, not validated again against response_model
    return Response(content=result.model_dump_json(), media_type="application/json")


# Starlette matches a request against the routes in order: the paths every worker polls go first.
_HOT_PATHS = ("/v1/clients/{client_id}/lease", "/v1/tasks/{task_id}/heartbeat", "/v1/tasks/{task_id}/upload",
              "/v1/tasks/{task_id}/complete", "/v1/adapters/{version_id}")
router.routes.sort(key=lambda r: _HOT_PATHS.index(r.path) if getattr(r, "path", None) in _HOT_PATHS
                   else len(_HOT_PATHS))
