"""Pydantic models of every JSON request and response: the wire contract of ``/v1``.

Tensor bodies are not here: they travel as safetensors (see ``shared.tensors``) and are checked
against the federation's adapter manifest.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.config import FederationConfig, Training

PROTOCOL_HEADER = "X-Hilora-Protocol"
WORKER_ID_HEADER = "X-Hilora-Worker-Id"
SHA256_HEADER = "X-Hilora-Sha256"

Stage = Literal["root", "probe", "cluster", "leaf"]


class FederationState(str, Enum):
    """Life of a federation. Transitions only go forward, in this order:

    - ``enrolling``: clients register; training starts at ``schedule.min_clients`` or on admin start.
    - ``root``: root rounds (aggregated over all clients) until ``root_rounds`` or rho <= tau.
    - ``probe``: one round in which every client trains from the final root; not aggregated;
      LSAC clusters the probes when it completes.
    - ``cluster``: each cluster trains its adapter for ``cluster_rounds`` rounds (root frozen).
    - ``leaf``: every client trains its private leaf for ``leaf_rounds`` rounds; metrics only.
    - ``serving``: training is over; a newly registered client is onboarded
      (probe -> assignment -> leaf rounds).
    """

    enrolling = "enrolling"
    root = "root"
    probe = "probe"
    cluster = "cluster"
    leaf = "leaf"
    serving = "serving"


class TaskStatus(str, Enum):
    """A task: pending -> leased -> done; leased -> pending when its lease expires (attempt < max)
    or its worker releases it; leased -> failed when its lease expires at the last attempt;
    pending|leased -> cancelled when its round is decided at the deadline without it.
    done, failed and cancelled are terminal."""

    pending = "pending"
    leased = "leased"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable reason, e.g. 'wrong_shape', 'stale_lease'")
    detail: str = Field(description="what was wrong, in words")


class VersionInfo(BaseModel):
    version: str
    protocol: int


class FederationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: FederationConfig


class FederationCreated(BaseModel):
    federation_id: int
    name: str
    state: FederationState
    enrollment_secret: str = Field(description="shown once; clients register with it")


class RoundInfo(BaseModel):
    id: int
    stage: Stage
    scope: str
    number: int
    status: str
    tasks_total: int
    tasks_done: int
    tasks_failed: int
    tasks_cancelled: int = 0
    quorum: int | None = Field(default=None, description="accepted uploads this round needs to aggregate")
    deadline_at: datetime | None = None
    failure: str | None = Field(default=None, description="why the round failed, in words")
    rho: float | None = None
    created_at: datetime
    closed_at: datetime | None = None


class ClusterInfo(BaseModel):
    id: int
    label: int
    members: list[str]
    adapter_version: int | None = None


class ClusteringRunInfo(BaseModel):
    id: int
    k: int
    features: str
    num_clients: int
    eigengaps: list[float]
    contrast_ratio: float | None
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
    paused_at: datetime | None = Field(default=None, description="set while an admin has paused the federation")


class AdminNote(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=500, description="recorded in the audit table")


class DeadlineChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    deadline_at: datetime | None = Field(default=None, description="new deadline (with a timezone)")
    extend_seconds: float | None = Field(default=None, gt=0, le=30 * 86400,
                                         description="push the deadline (or now, if it has none) back")


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
    num_samples: int = Field(default=0, ge=0)


class ClientRegistered(BaseModel):
    federation_id: int
    client_id: int
    name: str
    token: str = Field(description="shown once; the client's credential")
    cohort: Literal["train", "late"]


class AdapterRef(BaseModel):
    id: int
    tier: Literal["root", "cluster"]
    version: int
    sha256: str


class ClientAdapters(BaseModel):
    """The newest adapter versions a client's model is made of (its leaf stays on its worker)."""

    root: AdapterRef | None
    cluster: AdapterRef | None = Field(description="newest version of the client's cluster; null without one")


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
    trainable: list[str] = Field(description="factors of train_tier that train: A, B, head")
    upload: list[str] = Field(description="factors of train_tier to upload; empty: metrics only")
    local: list[str] = Field(description="factors the client keeps between rounds (never uploaded)")
    reset_leaf: bool = False
    training: Training


class LeaseResponse(BaseModel):
    task: TaskAssignment | None
    retry_after: float
    federation_state: FederationState
    client_state: Literal["waiting", "training", "onboarding", "ready", "revoked", "paused"]


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lease_id: str


class HeartbeatAck(BaseModel):
    lease_expires_at: datetime


class UploadAck(BaseModel):
    task_id: int
    sha256: str
    bytes: int


class TaskComplete(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lease_id: str
    num_samples: int = Field(ge=1, le=10**9)
    metrics: dict[str, float] = Field(default_factory=dict)


class TaskCompleted(BaseModel):
    task_id: int
    status: TaskStatus


class ClientReport(BaseModel):
    client_id: int
    name: str
    cohort: str
    cluster_label: int | None
    num_samples: int
    metrics: dict[str, float] = Field(description="latest value of each metric the worker reported")
    zero_shot: float | None = Field(default=None, description="root+cluster accuracy when assigned")
    uploaded_bytes: int


class FederationReport(BaseModel):
    federation_id: int
    name: str
    state: FederationState
    clustering: ClusteringRunInfo | None
    clients: list[ClientReport]
    uploaded_bytes: int
    rounds: list[RoundInfo]

