"""Tasks and leases: lease, heartbeat, upload acceptance, completion, expiry.

State contract (``shared.states.TaskStatus``; every status change is one guarded UPDATE whose
``WHERE status IN (...)`` is ``task_status_may_become``, i.e. the transition table's sources):
- ``lease_task`` MUST hand a task only to the client it belongs to, and only a pending one; the
  transition pending -> leased is one guarded UPDATE, so two pollers never get the same task.
- ``heartbeat``, ``accept_upload`` and ``complete_task`` MUST fail with Conflict (409) and change
  nothing when the lease id is not the task's current one, or the lease has expired.
- An upload whose tensors do not match the federation's manifest for this task (names, shapes,
  dtype float32, finite values, size) MUST be refused (4xx) before anything refers to it: the
  upload route checks it (``upload_plan``, ``check_upload_body``) before ``accept_upload``.
- An eval task (the final evaluation) trains nothing and takes no upload; nor does a refine task,
  which completes with its losses (``refine_loss_root`` and one per candidate cluster).
- ``complete_task`` repeated under the same lease returns the first answer.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from sqlalchemy import ColumnElement, Text, bindparam, cast, func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from coordinator.blobs import BlobStore
from coordinator.errors import Conflict, Forbidden, Invalid, NotFound, PayloadTooLarge
from coordinator.models import AdapterVersion, Client, Cluster, Federation, Round, Task
from coordinator.services.adapters import ensure_blob_row, serving_version
from coordinator.security import hash_secret
from coordinator.services.federations import config_from_text, federation_config
from coordinator.services.registration import check_client
from coordinator.services.retention import release_blob_if_unreferenced
from shared.config import FederationConfig
from shared.manifest import FACTORS
from shared.schemas import AdapterRef, LeaseResponse, RefineCandidate, TaskAssignment, refine_metric
from shared.states import (
    ClientStatus,
    Cohort,
    FederationState,
    Machine,
    Onboarding,
    Stage,
    TaskStatus,
    sources,
)
from shared.tensors import TensorValidationError, validate_tensor_file

# The tier a task of each training stage trains (an eval task trains none: see ``task_tier``).
STAGE_TIER = {Stage.root: "root", Stage.probe: "root", Stage.cluster: "cluster", Stage.leaf: "leaf"}


def task_status_may_become(target: TaskStatus) -> ColumnElement[bool]:
    """The WHERE clause of a guarded UPDATE that moves a task to ``target``: its status is one the
    transition table (``shared.states``) allows to move there."""
    froms = sources(Machine.task, target)
    return Task.status == froms[0] if len(froms) == 1 else Task.status.in_(froms)


def task_tier(stage: Stage, has_cluster_input: bool) -> str:
    """The tier a task of ``stage`` works on: the trained tier, and for an eval task the deepest
    shared tier it evaluates ('cluster' when its round has a cluster version, else 'root')."""
    if stage == Stage.eval:
        return "cluster" if has_cluster_input else "root"
    if stage == Stage.refine:  # evaluates every cluster adapter of its candidates
        return "cluster"
    return STAGE_TIER[Stage(stage)]


def refine_candidates(session: Session, federation_id: int) -> list[tuple[Cluster, AdapterVersion]]:
    """The cluster adapters a refine task evaluates: every cluster of the federation with a trained
    version (version >= 1; a version 0 is the root's head and a zero LoRA, so it scores as the root
    does), with the version it serves (``serving_version``: its newest unless pinned), in label order."""
    out = []
    for cluster in session.scalars(select(Cluster).where(Cluster.federation_id == federation_id)
                                   .order_by(Cluster.label)):
        version = serving_version(session, cluster)
        if version is not None and version.version >= 1:
            out.append((cluster, version))
    return out


def may_read_for_refinement(session: Session, client: Client, version: AdapterVersion) -> bool:
    """A cluster adapter is readable by its members; during a refinement also by a client that
    holds a live lease on a refine task, when the version is one of that task's candidates (the
    trained version a cluster serves: ``refine_candidates``)."""
    if version.tier != "cluster" or version.version < 1:
        return False
    holds = session.scalar(select(Task.id).where(Task.client_id == client.id, Task.stage == Stage.refine,
                                                 Task.status == TaskStatus.leased).limit(1))
    if holds is None:
        return False
    return version.cluster_id is not None and any(
        v.id == version.id for _, v in refine_candidates(session, version.federation_id))


def expected_upload(cfg: FederationConfig, stage: str) -> tuple[str, ...]:
    """Factors a task of this stage uploads: the tier's aggregated ones; the probe uploads the whole
    root tier (clustering needs A, B and head); the leaf and eval tasks upload nothing."""
    if stage == Stage.probe:
        return FACTORS
    if stage in (Stage.leaf, Stage.eval, Stage.refine):
        return ()
    return cfg.tier_policy(STAGE_TIER[Stage(stage)]).uploaded_factors()


def upload_limit(cfg: FederationConfig, stage: str) -> int:
    factors = expected_upload(cfg, stage)
    return cfg.manifest.max_body_bytes(STAGE_TIER[Stage(stage)], factors) if factors else 0


def _owned_task(session: Session, client: Client, task_id: int) -> Task:
    task = session.get(Task, task_id)
    if task is None:
        raise NotFound(f"task {task_id} does not exist", code="task_not_found")
    if task.client_id != client.id:
        raise Forbidden(f"task {task_id} belongs to another client", code="not_your_task")
    return task


def _ref(v: AdapterVersion | None) -> AdapterRef | None:
    return None if v is None else AdapterRef(id=v.id, tier=v.tier, version=v.version, sha256=v.blob_sha256)


def client_state(fed: Federation | LeaseFederation, client: Client | LeaseClient) -> str:
    """The client's state as its worker sees it (``LeaseResponse.client_state``): derived, not stored."""
    if client.status != ClientStatus.active:
        return "revoked"
    if client.cohort == Cohort.late and client.onboarding != Onboarding.cycle:
        return "ready" if client.onboarding == Onboarding.ready else "onboarding"
    if fed.state == FederationState.enrolling:
        return "waiting"
    if fed.state == FederationState.serving:
        return "ready"
    return "training"


class LeaseClient(NamedTuple):
    """The columns of a client that a lease reads (``lease_task`` takes this or a ``Client``)."""
    id: int
    federation_id: int
    token_hash: str
    status: ClientStatus
    cohort: Cohort
    onboarding: Onboarding
    last_seen_at: datetime | None
    inactive_since: datetime | None


class LeaseFederation(NamedTuple):
    """The columns of a federation that a lease reads (``lease_task`` takes this or a ``Federation``)."""
    id: int
    state: FederationState
    paused_at: datetime | None


def _clients_for_lease_statement(which):  # noqa: ANN001, ANN202
    """Plain columns, not ORM entities: every poll of every worker runs it, and building two
    instances (and expiring them at the commit) cost more than the query."""
    leasable = (select(Task.id).where(Task.client_id == Client.id, task_status_may_become(TaskStatus.leased))
                .exists())
    clients, feds = Client.__table__.c, Federation.__table__.c
    # the config comes as its stored text, the key of the parsed-config cache (not decoded and
    # encoded again on every poll)
    return (select(*(clients[name] for name in LeaseClient._fields), *(feds[name] for name in LeaseFederation._fields),
                   leasable, cast(feds.config, Text))
            .select_from(Client.__table__.join(Federation.__table__, feds.id == clients.federation_id))
            .where(which))


_CLIENT_END = len(LeaseClient._fields)                   # a lease row: the client's columns,
_FEDERATION_END = _CLIENT_END + len(LeaseFederation._fields)   # its federation's, has_pending, config


def _lease_row(row) -> tuple[LeaseClient, LeaseFederation, bool, str]:  # noqa: ANN001
    return (LeaseClient(*row[:_CLIENT_END]), LeaseFederation(*row[_CLIENT_END:_FEDERATION_END]),
            bool(row[_FEDERATION_END]), row[_FEDERATION_END + 1])


def lease_many(session: Session, wanted: dict[int, str], now: datetime) -> dict[int, LeaseResponse]:
    """Long polling: the answers to several clients' held lease requests (client id -> worker id),
    in one transaction, each as ``lease_task`` gives it. A client that is no longer active is left
    out (its request leases on its own, and is refused)."""
    out = {}
    for row in session.connection().execute(_LEASE_STATEMENTS["many"], {"ids": list(wanted)}):
        client, fed, has_pending, config = _lease_row(row)
        if client.status == ClientStatus.active:
            out[client.id] = lease_task(session, client, wanted[client.id], now, fed, config_from_text(config),
                                        has_pending)
    return out


def authenticate_for_lease(session: Session, token: str) -> tuple[LeaseClient, LeaseFederation, FederationConfig, bool]:
    """``registration.authenticate_client`` for a lease, in one query that also reads the client's
    federation, its parsed config and whether the client has a task to lease (so "nothing to do"
    is this one read)."""
    row = session.connection().execute(_LEASE_STATEMENTS["auth"], {"token_hash": hash_secret(token)}).first()
    if row is None:
        check_client(None, token)   # raises: unknown token
    client, fed, has_pending, config = _lease_row(row)
    return check_client(client, token), fed, config_from_text(config), has_pending


def _lease_update_statement(postgres: bool):  # noqa: ANN202
    """The guarded UPDATE pending -> leased of the client's oldest leasable task, returning what the
    assignment needs (Core: no ORM bookkeeping on the hot path)."""
    tasks = Task.__table__
    pick = (select(tasks.c.id).where(tasks.c.client_id == bindparam("lessee_id"),
                                     task_status_may_become(TaskStatus.leased))
            .order_by(tasks.c.id).limit(1))
    if postgres:
        pick = pick.with_for_update(skip_locked=True)
    statement = (update(tasks)
                 .where(tasks.c.id == pick.scalar_subquery(), task_status_may_become(TaskStatus.leased))
                 .values(status=TaskStatus.leased, lease_id=bindparam("new_lease_id"), attempt=tasks.c.attempt + 1,
                         lease_expires_at=bindparam("expires"), worker_id=bindparam("new_worker_id")))
    returned = [tasks.c.id, tasks.c.round_id, tasks.c.stage, tasks.c.attempt, tasks.c.reset_leaf]
    if postgres:
        # UPDATE ... FROM the round's inputs: the assignment's round and adapter versions come back
        # with the row (one round trip fewer; SQLite's RETURNING cannot name a FROM table)
        inputs = _round_inputs_select().add_columns(Round.__table__.c.id.label("input_round")).subquery("inputs")
        statement = statement.where(tasks.c.round_id == inputs.c.input_round)
        returned += [inputs.c[name] for name in ROUND_INPUTS]
    return statement.returning(*returned)


ROUND_INPUTS = ("number", "scope", "root_id", "root_tier", "root_version", "root_sha",
                "cluster_id", "cluster_tier", "cluster_version", "cluster_sha")


def _round_inputs_select():  # noqa: ANN202
    """A round's number, scope and input adapter versions (``ROUND_INPUTS``; the versions' columns
    null when the round has none)."""
    rounds, root, cluster = Round.__table__, AdapterVersion.__table__.alias(), AdapterVersion.__table__.alias()
    versions = [column.label(f"{prefix}_{name}") for prefix, table in (("root", root), ("cluster", cluster))
                for column, name in ((table.c.id, "id"), (table.c.tier, "tier"), (table.c.version, "version"),
                                     (table.c.blob_sha256, "sha"))]
    return (select(rounds.c.number, rounds.c.scope, *versions)
            .select_from(rounds.outerjoin(root, root.c.id == rounds.c.input_root_version_id)
                         .outerjoin(cluster, cluster.c.id == rounds.c.input_cluster_version_id)))


def _round_inputs_statement():  # noqa: ANN202
    return _round_inputs_select().where(Round.__table__.c.id == bindparam("round_id"))


def _attach_upload_statement(first: bool):  # noqa: ANN202
    """The guarded UPDATE that attaches an upload to its leased task: the task's first body, or one
    that replaces the body ``up_previous`` (compare and set: a concurrent upload loses)."""
    tasks = Task.__table__
    body = tasks.c.upload_sha256.is_(None) if first else tasks.c.upload_sha256 == bindparam("up_previous")
    return (update(tasks)
            .where(tasks.c.id == bindparam("up_id"), tasks.c.status == TaskStatus.leased,
                   tasks.c.lease_id == bindparam("up_lease"), body)
            .values(upload_sha256=bindparam("up_sha"), upload_bytes=bindparam("up_bytes"),
                    upload_count=tasks.c.upload_count + 1))


def _attach_and_complete_statement():  # noqa: ANN202
    """The guarded UPDATE of ``attach_and_complete``: the task's first body and its completion at
    once, only under the client's live lease; the round and the lease's expiry come back."""
    tasks = Task.__table__
    return (update(tasks)
            .where(tasks.c.id == bindparam("ac_id"), tasks.c.client_id == bindparam("ac_client"),
                   task_status_may_become(TaskStatus.done), tasks.c.status == TaskStatus.leased,
                   tasks.c.lease_id == bindparam("ac_lease"), tasks.c.upload_sha256.is_(None))
            .values(upload_sha256=bindparam("ac_sha"), upload_bytes=bindparam("ac_bytes"),
                    upload_count=tasks.c.upload_count + 1, status=TaskStatus.done,
                    finished_at=bindparam("ac_finished_at"), num_samples=bindparam("ac_num_samples"),
                    metrics=bindparam("ac_metrics"))
            .returning(tasks.c.round_id, tasks.c.lease_expires_at))


def _complete_live_statement():  # noqa: ANN202
    """The guarded UPDATE of ``complete_live``: done under the client's live lease, for a task that
    needs no upload or has its body; the round and the lease's expiry come back."""
    tasks = Task.__table__
    return (update(tasks)
            .where(tasks.c.id == bindparam("cl_id"), tasks.c.client_id == bindparam("cl_client"),
                   task_status_may_become(TaskStatus.done), tasks.c.status == TaskStatus.leased,
                   tasks.c.lease_id == bindparam("cl_lease"), tasks.c.stage != Stage.refine,
                   or_(tasks.c.upload_sha256.is_not(None), tasks.c.stage.in_((Stage.leaf, Stage.eval))))
            .values(status=TaskStatus.done, finished_at=bindparam("cl_finished_at"),
                    num_samples=bindparam("cl_num_samples"), metrics=bindparam("cl_metrics"))
            .returning(tasks.c.round_id, tasks.c.lease_expires_at))


# Built once: building a statement costs more than running it on the worker paths (lease, upload,
# completion). The targets whose guards (``task_status_may_become``) are built into them, and the
# statement of each, for tests that watch the guards asked for.
PREBUILT_GUARDS = {TaskStatus.leased: "update", TaskStatus.done: "complete"}
_LEASE_STATEMENTS = {"auth": _clients_for_lease_statement(Client.token_hash == bindparam("token_hash")),
                     "many": _clients_for_lease_statement(Client.id.in_(bindparam("ids", expanding=True))), "update": _lease_update_statement(False),
                     "update_pg": _lease_update_statement(True), "round": _round_inputs_statement(),
                     "complete": update(Task.__table__)
                     .where(Task.__table__.c.id == bindparam("done_id"), task_status_may_become(TaskStatus.done),
                            Task.__table__.c.lease_id == bindparam("done_lease"))
                     .values(status=bindparam("new_status"), finished_at=bindparam("new_finished_at"),
                             num_samples=bindparam("new_num_samples"), metrics=bindparam("new_metrics")),
                     "others_open": select(Task.__table__.c.id).where(
                         Task.__table__.c.round_id == bindparam("wait_round"), Task.__table__.c.id != bindparam("wait_task"),
                         Task.__table__.c.status.in_((TaskStatus.pending, TaskStatus.leased))).limit(1),
                     "attach_first": _attach_upload_statement(first=True),
                     "attach_again": _attach_upload_statement(first=False),
                     "attach_complete": _attach_and_complete_statement(),
                     "complete_live": _complete_live_statement(),
                     "client_by_token": select(Client.__table__.c.id, Client.__table__.c.token_hash,
                                               Client.__table__.c.status)
                     .where(Client.__table__.c.token_hash == bindparam("token_hash")),
                     "plan": select(Task.__table__.c.client_id, Task.__table__.c.status, Task.__table__.c.lease_id,
                                    Task.__table__.c.lease_expires_at, Task.__table__.c.stage,
                                    Task.__table__.c.federation_id, cast(Federation.__table__.c.config, Text).label("config"))
                     .select_from(Task.__table__.join(Federation.__table__,
                                                      Federation.__table__.c.id == Task.__table__.c.federation_id))
                     .where(Task.__table__.c.id == bindparam("plan_id")),
                     "done_by": update(Client.__table__).where(Client.__table__.c.id == bindparam("done_by_id"))
                     .values(num_samples=bindparam("done_by_samples"), last_seen_at=bindparam("done_by_at")),
                     "seen": update(Client.__table__).where(Client.__table__.c.id == bindparam("seen_id"))
                     .values(last_seen_at=bindparam("seen_at")),
                     "back": update(Client.__table__).where(Client.__table__.c.id == bindparam("back_id"))
                     .values(inactive_since=None, missed_rounds=0)}


def _version_ref(id_: int | None, tier: str, version: int, sha: str) -> AdapterRef | None:
    return None if id_ is None else AdapterRef(id=id_, tier=tier, version=version, sha256=sha)


def lease_task(session: Session, client: Client | LeaseClient, worker_id: str, now: datetime,
               fed: Federation | LeaseFederation | None = None,
               cfg: FederationConfig | None = None, has_pending: bool | None = None) -> LeaseResponse:
    """Lease the client's oldest pending task, or answer 'no work, retry after N s'.

    ``fed``, ``cfg`` and ``has_pending`` may come from the caller's authentication query
    (``registration.authenticate_for_lease``): then "nothing to do" costs that one read and no
    write statement, and a grant costs the guarded UPDATE and one read of the round and its inputs."""
    fed = fed if fed is not None else session.get(Federation, client.federation_id)
    cfg = cfg if cfg is not None else federation_config(fed)
    # An empty poll stays a read-only transaction (no WAL flush): last_seen_at moves in steps of at
    # most 5 s, far below the "online" window of 2 x lease_seconds.
    resolution = timedelta(seconds=min(5.0, cfg.schedule.lease_seconds / 4))
    if client.last_seen_at is None or now - client.last_seen_at >= resolution:
        # one plain UPDATE, not a unit-of-work flush (this is every worker's poll)
        session.connection().execute(_LEASE_STATEMENTS["seen"], {"seen_id": client.id, "seen_at": now})
        if isinstance(client, Client):
            set_committed_value(client, "last_seen_at", now)
    if client.inactive_since is not None:  # back: the next rounds open tasks for it again
        session.connection().execute(_LEASE_STATEMENTS["back"], {"back_id": client.id})
        if isinstance(client, Client):
            set_committed_value(client, "inactive_since", None)
            set_committed_value(client, "missed_rounds", 0)
    state = FederationState(fed.state)
    if fed.paused_at is not None:
        return LeaseResponse(task=None, retry_after=max(cfg.schedule.retry_after_seconds, 5.0),
                             federation_state=state, client_state="paused")
    nothing = LeaseResponse(task=None, retry_after=cfg.schedule.retry_after_seconds,
                            federation_state=state, client_state=client_state(fed, client))
    if has_pending is False:
        return nothing
    lease_id = secrets.token_hex(16)
    expires = now + timedelta(seconds=cfg.schedule.lease_seconds)
    postgres = session.get_bind().dialect.name == "postgresql"
    conn = session.connection()  # Core statements: no ORM bookkeeping
    task = conn.execute(_LEASE_STATEMENTS["update_pg" if postgres else "update"],
                           {"lessee_id": client.id, "new_lease_id": lease_id, "expires": expires,
                            "new_worker_id": worker_id[:200]}).one_or_none()
    if task is None:
        return nothing
    # PostgreSQL returned the round's inputs with the row (UPDATE ... FROM); SQLite reads them
    rnd = task if postgres else conn.execute(_LEASE_STATEMENTS["round"], {"round_id": task.round_id}).one()
    root_ref = _version_ref(rnd.root_id, rnd.root_tier, rnd.root_version, rnd.root_sha)
    cluster_ref = _version_ref(rnd.cluster_id, rnd.cluster_tier, rnd.cluster_version, rnd.cluster_sha)
    tier = task_tier(task.stage, cluster_ref is not None)
    policy = cfg.tier_policy(tier)
    # the final evaluation and refinement: nothing trains, nothing is uploaded
    evaluating = task.stage in (Stage.eval, Stage.refine)
    candidates = ([RefineCandidate(cluster_id=cluster.id, label=cluster.label,
                                   adapter=_ref(version))
                   for cluster, version in refine_candidates(session, fed.id)] if task.stage == Stage.refine else [])
    assignment = TaskAssignment(
        task_id=task.id, lease_id=lease_id, attempt=task.attempt, lease_expires_at=expires,
        lease_seconds=cfg.schedule.lease_seconds, federation_id=fed.id, client_id=client.id,
        stage=task.stage, round_number=rnd.number, scope=rnd.scope,
        root=root_ref, cluster=cluster_ref,
        train_tier=tier,
        epochs=(0 if evaluating else cfg.schedule.probe_epochs if task.stage == Stage.probe
                else cfg.schedule.local_epochs),
        steps=cfg.clustering.probe_steps if task.stage == Stage.probe else None,
        loss=cfg.clustering.probe_loss if task.stage == Stage.probe else "ce",
        trainable=[] if evaluating else list(policy.trained_factors()),
        upload=list(expected_upload(cfg, task.stage)),
        # the client's own local factors are laid over the federation's version (not for a probe,
        # which starts from the federation's root alone)
        local=[f for f in FACTORS if getattr(policy, f) == "local"] if task.stage != Stage.probe else [],
        reset_leaf=task.reset_leaf and not evaluating,
        evaluate=cfg.schedule.evaluates_received(rnd.number),
        training=cfg.training,
        candidates=candidates,
    )
    return LeaseResponse(task=assignment, retry_after=0.0, federation_state=state,
                         client_state=client_state(fed, client))


def _require_live_lease(task: Task, lease_id: str, now: datetime) -> None:
    if task.lease_id == lease_id and task.status in (TaskStatus.cancelled, TaskStatus.failed):
        raise Conflict(f"task {task.id} is {task.status}: its round was decided without it "
                       f"({task.error or 'no detail'}); drop this result", code=f"task_{task.status}")
    if task.status != TaskStatus.leased or task.lease_id != lease_id:
        raise Conflict(f"lease {lease_id} is not the current lease of task {task.id} "
                       f"(task is {task.status})", code="stale_lease")
    _refuse_expired(task.id, task.lease_expires_at, now)


def heartbeat(session: Session, client: Client, task_id: int, lease_id: str, now: datetime) -> datetime:
    task = _owned_task(session, client, task_id)
    _require_live_lease(task, lease_id, now)
    cfg = federation_config(session.get(Federation, task.federation_id))
    expires = now + timedelta(seconds=cfg.schedule.lease_seconds)
    updated = session.execute(
        update(Task)
        .where(Task.id == task.id, Task.status == TaskStatus.leased, Task.lease_id == lease_id)
        .values(lease_expires_at=expires)
    ).rowcount
    if updated != 1:
        raise Conflict("the lease changed while extending it", code="stale_lease")
    client.last_seen_at = now
    return expires


def release_task(session: Session, client: Client, task_id: int, lease_id: str, now: datetime) -> Task:
    """Give a live lease back (a worker stopping or pre-empted): the task is pending again at once,
    and the release does not count toward ``max_attempts``. Releasing twice is refused (409)."""
    task = _owned_task(session, client, task_id)
    _require_live_lease(task, lease_id, now)
    updated = session.execute(
        update(Task)
        .where(Task.id == task.id, task_status_may_become(TaskStatus.pending), Task.lease_id == lease_id)
        .values(status=TaskStatus.pending, lease_id=None, lease_expires_at=None, worker_id=None,
                upload_sha256=None, upload_bytes=0, releases=Task.releases + 1)
    ).rowcount
    if updated != 1:
        raise Conflict("the lease changed while releasing it", code="stale_lease")
    client.last_seen_at = now
    session.refresh(task)
    return task


@dataclass(frozen=True)
class AcceptedUpload:
    sha256: str
    size: int
    freed: str | None = None  # the superseded body's blob, whose row is gone: unlink after commit


@dataclass(frozen=True)
class UploadPlan:
    """What an upload to one task may be: at most ``limit`` bytes (0: the task takes none), the
    tensors ``shapes``, every value within +-``max_abs``."""

    limit: int
    shapes: Mapping[str, tuple[int, ...]]
    max_abs: float | None = None
    federation_id: int = 0


@functools.lru_cache(maxsize=256)
def _plan_for(config_text: str, stage: str, federation_id: int) -> UploadPlan:
    """The plan of a live task's upload from its federation's stored config and its stage: the
    same for every task of that stage, so parsed and built once (the config is immutable text)."""
    plan = _plan_of(config_from_text(config_text), stage, federation_id)
    return replace(plan, shapes=MappingProxyType(plan.shapes))   # shared: read-only


def _plan_of(cfg: FederationConfig, stage: str, federation_id: int) -> UploadPlan:
    factors = expected_upload(cfg, stage)
    if not factors:
        return UploadPlan(0, {}, federation_id=federation_id)
    tier = STAGE_TIER[Stage(stage)]
    return UploadPlan(upload_limit(cfg, stage), cfg.manifest.tier_shapes(tier, factors),
                      cfg.tier_policy(tier).max_abs_value, federation_id)


def live_upload_plan(session: Session, token: str, task_id: int, lease_id: str,
                     now: datetime) -> tuple[int, UploadPlan] | None:
    """``authenticate_client`` and ``upload_plan`` for the usual upload, in two Core reads: the
    client's own task under its current, unexpired lease. Returns the client's id and the plan,
    or None for any other case (a finished task, someone else's, a stale or expired lease, no such
    task), which the caller answers by the general path (``upload_plan``) with its exact result
    or error. An unknown token or a revoked client is refused here as there."""
    conn = session.connection()
    client = _client_by_token(conn, token)
    task = conn.execute(_LEASE_STATEMENTS["plan"], {"plan_id": task_id}).first()
    if (task is None or task.client_id != client.id or task.status != TaskStatus.leased
            or task.lease_id != lease_id or (task.lease_expires_at is not None and task.lease_expires_at < now)):
        return None
    return client.id, _plan_for(task.config, task.stage, task.federation_id)


def upload_plan(session: Session, client: Client, task_id: int, lease_id: str, now: datetime) -> UploadPlan:
    """The plan of this task's upload; limit 0 for a task that takes none (leaf, eval). The lease
    is checked here, before a byte of the body is read (a finished task under the same lease
    passes: its re-upload is answered by ``accept_upload``). The upload route streams at most
    ``limit`` bytes and checks the body (``check_upload_body``) before ``accept_upload``."""
    task = _owned_task(session, client, task_id)
    if not (task.status == TaskStatus.done and task.lease_id == lease_id):
        _require_live_lease(task, lease_id, now)
    return _plan_of(federation_config(session.get(Federation, task.federation_id)), task.stage, task.federation_id)


def check_upload_body(path: Path, plan: UploadPlan) -> None:
    """Validate a streamed body against its task's plan, outside any transaction (a hostile body
    is parsed without holding a database lock). Raises 413 / 422 with the reason."""
    try:
        validate_tensor_file(path, plan.shapes, plan.limit, plan.max_abs)  # mapped, never read whole
    except TensorValidationError as exc:
        if exc.reason == "too_large":
            raise PayloadTooLarge(str(exc), code="too_large") from exc
        raise Invalid(str(exc), code=exc.reason) from exc


def accept_upload(session: Session, blobs: BlobStore, client: Client, task_id: int, lease_id: str,
                  tmp: Path, sha256: str, size: int, now: datetime, max_uploads: int = 16) -> AcceptedUpload:
    """Attach a streamed upload (already in ``tmp`` with its sha256) to the task under its live
    lease. The caller has checked the body against this task's plan (``upload_plan``,
    ``check_upload_body``) outside the transaction: nothing here parses it again.

    One stored body per task: a different body under the lease replaces the stored one, whose blob
    row is deleted at once unless another row refers to the same bytes (``freed``: the caller
    unlinks its file after commit); the same body again is an idempotent success. At most
    ``max_uploads`` distinct bodies per task (409 upload_quota)."""
    task = _owned_task(session, client, task_id)
    if task.status == TaskStatus.done and task.lease_id == lease_id:
        tmp.unlink(missing_ok=True)
        if task.upload_sha256 == sha256:
            return AcceptedUpload(sha256, task.upload_bytes)
        raise Conflict(f"task {task.id} is finished with a different upload", code="task_finished")
    _require_live_lease(task, lease_id, now)
    cfg = federation_config(session.get(Federation, task.federation_id))
    factors = expected_upload(cfg, task.stage)
    if not factors:
        tmp.unlink(missing_ok=True)
        why = "leaves never leave the client" if task.stage == Stage.leaf else "it evaluates only"
        raise Conflict(f"a {task.stage} task takes no upload ({why}); complete it with metrics only",
                       code="no_upload_expected")
    previous = task.upload_sha256
    if previous == sha256:  # the same body again (a retry): nothing changes
        tmp.unlink(missing_ok=True)
        client.last_seen_at = now
        return AcceptedUpload(sha256, task.upload_bytes)
    if (task.upload_count or 0) >= max_uploads:
        tmp.unlink(missing_ok=True)
        raise Conflict(f"task {task.id} has received {task.upload_count} different bodies, the most one task may "
                       f"(HILORA_MAX_UPLOADS_PER_TASK); complete it with the stored one", code="upload_quota")
    blobs.adopt(tmp, sha256)
    ensure_blob_row(session, sha256, size, "upload", now)
    updated = session.connection().execute(  # prebuilt Core statement, the task's new values set below
        _LEASE_STATEMENTS["attach_first" if previous is None else "attach_again"],
        {"up_id": task.id, "up_lease": lease_id, "up_sha": sha256, "up_bytes": size, "up_previous": previous}).rowcount
    if updated != 1:
        raise Conflict("the lease changed while uploading", code="stale_lease")
    for key, value in (("upload_sha256", sha256), ("upload_bytes", size), ("upload_count", (task.upload_count or 0) + 1)):
        set_committed_value(task, key, value)
    client.last_seen_at = now
    freed = previous if previous is not None and release_blob_if_unreferenced(session, previous) else None
    return AcceptedUpload(sha256, size, freed)


def attach_and_complete(session: Session, blobs: BlobStore, token: str, task_id: int, lease_id: str, tmp: Path,
                        sha256: str, size: int, num_samples: int, metrics: dict[str, float],
                        now: datetime) -> int | None:
    """An upload that carries its completion (the worker's ``X-Hilora-Complete``) in its usual
    case: the task's first body under the client's live lease. Authentication, the blob's row,
    one guarded UPDATE that attaches the body and completes the task, and the client's row: Core
    statements, no ORM instance loaded. The caller has checked the body against the task's plan
    and the metrics (``check_metrics``). Returns the task's round id; None when the UPDATE
    matched no row (a retry, a replaced body, someone else's task, a lease no longer current,
    a task that does not exist): the caller then takes the general path (``accept_upload`` and
    ``complete_task``), which answers each of those with its own result or error, in the same
    transaction. An expired lease raises here (409 lease_expired): the caller's transaction,
    UPDATE included, rolls back."""
    conn = session.connection()
    client = _client_by_token(conn, token)
    ensure_blob_row(session, sha256, size, "upload", now)   # before the row refers to it (a foreign key)
    row = conn.execute(_LEASE_STATEMENTS["attach_complete"], {
        "ac_id": task_id, "ac_client": client.id, "ac_lease": lease_id, "ac_sha": sha256, "ac_bytes": size,
        "ac_finished_at": now, "ac_num_samples": num_samples, "ac_metrics": dict(metrics)}).first()
    if row is None:
        return None
    _refuse_expired(task_id, row.lease_expires_at, now)
    blobs.adopt(tmp, sha256, synced=True)   # in place before the commit says it was accepted
    conn.execute(_LEASE_STATEMENTS["done_by"], {"done_by_id": client.id, "done_by_samples": num_samples,
                                                "done_by_at": now})
    return row.round_id


def complete_live(session: Session, token: str, task_id: int, lease_id: str, num_samples: int,
                  metrics: dict[str, float], now: datetime) -> int | None:
    """``complete_task`` in its usual case, in Core statements: the client's task under its live
    lease, a leaf or eval task (nothing to upload) or one whose body is attached; not a refine task
    (its metrics are checked against the candidates), with metrics that pass ``check_metrics``.
    Returns the task's round id, or None for any other case, which the caller answers by the
    general path in the same transaction (so each error comes in the order it always did); an
    expired lease raises (409 lease_expired) and the caller's transaction rolls back."""
    conn = session.connection()
    client = _client_by_token(conn, token)
    if _bad_metrics(metrics):
        return None
    row = conn.execute(_LEASE_STATEMENTS["complete_live"], {
        "cl_id": task_id, "cl_client": client.id, "cl_lease": lease_id, "cl_finished_at": now,
        "cl_num_samples": num_samples, "cl_metrics": dict(metrics)}).first()
    if row is None:
        return None
    _refuse_expired(task_id, row.lease_expires_at, now)
    conn.execute(_LEASE_STATEMENTS["done_by"], {"done_by_id": client.id, "done_by_samples": num_samples,
                                                "done_by_at": now})
    return row.round_id


def _client_by_token(conn, token: str):  # noqa: ANN001, ANN202
    """The id, token hash and status of the active client holding ``token`` (``check_client``'s
    401 / 403 otherwise), one Core read."""
    return check_client(conn.execute(_LEASE_STATEMENTS["client_by_token"],
                                     {"token_hash": hash_secret(token)}).first(), token)


def _refuse_expired(task_id: int, expires: datetime | None, now: datetime) -> None:
    if expires is not None and expires < now:
        raise Conflict(f"the lease of task {task_id} expired at {expires.isoformat()}", code="lease_expired")


def check_metrics(metrics: dict[str, float]) -> None:
    """A completion's metrics: finite numbers named in at most 64 characters (422 bad_metrics)."""
    bad = _bad_metrics(metrics)
    if bad:
        raise Invalid(f"metrics must be finite numbers with names up to 64 characters: {bad}",
                      code="bad_metrics")


def _bad_metrics(metrics: dict[str, float]) -> list[str]:
    return [k for k, v in metrics.items() if not math.isfinite(v) or len(k) > 64]


def complete_task(session: Session, client: Client, task_id: int, lease_id: str, num_samples: int,
                  metrics: dict[str, float], now: datetime) -> Task:
    task = _owned_task(session, client, task_id)
    if task.status == TaskStatus.done and task.lease_id == lease_id:
        return task
    _require_live_lease(task, lease_id, now)
    check_metrics(metrics)
    cfg = federation_config(session.get(Federation, task.federation_id))
    if expected_upload(cfg, task.stage) and task.upload_sha256 is None:
        raise Conflict(f"task {task.id} ({task.stage}) needs its upload before completion",
                       code="upload_missing")
    if task.stage == Stage.refine:
        wanted = [refine_metric(None)] + [refine_metric(c.id) for c, _ in refine_candidates(session, task.federation_id)]
        missing = [name for name in wanted if name not in metrics]
        negative = [name for name in wanted if metrics.get(name, 0.0) < 0]
        if missing or negative:
            raise Invalid(f"a refine task completes with a non-negative mean training loss for the root and for each "
                          f"candidate cluster; missing: {missing[:10]}, negative: {negative[:10]}",
                          code="bad_metrics")
    done = {"status": TaskStatus.done, "finished_at": now, "num_samples": num_samples, "metrics": dict(metrics)}
    # the prebuilt Core statement: no ORM bulk-update bookkeeping, and the row's new values set on
    # the loaded task (no read-back)
    updated = session.connection().execute(_LEASE_STATEMENTS["complete"], {
        "done_id": task.id, "done_lease": lease_id, **{f"new_{k}": v for k, v in done.items()}}).rowcount
    if updated != 1:
        raise Conflict("the lease changed while completing", code="stale_lease")
    for key, value in done.items():
        set_committed_value(task, key, value)
    client.num_samples = num_samples
    client.last_seen_at = now
    return task


def round_waits_on_others(session: Session, task: Task) -> bool:
    """Whether another task of ``task``'s round is still open (pending or leased). A completion
    can decide its round (``scheduling._verdict``) only when none is: else the round waits for the
    others, or for its deadline, which the scheduler's periodic tick catches."""
    return others_open(session, task.round_id, task.id)


def others_open(session: Session, round_id: int, task_id: int) -> bool:
    """``round_waits_on_others`` by the round's and the task's ids."""
    return session.connection().execute(_LEASE_STATEMENTS["others_open"],
                                        {"wait_round": round_id, "wait_task": task_id}).first() is not None


LEASABLE_FOR = "hilora_leasable_for"   # Session.info: clients this transaction made a task leasable for


def note_leasable(session: Session, client_ids) -> None:  # noqa: ANN001
    """Record in the session that its transaction makes a task leasable for these clients (a new
    round's tasks, a requeued lease): after the commit the scheduler tells the held lease requests
    whom to lease for (``LeaseWaiters.poke``) without asking the database who has a task."""
    session.info.setdefault(LEASABLE_FOR, set()).update(client_ids)


def expire_leases(session: Session, now: datetime) -> int:
    """Requeue tasks whose lease expired (or fail them at their last attempt). Returns the count."""
    expired = session.execute(
        select(Task.id, Task.attempt, Task.releases, Task.lease_id, Task.client_id, Federation.config)
        .join(Federation, Federation.id == Task.federation_id)
        .where(Task.status == TaskStatus.leased, Task.lease_expires_at < now)
    ).all()
    for task_id, attempt, releases, lease_id, client_id, config in expired:
        max_attempts = FederationConfig.model_validate(config).schedule.max_attempts
        final = attempt - (releases or 0) >= max_attempts
        target = TaskStatus.failed if final else TaskStatus.pending
        if not final:
            note_leasable(session, (client_id,))
        session.execute(
            update(Task)
            .where(Task.id == task_id, task_status_may_become(target), Task.lease_id == lease_id)
            .values(status=target,
                    lease_id=lease_id if final else None, lease_expires_at=None,
                    upload_sha256=None, upload_bytes=0,
                    finished_at=now if final else None,
                    error=f"lease expired at attempt {attempt}" if final else None)
        )
    return len(expired)


def count_tasks(session: Session, round_id: int) -> dict[str, int]:
    rows = session.execute(
        select(Task.status, func.count()).where(Task.round_id == round_id).group_by(Task.status)
    ).all()
    return {status: n for status, n in rows}
