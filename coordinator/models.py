"""SQLAlchemy 2 tables of the coordinator. Every schema change goes through an Alembic migration.

Invariants live in the database: one task per (round, client), one adapter version per
(federation, tier, scope, version), one round per (federation, stage, scope, number), unique
token hashes. States are the enums of ``shared.states``, stored as their text value
(``EnumText``); every change of one goes through the transition table there
(``shared.states.move``, or a guarded UPDATE whose ``WHERE`` comes from ``shared.states.sources``).
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from shared.states import ClientStatus, Cohort, FederationState, Onboarding, RoundStatus, Stage, StateEnum, TaskStatus


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive UTC text)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):  # noqa: ANN001
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value, dialect):  # noqa: ANN001
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc)


class EnumText(TypeDecorator):
    """A ``shared.states`` enum in a plain text column: the database holds the value (as it always
    has; no database enum type, no migration), Python sees the enum. Binding a value that is not
    one of the enum's is an error, so no unknown state reaches the database."""

    impl = String
    cache_ok = True

    def __init__(self, enum: type[StateEnum], length: int = 16) -> None:
        super().__init__(length)
        self.enum = enum

    def process_bind_param(self, value, dialect):  # noqa: ANN001
        return None if value is None else self.enum(value).value

    def process_result_value(self, value, dialect):  # noqa: ANN001
        return None if value is None else self.enum(value)


class Base(DeclarativeBase):
    pass


class Blob(Base):
    """A content-addressed file in the blob store, verified against its sha256 before insertion."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(32))  # backbone | upload | adapter | affinity
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Federation(Base):
    """A federation. ``state``: enrolling -> root -> probe -> cluster -> leaf -> serving, each stage
    skipped when the schedule leaves it out (``shared.states.FederationState``, ``TRANSITIONS``)."""

    __tablename__ = "federations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    config: Mapped[dict] = mapped_column(JSON)
    state: Mapped[FederationState] = mapped_column(EnumText(FederationState))
    enrollment_secret_hash: Mapped[str] = mapped_column(String(64))
    backbone_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    last_rho: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Paused: the scheduler makes no transition and leases hand out nothing; deadlines of open
    # rounds are pushed back by the paused time on resume.
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Why: the admin's note, or the scheduler's when it paused a federation it failed to advance
    # ``MAX_CONSECUTIVE_FAILURES`` ticks in a row (``coordinator.services.scheduling``).
    paused_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Scheduler ticks in a row that failed to advance this federation (0 after one that did), and
    # the newest failure; the counter is reset by a good tick and by an admin's resume.
    failure_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_failure: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_failure_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # cycles: 0 is the first cascade; each later cycle adds one (schedule.cycle_*, or an admin's request)
    cycle: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cycle_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    cycle_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    serving_since: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Client(Base):
    """A data owner. ``cohort`` is 'train' for clients registered while the federation enrolls (or
    while a training federation has no active training client left), 'late' for clients registered
    once training began (the unseen clients of
    the paper), which are onboarded while serving. ``status``: active -> revoked. ``onboarding``:
    'none' for the training cohort; waiting -> probe -> leaf -> ready (waiting -> leaf without
    clusters) for a late client (``shared.states``)."""

    __tablename__ = "clients"
    __table_args__ = (UniqueConstraint("federation_id", "name", name="uq_clients_federation_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    federation_id: Mapped[int] = mapped_column(ForeignKey("federations.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[ClientStatus] = mapped_column(EnumText(ClientStatus))
    cohort: Mapped[Cohort] = mapped_column(EnumText(Cohort))
    num_samples: Mapped[int] = mapped_column(Integer, default=0)
    cluster_id: Mapped[int | None] = mapped_column(ForeignKey("clusters.id"), nullable=True)
    onboarding: Mapped[Onboarding] = mapped_column(EnumText(Onboarding), default=Onboarding.none.value)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Partial participation (Schedule.max_consecutive_failures): rounds in a row whose task for this
    # client ended without its upload, and since when it is inactive (no task opened for it until it
    # asks for work again); null while active.
    missed_rounds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    inactive_since: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ClusteringRun(Base):
    __tablename__ = "clustering_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    federation_id: Mapped[int] = mapped_column(ForeignKey("federations.id", ondelete="CASCADE"), index=True)
    probe_round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"))
    features: Mapped[str] = mapped_column(String(16))
    algorithm: Mapped[str] = mapped_column(String(16), default="lsac", server_default="lsac")  # Clustering.algorithm
    k: Mapped[int] = mapped_column(Integer)
    num_clients: Mapped[int] = mapped_column(Integer)
    eigengaps: Mapped[list] = mapped_column(JSON)
    contrast_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    affinity_sha256: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256"), nullable=True)
    cycle: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Cluster(Base):
    """A cluster; ``label`` is stable across clustering reruns (matched by membership overlap)."""

    __tablename__ = "clusters"
    __table_args__ = (UniqueConstraint("federation_id", "label", name="uq_clusters_federation_label"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    federation_id: Mapped[int] = mapped_column(ForeignKey("federations.id", ondelete="CASCADE"), index=True)
    label: Mapped[int] = mapped_column(Integer)
    created_run_id: Mapped[int] = mapped_column(ForeignKey("clustering_runs.id"))
    # an admin's pin (or rollback): the version the cluster serves instead of its newest; null: the newest
    pinned_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("adapter_versions.id", use_alter=True, name="fk_clusters_pinned_version", ondelete="SET NULL"),
        nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Assignment(Base):
    """History of client -> cluster assignments: from a clustering run or from onboarding."""

    __tablename__ = "assignments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"), index=True)
    # null: the client fits no cluster (a refinement, or an onboarding with no clustered client to join)
    cluster_id: Mapped[int | None] = mapped_column(ForeignKey("clusters.id"), nullable=True)
    clustering_run_id: Mapped[int | None] = mapped_column(ForeignKey("clustering_runs.id"), nullable=True)
    source: Mapped[str] = mapped_column(String(16))  # lsac | onboarding | manual | refine | cycle
    similarity: Mapped[float | None] = mapped_column(Float, nullable=True)
    cycle: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Round(Base):
    """A round of one stage (root, probe, cluster, leaf, eval): open -> done | failed
    (``shared.states.RoundStatus``). Root, probe and cluster rounds need their quorum of done tasks
    (aggregated, resp. clustered) else fail and a fresh round opens; leaf and eval rounds are done
    with at least one done task, once all tasks are terminal or at the deadline.

    ``scope`` (``shared.states.scope``): 'root' (root rounds), 'all' (the probe round of every
    training client), 'cluster:<id>' (a cluster's rounds), 'leaf:<cluster id>' | 'leaf:none' and
    'eval:<cluster id>' | 'eval:none' (the leaf and final evaluation rounds of one cluster's
    members, or of the clients without a cluster), 'client:<id>' (onboarding of one late client:
    its probe and leaf rounds)."""

    __tablename__ = "rounds"
    __table_args__ = (
        UniqueConstraint("federation_id", "stage", "scope", "number", name="uq_rounds_identity"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    federation_id: Mapped[int] = mapped_column(ForeignKey("federations.id", ondelete="CASCADE"), index=True)
    stage: Mapped[Stage] = mapped_column(EnumText(Stage))
    scope: Mapped[str] = mapped_column(String(64))
    number: Mapped[int] = mapped_column(Integer)
    cycle: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # the federation's cycle
    status: Mapped[RoundStatus] = mapped_column(EnumText(RoundStatus), index=True)
    # Plain ids, not foreign keys: adapter_versions -> clusters -> clustering_runs -> rounds would
    # otherwise form a cycle that SQLite cannot create.
    input_root_version_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    input_cluster_version_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    result_version_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rho: Mapped[float | None] = mapped_column(Float, nullable=True)
    quorum: Mapped[int | None] = mapped_column(Integer, nullable=True)
    aggregation_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Norm clipping (TierPolicy.clip_norm, shared.robust): how many updates were scaled down, and
    # each client's update norm and scale ([{client_id, norm, scale}]); null when clipping is off.
    clipped_clients: Mapped[int | None] = mapped_column(Integer, nullable=True)
    update_norms: Mapped[list | None] = mapped_column(JSON, nullable=True)
    # [{client_id, reported, weight}] of an aggregated round: the weights it was computed with
    aggregation_weights: Mapped[list | None] = mapped_column(JSON, nullable=True)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Client sampling (Schedule.clients_per_round, shared.sampling): the seed the round's clients were
    # drawn with and how many were eligible; null when the round asked every eligible client.
    sample_seed: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    sampled_from: Mapped[int | None] = mapped_column(Integer, nullable=True)
    failure: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class AdapterVersion(Base):
    """An immutable adapter version: (federation, tier, scope, version) -> blob."""

    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("federation_id", "tier", "scope", "version", name="uq_adapter_versions_identity"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    federation_id: Mapped[int] = mapped_column(ForeignKey("federations.id", ondelete="CASCADE"), index=True)
    tier: Mapped[str] = mapped_column(String(16))  # root | cluster
    scope: Mapped[str] = mapped_column(String(64))  # root | cluster:<cluster id>
    cluster_id: Mapped[int | None] = mapped_column(ForeignKey("clusters.id"), nullable=True)
    version: Mapped[int] = mapped_column(Integer)
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Task(Base):
    """One client's work in one round: pending -> leased -> done, with leased -> pending (lease
    expired or released), leased -> failed (expired at the last attempt) and pending|leased ->
    cancelled (``shared.states.TaskStatus``). Every transition is a guarded UPDATE whose
    ``WHERE status IN (...)`` is ``shared.states.sources``."""

    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("round_id", "client_id", name="uq_tasks_round_client"),
        Index("ix_tasks_client_status", "client_id", "status"),
        Index("ix_tasks_status_expiry", "status", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    federation_id: Mapped[int] = mapped_column(ForeignKey("federations.id", ondelete="CASCADE"))
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    stage: Mapped[Stage] = mapped_column(EnumText(Stage))
    status: Mapped[TaskStatus] = mapped_column(EnumText(TaskStatus))
    lease_id: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    # Leases given back by their worker (SIGTERM, pre-emption): they do not count toward max_attempts.
    releases: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    reset_leaf: Mapped[bool] = mapped_column(Boolean, default=False)
    upload_sha256: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256"), nullable=True)
    upload_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # Distinct bodies accepted for this task (a new body under the lease replaces the stored one,
    # whose blob is freed at once): at most Settings.max_uploads_per_task.
    upload_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    num_samples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    metrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Set when aggregation could not combine this done task's upload into float32 values and left
    # it out (``coordinator.services.aggregation``); ``error`` says why. The task stays done: the
    # worker did its part, the coordinator refused to use the result.
    quarantined_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Invitation(Base):
    """A one-time, expiring registration code for one client (``hli_`` + 256 random bits; only its
    sha256 is stored). Registering with it consumes it (``used_at``, ``client_id``); an admin may
    revoke an unused one. It is bound by the federation's client cap and registration rate limit,
    as the shared enrollment secret is."""

    __tablename__ = "invitations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    federation_id: Mapped[int] = mapped_column(ForeignKey("federations.id", ondelete="CASCADE"), index=True)
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    note: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    client_id: Mapped[int | None] = mapped_column(ForeignKey("clients.id", ondelete="SET NULL"), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class AuditEvent(Base):
    """An admin action (revoke, pause, resume, deadline change, recluster, client deletion): who,
    when, on what, with which parameters. Append-only."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    federation_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    target: Mapped[str | None] = mapped_column(String(200), nullable=True)
    detail: Mapped[dict] = mapped_column(JSON, default=dict)


class ClientFeature(Base):
    """Per-client clustering features the coordinator keeps between rounds, as a safetensors blob.

    kind 'root_b_ema' (``clustering.algorithm`` 'lsac-paper'): per target, the EMA over the root
    rounds of the client's uploaded B scaled to unit Frobenius norm (float32, named by target);
    ``rounds`` is how many root uploads it has averaged. Replaced (new blob) every root round the
    client is aggregated in; deleted with the client. Garbage collection keeps the blob while a
    row refers to it and frees superseded ones (kind 'client_feature')."""

    __tablename__ = "client_features"
    __table_args__ = (UniqueConstraint("client_id", "kind", name="uq_client_features_client_kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    federation_id: Mapped[int] = mapped_column(ForeignKey("federations.id", ondelete="CASCADE"), index=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))  # root_b_ema
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    rounds: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
