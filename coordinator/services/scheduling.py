"""The scheduler: opens rounds, aggregates finished ones and moves federations through their stages.

``advance_federation`` is called by the coordinator's background loop (and by tests, with an
injected ``now``). Each call makes every transition that is due and returns how many it made; it
is idempotent when nothing is due. Stage order: enrolling -> root -> probe -> cluster -> leaf ->
serving (``shared.states.FederationState``; a stage the schedule leaves out is skipped). Every
state change goes through the transition table (``shared.states.move``). Late clients are
onboarded while serving: waiting -> probe -> leaf -> ready (``Client.onboarding``).

The final evaluation: workers evaluate the adapters a root or cluster task hands them before
training them, so the last version of those stages is measured by the next stage's tasks. Leaf
tasks evaluate root + cluster + leaf after training, so a federation that ends with leaf rounds
has measured its final versions. One that ends with a root or cluster stage (no leaf rounds: the
flat baselines) would never evaluate its final adapters, so when its training ends (the step into
serving) the scheduler opens one evaluation round (stage 'eval') per cluster of the active training
clients, like the leaf rounds (scope 'eval:<cluster id>', or 'eval:none' for clients without a
cluster), on the final root and cluster versions: workers evaluate root, root + cluster and root +
cluster + their leaf if they have one, and report metrics only. Eval rounds
are decided while serving, like leaf rounds, and never reopened.

Quorum and deadlines (``shared.config.Schedule``): a root, cluster or probe round is decided when
all its tasks are terminal, at its deadline, or as soon as its quorum can no longer be reached. It
aggregates only when at least ``Round.quorum`` tasks are done; otherwise it is recorded as failed
(with the reason) and a fresh round with fresh tasks opens. Tasks still open when a round is decided
are cancelled, so a late upload for them is refused. Leaf and eval rounds aggregate nothing: they
close when all tasks are terminal or at the deadline, done with at least one done task, else failed.
A round's deadline is a fixed age (``round_deadline_seconds``) or, by default, 'auto'
(``shared.deadlines``): set when the round opens from how long the federation's recent tasks took,
or, for a round opened without that history, once half its tasks are done.

Several replicas may run this loop; ``scheduler_tick`` takes a Postgres advisory lock so exactly
one runs a tick at a time, and each federation is advanced under a row lock of the federation.

Isolation: each federation is advanced in its own transaction, and an exception while advancing
one rolls back that transaction only; it is recorded on the federation (``failure_count``,
``last_failure``: the error, in the stage it happened), logged with the federation's id, counted
(``hilora_scheduler_failures``), and the tick goes on with the next federation. After
``MAX_CONSECUTIVE_FAILURES`` failing ticks in a row the scheduler pauses the federation with the
reason (``paused_reason``, an audit event 'auto_pause'), so it is not retried every tick; an
admin's resume clears the record. Aggregation itself does not fail on accepted input: an upload
whose contribution leaves the float32 range is quarantined (``coordinator.services.aggregation``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from coordinator.blobs import BlobStore
from coordinator.errors import Conflict
from coordinator.faults import fault_point
from coordinator.logs import log_context
from coordinator.metrics import observe_scheduler_failure
from coordinator.models import Assignment, Client, Cluster, ClusteringRun, Federation, Round, Task
from coordinator.services.adapters import latest_version, serving_version
from coordinator.services.admin_actions import audit
from coordinator.services.aggregation import aggregate_round
from coordinator.services.clustering import (
    REFINE,
    assign_late_client,
    assign_late_client_by_loss,
    cluster_probes,
    recluster_cycle,
    refine_clusters,
    unassigned_client_ids,
)
from coordinator.services.federations import federation_config, get_federation
from coordinator.services.tasks import (
    LEASABLE_FOR,
    count_tasks,
    expire_leases,
    note_leasable,
    refine_candidates,
    task_status_may_become,
)
from shared import deadlines, sampling
from shared.config import FederationConfig
from shared.states import (
    ClientStatus,
    Cohort,
    FederationState,
    Machine,
    Onboarding,
    RoundStatus,
    ScopeKind,
    Stage,
    TaskStatus,
    enter,
    move,
    scope,
    scope_pattern,
    terminal,
)

TERMINAL = terminal(Machine.task)  # done, failed, cancelled
OPEN = tuple(s for s in TaskStatus if s not in TERMINAL)  # pending, leased: a round waits for these
QUORUM_STAGES = (Stage.root, Stage.cluster, Stage.probe)
ROOT, ALL = scope(ScopeKind.root), scope(ScopeKind.all)
MAX_TRANSITIONS_PER_CALL = 64
MAX_CONSECUTIVE_FAILURES = 3  # failing ticks in a row before the scheduler pauses a federation
MAX_FAILURE_TEXT = 2000
log = logging.getLogger(__name__)
SCHEDULER_LOCK_KEY = 0x68696C6F7261  # 'hilora': the Postgres advisory lock of scheduler ticks


def open_round(session: Session, fed: Federation, stage: Stage, scope: str, client_ids: list[int],
               now: datetime, root_version_id: int | None, cluster_version_id: int | None = None,
               reset_leaf: bool = False, sample: bool = False) -> Round:
    """Open the next round of (stage, scope) with one pending task per client; with ``sample``
    (root and cluster rounds) one per client drawn by ``schedule.clients_per_round``."""
    stage = Stage(stage)
    last = session.scalar(select(func.max(Round.number)).where(
        Round.federation_id == fed.id, Round.stage == stage, Round.scope == scope))
    cfg = federation_config(fed)
    schedule = cfg.schedule
    sample_seed = sampled_from = None
    if sample and schedule.clients_per_round.samples and client_ids:
        per_round = schedule.clients_per_round
        sample_seed = sampling.round_seed(cfg.training.seed, stage.value, scope, (last or 0) + 1)
        sampled_from = len(client_ids)
        client_ids = sampling.draw(client_ids, sampling.sample_size(
            len(client_ids), per_round.fraction, per_round.min, per_round.max), sample_seed)
    if schedule.round_deadline_seconds == "auto":
        deadline = deadlines.from_history(now, _longest_recent_task(session, fed), schedule.lease_seconds,
                                          schedule.max_attempts)
    elif schedule.round_deadline_seconds:
        deadline = now + timedelta(seconds=schedule.round_deadline_seconds)
    else:
        deadline = None
    rnd = Round(federation_id=fed.id, stage=stage, scope=scope, number=(last or 0) + 1, cycle=fed.cycle or 0,
                status=enter(Machine.round, RoundStatus.open),
                input_root_version_id=root_version_id, input_cluster_version_id=cluster_version_id,
                quorum=schedule.quorum(len(client_ids)) if stage in QUORUM_STAGES else None,
                deadline_at=deadline, sample_seed=sample_seed, sampled_from=sampled_from, created_at=now)
    session.add(rnd)
    session.flush()
    if client_ids:  # one multi-row INSERT (ORM bulk), not one ORM object per task
        session.execute(insert(Task), [
            dict(round_id=rnd.id, federation_id=fed.id, client_id=cid, stage=stage,
                 status=enter(Machine.task, TaskStatus.pending),
                 attempt=0, releases=0, upload_bytes=0, reset_leaf=reset_leaf, created_at=now)
            for cid in sorted(client_ids)])
        note_leasable(session, client_ids)
    fault_point("round_open")
    return rnd


def _longest_recent_task(session: Session, fed: Federation) -> float | None:
    """Seconds from its round's opening to its end of the slowest done task in the federation's
    last ``deadlines.HISTORY_ROUNDS`` done rounds (final evaluation rounds, which only evaluate, left
    out); None before any."""
    recent = list(session.execute(
        select(Round.id, Round.created_at).where(Round.federation_id == fed.id, Round.status == RoundStatus.done,
                                                 Round.stage != Stage.eval)
        .order_by(Round.id.desc()).limit(deadlines.HISTORY_ROUNDS)))
    if not recent:
        return None
    opened = dict(recent)
    rows = session.execute(select(Task.round_id, func.max(Task.finished_at)).where(
        Task.round_id.in_(list(opened)), Task.status == TaskStatus.done).group_by(Task.round_id))
    took = [(finished - opened[rid]).total_seconds() for rid, finished in rows if finished is not None]
    return max(took) if took else None


def _refresh_auto_deadline(session: Session, rnd: Round, counts: dict[str, int], now: datetime) -> None:
    """The 'half' rule of an 'auto' deadline (``shared.deadlines``): a round opened without history
    gets its deadline once half its tasks are done, while others are still open."""
    if rnd.deadline_at is not None or rnd.status != RoundStatus.open:
        return
    schedule = federation_config(session.get(Federation, rnd.federation_id)).schedule
    if schedule.round_deadline_seconds != "auto":
        return
    need = deadlines.half_needed(sum(counts.values()))
    still_open = sum(counts.get(s, 0) for s in OPEN)
    if not need or not still_open or counts.get(TaskStatus.done.value, 0) < need:
        return
    half_done_at = session.scalar(select(Task.finished_at).where(
        Task.round_id == rnd.id, Task.status == TaskStatus.done, Task.finished_at.is_not(None))
        .order_by(Task.finished_at, Task.id).offset(need - 1).limit(1))
    if half_done_at is not None:
        rnd.deadline_at = deadlines.from_half(rnd.created_at, half_done_at, now, schedule.lease_seconds,
                                              schedule.max_attempts)


def _round_verdict(session: Session, rnd: Round, now: datetime) -> tuple[str, dict[str, int]]:
    """The round's verdict now (``_verdict``), after its 'auto' deadline is brought up to date."""
    counts = count_tasks(session, rnd.id)
    _refresh_auto_deadline(session, rnd, counts, now)
    return _verdict(rnd, counts, now), counts


def _training_clients(session: Session, fed: Federation) -> list[Client]:
    """The active clients that train: the training cohort, and late clients taking part in a cycle
    (onboarding 'cycle'), less the inactive ones (``_record_participation``)."""
    trains = (Client.cohort == Cohort.train) | ((Client.cohort == Cohort.late) & (Client.onboarding == Onboarding.cycle))
    return list(session.scalars(
        select(Client).where(Client.federation_id == fed.id, Client.status == ClientStatus.active, trains,
                             Client.inactive_since.is_(None)).order_by(Client.id)))


def _latest_round(session: Session, fed: Federation, stage: Stage, scope: str) -> Round | None:
    """The newest round of (stage, scope) in the federation's current cycle."""
    return session.scalars(
        select(Round).where(Round.federation_id == fed.id, Round.stage == stage, Round.scope == scope,
                            Round.cycle == (fed.cycle or 0))
        .order_by(Round.number.desc()).limit(1)).first()


def _done_rounds(session: Session, fed: Federation, stage: Stage, scope: str) -> int:
    """Done rounds of (stage, scope) in the federation's current cycle."""
    return session.scalar(select(func.count()).select_from(Round).where(
        Round.federation_id == fed.id, Round.stage == stage, Round.scope == scope,
        Round.cycle == (fed.cycle or 0), Round.status == RoundStatus.done)) or 0


def _refine_pass(session: Session, rnd: Round) -> int:
    """Which refinement of its cycle a refine round of all clients is (1, 2, ...)."""
    return session.scalar(select(func.count()).select_from(Round).where(
        Round.federation_id == rnd.federation_id, Round.stage == Stage.refine, Round.scope == ALL,
        Round.cycle == rnd.cycle, Round.number <= rnd.number)) or 0


WAIT, AGGREGATE, FAIL = "wait", "aggregate", "fail"


def _verdict(rnd: Round, counts: dict[str, int], now: datetime) -> str:
    """What the round's task counts call for, without acting on it: WAIT while open tasks can
    still matter (before the deadline, with the quorum still reachable); else AGGREGATE with the
    quorum done (leaf and eval rounds: at least one), else FAIL."""
    done = counts.get(TaskStatus.done.value, 0)
    still_open = sum(counts.get(s, 0) for s in OPEN)
    need = rnd.quorum if rnd.quorum is not None else 1
    at_deadline = rnd.deadline_at is not None and now >= rnd.deadline_at
    if still_open and not at_deadline and done + still_open >= need:
        return WAIT
    return AGGREGATE if done >= need else FAIL


def _decide(session: Session, rnd: Round, now: datetime) -> str:
    """WAIT, AGGREGATE (close as done; for root/cluster rounds: aggregate the done tasks) or FAIL.

    Deciding cancels the round's open tasks and, on FAIL, records the reason on the round."""
    verdict, counts = _round_verdict(session, rnd, now)
    if verdict == WAIT:
        return WAIT
    still_open = sum(counts.get(s, 0) for s in OPEN)
    if still_open:
        session.execute(update(Task).where(Task.round_id == rnd.id, task_status_may_become(TaskStatus.cancelled))
                        .values(status=TaskStatus.cancelled, lease_expires_at=None, finished_at=now,
                                error="the round was decided without this task"))
    if verdict == FAIL:
        at_deadline = rnd.deadline_at is not None and now >= rnd.deadline_at
        why = "the deadline passed" if at_deadline and still_open else (
            "too few tasks can still finish" if still_open else "all tasks ended")
        rnd.failure = (f"{why} with {counts.get(TaskStatus.done.value, 0)} accepted of {sum(counts.values())}; "
                       f"the quorum is {rnd.quorum if rnd.quorum is not None else 1}")
    return verdict


def _set_state(fed: Federation, state: FederationState, now: datetime) -> None:
    move(Machine.federation, fed, state)
    fed.updated_at = now


def _root_version_id(session: Session, fed: Federation) -> int:
    return latest_version(session, fed.id, ROOT).id


def start_training(session: Session, fed: Federation, cfg: FederationConfig, now: datetime) -> None:
    clients = _training_clients(session, fed)
    if not clients:
        raise Conflict("no client is registered: nothing to train", code="no_clients")
    if cfg.schedule.root_rounds > 0:
        _set_state(fed, FederationState.root, now)
        open_round(session, fed, Stage.root, ROOT, [c.id for c in clients], now, _root_version_id(session, fed),
                   sample=True)
    else:
        _enter_probe_or_leaf(session, fed, cfg, now)


def _enter_probe_or_leaf(session: Session, fed: Federation, cfg: FederationConfig, now: datetime) -> None:
    clients = [c.id for c in _training_clients(session, fed)]
    if cfg.cluster.enabled:
        _set_state(fed, FederationState.probe, now)
        open_round(session, fed, Stage.probe, ALL, clients, now, _root_version_id(session, fed))
    else:
        _enter_leaf(session, fed, cfg, now)


def _enter_leaf(session: Session, fed: Federation, cfg: FederationConfig, now: datetime) -> None:
    needing = _needs_leaf(session, fed) if fed.cycle else None
    if cfg.schedule.leaf_rounds > 0 and needing != set():
        _set_state(fed, FederationState.leaf, now)
        _open_leaf_rounds(session, fed, now, first=True, only=needing)
    else:
        _finish_training(session, fed, now)


def _finish_training(session: Session, fed: Federation, now: datetime, after_leaf: bool = False) -> None:
    """Training is over: open the final evaluation rounds (unless the last stage was the leaf
    stage, whose tasks evaluated every final version after training; a cycle always evaluates
    everyone, since its leaf rounds were only for clients that moved or are new), then serve. Late
    clients that took part in the cycle are ready."""
    if not after_leaf or fed.cycle:
        _open_per_cluster_rounds(session, fed, now, Stage.eval, ScopeKind.eval)
    for client in session.scalars(select(Client).where(Client.federation_id == fed.id,
                                                       Client.onboarding == Onboarding.cycle)):
        move(Machine.onboarding, client, Onboarding.ready)
    fed.serving_since = now
    _set_state(fed, FederationState.serving, now)


def _open_per_cluster_rounds(session: Session, fed: Federation, now: datetime, stage: Stage, kind: ScopeKind,
                             reset_leaf: bool = False, only: set[int] | None = None) -> None:
    """Open a round of ``stage`` for the active training clients. A round's inputs name one
    cluster adapter, so it is one round per cluster (scope '<kind>:<cluster id>', on that
    cluster's newest version) plus one for clients without a cluster ('<kind>:none'); together
    they are one round of the federation."""
    root_id = _root_version_id(session, fed)
    groups: dict[int | None, list[int]] = {}
    for c in _training_clients(session, fed):
        if only is None or c.id in only:
            groups.setdefault(c.cluster_id, []).append(c.id)
    for cluster_id, members in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        cluster_version = serving_version(session, session.get(Cluster, cluster_id)) if cluster_id else None
        open_round(session, fed, stage, scope(kind, cluster_id or None), members, now,
                   root_id, cluster_version.id if cluster_version else None, reset_leaf=reset_leaf)


def _open_leaf_rounds(session: Session, fed: Federation, now: datetime, first: bool,
                      only: set[int] | None = None) -> None:
    """Open the next leaf round (one per cluster: 'leaf:<cluster id>', 'leaf:none'); in a cycle, of
    the clients that need a new leaf (``_needs_leaf``, computed here unless given)."""
    if only is None and fed.cycle:
        only = _needs_leaf(session, fed)
    _open_per_cluster_rounds(session, fed, now, Stage.leaf, ScopeKind.leaf, reset_leaf=first, only=only)


def _needs_leaf(session: Session, fed: Federation) -> set[int]:
    """A cycle's leaf rounds are for the training clients whose cluster this cycle changed (their
    leaf was trained on top of another cluster) and for those without a leaf from an earlier cycle
    (newcomers). Judged on earlier cycles only, so the set stays the same for all the cycle's leaf
    rounds. Two queries, whatever the number of clients."""
    clients = _training_clients(session, fed)
    ids = [c.id for c in clients]
    with_leaf = set(session.scalars(
        select(Task.client_id).join(Round, Round.id == Task.round_id)
        .where(Task.client_id.in_(ids), Task.stage == Stage.leaf, Task.status == TaskStatus.done,
               Round.cycle < fed.cycle).distinct()))
    newest = (select(func.max(Assignment.id).label("id"))
              .where(Assignment.client_id.in_(ids), Assignment.cycle < fed.cycle)
              .group_by(Assignment.client_id).subquery())
    before = dict(session.execute(select(Assignment.client_id, Assignment.cluster_id)
                                  .join(newest, newest.c.id == Assignment.id)).all())
    return {c.id for c in clients
            if c.id not in with_leaf or before.get(c.id, None) != c.cluster_id}


def advance_federation(session: Session, blobs: BlobStore, federation_id: int, now: datetime) -> int:
    """Make every transition of one federation that is due. Returns how many were made."""
    fed = get_federation(session, federation_id, lock=True)
    if fed.paused_at is not None:
        return 0
    cfg = federation_config(fed)
    if fed.failure_count:  # this attempt got this far after failed ones: the record starts over
        fed.failure_count = 0
    made = 0
    for _ in range(MAX_TRANSITIONS_PER_CALL):
        if not _advance_once(session, blobs, fed, cfg, now):
            break
        made += 1
        session.flush()
    return made


def _advance_once(session: Session, blobs: BlobStore, fed: Federation, cfg: FederationConfig,
                  now: datetime) -> bool:
    state = FederationState(fed.state)
    if state == FederationState.enrolling:
        if len(_training_clients(session, fed)) >= cfg.schedule.min_clients:
            start_training(session, fed, cfg, now)
            return True
        return False
    if state == FederationState.root:
        return _advance_root(session, blobs, fed, cfg, now)
    if state == FederationState.probe:
        return _advance_probe(session, blobs, fed, cfg, now)
    if state == FederationState.cluster:
        return _advance_cluster(session, blobs, fed, cfg, now)
    if state == FederationState.leaf:
        return _advance_leaf(session, fed, cfg, now)
    return _advance_serving(session, blobs, fed, cfg, now)


def _close(session: Session, rnd: Round, status: RoundStatus, now: datetime) -> None:
    move(Machine.round, rnd, status)
    rnd.closed_at = now
    _record_participation(session, rnd, now)


def _record_participation(session: Session, rnd: Round, now: datetime) -> None:
    """Partial participation: a client with a done task in the closed round starts its count of
    missed rounds over; one whose task ended otherwise (failed, cancelled, never leased) adds one,
    and at ``schedule.max_consecutive_failures`` in a row it is marked inactive (``inactive_since``):
    no further task is opened for it until it asks for work again (``tasks.lease_task``)."""
    limit = federation_config(session.get(Federation, rnd.federation_id)).schedule.max_consecutive_failures
    if limit is None:
        return
    session.flush()
    in_round = select(Task.client_id).where(Task.round_id == rnd.id)
    done = in_round.where(Task.status == TaskStatus.done)
    missed = in_round.where(Task.status != TaskStatus.done)
    session.execute(update(Client).where(Client.id.in_(done), Client.missed_rounds != 0)
                    .values(missed_rounds=0).execution_options(synchronize_session=False))
    session.execute(update(Client).where(Client.id.in_(missed))
                    .values(missed_rounds=Client.missed_rounds + 1).execution_options(synchronize_session=False))
    gone = list(session.scalars(select(Client.id).where(
        Client.id.in_(missed), Client.missed_rounds >= limit, Client.inactive_since.is_(None))))
    if gone:
        session.execute(update(Client).where(Client.id.in_(gone)).values(inactive_since=now)
                        .execution_options(synchronize_session=False))
        log.info("federation %s: clients %s marked inactive after %d rounds in a row without an upload",
                 rnd.federation_id, gone, limit)
    for obj in list(session.identity_map.values()):  # keep loaded rows in step with the UPDATEs above
        if isinstance(obj, Client) and obj.federation_id == rnd.federation_id:
            session.expire(obj, ["missed_rounds", "inactive_since"])


def _advance_root(session: Session, blobs: BlobStore, fed: Federation, cfg: FederationConfig,
                  now: datetime) -> bool:
    rnd = _latest_round(session, fed, Stage.root, ROOT)
    if rnd is None or rnd.status != RoundStatus.open:
        return _open_root_round(session, fed, now, _root_version_id(session, fed))
    verdict = _decide(session, rnd, now)
    if verdict == WAIT:
        return False
    if verdict == FAIL:
        _close(session, rnd, RoundStatus.failed, now)
        _open_root_round(session, fed, now, rnd.input_root_version_id)
        return True
    version = aggregate_round(session, blobs, cfg, rnd, now)
    if version is None:  # quarantined uploads left the round below its quorum (rnd.failure says so)
        _close(session, rnd, RoundStatus.failed, now)
        _open_root_round(session, fed, now, rnd.input_root_version_id)
        return True
    rnd.result_version_id = version.id
    fed.last_rho = rnd.rho
    _close(session, rnd, RoundStatus.done, now)
    done_rounds = _done_rounds(session, fed, Stage.root, ROOT)
    converged = cfg.schedule.tau_rel > 0 and rnd.rho is not None and rnd.rho <= cfg.schedule.tau_rel
    wanted = cfg.schedule.cycle_root_rounds if fed.cycle else cfg.schedule.root_rounds
    if done_rounds >= wanted or converged:
        _enter_probe_or_leaf(session, fed, cfg, now)
    else:
        _open_root_round(session, fed, now, version.id)
    return True


def _open_root_round(session: Session, fed: Federation, now: datetime, root_version_id: int) -> bool:
    """Open the next root round, unless no training client is left (all revoked or deleted): a
    round without tasks fails at once, and reopening it would spin the scheduler forever. The
    round opens once a client registers again."""
    clients = [c.id for c in _training_clients(session, fed)]
    if not clients:
        return False
    open_round(session, fed, Stage.root, ROOT, clients, now, root_version_id, sample=True)
    return True


def _advance_probe(session: Session, blobs: BlobStore, fed: Federation, cfg: FederationConfig,
                   now: datetime) -> bool:
    rnd = _latest_round(session, fed, Stage.probe, ALL)
    clients = [c.id for c in _training_clients(session, fed)]
    if rnd.status != RoundStatus.open:  # the last one failed with no client left to ask (see _open_root_round)
        if not clients:
            return False
        open_round(session, fed, Stage.probe, ALL, clients, now, rnd.input_root_version_id)
        return True
    verdict = _decide(session, rnd, now)
    if verdict == WAIT:
        return False
    if verdict == FAIL:
        _close(session, rnd, RoundStatus.failed, now)
        if clients:
            open_round(session, fed, Stage.probe, ALL, clients, now, rnd.input_root_version_id)
        return True
    if fed.cycle:  # stable cluster ids and warm starts
        recluster_cycle(session, blobs, cfg, rnd, now)
    else:
        cluster_probes(session, blobs, cfg, rnd, now)
    _close(session, rnd, RoundStatus.done, now)
    if cfg.schedule.cluster_rounds > 0 and not _skips_single_cluster(session, fed, cfg):
        _set_state(fed, FederationState.cluster, now)
        for cluster in _clusters(session, fed):
            _open_cluster_round(session, fed, cluster, now)
    else:
        _enter_leaf(session, fed, cfg, now)
    return True


def _skips_single_cluster(session: Session, fed: Federation, cfg: FederationConfig) -> bool:
    """``clustering.skip_single_cluster``: the federation's first clustering found one cluster by its
    rule (not forced, not a manual assignment) and no refinement follows: the cluster stage is left
    out. Not in a cycle, whose one cluster starts from the adapters it merges, not from the root."""
    c = cfg.clustering
    if (not c.skip_single_cluster or fed.cycle or c.force_k is not None or c.algorithm == "manual"
            or c.refine_rounds):
        return False
    return len({client.cluster_id for client in _training_clients(session, fed)} - {None}) == 1


def _clusters(session: Session, fed: Federation) -> list[Cluster]:
    return list(session.scalars(select(Cluster).where(Cluster.federation_id == fed.id).order_by(Cluster.label)))


def _open_cluster_round(session: Session, fed: Federation, cluster: Cluster, now: datetime) -> Round | None:
    members = [c.id for c in _training_clients(session, fed) if c.cluster_id == cluster.id]
    if not members:
        return None
    cluster_scope = scope(ScopeKind.cluster, cluster.id)
    version = latest_version(session, fed.id, cluster_scope)
    return open_round(session, fed, Stage.cluster, cluster_scope, members, now,
                      _root_version_id(session, fed), version.id, sample=True)


def _stage_position(session: Session, fed: Federation, cluster: Cluster) -> int:
    """How far into the cluster stage a cluster is: its done rounds, plus, for a cluster a refinement
    made, the cluster rounds the stage had run before (that refinement's number), so that it trains
    only the stage's remaining rounds, as long as the clusters that existed from the start."""
    done = _done_rounds(session, fed, Stage.cluster, scope(ScopeKind.cluster, cluster.id))
    made_by = session.execute(select(ClusteringRun.algorithm, Round).join(
        Round, Round.id == ClusteringRun.probe_round_id).where(ClusteringRun.id == cluster.created_run_id)).first()
    if made_by is None or made_by[0] != REFINE or made_by[1].cycle != (fed.cycle or 0):
        return done
    return done + _refine_pass(session, made_by[1])


def _advance_cluster(session: Session, blobs: BlobStore, fed: Federation, cfg: FederationConfig,
                     now: datetime) -> bool:
    """The cluster stage: each cluster with members runs its rounds on its own; with
    ``clustering.refine_rounds`` R, after their k-th done round (k <= R) every cluster waits for the
    others, a refine round of all training clients runs, its reassignment is applied
    (``refine_clusters``), and the clusters with members go on. When no cluster round is open and no
    refinement is due, the leaf stage starts."""
    refinement = _latest_round(session, fed, Stage.refine, ALL)
    if refinement is not None and refinement.status == RoundStatus.open:
        verdict = _decide(session, refinement, now)
        if verdict == WAIT:
            return False
        if verdict == AGGREGATE:  # a cluster it makes is trained only if cluster rounds follow
            refine_clusters(session, blobs, cfg, refinement, now,
                            may_create=_refine_pass(session, refinement) < cfg.schedule.cluster_rounds)
        _close(session, refinement, RoundStatus.done if verdict == AGGREGATE else RoundStatus.failed, now)
        for cluster in _clusters(session, fed):
            if _stage_position(session, fed, cluster) < cfg.schedule.cluster_rounds:
                _open_cluster_round(session, fed, cluster, now)
        return True
    passes = _refine_pass(session, refinement) if refinement is not None else 0
    hold_at = passes + 1 if passes < cfg.clustering.refine_rounds else None  # the next refinement follows this round
    progressed = False
    any_open = False
    for cluster in _clusters(session, fed):
        cluster_scope = scope(ScopeKind.cluster, cluster.id)
        rnd = _latest_round(session, fed, Stage.cluster, cluster_scope)
        if rnd is None:
            # a cluster an admin's recluster made during this stage gets its cluster rounds too;
            # a cluster without members gets none
            if _open_cluster_round(session, fed, cluster, now) is not None:
                progressed = any_open = True
            continue
        if rnd.status != RoundStatus.open:
            continue
        verdict = _decide(session, rnd, now)
        if verdict == WAIT:
            any_open = True
            continue
        version = aggregate_round(session, blobs, cfg, rnd, now) if verdict != FAIL else None
        if version is None:  # failed, or quarantined uploads left it below its quorum
            _close(session, rnd, RoundStatus.failed, now)
        else:
            rnd.result_version_id = version.id
            _close(session, rnd, RoundStatus.done, now)
        progressed = True
        done = _stage_position(session, fed, cluster)
        if done < cfg.schedule.cluster_rounds and (hold_at is None or done < hold_at):
            if _open_cluster_round(session, fed, cluster, now) is not None:
                any_open = True
    if any_open:
        return progressed
    if hold_at is not None and refine_candidates(session, fed.id):
        clients = [c.id for c in _training_clients(session, fed)]
        open_round(session, fed, Stage.refine, ALL, clients, now, _root_version_id(session, fed))
        return True
    _enter_leaf(session, fed, cfg, now)
    return True


def _open_rounds(session: Session, fed: Federation, stage: Stage, kind: ScopeKind) -> list[Round]:
    return list(session.scalars(select(Round).where(
        Round.federation_id == fed.id, Round.stage == stage, Round.status == RoundStatus.open,
        Round.scope.like(scope_pattern(kind))).order_by(Round.id)))


def _close_without_quorum(session: Session, rnd: Round, now: datetime) -> None:
    """Close a decided leaf or eval round: done with at least one done task, else failed."""
    _close(session, rnd, RoundStatus.done if _decide(session, rnd, now) == AGGREGATE else RoundStatus.failed, now)


def _advance_leaf(session: Session, fed: Federation, cfg: FederationConfig, now: datetime) -> bool:
    open_rounds = _open_rounds(session, fed, Stage.leaf, ScopeKind.leaf)
    if not open_rounds:
        return False
    # the leaf rounds of a federation (one per cluster) close together
    if any(_round_verdict(session, r, now)[0] == WAIT for r in open_rounds):
        return False
    for rnd in open_rounds:
        _close_without_quorum(session, rnd, now)
    completed = max(_done_rounds(session, fed, Stage.leaf, r.scope) for r in open_rounds)
    if completed >= cfg.schedule.leaf_rounds:
        _finish_training(session, fed, now, after_leaf=True)
    else:
        _open_leaf_rounds(session, fed, now, first=False)
    return True


def _advance_eval(session: Session, fed: Federation, now: datetime) -> bool:
    """Serving: decide each open final evaluation round once all its tasks are terminal or at its
    deadline (no quorum, never reopened)."""
    progressed = False
    for rnd in _open_rounds(session, fed, Stage.eval, ScopeKind.eval):
        if _round_verdict(session, rnd, now)[0] == WAIT:
            continue
        _close_without_quorum(session, rnd, now)
        progressed = True
    return progressed


def _advance_serving(session: Session, blobs: BlobStore, fed: Federation, cfg: FederationConfig,
                     now: datetime) -> bool:
    evaluated = _advance_eval(session, fed, now)
    if _start_cycle_if_due(session, fed, cfg, now):
        return True
    onboarded = _advance_onboarding(session, blobs, fed, cfg, now)
    return evaluated or onboarded


def cycle_candidates(session: Session, fed: Federation) -> int:
    """Clients waiting for a cycle (``schedule.cycle_min_new_clients``): active late clients that
    registered after the last cycle started (any, before the first) and take part in none, and
    active clients that fit no cluster, found so since the federation last began to serve."""
    since = fed.cycle_started_at
    late = select(func.count()).select_from(Client).where(
        Client.federation_id == fed.id, Client.status == ClientStatus.active, Client.cohort == Cohort.late,
        Client.onboarding != Onboarding.cycle)
    if since is not None:
        late = late.where(Client.created_at > since)
    newcomers = session.scalar(late) or 0
    unassigned = unassigned_client_ids(session, fed.id)
    if unassigned and fed.serving_since is not None:  # only those that became unassigned since the last cycle
        recent = set(session.scalars(select(Assignment.client_id).where(
            Assignment.client_id.in_(unassigned), Assignment.cluster_id.is_(None),
            Assignment.created_at > fed.serving_since)))
        unassigned = unassigned & recent
    return newcomers + len(unassigned)


def cycle_trigger(session: Session, fed: Federation, cfg: FederationConfig, now: datetime) -> str | None:
    """Why a cycle is due now ('admin', 'timer', 'arrivals'), or None."""
    schedule = cfg.schedule
    if fed.cycle_requested_at is not None:
        return "admin"
    serving_since = fed.serving_since or fed.updated_at
    if schedule.cycle_every_seconds and serving_since is not None and \
            (now - serving_since).total_seconds() >= schedule.cycle_every_seconds:
        return "timer"
    if schedule.cycle_min_new_clients and cycle_candidates(session, fed) >= schedule.cycle_min_new_clients:
        return "arrivals"
    return None


def _start_cycle_if_due(session: Session, fed: Federation, cfg: FederationConfig, now: datetime) -> bool:
    """Serving: start the next cycle when one is due and nothing runs (no open round: final
    evaluation and onboardings finish first). Every active client takes part: inactive ones are
    asked again, late ones (waiting or onboarded) join as training clients (onboarding 'cycle')."""
    trigger = cycle_trigger(session, fed, cfg, now)
    if trigger is None:
        return False
    if not cfg.cluster.enabled and cfg.schedule.cycle_root_rounds == 0:  # nothing a cycle could train
        fed.cycle_requested_at = None
        return False
    if session.scalar(select(Round.id).where(Round.federation_id == fed.id, Round.status == RoundStatus.open)
                      .limit(1)) is not None:
        return False
    if session.scalar(select(Client.id).where(
            Client.federation_id == fed.id, Client.status == ClientStatus.active,
            Client.onboarding.in_((Onboarding.probe, Onboarding.leaf))).limit(1)) is not None:
        return False
    fed.cycle = (fed.cycle or 0) + 1
    fed.cycle_requested_at, fed.cycle_started_at = None, now
    session.execute(update(Client).where(Client.federation_id == fed.id, Client.inactive_since.is_not(None))
                    .values(inactive_since=None, missed_rounds=0).execution_options(synchronize_session=False))
    for obj in list(session.identity_map.values()):
        if isinstance(obj, Client) and obj.federation_id == fed.id:
            session.expire(obj, ["missed_rounds", "inactive_since"])
    joined = 0
    for client in session.scalars(select(Client).where(
            Client.federation_id == fed.id, Client.status == ClientStatus.active, Client.cohort == Cohort.late,
            Client.onboarding.in_((Onboarding.waiting, Onboarding.ready)))):
        move(Machine.onboarding, client, Onboarding.cycle)
        joined += 1
    audit(session, now, "cycle_start", fed.id, f"federation:{fed.id}",
          {"cycle": fed.cycle, "trigger": trigger, "late_clients_joined": joined}, actor="scheduler")
    log.info("federation %s: cycle %s starts (%s), %d late clients join", fed.id, fed.cycle, trigger, joined)
    if cfg.schedule.cycle_root_rounds > 0:
        _set_state(fed, FederationState.root, now)
        open_round(session, fed, Stage.root, ROOT, [c.id for c in _training_clients(session, fed)], now,
                   _root_version_id(session, fed), sample=True)
    else:
        _enter_probe_or_leaf(session, fed, cfg, now)
    return True


def _advance_onboarding(session: Session, blobs: BlobStore, fed: Federation, cfg: FederationConfig,
                        now: datetime) -> bool:
    """Serving: move each late client one step: waiting -> probe -> leaf -> ready."""
    late = list(session.scalars(select(Client).where(
        Client.federation_id == fed.id, Client.status == ClientStatus.active, Client.cohort == Cohort.late,
        Client.inactive_since.is_(None),  # an inactive late client's open round waits for it, undecided
        Client.onboarding.in_((Onboarding.waiting, Onboarding.probe, Onboarding.leaf))).order_by(Client.id)))
    progressed = False
    root_id = _root_version_id(session, fed)
    clustered = cfg.cluster.enabled and _clusters(session, fed)
    for client in late:
        client_scope = scope(ScopeKind.client, client.id)
        assign_stage = Stage.refine if cfg.clustering.onboard == "loss" else Stage.probe
        if client.onboarding == Onboarding.waiting:
            if clustered:
                open_round(session, fed, assign_stage, client_scope, [client.id], now, root_id)
                move(Machine.onboarding, client, Onboarding.probe)
            else:
                _open_client_leaf(session, fed, client, now, root_id, first=True)
                move(Machine.onboarding, client, Onboarding.leaf)
            progressed = True
        elif client.onboarding == Onboarding.probe:
            rnd = session.scalars(select(Round).where(  # its assignment round: a probe, or a refine round
                Round.federation_id == fed.id, Round.scope == client_scope, Round.cycle == (fed.cycle or 0),
                Round.stage.in_((Stage.probe, Stage.refine))).order_by(Round.id.desc()).limit(1)).first()
            verdict = _decide(session, rnd, now)
            if verdict == WAIT:
                continue
            if verdict == FAIL:
                _close(session, rnd, RoundStatus.failed, now)
                open_round(session, fed, assign_stage, client_scope, [client.id], now, root_id)
            else:
                task = session.scalars(select(Task).where(Task.round_id == rnd.id)).one()
                if rnd.stage == Stage.refine:
                    assign_late_client_by_loss(session, cfg, client, task, now)
                else:
                    assign_late_client(session, blobs, cfg, client, task, now)
                _close(session, rnd, RoundStatus.done, now)
                _open_client_leaf(session, fed, client, now, root_id, first=True)
                move(Machine.onboarding, client, Onboarding.leaf)
            progressed = True
        elif client.onboarding == Onboarding.leaf:
            rnd = _latest_round(session, fed, Stage.leaf, client_scope)
            if rnd is None:
                _open_client_leaf(session, fed, client, now, root_id, first=True)
                progressed = True
                continue
            if rnd.status == RoundStatus.open:
                verdict = _decide(session, rnd, now)
                if verdict == WAIT:
                    continue
                _close(session, rnd, RoundStatus.done if verdict == AGGREGATE else RoundStatus.failed, now)
            if _done_rounds(session, fed, Stage.leaf, client_scope) >= cfg.schedule.unseen_leaf_rounds:
                move(Machine.onboarding, client, Onboarding.ready)
            else:
                _open_client_leaf(session, fed, client, now, root_id, first=False)
            progressed = True
    return progressed


def _open_client_leaf(session: Session, fed: Federation, client: Client, now: datetime, root_id: int,
                      first: bool) -> Round:
    cluster_version = serving_version(session, session.get(Cluster, client.cluster_id)) if client.cluster_id else None
    return open_round(session, fed, Stage.leaf, scope(ScopeKind.client, client.id), [client.id], now, root_id,
                      cluster_version.id if cluster_version else None, reset_leaf=first)


@contextmanager
def exclusive_tick(session_factory):  # noqa: ANN001, ANN201
    """Yield True when this process may run a scheduler tick now. On Postgres that is when it holds
    the scheduler's session-level advisory lock (so of several replicas exactly one ticks at a
    time); on SQLite always (one database file, one writer at a time anyway)."""
    engine = session_factory.kw["bind"]
    if engine.dialect.name != "postgresql":
        yield True
        return
    with engine.connect() as conn:
        got = bool(conn.execute(select(func.pg_try_advisory_lock(SCHEDULER_LOCK_KEY))).scalar())
        conn.commit()
        try:
            yield got
        finally:
            if got:
                conn.execute(select(func.pg_advisory_unlock(SCHEDULER_LOCK_KEY)))
                conn.commit()


FEDERATION_LOCK_SPACE = 0x686C72  # Postgres advisory locks (space, federation id): one advance at a time


def advance_one(session_factory, blobs: BlobStore, fid: int, now: datetime,  # noqa: ANN001
                leasable: set[int] | None = None) -> int:
    """Advance one federation in its own transaction; a failure is recorded, never raised. On
    Postgres the transaction holds the federation's advisory lock, so that of several replicas (or
    a job still running from an earlier tick) one advances it at a time: a federation whose lock is
    taken is left for the next tick (0 changes). ``leasable`` receives, once committed, the clients
    for which it opened tasks."""
    with log_context(federation_id=fid):
        try:
            with session_factory() as session, session.begin():
                if session.get_bind().dialect.name == "postgresql" and not session.scalar(
                        select(func.pg_try_advisory_xact_lock(FEDERATION_LOCK_SPACE, fid))):
                    return 0
                made = advance_federation(session, blobs, fid, now)
            if leasable is not None:
                leasable.update(session.info.get(LEASABLE_FOR, ()))
            return made
        except Exception as exc:  # one federation's failure never stalls the others
            log.exception("advancing federation %s failed", fid)
            record_failure(session_factory, fid, exc, now)
            return 0


def scheduler_tick(session_factory, blobs: BlobStore, now: datetime,  # noqa: ANN001
                   submit: Callable[[int, Callable[[], int]], None] | None = None,
                   leasable: set[int] | None = None) -> int:
    """One pass of the background loop: expire leases, then advance every federation, each in its
    own transaction (``advance_one``). With ``submit`` each federation's advance is handed to it as
    a job (the app's scheduler runs them on a thread pool, so that a long clustering or aggregation
    of one federation does not hold up the others) and only the expiries count as this tick's
    changes. ``leasable`` receives the clients for which the tick made a task leasable (requeued,
    or in a round it opened; a job handed to ``submit`` takes its own set, ``advance_one``'s
    ``leasable``). Returns the number of changes made, or -1 when another replica holds the lock."""
    with exclusive_tick(session_factory) as mine:
        if not mine:
            return -1
        with session_factory() as session, session.begin():
            changes = expire_leases(session, now)
        if leasable is not None:
            leasable.update(session.info.get(LEASABLE_FOR, ()))
        with session_factory() as session:
            ids = list(session.scalars(select(Federation.id).order_by(Federation.id)))
        for fid in ids:
            if submit is None:
                changes += advance_one(session_factory, blobs, fid, now, leasable)
            else:
                submit(fid, functools.partial(advance_one, session_factory, blobs, fid, now))
        return changes


def record_failure(session_factory, federation_id: int, exc: BaseException, now: datetime) -> None:  # noqa: ANN001
    """Record a failed attempt to advance a federation (its own transaction; the attempt's was rolled
    back), and pause the federation after ``MAX_CONSECUTIVE_FAILURES`` of them in a row. Never
    raises: a database that cannot take the record is logged, and the next tick tries again."""
    try:
        with session_factory() as session, session.begin():
            fed = session.get(Federation, federation_id, with_for_update=True)
            if fed is None:  # deleted meanwhile
                return
            stage = FederationState(fed.state).value
            text = f"{type(exc).__name__} while advancing the {stage} stage: {exc}"[:MAX_FAILURE_TEXT]
            fed.failure_count = (fed.failure_count or 0) + 1
            fed.last_failure, fed.last_failure_at = text, now
            observe_scheduler_failure(stage)
            if fed.failure_count >= MAX_CONSECUTIVE_FAILURES and fed.paused_at is None:
                fed.paused_at = now
                fed.paused_reason = (f"paused by the scheduler after {fed.failure_count} failed attempts in a row "
                                     f"to advance it; the last: {text}")[:MAX_FAILURE_TEXT]
                fed.updated_at = now
                audit(session, now, "auto_pause", federation_id, f"federation:{federation_id}",
                      {"failures": fed.failure_count, "last_failure": text}, actor="scheduler")
                log.error("federation %s paused after %d failed ticks: %s", federation_id, fed.failure_count, text)
    except Exception:
        log.exception("could not record the failure of federation %s", federation_id)

