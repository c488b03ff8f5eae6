"""Admin actions on a running federation, each recorded in the audit table:
revoke a client, pause and resume a federation, move a round's deadline.

Contracts:
- ``revoke_client``: the client's token is refused from now on (403 ``revoked``); its pending and
  leased tasks are cancelled, so its live leases end and any later upload is refused; its done
  tasks and every aggregate it contributed to are kept. Revoking twice is a 409.
- ``pause_federation``: no scheduler transition and no new lease until resumed; live leases may
  still finish. ``resume_federation`` pushes the deadlines of open rounds back by the paused time.
- ``set_round_deadline``: only an open round; the new deadline must be in the future (and at
  most a year ahead).
- ``change_schedule``: schedule fields of a live federation, validated as at creation; a round
  count below what the current stage has done is a 409; effective from the next round.
- ``rotate_enrollment_secret``: a new random secret (returned once, stored hashed); the old one
  stops working; registered clients keep their tokens.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from coordinator.errors import Conflict, Invalid, NotFound
from coordinator.models import AdapterVersion, AuditEvent, Client, Cluster, Federation, Round, Task
from coordinator.security import hash_secret, new_secret
from coordinator.services.federations import federation_config, get_federation
from coordinator.services.tasks import task_status_may_become
from shared.config import FederationConfig
from shared.states import ClientStatus, FederationState, Machine, RoundStatus, Stage, TaskStatus, move

MAX_DEADLINE_AHEAD = timedelta(days=366)


def audit(session: Session, now: datetime, action: str, federation_id: int | None, target: str | None,
          detail: dict | None = None, actor: str = "admin") -> AuditEvent:
    event = AuditEvent(at=now, actor=actor, action=action, federation_id=federation_id, target=target,
                       detail=detail or {})
    session.add(event)
    session.flush()
    return event


def audit_events(session: Session, federation_id: int | None = None, limit: int = 200) -> list[AuditEvent]:
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if federation_id is not None:
        query = query.where(AuditEvent.federation_id == federation_id)
    return list(session.scalars(query))


def revoke_client(session: Session, federation_id: int, client_id: int, now: datetime,
                  reason: str = "") -> dict:
    # The federation's row lock: the scheduler holds it while it opens rounds, so a round opened
    # concurrently is committed before this runs, and its task for this client is cancelled below
    # (without it, on Postgres, that task stayed pending for a revoked client and the round waited).
    get_federation(session, federation_id, lock=True)
    client = session.get(Client, client_id)
    if client is None or client.federation_id != federation_id:
        raise NotFound(f"client {client_id} is not in federation {federation_id}", code="client_not_found")
    if client.status == ClientStatus.revoked:
        raise Conflict(f"client {client_id} is already revoked", code="already_revoked")
    move(Machine.client, client, ClientStatus.revoked)
    cancelled = session.execute(
        update(Task).where(Task.client_id == client_id, task_status_may_become(TaskStatus.cancelled))
        .values(status=TaskStatus.cancelled, lease_expires_at=None, finished_at=now,
                error="the client was revoked")
    ).rowcount or 0
    audit(session, now, "revoke_client", federation_id, f"client:{client_id}",
          {"name": client.name, "reason": reason[:500], "tasks_cancelled": cancelled})
    return {"client_id": client_id, "name": client.name, "status": client.status.value, "tasks_cancelled": cancelled}


def pause_federation(session: Session, federation_id: int, now: datetime, reason: str = "") -> Federation:
    fed = get_federation(session, federation_id, lock=True)
    if fed.paused_at is not None:
        raise Conflict(f"federation {federation_id} is already paused", code="already_paused")
    fed.paused_at = now
    fed.paused_reason = reason[:500] or "paused by an admin"
    fed.updated_at = now
    audit(session, now, "pause", federation_id, f"federation:{federation_id}", {"reason": reason[:500]})
    return fed


def resume_federation(session: Session, federation_id: int, now: datetime) -> Federation:
    fed = get_federation(session, federation_id, lock=True)
    if fed.paused_at is None:
        raise Conflict(f"federation {federation_id} is not paused", code="not_paused")
    paused_for = now - fed.paused_at
    moved = 0
    for rnd in session.scalars(select(Round).where(Round.federation_id == federation_id,
                                                   Round.status == RoundStatus.open,
                                                   Round.deadline_at.is_not(None))):
        rnd.deadline_at = rnd.deadline_at + paused_for
        moved += 1
    detail = {"paused_seconds": paused_for.total_seconds(), "deadlines_moved": moved,
              "paused_reason": fed.paused_reason, "failures_cleared": fed.failure_count}
    fed.paused_at = None
    fed.paused_reason = None
    fed.failure_count = 0  # the admin has seen the failures: the scheduler tries afresh
    fed.updated_at = now
    audit(session, now, "resume", federation_id, f"federation:{federation_id}", detail)
    return fed


def set_round_deadline(session: Session, round_id: int, now: datetime, *, deadline_at: datetime | None = None,
                       extend_seconds: float | None = None) -> Round:
    """Set (``deadline_at``) or extend (``extend_seconds``, from the current deadline or from now)
    the deadline of an open round. Exactly one of the two."""
    if (deadline_at is None) == (extend_seconds is None):
        raise Invalid("give exactly one of deadline_at and extend_seconds", code="bad_deadline")
    rnd = session.get(Round, round_id, with_for_update=True)
    if rnd is None:
        raise NotFound(f"round {round_id} does not exist", code="round_not_found")
    if rnd.status != RoundStatus.open:
        raise Conflict(f"round {round_id} is {rnd.status}: only an open round has a deadline to move",
                       code="round_closed")
    old = rnd.deadline_at
    if extend_seconds is not None:
        if extend_seconds <= 0:
            raise Invalid("extend_seconds must be positive", code="bad_deadline")
        new = max(old or now, now) + timedelta(seconds=extend_seconds)
    else:
        if deadline_at.tzinfo is None:
            raise Invalid("deadline_at needs a timezone (e.g. 2026-01-01T12:00:00Z)", code="bad_deadline")
        if deadline_at <= now:
            raise Invalid("deadline_at must be in the future", code="bad_deadline")
        new = deadline_at
    if new > now + MAX_DEADLINE_AHEAD:
        raise Invalid(f"a deadline is at most {MAX_DEADLINE_AHEAD.days} days ahead", code="bad_deadline")
    rnd.deadline_at = new
    audit(session, now, "set_deadline", rnd.federation_id, f"round:{round_id}",
          {"old": old.isoformat() if old else None, "new": new.isoformat()})
    return rnd


def rotate_enrollment_secret(session: Session, federation_id: int, now: datetime, reason: str = "") -> str:
    fed = get_federation(session, federation_id, lock=True)
    secret = new_secret("hle")
    fed.enrollment_secret_hash = hash_secret(secret)
    fed.updated_at = now
    audit(session, now, "rotate_secret", federation_id, f"federation:{federation_id}", {"reason": reason[:500]})
    return secret


# the schedule field that counts the rounds of the stage a federation is in
STAGE_ROUNDS_FIELD = {FederationState.root: ("root_rounds", Stage.root),
                      FederationState.cluster: ("cluster_rounds", Stage.cluster),
                      FederationState.leaf: ("leaf_rounds", Stage.leaf)}


def request_cycle(session: Session, federation_id: int, now: datetime, reason: str = "") -> Federation:
    """Ask for the next cycle (docs/operations.md, "Cycles"); the scheduler starts it once the
    federation serves and nothing runs (final evaluation and onboardings done). A request while a
    cycle runs waits for that cycle to end. Audited.

    MUST fail: 404 unknown federation; 409 ``not_started`` while enrolling; 409 ``nothing_to_cycle``
    for a federation with no cluster tier and no ``schedule.cycle_root_rounds``."""
    fed = get_federation(session, federation_id, lock=True)
    if fed.state == FederationState.enrolling:
        raise Conflict(f"federation {federation_id} has not started training: there is no cycle to run yet",
                       code="not_started")
    cfg = federation_config(fed)
    if not cfg.cluster.enabled and cfg.schedule.cycle_root_rounds == 0:
        raise Conflict("a cycle reprobes and reclusters the clients, and this federation has no cluster tier and "
                       "no schedule.cycle_root_rounds: set cycle_root_rounds for cycles of root rounds",
                       code="nothing_to_cycle")
    if fed.cycle_requested_at is None:
        fed.cycle_requested_at = now
    fed.updated_at = now
    audit(session, now, "request_cycle", federation_id, f"federation:{federation_id}",
          {"cycle": (fed.cycle or 0) + 1, "state": str(fed.state), "reason": reason})
    return fed


def pin_cluster(session: Session, federation_id: int, label: int, version: int | None, now: datetime,
                reason: str = "") -> Cluster:
    """Serve version ``version`` of cluster ``label``'s adapter (a pin, or a rollback to an older
    one), or its newest again (``version`` None). What clients use from then on follows it: leaf,
    evaluation and onboarding rounds opened afterwards, ``GET /v1/clients/C/adapters``, exports and
    refinement candidates; rounds already open keep the version they were opened with, and the
    cluster's own rounds (cluster stage) train on from its newest. Audited ('pin' or 'unpin').

    MUST fail: 404 for an unknown federation or label; 422 ``unknown_version`` for a version number
    the cluster does not have."""
    get_federation(session, federation_id, lock=True)
    cluster = session.scalars(select(Cluster).where(Cluster.federation_id == federation_id,
                                                    Cluster.label == label)).first()
    if cluster is None:
        raise NotFound(f"federation {federation_id} has no cluster with label {label}", code="cluster_not_found")
    before = session.get(AdapterVersion, cluster.pinned_version_id) if cluster.pinned_version_id else None
    target = None
    if version is not None:
        target = session.scalars(select(AdapterVersion).where(
            AdapterVersion.federation_id == federation_id, AdapterVersion.scope == f"cluster:{cluster.id}",
            AdapterVersion.version == version)).first()
        if target is None:
            newest = session.scalar(select(func.max(AdapterVersion.version)).where(
                AdapterVersion.federation_id == federation_id, AdapterVersion.scope == f"cluster:{cluster.id}"))
            raise Invalid(f"cluster {label} has no adapter version {version} (its versions are 0..{newest})",
                          code="unknown_version")
    cluster.pinned_version_id = target.id if target is not None else None
    audit(session, now, "pin" if target is not None else "unpin", federation_id, f"cluster:{cluster.id}",
          {"label": label, "version": version, "before": before.version if before is not None else None,
           "reason": reason})
    session.flush()
    return cluster


def change_schedule(session: Session, federation_id: int, changes: dict[str, Any], now: datetime,
                    reason: str = "") -> tuple[Federation, dict[str, list]]:
    """Change schedule fields of a live federation (``clients_per_round`` may be given in part).
    The merged config is validated exactly as at creation (422 ``invalid_schedule``); a round count
    below the rounds the current stage has already done is refused (409 ``stage_passed``: lowering
    it would end the stage behind the admin's back). Takes effect from the next round the scheduler
    opens or decides: an open round keeps its quorum, deadline and drawn clients. Returns the
    federation and the changes made ({field: [before, after]}); audited as ``change_schedule``."""
    fed = get_federation(session, federation_id, lock=True)
    if not changes:
        raise Invalid("give at least one schedule field to change", code="invalid_schedule")
    current = federation_config(fed)
    before = current.schedule.model_dump(mode="json")
    merged = dict(before)
    for key, value in changes.items():
        part = before.get(key)
        merged[key] = {**part, **value} if isinstance(part, dict) and isinstance(value, dict) else value
    try:
        new = FederationConfig.model_validate({**current.model_dump(mode="json"), "schedule": merged})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:8])
        raise Invalid(f"the schedule would not be valid: {problems}", code="invalid_schedule") from None
    after = new.schedule.model_dump(mode="json")
    state = FederationState(fed.state)
    if state in STAGE_ROUNDS_FIELD:
        field, stage = STAGE_ROUNDS_FIELD[state]
        done = max((n for (n,) in session.execute(
            select(func.count()).select_from(Round).where(
                Round.federation_id == fed.id, Round.stage == stage, Round.status == RoundStatus.done)
            .group_by(Round.scope))), default=0)
        if after[field] < done and after[field] != before[field]:
            raise Conflict(f"the {state.value} stage has done {done} rounds; {field} cannot go below that "
                           f"(it would end the stage at once): give at least {done}", code="stage_passed")
    diff = {k: [before[k], after[k]] for k in after if before.get(k) != after[k]}
    if diff:
        fed.config = new.model_dump(mode="json")
        fed.updated_at = now
    audit(session, now, "change_schedule", federation_id, f"federation:{federation_id}",
          {"changes": diff, "reason": reason[:500]})
    return fed, diff
