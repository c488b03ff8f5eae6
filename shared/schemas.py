"""Pydantic models of every JSON request and response: the wire contract of ``/v1``.

Tensor bodies are not here: they travel as safetensors (see ``shared.tensors``) and are checked
against the federation's adapter manifest.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.config import FederationConfig, Training
from shared.states import (
    ClientStatus,
    Cohort,
    FederationState,
    Onboarding,
    RoundStatus,
    Stage,
    TaskStatus,
)

PROTOCOL_HEADER = "X-Hilora-Protocol"
WORKER_ID_HEADER = "X-Hilora-Worker-Id"
SHA256_HEADER = "X-Hilora-Sha256"
# an upload that also completes its task: the completion's JSON (``TaskResult``) in this header, so
# a task's result is one request instead of two (upload, then ``/complete``)
COMPLETE_HEADER = "X-Hilora-Complete"
# a lease request's adapter versions the worker already holds (ids, comma-separated; may be empty):
# its presence asks the coordinator to send the task's other input versions inline when they are small
# (``TaskAssignment.inline_adapters``), so the task starts without a download
HAVE_ADAPTERS_HEADER = "X-Hilora-Have-Adapters"
MAX_HAVE_ADAPTERS = 128


def format_have_adapters(ids: Iterable[int]) -> str:
    """The value of ``HAVE_ADAPTERS_HEADER`` for these version ids (the newest ``MAX_HAVE_ADAPTERS``)."""
    return ",".join(str(int(i)) for i in list(ids)[-MAX_HAVE_ADAPTERS:])


def parse_have_adapters(value: str | None) -> frozenset[int] | None:
    """``HAVE_ADAPTERS_HEADER`` as version ids; None when the header is absent (nothing is inlined).
    Raises ValueError, with what is wrong, on anything but up to ``MAX_HAVE_ADAPTERS`` positive
    integer ids separated by commas."""
    if value is None:
        return None
    parts = [part.strip() for part in value.split(",")] if value.strip() else []
    if len(parts) > MAX_HAVE_ADAPTERS:
        raise ValueError(f"{HAVE_ADAPTERS_HEADER} names {len(parts)} adapter versions; at most {MAX_HAVE_ADAPTERS}")
    ids = set()
    for part in parts:
        if not part.isascii() or not part.isdigit() or len(part) > 18 or int(part) < 1:
            raise ValueError(f"{HAVE_ADAPTERS_HEADER} must be adapter version ids (positive integers) separated "
                             f"by commas; got {part[:40]!r}")
        ids.add(int(part))
    return frozenset(ids)


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable reason, e.g. 'wrong_shape', 'stale_lease'")
    detail: str = Field(description="what was wrong, in words")


class VersionInfo(BaseModel):
    version: str
    protocol: int


class FederationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    config: FederationConfig


class FederationCreated(BaseModel):
    federation_id: int
    name: str
    state: FederationState
    enrollment_secret: str = Field(description="shown once; clients register with it")


class EnrollmentSecret(BaseModel):
    federation_id: int
    enrollment_secret: str = Field(description="the new secret, shown once; the previous one no longer works")


class InvitationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int = Field(default=1, ge=1, le=1000, description="how many codes, one client each")
    expires_in_seconds: float = Field(default=7 * 86400, ge=60, le=90 * 86400,
                                      description="each code is refused after this long (default 7 days)")
    note: str = Field(default="", max_length=200, description="for the admin: whom the codes are for")


class InvitationCode(BaseModel):
    id: int
    code: str = Field(description="shown once: the client registers with it as its bearer token, once")
    expires_at: datetime


class InvitationsCreated(BaseModel):
    federation_id: int
    invitations: list[InvitationCode]


class InvitationInfo(BaseModel):
    id: int
    note: str
    state: Literal["open", "used", "expired", "revoked"]
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    client_id: int | None
    revoked_at: datetime | None


class UpdateNorm(BaseModel):
    client_id: int
    norm: float
    scale: float


class AggregationWeight(BaseModel):
    client_id: int
    reported: float = Field(description="the num_samples the client reported (at least 1)")
    weight: float = Field(description="the weight aggregation used: reported, or the cap of "
                                      "TierPolicy.max_weight_ratio when that is lower")


class RoundInfo(BaseModel):
    id: int
    stage: Stage
    scope: str
    number: int
    cycle: int = Field(default=0, description="the federation's cycle the round belongs to (0: the first cascade)")
    status: RoundStatus
    tasks_total: int
    tasks_done: int
    tasks_failed: int
    tasks_cancelled: int = 0
    quorum: int | None = Field(default=None, description="accepted uploads this round needs to aggregate")
    deadline_at: datetime | None = None
    failure: str | None = Field(default=None, description="why the round failed, in words")
    rho: float | None = None
    clipped_clients: int | None = Field(default=None, description="updates scaled down by norm clipping "
                                        "(TierPolicy.clip_norm); null when clipping is off")
    update_norms: list[UpdateNorm] | None = Field(default=None, description="each client's update norm "
                                                  "and the scale clipping applied (1: unchanged)")
    aggregation_weights: list[AggregationWeight] | None = Field(
        default=None, description="each client's weight in the aggregate of this round; null until aggregated")
    sample_seed: int | None = Field(default=None, description=(
        "client sampling (schedule.clients_per_round): the seed this round's clients were drawn with "
        "(shared.sampling.draw over the eligible client ids, ascending); null when every eligible client was asked"))
    sampled_from: int | None = Field(default=None, description="how many clients were eligible for the draw")
    created_at: datetime
    closed_at: datetime | None = None


class ClusterInfo(BaseModel):
    id: int
    label: int
    members: list[str]
    adapter_version: int | None = None
    pinned_version: int | None = Field(default=None, description="the version it serves when an admin pinned one")


class ClusteringRunInfo(BaseModel):
    id: int
    k: int
    algorithm: str = Field(default="lsac", description="clustering.algorithm the run used: lsac, kmeans-flat, "
                                                        "lsac-paper")
    features: str
    num_clients: int
    eigengaps: list[float]
    contrast_ratio: float | None
    cycle: int = Field(default=0, description="the federation's cycle it ran in")
    created_at: datetime


class FederationStatus(BaseModel):
    federation_id: int
    name: str
    state: FederationState
    clients_total: int
    clients_training: int
    stage_round: int
    root_version: int | None
    last_rho: float | None
    uploaded_bytes: int
    rounds: list[RoundInfo]
    clusters: list[ClusterInfo]
    clustering: ClusteringRunInfo | None
    onboarding_pending: int
    cycle: int = Field(default=0, description="the federation's cycle: 0 is the first cascade, each later cycle adds one")
    cycle_requested_at: datetime | None = Field(default=None, description="an admin asked for the next cycle")
    cycle_started_at: datetime | None = None
    unassigned: int = Field(default=0, description="active clients that fit no cluster (clustering.refine_rounds): "
                                                   "served the root and their own leaf")
    paused_at: datetime | None = Field(default=None, description="set while the federation is paused (by an admin, "
                                                                 "or by the scheduler after repeated failures)")
    paused_reason: str | None = Field(default=None, description="why it is paused: the admin's note or the scheduler's")
    failure_count: int = Field(default=0, description="scheduler ticks in a row that failed to advance it")
    last_failure: str | None = Field(default=None, description="the newest failure to advance it (kept after recovery)")
    last_failure_at: datetime | None = None


class AdminNote(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=500, description="recorded in the audit table")


class DeadlineChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    deadline_at: datetime | None = Field(default=None, description="new deadline (with a timezone)")
    extend_seconds: float | None = Field(default=None, gt=0, le=30 * 86400,
                                         description="push the deadline (or now, if it has none) back")


class ScheduleChange(BaseModel):
    """``PATCH /v1/federations/F/schedule``: schedule fields to change (``clients_per_round`` may be
    given in part), validated as at creation; effective from the next round."""

    model_config = ConfigDict(extra="forbid")

    changes: dict[str, Any] = Field(description="schedule field -> new value", max_length=32)
    reason: str = Field(default="", max_length=500, description="recorded in the audit log")


class ScheduleChanged(BaseModel):
    federation_id: int
    changes: dict[str, list[Any]] = Field(description="each changed field: [before, after]; empty when every "
                                                      "value given was already the federation's")
    schedule: dict[str, Any] = Field(description="the federation's schedule now")


class AuditEventInfo(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    federation_id: int | None
    target: str | None
    detail: dict


class ClientRegister(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")
    num_samples: int = Field(default=0, ge=0, le=10**9)


class ClientRegistered(BaseModel):
    federation_id: int
    client_id: int
    name: str
    token: str = Field(description="shown once; the client's credential")
    cohort: Cohort


class AdapterRef(BaseModel):
    id: int
    tier: Literal["root", "cluster"]
    version: int
    sha256: str


class ClientAdapters(BaseModel):
    """The newest adapter versions a client's model is made of (its leaf stays on its worker)."""

    root: AdapterRef | None
    cluster: AdapterRef | None = Field(description="newest version of the client's cluster; null without one")


class RefineCandidate(BaseModel):
    """One cluster adapter a refine task evaluates (protocol 5)."""

    cluster_id: int
    label: int
    adapter: AdapterRef


def refine_metric(cluster_id: int | None) -> str:
    """The metric in which a refine task reports its mean training loss with the root alone
    (``cluster_id`` None) or with root + that cluster's adapter."""
    return "refine_loss_root" if cluster_id is None else f"refine_loss_c{int(cluster_id)}"


class TaskAssignment(BaseModel):
    task_id: int
    lease_id: str
    attempt: int
    lease_expires_at: datetime
    lease_seconds: float
    federation_id: int
    client_id: int
    stage: Stage
    round_number: int
    scope: str
    root: AdapterRef | None
    cluster: AdapterRef | None
    train_tier: Literal["root", "cluster", "leaf"]
    epochs: int
    steps: int | None = Field(default=None, description="exact optimizer steps (overrides epochs; protocol 3)")
    loss: Literal["ce", "balanced"] = Field(
        default="ce", description="'balanced': cross entropy weighted by inverse class frequency (protocol 3)")
    trainable: list[str] = Field(description="factors of train_tier that train: A, B, head")
    upload: list[str] = Field(description="factors of train_tier to upload; empty: metrics only")
    local: list[str] = Field(description="factors the client keeps between rounds (never uploaded)")
    reset_leaf: bool = False
    evaluate: bool = Field(
        default=True, description="root and cluster training tasks: evaluate the adapters as received on the "
                                  "client's data before training (schedule.evaluate_every; protocol 7)")
    training: Training
    candidates: list[RefineCandidate] = Field(
        default_factory=list,
        description="stage 'refine' only: the cluster adapters to evaluate (protocol 5); the task completes with "
                    "refine_loss_root and refine_loss_c<cluster_id> for each, the mean cross entropy on the client's "
                    "training data")
    inline_adapters: dict[int, str] = Field(
        default_factory=dict,
        description=f"input adapter versions of this task (root, cluster) by id, as base64 safetensors: sent when "
                    f"the lease request had {HAVE_ADAPTERS_HEADER} without their ids and they are small "
                    "(HILORA_INLINE_ADAPTER_MAX_BYTES); the worker checks each against its reference's sha256 and "
                    "does not download it. Optional on both sides: any other version is downloaded as before")


class LeaseResponse(BaseModel):
    task: TaskAssignment | None
    retry_after: float
    federation_state: FederationState
    client_state: Literal["waiting", "training", "onboarding", "ready", "revoked", "paused"]


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lease_id: str = Field(max_length=64)


class HeartbeatAck(BaseModel):
    lease_expires_at: datetime


class UploadAck(BaseModel):
    task_id: int
    sha256: str
    bytes: int
    status: TaskStatus | None = Field(default=None, description=(
        f"present when the upload also completed its task ({COMPLETE_HEADER}): the task's status, done"))


class TaskResult(BaseModel):
    """What a completion reports: the body of ``/complete`` without its lease id, and the JSON of
    an upload's ``X-Hilora-Complete`` header."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_samples: int = Field(ge=1, le=10**9)
    metrics: dict[str, float] = Field(default_factory=dict, max_length=256,
                                      description="at most 256 finite numbers, names up to 64 characters")


class TaskComplete(TaskResult):
    lease_id: str = Field(max_length=64)


class TaskCompleted(BaseModel):
    task_id: int
    status: TaskStatus


class ClientReport(BaseModel):
    client_id: int
    name: str
    cohort: Cohort
    cluster_label: int | None
    num_samples: int
    metrics: dict[str, float] = Field(description="latest value of each metric the worker reported")
    zero_shot: float | None = Field(default=None, description=(
        "accuracy of the federation's shared model (root + the client's cluster, if any) on this client "
        "before its leaf trained: the first done leaf task's acc_cluster, else its acc_root"))
    uploaded_bytes: int


class FederationReport(BaseModel):
    federation_id: int
    name: str
    state: FederationState
    clustering: ClusteringRunInfo | None
    clients: list[ClientReport]
    uploaded_bytes: int
    rounds: list[RoundInfo]



# ---------------------------------------------------------------- the operator's view (/dashboard)
# Read models of the admin JSON API in coordinator/routes_admin.py (docs/dashboard.md).

class FederationOverview(BaseModel):
    federation_id: int
    name: str
    state: FederationState
    paused_at: datetime | None = Field(description="set while the federation is paused (by an admin, or by the "
                                                   "scheduler after repeated failures)")
    paused_reason: str | None = Field(default=None, description="why it is paused")
    failure_count: int = Field(default=0, description="scheduler ticks in a row that failed to advance it")
    current_round: int | None = Field(description="number of the newest open round of the current stage")
    open_rounds: int
    tasks_done: int = Field(description="done tasks of the open rounds")
    tasks_total: int = Field(description="all tasks of the open rounds")
    clients_total: int
    clients_online: int = Field(description="clients seen (lease, heartbeat, upload) within online_window_seconds")
    online_window_seconds: float = Field(description="2 x the federation's lease_seconds")
    k: int | None = Field(description="K of the newest clustering run")
    unassigned: int = Field(default=0, description="active clients that fit no cluster (served root + their leaf)")
    last_aggregation_at: datetime | None = Field(description="when the newest aggregated round closed")
    created_at: datetime


class StageSpan(BaseModel):
    stage: FederationState
    started_at: datetime
    ended_at: datetime | None = Field(description="null while the federation is in this stage")
    rounds_done: int
    rounds_failed: int


class RoundRow(RoundInfo):
    duration_seconds: float | None = Field(description="closed_at - created_at; null while open")
    aggregation_seconds: float | None = None


class FederationTimeline(BaseModel):
    federation_id: int
    state: FederationState
    stages: list[StageSpan]
    rounds: list[RoundRow] = Field(description="newest first, at most `limit`")
    rounds_total: int


class ClusterRow(BaseModel):
    id: int
    label: int = Field(description="stable across reclusterings (matched by membership overlap)")
    size: int
    members: list[str]
    created_at: datetime
    age_seconds: float
    created_run_id: int = Field(description="the clustering run that made this cluster")
    adapter_version: int | None
    pinned_version: int | None = Field(default=None, description=(
        "an admin's pin or rollback: the version the cluster serves instead of its newest (adapter_version); "
        "null: it serves its newest"))


class ClusterPin(BaseModel):
    """``POST /v1/federations/F/clusters/{label}/pin``: serve this version of the cluster's adapter
    (a pin, or a rollback to an older one), or the newest again (``version`` null)."""

    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(ge=0, description="a version number of this cluster's adapter; null: unpin")
    reason: str = Field(default="", max_length=500, description="recorded in the audit log")


class ClusteringRunRow(ClusteringRunInfo):
    probe_round_id: int
    trigger: Literal["scheduler", "admin"] = Field(description="'admin': made by POST .../recluster")
    has_affinity: bool


class AffinityMatrix(BaseModel):
    run_id: int
    client_ids: list[int] = Field(description="rows and columns, ordered by cluster label, then client id")
    names: list[str]
    labels: list[int | None] = Field(description="stable cluster label of each row in this run")
    matrix: list[list[float]] = Field(description="the self-tuning affinity LSAC used, reordered")


class AssignmentMove(BaseModel):
    client_id: int
    name: str
    from_label: int | None
    to_label: int | None


class RunTransition(BaseModel):
    """What changed between two consecutive clustering runs of a federation."""

    from_run_id: int
    to_run_id: int
    created_at: datetime
    moves: list[AssignmentMove]
    unchanged: int = Field(description="clients in both runs that kept their cluster")


class TierStats(BaseModel):
    mean: float | None
    p10: float | None = Field(description="10th percentile over clients (the worst-case metric)")
    n: int


class AccuracyStep(BaseModel):
    """One round of the training cascade (all scopes of a stage's round number together), or the
    final evaluation (stage 'eval')."""

    stage: Stage
    number: int
    label: str
    tiers: dict[str, TierStats] = Field(description="keys 'root', 'cluster', 'leaf' where reported, and "
                                                    "'selected' (each client's chosen model) with a validation split")


class ClientAccuracy(BaseModel):
    client_id: int
    name: str
    cohort: Cohort
    cluster_label: int | None
    acc_root: float | None
    acc_cluster: float | None
    acc_leaf: float | None
    acc_selected: float | None = Field(default=None, description=(
        "test accuracy of the model the client chose on its held-out validation part "
        "(training.validation_fraction > 0); None when it holds none out"))
    acc_alone: float | None = Field(default=None, description=(
        "test accuracy of the model the client trained alone (training.alone_epochs), one of the candidates "
        "of its choice; None when it trains none"))


class AccuracyView(BaseModel):
    """Accuracies the workers reported: root and cluster tasks evaluate the adapters they
    received, leaf tasks evaluate root + cluster + the trained leaf, and the final evaluation
    (stage 'eval', once training is over) evaluates the final root, root + cluster and root +
    cluster + leaf (worker.train.evaluate_tiers)."""

    steps: list[AccuracyStep]
    latest: dict[str, TierStats] = Field(description="each tier in the newest step that reports it")
    clients: list[ClientAccuracy] = Field(description="each client's latest value per tier")


class ClientRow(BaseModel):
    client_id: int
    name: str
    status: ClientStatus
    cohort: Cohort
    onboarding: Onboarding
    cluster_label: int | None
    num_samples: int
    last_seen_at: datetime | None
    online: bool
    tasks_done: int
    acc_root: float | None
    acc_cluster: float | None
    acc_leaf: float | None
    acc_selected: float | None = Field(default=None, description=(
        "test accuracy of the model the client chose on its held-out validation part "
        "(training.validation_fraction > 0); None when it holds none out"))
    missed_rounds: int = Field(default=0, description="rounds in a row whose task for it ended without its upload")
    unassigned: bool = Field(default=False, description="it fits no cluster (a refinement found no cluster better "
                                                        "than the root for it): served root + its own leaf")
    inactive_since: datetime | None = Field(default=None, description=(
        "marked inactive after schedule.max_consecutive_failures missed rounds: no task is opened for it until it "
        "asks for work again; null while active"))


class LeaseRow(BaseModel):
    task_id: int
    worker_id: str | None
    client_id: int
    client_name: str
    stage: Stage
    scope: str
    round_number: int
    attempt: int
    lease_expires_at: datetime | None
    seconds_left: float | None


class TaskFailureRow(BaseModel):
    task_id: int
    worker_id: str | None
    client_id: int
    client_name: str
    stage: Stage
    round_number: int
    status: TaskStatus
    attempt: int
    error: str | None
    finished_at: datetime | None


class WorkerRow(BaseModel):
    worker_id: str
    live_leases: int
    tasks_done: int
    tasks_failed: int
    last_finished_at: datetime | None
    task_seconds: dict[str, float] = Field(default_factory=dict, description=(
        "median seconds per task by phase (data, fetch, compute, eval, upload: the time_<phase> metrics its "
        "tasks reported) over its newest done tasks of this federation (at most 100); phases no task reported "
        "are left out"))


class WorkersView(BaseModel):
    workers: list[WorkerRow]
    leases: list[LeaseRow] = Field(description="live leases, soonest expiry first")
    failures: list[TaskFailureRow] = Field(description="failed, and cancelled with a reason, newest first")


class UnseenClientRow(BaseModel):
    client_id: int
    name: str
    status: ClientStatus
    onboarding: Onboarding = Field(description="waiting -> probe -> leaf -> ready")
    cluster_label: int | None
    similarity: float | None = Field(description="mean probe similarity to the cluster it was assigned to")
    zero_shot: float | None = Field(description=(
        "accuracy of the shared model (root + assigned cluster, if any) before its leaf trained: the "
        "first done leaf task's acc_cluster, else its acc_root (as ClientReport.zero_shot)"))
    after_leaf: float | None = Field(description="root + cluster + leaf accuracy, latest")
    leaf_rounds_done: int
    created_at: datetime


class ReclusterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force_k: int | None = Field(default=None, ge=1, le=1000, description="take this K instead of the eigengap rule")
    features: Literal["update", "subspace"] | None = Field(default=None, description="override clustering.features")
    knn: int | None = Field(default=None, ge=1, le=1000, description="override clustering.knn")
    assignment: dict[str, int] | None = Field(
        default=None, description="assign by hand: client name -> cluster label (an existing cluster's label, or a "
                                  "new one for a new cluster); the clients it does not name keep their cluster; "
                                  "excludes force_k")
    reason: str = Field(default="", max_length=500, description="recorded in the audit table")

    @model_validator(mode="after")
    def _one_way(self) -> "ReclusterRequest":
        if self.assignment is not None and not self.assignment:
            raise ValueError("assignment names no client: give {client name: cluster label}")
        if self.assignment is not None and self.force_k is not None:
            raise ValueError("assignment and force_k exclude each other: an assignment gives the clusters")
        return self


class ReclusterResult(BaseModel):
    run: ClusteringRunRow
    clusters_kept: list[int] = Field(description="labels of existing clusters matched by membership overlap")
    clusters_created: list[int] = Field(description="labels of new clusters (adapter version 0)")
    moves: list[AssignmentMove]
    tasks_cancelled: int = Field(description="open cluster, leaf and eval tasks of moved clients, cancelled")
