"""Every state of the service and the one table of its transitions. Pure: no database, no I/O.

The coordinator stores each state as the enum's value (plain text, as it always has); every change
of a federation's state, a round's, a task's, a client's status or a late client's onboarding
goes through this module: ``move`` checks an object's change against ``TRANSITIONS`` and makes it,
``enter`` checks the first state of a new object, and guarded SQL UPDATEs take their ``WHERE
status IN (...)`` from ``sources``. A pair that is not in the table raises ``IllegalTransition``.

The table (``python -m shared.states`` prints it)::

    federation   enrolling -> root | probe | leaf | serving    (the first stage the schedule has)
                 root      -> probe | leaf | serving
                 probe     -> cluster | leaf | serving
                 cluster   -> leaf | serving
                 leaf      -> serving
                 serving   -> root | probe                (a cycle; the final evaluation rounds and
                                                           onboarding run in serving)
    round        open -> done | failed                       (done, failed: terminal)
    task         pending -> leased | cancelled
                 leased  -> pending | done | failed | cancelled   (done, failed, cancelled: terminal)
    client       active -> revoked                           (revoked: terminal)
    onboarding   waiting -> probe | leaf | cycle; probe -> leaf; leaf -> ready;
                 ready -> cycle; cycle -> ready; none (the training cohort): terminal

Scopes (``Round.scope``, ``AdapterVersion.scope``) are built and parsed by ``scope``/``parse_scope``:
'root', 'all', 'cluster:<id>', 'leaf:<cluster id>' | 'leaf:none', 'eval:<cluster id>' | 'eval:none'
and 'client:<id>' (the onboarding rounds of one late client).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any


class StateEnum(str, Enum):
    """A str enum whose ``str()`` and ``format()`` are its value on every Python (like 3.11's
    ``StrEnum``): it compares, hashes and prints as the text stored in the database."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str.__str__(self), spec)


class FederationState(StateEnum):
    """Life of a federation. Transitions only go forward, in this order (``TRANSITIONS``):

    - ``enrolling``: clients register; training starts at ``schedule.min_clients`` or on admin start.
    - ``root``: root rounds (aggregated over all clients) until ``root_rounds`` or rho <= tau.
    - ``probe``: one round in which every client trains from the final root; not aggregated;
      LSAC clusters the probes when it completes.
    - ``cluster``: each cluster trains its adapter for ``cluster_rounds`` rounds (root frozen);
      with ``clustering.refine_rounds`` R, refinement rounds (stage ``refine``) after the first R
      cluster rounds reassign clients by the loss of every cluster adapter on their own data.
    - ``leaf``: every client trains its private leaf for ``leaf_rounds`` rounds; metrics only (in a
      cycle: only clients whose cluster changed or that have no leaf yet).
    - ``serving``: training is over. On entering it without leaf rounds behind it, the scheduler
      opens the final evaluation rounds (stage ``eval``: every training client evaluates the final
      root, root + cluster and root + cluster + its leaf); a newly registered client is onboarded
      (probe -> assignment -> leaf rounds). A **cycle** (``schedule.cycle_*`` or an admin's request)
      leaves it again: serving -> root (``cycle_root_rounds`` > 0) or probe, then the stages as
      above with every active client, and back to serving with an evaluation of everyone.

    A stage the schedule leaves out is skipped (no root rounds, clustering disabled, no cluster or
    leaf rounds), so e.g. enrolling -> leaf and root -> serving are transitions too.
    """

    enrolling = "enrolling"
    root = "root"
    probe = "probe"
    cluster = "cluster"
    leaf = "leaf"
    serving = "serving"


class Stage(StateEnum):
    """What a round (and its tasks) does. ``root``/``probe``/``cluster``/``leaf`` train in the
    federation stage of that name (``probe`` and ``leaf`` also onboard a late client while
    serving); ``eval`` evaluates the final versions once a training without leaf rounds is over
    (nothing trains); ``refine`` (in the cluster stage, ``clustering.refine_rounds``): every training
    client reports the loss of the root and of root + each cluster adapter on its own training data
    (forward passes only), and the coordinator reassigns the clients whose loss is clearly lower in
    another cluster, or marks one that no cluster fits better than the root as unassigned."""

    root = "root"
    probe = "probe"
    cluster = "cluster"
    leaf = "leaf"
    eval = "eval"
    refine = "refine"


class RoundStatus(StateEnum):
    """A round: open -> done | failed. A root, probe or cluster round is done when its quorum of
    tasks is done (root and cluster rounds: aggregated into a new adapter version; probe rounds:
    clustered), failed otherwise (a fresh round then opens). A leaf, eval or refine round aggregates
    nothing: done when at least one task is done (a refine round then reassigns). done and failed are terminal."""

    open = "open"
    done = "done"
    failed = "failed"


class TaskStatus(StateEnum):
    """A task: pending -> leased -> done; leased -> pending when its lease expires (attempt < max)
    or its worker releases it; leased -> failed when its lease expires at the last attempt;
    pending|leased -> cancelled when its round is decided without it, its client is revoked or
    moved to another cluster. done, failed and cancelled are terminal."""

    pending = "pending"
    leased = "leased"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


class ClientStatus(StateEnum):
    """A client: active -> revoked (by an admin; terminal). A deleted client has no row."""

    active = "active"
    revoked = "revoked"


class Cohort(StateEnum):
    """Fixed at registration: ``train`` before the probe stage began, ``late`` afterwards (the
    unseen clients of the paper, onboarded while serving)."""

    train = "train"
    late = "late"


class Onboarding(StateEnum):
    """A client's onboarding: ``none`` for the training cohort (never onboarded); a late client
    goes waiting -> probe -> leaf -> ready (waiting -> leaf without clusters). ``probe``: its
    assignment round runs, a probe (``clustering.onboard`` 'probe') or a refine round ('loss').
    ``cycle``: it takes part in a cycle's training like a training client (from waiting, or ready
    again), and is ready when the cycle ends."""

    none = "none"
    waiting = "waiting"
    probe = "probe"
    leaf = "leaf"
    ready = "ready"
    cycle = "cycle"


class Machine(StateEnum):
    """The state machines of ``TRANSITIONS``."""

    federation = "federation"
    round = "round"
    task = "task"
    client = "client"
    onboarding = "onboarding"


@dataclass(frozen=True)
class Table:
    """One state machine: its states, the states a new object may start in, the attribute that
    holds the state on a coordinator row, and the allowed (from, to) pairs."""

    states: type[StateEnum]
    initial: tuple[StateEnum, ...]
    attribute: str
    pairs: frozenset[tuple[StateEnum, StateEnum]]


def _pairs(*edges: tuple[StateEnum, Iterable[StateEnum]]) -> frozenset[tuple[StateEnum, StateEnum]]:
    return frozenset((a, b) for a, targets in edges for b in targets)


_F, _R, _T, _C, _O = FederationState, RoundStatus, TaskStatus, ClientStatus, Onboarding

TRANSITIONS: dict[Machine, Table] = {
    Machine.federation: Table(_F, (_F.enrolling,), "state", _pairs(
        (_F.enrolling, (_F.root, _F.probe, _F.leaf, _F.serving)),
        (_F.root, (_F.probe, _F.leaf, _F.serving)),
        (_F.probe, (_F.cluster, _F.leaf, _F.serving)),
        (_F.cluster, (_F.leaf, _F.serving)),
        (_F.leaf, (_F.serving,)),
        (_F.serving, (_F.root, _F.probe)),  # a cycle
    )),
    Machine.round: Table(_R, (_R.open,), "status", _pairs(
        (_R.open, (_R.done, _R.failed)),
    )),
    Machine.task: Table(_T, (_T.pending,), "status", _pairs(
        (_T.pending, (_T.leased, _T.cancelled)),
        (_T.leased, (_T.pending, _T.done, _T.failed, _T.cancelled)),
    )),
    Machine.client: Table(_C, (_C.active,), "status", _pairs(
        (_C.active, (_C.revoked,)),
    )),
    Machine.onboarding: Table(_O, (_O.none, _O.waiting), "onboarding", _pairs(
        (_O.waiting, (_O.probe, _O.leaf, _O.cycle)),
        (_O.probe, (_O.leaf,)),
        (_O.leaf, (_O.ready,)),
        (_O.ready, (_O.cycle,)),
        (_O.cycle, (_O.ready,)),
    )),
}


class IllegalTransition(ValueError):
    """A state change the table does not list (a bug of the caller, never a client's mistake)."""


def _state(machine: Machine, value: Any) -> StateEnum:
    states = TRANSITIONS[machine].states
    try:
        return states(value)
    except ValueError:
        raise IllegalTransition(f"{value!r} is not a {machine} state (one of "
                                f"{', '.join(s.value for s in states)})") from None


def targets(machine: Machine, current: Any) -> tuple[StateEnum, ...]:
    """The states ``current`` may move to, in the enum's order (empty: terminal)."""
    table = TRANSITIONS[machine]
    current = _state(machine, current)
    return tuple(s for s in table.states if (current, s) in table.pairs)


def sources(machine: Machine, target: Any) -> tuple[str, ...]:
    """The states that may move to ``target``, as stored values: the ``WHERE status IN (...)`` of a
    guarded UPDATE that makes this transition. Raises if no state may move there."""
    table = TRANSITIONS[machine]
    target = _state(machine, target)
    found = tuple(s.value for s in table.states if (s, target) in table.pairs)
    if not found:
        raise IllegalTransition(f"no {machine} state may move to {target.value}")
    return found


def terminal(machine: Machine) -> tuple[StateEnum, ...]:
    """The states without an exit."""
    return tuple(s for s in TRANSITIONS[machine].states if not targets(machine, s))


def check(machine: Machine, current: Any, new: Any) -> StateEnum:
    """``new`` as the machine's enum, when current -> new is in the table; else IllegalTransition."""
    table = TRANSITIONS[machine]
    current, new = _state(machine, current), _state(machine, new)
    if (current, new) not in table.pairs:
        allowed = ", ".join(s.value for s in targets(machine, current)) or "nothing: it is terminal"
        raise IllegalTransition(f"illegal {machine} transition {current.value} -> {new.value} "
                                f"(from {current.value} it may move to {allowed})")
    return new


def move(machine: Machine, obj_or_current: Any, new: Any) -> StateEnum:
    """Check and make one transition. Given a row (a Federation, Round, Task or Client), set its
    state attribute (``Table.attribute``) to the new state (the enum; the column stores its
    value); given a state, only check. Returns the new state."""
    table = TRANSITIONS[machine]
    if isinstance(obj_or_current, str):
        return check(machine, obj_or_current, new)
    new = check(machine, getattr(obj_or_current, table.attribute), new)
    setattr(obj_or_current, table.attribute, new)
    return new


def enter(machine: Machine, state: Any) -> StateEnum:
    """A new object's first state; IllegalTransition unless it is an initial state of the machine."""
    state = _state(machine, state)
    if state not in TRANSITIONS[machine].initial:
        raise IllegalTransition(f"a new {machine} cannot start in {state.value} (it starts in "
                                f"{', '.join(s.value for s in TRANSITIONS[machine].initial)})")
    return state


# ---------------------------------------------------------------- scopes

class ScopeKind(StateEnum):
    """What a scope names: ``root`` (the root adapter, root rounds), ``all`` (the probe round of
    every training client), ``cluster`` (a cluster's adapter and rounds), ``leaf`` and ``eval``
    (the leaf / final evaluation round of one cluster's members, or of clients without one),
    ``client`` (the onboarding rounds of one late client)."""

    root = "root"
    all = "all"
    cluster = "cluster"
    leaf = "leaf"
    eval = "eval"
    client = "client"


_BARE = (ScopeKind.root, ScopeKind.all)
_OPTIONAL_ID = (ScopeKind.leaf, ScopeKind.eval)  # no id: the clients without a cluster ('leaf:none')


@dataclass(frozen=True)
class Scope:
    kind: ScopeKind
    id: int | None = None

    def __str__(self) -> str:
        return scope(self.kind, self.id)


def scope(kind: ScopeKind | str, id: int | None = None) -> str:
    """The stored scope: scope('root'), scope('cluster', 3) == 'cluster:3', scope('leaf', None) ==
    'leaf:none'. An id where none belongs, or none where one must be, is a ValueError."""
    kind = ScopeKind(kind)
    if kind in _BARE:
        if id is not None:
            raise ValueError(f"scope {kind.value} takes no id")
        return kind.value
    if id is None:
        if kind not in _OPTIONAL_ID:
            raise ValueError(f"scope {kind.value} needs an id")
        return f"{kind.value}:none"
    return f"{kind.value}:{int(id)}"


def parse_scope(text: str) -> Scope:
    """The inverse of ``scope``; ValueError for anything it would not build."""
    kind, sep, rest = text.partition(":")
    try:
        parsed = ScopeKind(kind)
    except ValueError:
        raise ValueError(f"unknown scope {text!r}") from None
    if parsed in _BARE:
        if sep:
            raise ValueError(f"scope {text!r}: {kind} takes no id")
        return Scope(parsed)
    if rest == "none" and parsed in _OPTIONAL_ID:
        return Scope(parsed)
    if not rest.isdigit() or not rest.isascii():
        raise ValueError(f"scope {text!r}: {kind} needs a numeric id")
    return Scope(parsed, int(rest))


def scope_pattern(kind: ScopeKind | str) -> str:
    """A SQL LIKE pattern matching every scope of ``kind`` that carries an id (or 'none')."""
    kind = ScopeKind(kind)
    if kind in _BARE:
        raise ValueError(f"scope {kind.value} has no id: compare it with ==")
    return f"{kind.value}:%"


def describe() -> str:
    """The transition table in words (``python -m shared.states``)."""
    lines = []
    for machine, table in TRANSITIONS.items():
        lines.append(f"{machine.value} (starts in {', '.join(s.value for s in table.initial)})")
        for state in table.states:
            out = targets(machine, state)
            lines.append(f"  {state.value:<10} -> {' | '.join(s.value for s in out) if out else '(terminal)'}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
