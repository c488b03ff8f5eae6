"""Read models of the operator's view (the admin JSON API behind ``/dashboard``): federations at a
glance, stage timeline and rounds, clusters and clustering runs (affinity, moves), accuracy per
tier, clients, workers and leases, unseen clients. Plain reads; each call is one transaction of
the caller. Numbers the workers report (``acc_root``, ``acc_cluster``, ``acc_leaf``) come from
``Task.metrics`` (see ``worker.train.evaluate_tiers``), those of the final evaluation (stage
'eval', opened when training ends) included.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from datetime import datetime, timedelta

import numpy as np
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from coordinator.blobs import BlobNotFound, BlobStore
from coordinator.errors import NotFound
from coordinator.models import (
    AdapterVersion,
    Assignment,
    AuditEvent,
    Client,
    Cluster,
    ClusteringRun,
    Federation,
    Round,
    Task,
)
from coordinator.services.adapters import latest_version
from coordinator.services.clustering import unassigned_client_ids
from coordinator.services.federations import federation_config, list_federations
from coordinator.services.reporting import zero_shot_accuracy
from shared.schemas import (
    AccuracyStep,
    AccuracyView,
    AffinityMatrix,
    AssignmentMove,
    ClientAccuracy,
    ClientRow,
    ClusteringRunRow,
    ClusterRow,
    FederationOverview,
    FederationTimeline,
    LeaseRow,
    RoundRow,
    RunTransition,
    StageSpan,
    TaskFailureRow,
    TierStats,
    UnseenClientRow,
    WorkerRow,
    WorkersView,
)
from shared.states import (
    ClientStatus,
    Cohort,
    FederationState,
    RoundStatus,
    ScopeKind,
    Stage,
    TaskStatus,
    parse_scope,
    scope,
    scope_pattern,
)
from shared.tensors import METADATA_KEY, read_safetensors_header, unpack_tensors

TIERS = ("root", "cluster", "leaf")
# accuracies the views show: each tier's, the model each client chose on its validation part, and
# the model it trained alone (training.alone_epochs), one of the candidates of that choice
ACCURACY_KEYS = TIERS + ("selected", "alone")
TRAINING_STAGES = (Stage.root, Stage.probe, Stage.cluster, Stage.leaf)
# stages whose tasks report accuracy per tier: the training rounds that evaluate what they
# received, and the final evaluation
ACCURACY_STAGES = (Stage.root, Stage.cluster, Stage.leaf, Stage.eval)
STATE_ORDER = {s.value: i for i, s in enumerate(FederationState)}
# the order of accuracy steps: the cascade's stages, then the final evaluation
STEP_ORDER = {s.value: i for i, s in enumerate(Stage)}
DONE = TaskStatus.done
ONBOARDING = scope_pattern(ScopeKind.client)  # the rounds of one late client's onboarding


def _is_onboarding(round_scope: str) -> bool:
    return parse_scope(round_scope).kind == ScopeKind.client


def online_window_seconds(fed: Federation) -> float:
    """A client counts as online when seen within two lease lifetimes."""
    return 2.0 * federation_config(fed).schedule.lease_seconds


def _labels(session: Session, federation_id: int) -> dict[int, int]:
    return {cid: label for cid, label in session.execute(
        select(Cluster.id, Cluster.label).where(Cluster.federation_id == federation_id))}


def tier_stats(values: list[float]) -> TierStats:
    if not values:
        return TierStats(mean=None, p10=None, n=0)
    return TierStats(mean=float(np.mean(values)), p10=float(np.percentile(values, 10)), n=len(values))


def _seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return (later - earlier).total_seconds()


# ---------------------------------------------------------------- federations

def federations_overview(session: Session, now: datetime) -> list[FederationOverview]:
    out = []
    for fed in list_federations(session):
        window = online_window_seconds(fed)
        open_rounds = list(session.execute(select(Round.id, Round.stage, Round.number).where(
            Round.federation_id == fed.id, Round.status == RoundStatus.open)))
        in_stage = [number for _, stage, number in open_rounds if stage == fed.state]
        counts: dict[str, int] = {}
        if open_rounds:
            counts = {status: n for status, n in session.execute(
                select(Task.status, func.count()).where(Task.round_id.in_([r[0] for r in open_rounds]))
                .group_by(Task.status))}
        online = session.scalar(select(func.count()).select_from(Client).where(
            Client.federation_id == fed.id, Client.last_seen_at >= now - timedelta(seconds=window))) or 0
        total = session.scalar(select(func.count()).select_from(Client).where(Client.federation_id == fed.id)) or 0
        k = session.scalar(select(ClusteringRun.k).where(ClusteringRun.federation_id == fed.id)
                           .order_by(ClusteringRun.id.desc()).limit(1))
        last_agg = session.scalar(select(func.max(Round.closed_at)).where(
            Round.federation_id == fed.id, Round.status == RoundStatus.done, Round.result_version_id.is_not(None)))
        out.append(FederationOverview(
            federation_id=fed.id, name=fed.name, state=FederationState(fed.state), paused_at=fed.paused_at,
            paused_reason=fed.paused_reason, failure_count=fed.failure_count or 0,
            current_round=max(in_stage or [n for _, _, n in open_rounds], default=None),
            open_rounds=len(open_rounds), tasks_done=counts.get(DONE, 0), tasks_total=sum(counts.values()),
            clients_total=total, clients_online=online, online_window_seconds=window, k=k,
            unassigned=len(unassigned_client_ids(session, fed.id)),
            last_aggregation_at=last_agg, created_at=fed.created_at))
    return out


def _round_rows(session: Session, rounds: list[Round]) -> list[RoundRow]:
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    if rounds:
        for round_id, status, n in session.execute(
                select(Task.round_id, Task.status, func.count()).where(Task.round_id.in_([r.id for r in rounds]))
                .group_by(Task.round_id, Task.status)):
            counts[round_id][status] = n
    rows = []
    for r in rounds:
        c = counts.get(r.id, {})
        rows.append(RoundRow(
            id=r.id, stage=r.stage, scope=r.scope, number=r.number, status=r.status,
            tasks_total=sum(c.values()), tasks_done=c.get(DONE, 0), tasks_failed=c.get(TaskStatus.failed, 0),
            tasks_cancelled=c.get(TaskStatus.cancelled, 0), quorum=r.quorum, deadline_at=r.deadline_at,
            failure=r.failure, rho=r.rho, created_at=r.created_at, closed_at=r.closed_at,
            duration_seconds=_seconds(r.closed_at, r.created_at), aggregation_seconds=r.aggregation_seconds))
    return rows


def federation_timeline(session: Session, fed: Federation, limit: int = 200) -> FederationTimeline:
    """The stages the federation went through (from its rounds) and its newest ``limit`` rounds.
    The serving span counts the rounds run while serving: the final evaluation and onboarding."""
    spans = list(session.execute(
        select(Round.stage, func.min(Round.created_at), func.max(Round.closed_at),
               func.sum(case((Round.status == RoundStatus.done, 1), else_=0)),
               func.sum(case((Round.status == RoundStatus.failed, 1), else_=0)))
        .where(Round.federation_id == fed.id, ~Round.scope.like(ONBOARDING)).group_by(Round.stage)))
    by_stage = {stage: (start, end, done or 0, failed or 0) for stage, start, end, done, failed in spans}
    current = STATE_ORDER[fed.state]
    stages = []
    first_round = min((v[0] for v in by_stage.values()), default=None)
    stages.append(StageSpan(stage=FederationState.enrolling, started_at=fed.created_at,
                            ended_at=first_round if current > 0 else None, rounds_done=0, rounds_failed=0))
    training_end = None
    for stage in TRAINING_STAGES:
        if stage not in by_stage or STATE_ORDER[stage] > current:
            continue
        start, end, done, failed = by_stage[stage]
        ended = end if STATE_ORDER[stage] < current else None
        training_end = max(filter(None, (training_end, end)), default=None)
        stages.append(StageSpan(stage=FederationState(stage), started_at=start, ended_at=ended,
                                rounds_done=done, rounds_failed=failed))
    if fed.state == FederationState.serving:
        while_serving = Round.scope.like(ONBOARDING) | (Round.stage == Stage.eval)
        done, failed = (session.scalar(select(func.count()).select_from(Round).where(
            Round.federation_id == fed.id, while_serving, Round.status == status)) or 0
            for status in (RoundStatus.done, RoundStatus.failed))
        stages.append(StageSpan(stage=FederationState.serving, started_at=training_end or fed.updated_at,
                                ended_at=None, rounds_done=done, rounds_failed=failed))
    total = session.scalar(select(func.count()).select_from(Round).where(Round.federation_id == fed.id)) or 0
    rounds = list(session.scalars(select(Round).where(Round.federation_id == fed.id)
                                  .order_by(Round.id.desc()).limit(limit)))
    return FederationTimeline(federation_id=fed.id, state=FederationState(fed.state), stages=stages,
                              rounds=_round_rows(session, rounds), rounds_total=total)


# ---------------------------------------------------------------- clusters and clustering runs

def _pinned_number(session: Session, cluster: Cluster) -> int | None:
    if cluster.pinned_version_id is None:
        return None
    return session.scalar(select(AdapterVersion.version).where(AdapterVersion.id == cluster.pinned_version_id))


def clusters(session: Session, fed: Federation, now: datetime) -> list[ClusterRow]:
    members: dict[int, list[str]] = defaultdict(list)
    for cluster_id, name in session.execute(select(Client.cluster_id, Client.name).where(
            Client.federation_id == fed.id, Client.cluster_id.is_not(None), Client.status == ClientStatus.active)
            .order_by(Client.name)):
        members[cluster_id].append(name)
    rows = []
    for c in session.scalars(select(Cluster).where(Cluster.federation_id == fed.id).order_by(Cluster.label)):
        version = latest_version(session, fed.id, scope(ScopeKind.cluster, c.id))
        rows.append(ClusterRow(id=c.id, label=c.label, size=len(members[c.id]), members=members[c.id],
                               created_at=c.created_at, age_seconds=(now - c.created_at).total_seconds(),
                               created_run_id=c.created_run_id,
                               adapter_version=version.version if version else None,
                               pinned_version=_pinned_number(session, c)))
    return rows


def _admin_runs(session: Session, federation_id: int) -> set[int]:
    """Ids of clustering runs an admin's recluster made (from the audit table)."""
    out = set()
    for detail in session.scalars(select(AuditEvent.detail).where(
            AuditEvent.federation_id == federation_id, AuditEvent.action == "recluster")):
        if isinstance(detail, dict) and isinstance(detail.get("run_id"), int):
            out.add(detail["run_id"])
    return out


def run_row(run: ClusteringRun, admin_runs: set[int]) -> ClusteringRunRow:
    return ClusteringRunRow(id=run.id, k=run.k, algorithm=run.algorithm, features=run.features, cycle=run.cycle or 0,
                            num_clients=run.num_clients, eigengaps=list(run.eigengaps), contrast_ratio=run.contrast_ratio,
                            created_at=run.created_at, probe_round_id=run.probe_round_id,
                            trigger="admin" if run.id in admin_runs else "scheduler",
                            has_affinity=run.affinity_sha256 is not None)


def clustering_runs(session: Session, fed: Federation) -> list[ClusteringRunRow]:
    """Every clustering run of the federation, newest first."""
    admin = _admin_runs(session, fed.id)
    return [run_row(r, admin) for r in session.scalars(
        select(ClusteringRun).where(ClusteringRun.federation_id == fed.id).order_by(ClusteringRun.id.desc()))]


def _run_assignments(session: Session, run_id: int) -> dict[int, int]:
    return {client_id: cluster_id for client_id, cluster_id in session.execute(
        select(Assignment.client_id, Assignment.cluster_id).where(Assignment.clustering_run_id == run_id))}


def affinity_matrix(session: Session, blobs: BlobStore, fed: Federation, run_id: int) -> AffinityMatrix:
    """The affinity LSAC used in a run, rows and columns ordered by cluster label then client id.

    MUST fail with 404 for a run of another federation, or whose affinity blob is gone."""
    run = session.get(ClusteringRun, run_id)
    if run is None or run.federation_id != fed.id:
        raise NotFound(f"clustering run {run_id} is not in federation {fed.id}", code="run_not_found")
    if run.affinity_sha256 is None:
        raise NotFound(f"clustering run {run_id} has no affinity matrix", code="affinity_not_found")
    try:
        data = blobs.get_bytes(run.affinity_sha256)
    except BlobNotFound:
        raise NotFound(f"the affinity blob of clustering run {run_id} is gone", code="affinity_not_found") from None
    meta = read_safetensors_header(data).get(METADATA_KEY) or {}
    ids = [int(x) for x in meta.get("client_ids", "").split(",") if x]
    matrix = unpack_tensors(data)["affinity"].astype(np.float64)
    if matrix.shape != (len(ids), len(ids)):
        raise NotFound(f"the affinity blob of clustering run {run_id} does not match its client ids",
                       code="affinity_not_found")
    labels_of = _labels(session, fed.id)
    assigned = _run_assignments(session, run.id)
    names = {cid: name for cid, name in session.execute(select(Client.id, Client.name).where(Client.id.in_(ids)))}
    labels = [labels_of.get(assigned.get(cid)) for cid in ids]
    order = sorted(range(len(ids)), key=lambda i: (labels[i] is None, labels[i] or 0, ids[i]))
    reordered = matrix[np.ix_(order, order)]
    return AffinityMatrix(run_id=run.id, client_ids=[ids[i] for i in order],
                          names=[names.get(ids[i], f"(deleted {ids[i]})") for i in order],
                          labels=[labels[i] for i in order],
                          matrix=[[round(float(x), 5) for x in row] for row in reordered])


def assignment_moves(session: Session, fed: Federation) -> list[RunTransition]:
    """Clients whose cluster changed between consecutive clustering runs, newest transition first."""
    runs = list(session.scalars(select(ClusteringRun).where(ClusteringRun.federation_id == fed.id)
                                .order_by(ClusteringRun.id)))
    labels_of = _labels(session, fed.id)
    names = {cid: name for cid, name in session.execute(select(Client.id, Client.name).where(
        Client.federation_id == fed.id))}
    out = []
    for prev, cur in zip(runs, runs[1:]):
        before, after = _run_assignments(session, prev.id), _run_assignments(session, cur.id)
        moves = [AssignmentMove(client_id=cid, name=names.get(cid, str(cid)), from_label=labels_of.get(before.get(cid)),
                                to_label=labels_of.get(cluster_id))
                 for cid, cluster_id in sorted(after.items()) if before.get(cid) != cluster_id]
        out.append(RunTransition(from_run_id=prev.id, to_run_id=cur.id, created_at=cur.created_at, moves=moves,
                                 unchanged=sum(1 for cid, c in after.items() if before.get(cid) == c)))
    return list(reversed(out))


# ---------------------------------------------------------------- accuracy

def _accuracy_rows(session: Session, federation_id: int, round_ids: list[int] | None = None):  # noqa: ANN202
    query = (select(Task.id, Task.client_id, Task.metrics, Round.stage, Round.number, Round.scope)
             .join(Round, Round.id == Task.round_id)
             .where(Task.federation_id == federation_id, Task.status == DONE).order_by(Task.id))
    if round_ids is not None:
        query = query.where(Task.round_id.in_(round_ids))
    return session.execute(query).all()


def _step_key(stage: str, number: int) -> tuple[int, int]:
    return STEP_ORDER[stage], number


def _tier_values(rows) -> dict[str, list[float]]:  # noqa: ANN001
    values: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        for tier in ACCURACY_KEYS:
            value = (row.metrics or {}).get(f"acc_{tier}")
            if isinstance(value, (int, float)):
                values[tier].append(float(value))
    return values


def latest_accuracy(session: Session, federation_id: int) -> dict[str, TierStats]:
    """Accuracy per tier in the newest round (root, cluster, leaf or the final evaluation; every
    scope of that round number) whose tasks reported any. Reads one round's tasks at a time,
    newest first."""
    steps = session.execute(select(Round.stage, Round.number, Round.id).where(
        Round.federation_id == federation_id, Round.stage.in_(ACCURACY_STAGES), ~Round.scope.like(ONBOARDING))).all()
    grouped: dict[tuple[str, int], list[int]] = defaultdict(list)
    for stage, number, round_id in steps:
        grouped[(stage, number)].append(round_id)
    for key in sorted(grouped, key=lambda k: _step_key(*k), reverse=True):
        values = _tier_values(_accuracy_rows(session, federation_id, grouped[key]))
        if values:
            return {tier: tier_stats(values[tier]) for tier in ACCURACY_KEYS if values.get(tier)}
    return {}


def _latest_per_client(rows) -> dict[int, dict[str, float]]:  # noqa: ANN001
    latest: dict[int, dict[str, float]] = defaultdict(dict)
    for row in rows:  # in task id order: later tasks overwrite
        for tier in ACCURACY_KEYS:
            value = (row.metrics or {}).get(f"acc_{tier}")
            if isinstance(value, (int, float)):
                latest[row.client_id][tier] = float(value)
    return latest


def accuracy(session: Session, fed: Federation) -> AccuracyView:
    rows = _accuracy_rows(session, fed.id)
    by_step: dict[tuple[str, int], list] = defaultdict(list)
    for row in rows:
        if row.stage in ACCURACY_STAGES and not _is_onboarding(row.scope):
            by_step[(row.stage, row.number)].append(row)
    steps = []
    for stage, number in sorted(by_step, key=lambda k: _step_key(*k)):
        values = _tier_values(by_step[(stage, number)])
        if values:
            steps.append(AccuracyStep(stage=stage, number=number, label=f"{stage} {number}",
                                      tiers={t: tier_stats(values[t]) for t in ACCURACY_KEYS if values.get(t)}))
    latest = _latest_per_client(rows)
    labels_of = _labels(session, fed.id)
    clients = [ClientAccuracy(client_id=c.id, name=c.name, cohort=c.cohort, cluster_label=labels_of.get(c.cluster_id),
                              acc_root=latest[c.id].get("root"), acc_cluster=latest[c.id].get("cluster"),
                              acc_leaf=latest[c.id].get("leaf"), acc_selected=latest[c.id].get("selected"),
                              acc_alone=latest[c.id].get("alone"))
               for c in session.scalars(select(Client).where(Client.federation_id == fed.id).order_by(Client.id))
               if c.id in latest]
    return AccuracyView(steps=steps, latest=steps[-1].tiers if steps else {}, clients=clients)


# ---------------------------------------------------------------- clients, workers, unseen clients

def clients_table(session: Session, fed: Federation, now: datetime) -> list[ClientRow]:
    window = timedelta(seconds=online_window_seconds(fed))
    labels_of = _labels(session, fed.id)
    latest = _latest_per_client(_accuracy_rows(session, fed.id))
    unassigned = unassigned_client_ids(session, fed.id)
    done = {cid: n for cid, n in session.execute(
        select(Task.client_id, func.count()).where(Task.federation_id == fed.id, Task.status == DONE)
        .group_by(Task.client_id))}
    return [ClientRow(client_id=c.id, name=c.name, status=c.status, cohort=c.cohort, onboarding=c.onboarding,
                      cluster_label=labels_of.get(c.cluster_id), num_samples=c.num_samples,
                      last_seen_at=c.last_seen_at,
                      online=c.last_seen_at is not None and c.last_seen_at >= now - window,
                      tasks_done=done.get(c.id, 0), acc_root=latest.get(c.id, {}).get("root"),
                      acc_cluster=latest.get(c.id, {}).get("cluster"), acc_leaf=latest.get(c.id, {}).get("leaf"),
                      acc_selected=latest.get(c.id, {}).get("selected"), missed_rounds=c.missed_rounds or 0,
                      inactive_since=c.inactive_since, unassigned=c.id in unassigned)
            for c in session.scalars(select(Client).where(Client.federation_id == fed.id).order_by(Client.id))]


def workers(session: Session, fed: Federation, now: datetime, failures: int = 20) -> WorkersView:
    """Live leases, the workers seen on this federation's tasks, and recent failed tasks."""
    leased = session.execute(
        select(Task, Round.number, Round.scope, Client.name).join(Round, Round.id == Task.round_id)
        .join(Client, Client.id == Task.client_id)
        .where(Task.federation_id == fed.id, Task.status == TaskStatus.leased)
        .order_by(Task.lease_expires_at, Task.id)).all()
    leases = [LeaseRow(task_id=t.id, worker_id=t.worker_id, client_id=t.client_id, client_name=name, stage=t.stage,
                       scope=scope, round_number=number, attempt=t.attempt, lease_expires_at=t.lease_expires_at,
                       seconds_left=_seconds(t.lease_expires_at, now)) for t, number, scope, name in leased]
    failed = session.execute(
        select(Task, Round.number, Client.name).join(Round, Round.id == Task.round_id)
        .join(Client, Client.id == Task.client_id)
        .where(Task.federation_id == fed.id,
               (Task.status == TaskStatus.failed)
               | ((Task.status == TaskStatus.cancelled) & Task.error.is_not(None)))
        .order_by(Task.finished_at.desc(), Task.id.desc()).limit(failures)).all()
    failure_rows = [TaskFailureRow(task_id=t.id, worker_id=t.worker_id, client_id=t.client_id, client_name=name,
                                   stage=t.stage, round_number=number, status=TaskStatus(t.status), attempt=t.attempt,
                                   error=t.error, finished_at=t.finished_at) for t, number, name in failed]
    stats: dict[str, dict] = {}
    for worker_id, status, n, last in session.execute(
            select(Task.worker_id, Task.status, func.count(), func.max(Task.finished_at))
            .where(Task.federation_id == fed.id, Task.worker_id.is_not(None))
            .group_by(Task.worker_id, Task.status)):
        s = stats.setdefault(worker_id, {"leased": 0, "done": 0, "failed": 0, "last": None})
        if status in (TaskStatus.leased, TaskStatus.done, TaskStatus.failed):
            s[status.value] += n
        if status in (TaskStatus.done, TaskStatus.failed) and last is not None and (
                s["last"] is None or last > s["last"]):
            s["last"] = last
    rows = [WorkerRow(worker_id=w, live_leases=s["leased"], tasks_done=s["done"], tasks_failed=s["failed"],
                      last_finished_at=s["last"], task_seconds=_task_seconds(session, fed.id, w))
            for w, s in sorted(stats.items())]
    return WorkersView(workers=rows, leases=leases, failures=failure_rows)


TASK_PHASES = ("data", "fetch", "compute", "eval", "upload")


def _task_seconds(session: Session, federation_id: int, worker_id: str, newest: int = 100) -> dict[str, float]:
    """Median ``time_<phase>`` over the worker's newest done tasks of the federation."""
    seen: dict[str, list[float]] = {}
    for metrics in session.scalars(
            select(Task.metrics).where(Task.federation_id == federation_id, Task.worker_id == worker_id,
                                       Task.status == TaskStatus.done)
            .order_by(Task.finished_at.desc(), Task.id.desc()).limit(newest)):
        for phase in TASK_PHASES:
            value = (metrics or {}).get(f"time_{phase}")
            if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
                seen.setdefault(phase, []).append(float(value))
    return {phase: statistics.median(values) for phase, values in seen.items()}


def unseen_clients(session: Session, fed: Federation) -> list[UnseenClientRow]:
    """Clients onboarded while serving: assignment by probe similarity, zero-shot accuracy
    (``reporting.zero_shot_accuracy``: root + cluster before its leaf trained) and after-leaf
    accuracy."""
    labels_of = _labels(session, fed.id)
    out = []
    for c in session.scalars(select(Client).where(Client.federation_id == fed.id, Client.cohort == Cohort.late)
                             .order_by(Client.id)):
        similarity = session.scalar(select(Assignment.similarity).where(
            Assignment.client_id == c.id, Assignment.source == "onboarding").order_by(Assignment.id.desc()).limit(1))
        leaf_metrics = [m or {} for m in session.scalars(
            select(Task.metrics).where(Task.client_id == c.id, Task.status == DONE, Task.stage == Stage.leaf)
            .order_by(Task.id))]
        after = next((m["acc_leaf"] for m in reversed(leaf_metrics) if "acc_leaf" in m), None)
        rounds_done = session.scalar(select(func.count()).select_from(Round).where(
            Round.federation_id == fed.id, Round.stage == Stage.leaf, Round.scope == scope(ScopeKind.client, c.id),
            Round.status == RoundStatus.done)) or 0
        out.append(UnseenClientRow(client_id=c.id, name=c.name, status=c.status, onboarding=c.onboarding,
                                   cluster_label=labels_of.get(c.cluster_id), similarity=similarity,
                                   zero_shot=zero_shot_accuracy(session, c.id),
                                   after_leaf=None if after is None else float(after),
                                   leaf_rounds_done=rounds_done, created_at=c.created_at))
    return out
