"""Read models for admins: federation status (progress) and report (per-client results), and the
one definition of a client's zero-shot accuracy (``zero_shot_accuracy``)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.models import AdapterVersion, Client, Cluster, ClusteringRun, Federation, Round, Task
from coordinator.services.adapters import latest_version
from coordinator.services.clustering import latest_run, unassigned_client_ids
from coordinator.services.tasks import count_tasks
from shared.schemas import (
    ClientReport,
    ClusterInfo,
    ClusteringRunInfo,
    FederationReport,
    FederationStatus,
    RoundInfo,
)
from shared.states import ClientStatus, Cohort, FederationState, Onboarding, ScopeKind, Stage, TaskStatus, scope


def zero_shot_accuracy(session: Session, client_id: int) -> float | None:
    """A client's zero-shot accuracy: that of the federation's shared model (root + the client's
    assigned cluster, if any) on its data before its leaf trained. It is what the client's first
    done leaf task reported for the adapters it received: ``acc_cluster`` when it had a cluster,
    else ``acc_root``; None before a leaf task is done. For a late (unseen) client that is its
    first onboarding leaf round. The report and the operator's view both use this."""
    first = session.scalars(select(Task.metrics).where(
        Task.client_id == client_id, Task.status == TaskStatus.done, Task.stage == Stage.leaf)
        .order_by(Task.id).limit(1)).first()
    value = (first or {}).get("acc_cluster", (first or {}).get("acc_root"))
    return None if value is None else float(value)


def round_info(session: Session, rnd: Round) -> RoundInfo:
    counts = count_tasks(session, rnd.id)
    return RoundInfo(id=rnd.id, stage=rnd.stage, scope=rnd.scope, number=rnd.number, cycle=rnd.cycle or 0,
                     status=rnd.status,
                     tasks_total=sum(counts.values()), tasks_done=counts.get(TaskStatus.done, 0),
                     tasks_failed=counts.get(TaskStatus.failed, 0),
                     tasks_cancelled=counts.get(TaskStatus.cancelled, 0), quorum=rnd.quorum,
                     deadline_at=rnd.deadline_at, failure=rnd.failure, rho=rnd.rho,
                     clipped_clients=rnd.clipped_clients, update_norms=rnd.update_norms,
                     aggregation_weights=rnd.aggregation_weights, sample_seed=rnd.sample_seed,
                     sampled_from=rnd.sampled_from, created_at=rnd.created_at, closed_at=rnd.closed_at)


def _run_info(run: ClusteringRun | None) -> ClusteringRunInfo | None:
    if run is None:
        return None
    return ClusteringRunInfo(id=run.id, k=run.k, algorithm=run.algorithm, features=run.features,
                             num_clients=run.num_clients, eigengaps=list(run.eigengaps), contrast_ratio=run.contrast_ratio,
                             cycle=run.cycle or 0, created_at=run.created_at)


def _uploaded_bytes(session: Session, fed_id: int) -> int:
    return int(session.scalar(select(func.coalesce(func.sum(Task.upload_bytes), 0)).where(
        Task.federation_id == fed_id, Task.status == TaskStatus.done)) or 0)


def federation_status(session: Session, fed: Federation, last_rounds: int = 50) -> FederationStatus:
    clients = list(session.scalars(select(Client).where(Client.federation_id == fed.id)))
    rounds = list(session.scalars(select(Round).where(Round.federation_id == fed.id)
                                  .order_by(Round.id.desc()).limit(last_rounds)))
    clusters = []
    for cluster in session.scalars(select(Cluster).where(Cluster.federation_id == fed.id).order_by(Cluster.label)):
        version = latest_version(session, fed.id, scope(ScopeKind.cluster, cluster.id))
        pinned = session.get(AdapterVersion, cluster.pinned_version_id) if cluster.pinned_version_id else None
        clusters.append(ClusterInfo(id=cluster.id, label=cluster.label,
                                    members=sorted(c.name for c in clients if c.cluster_id == cluster.id),
                                    adapter_version=version.version if version else None,
                                    pinned_version=pinned.version if pinned else None))
    root = latest_version(session, fed.id, scope(ScopeKind.root))
    stage_rounds = [r for r in rounds if r.stage == fed.state]
    return FederationStatus(
        federation_id=fed.id, name=fed.name, state=FederationState(fed.state),
        clients_total=len(clients),
        clients_training=sum(1 for c in clients if c.cohort == Cohort.train and c.status == ClientStatus.active),
        stage_round=max((r.number for r in stage_rounds), default=0),
        root_version=root.version if root else None, last_rho=fed.last_rho,
        uploaded_bytes=_uploaded_bytes(session, fed.id),
        rounds=[round_info(session, r) for r in reversed(rounds)],
        clusters=clusters, clustering=_run_info(latest_run(session, fed.id)),
        onboarding_pending=sum(1 for c in clients if c.cohort == Cohort.late and c.onboarding != Onboarding.ready
                               and c.status == ClientStatus.active),
        unassigned=len(unassigned_client_ids(session, fed.id)),
        cycle=fed.cycle or 0, cycle_requested_at=fed.cycle_requested_at, cycle_started_at=fed.cycle_started_at,
        paused_at=fed.paused_at, paused_reason=fed.paused_reason, failure_count=fed.failure_count or 0,
        last_failure=fed.last_failure, last_failure_at=fed.last_failure_at,
    )


def federation_report(session: Session, fed: Federation) -> FederationReport:
    clients = list(session.scalars(select(Client).where(Client.federation_id == fed.id).order_by(Client.id)))
    labels = {c.id: c.label for c in session.scalars(select(Cluster).where(Cluster.federation_id == fed.id))}
    reports = []
    for client in clients:
        tasks = list(session.scalars(select(Task).where(
            Task.client_id == client.id, Task.status == TaskStatus.done).order_by(Task.id)))
        metrics: dict[str, float] = {}
        for task in tasks:
            metrics.update(task.metrics or {})
        reports.append(ClientReport(
            client_id=client.id, name=client.name, cohort=client.cohort,
            cluster_label=labels.get(client.cluster_id) if client.cluster_id else None,
            num_samples=client.num_samples, metrics=metrics, zero_shot=zero_shot_accuracy(session, client.id),
            uploaded_bytes=sum(t.upload_bytes for t in tasks)))
    rounds = list(session.scalars(select(Round).where(Round.federation_id == fed.id).order_by(Round.id)))
    return FederationReport(federation_id=fed.id, name=fed.name, state=FederationState(fed.state),
                            clustering=_run_info(latest_run(session, fed.id)), clients=reports,
                            uploaded_bytes=_uploaded_bytes(session, fed.id),
                            rounds=[round_info(session, r) for r in rounds])
