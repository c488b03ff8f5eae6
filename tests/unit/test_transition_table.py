"""The one transition table (shared.states): walked completely, for every state machine.

Every listed pair is accepted (by ``check``, ``move`` on an object, and ``sources`` of its target);
every unlisted pair is refused; every state is reachable from an initial one; terminal states have
no exits; and the coordinator changes no state outside it (no bare assignment to a state
attribute, no state literal in a ``.values(...)`` of an UPDATE)."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest

from shared.states import (
    TRANSITIONS,
    ClientStatus,
    FederationState,
    IllegalTransition,
    Machine,
    Onboarding,
    RoundStatus,
    Scope,
    ScopeKind,
    Stage,
    StateEnum,
    TaskStatus,
    check,
    enter,
    move,
    parse_scope,
    scope,
    scope_pattern,
    sources,
    targets,
    terminal,
)

ROOT = Path(__file__).resolve().parents[2]
MACHINES = list(Machine)

# The table as the docs state it (docs/operations.md, "States"): a change to the table must be a
# change to this test too.
EXPECTED = {
    Machine.federation: {
        "enrolling": {"root", "probe", "leaf", "serving"},
        "root": {"probe", "leaf", "serving"},
        "probe": {"cluster", "leaf", "serving"},
        "cluster": {"leaf", "serving"},
        "leaf": {"serving"},
        "serving": {"root", "probe"},   # a cycle
    },
    Machine.round: {"open": {"done", "failed"}, "done": set(), "failed": set()},
    Machine.task: {
        "pending": {"leased", "cancelled"},
        "leased": {"pending", "done", "failed", "cancelled"},
        "done": set(), "failed": set(), "cancelled": set(),
    },
    Machine.client: {"active": {"revoked"}, "revoked": set()},
    Machine.onboarding: {
        "none": set(), "waiting": {"probe", "leaf", "cycle"}, "probe": {"leaf"}, "leaf": {"ready"},
        "ready": {"cycle"}, "cycle": {"ready"},
    },
}


def all_pairs(machine: Machine):
    states = list(TRANSITIONS[machine].states)
    return itertools.product(states, states)


def test_every_machine_is_in_the_table_and_matches_the_documented_one():
    assert set(TRANSITIONS) == set(Machine)
    for machine in MACHINES:
        table = TRANSITIONS[machine]
        assert {s.value: {t.value for t in targets(machine, s)} for s in table.states} == EXPECTED[machine]
        assert issubclass(table.states, StateEnum)
        assert all(a in table.states and b in table.states for a, b in table.pairs)
        assert all(a != b for a, b in table.pairs), "no self-loops: staying put is not a transition"


@pytest.mark.parametrize("machine", MACHINES)
def test_every_listed_pair_is_accepted_and_every_other_pair_refused(machine):
    table = TRANSITIONS[machine]
    for current, new in all_pairs(machine):
        listed = (current, new) in table.pairs
        if listed:
            assert check(machine, current, new) is new
            assert check(machine, current.value, new.value) is new  # the stored text works too
            assert move(machine, current, new) is new
            row = SimpleNamespace(**{table.attribute: current.value})
            assert move(machine, row, new) is new and getattr(row, table.attribute) is new
            assert current.value in sources(machine, new)
        else:
            with pytest.raises(IllegalTransition, match=f"{current.value} -> {new.value}"):
                check(machine, current, new)
            row = SimpleNamespace(**{table.attribute: current.value})
            with pytest.raises(IllegalTransition):
                move(machine, row, new)
            assert getattr(row, table.attribute) == current.value  # a refused move changes nothing


@pytest.mark.parametrize("machine", MACHINES)
def test_sources_are_exactly_the_states_that_may_move_to_a_target(machine):
    table = TRANSITIONS[machine]
    for target in table.states:
        expected = tuple(s.value for s in table.states if (s, target) in table.pairs)
        if expected:
            assert sources(machine, target) == expected
        else:  # an initial state that nothing returns to
            with pytest.raises(IllegalTransition):
                sources(machine, target)


@pytest.mark.parametrize("machine", MACHINES)
def test_every_state_is_reachable_from_an_initial_one(machine):
    table = TRANSITIONS[machine]
    seen = set(table.initial)
    frontier = list(table.initial)
    while frontier:
        state = frontier.pop()
        for nxt in targets(machine, state):
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(table.states), f"unreachable {machine} states: {set(table.states) - seen}"


@pytest.mark.parametrize("machine", MACHINES)
def test_terminal_states_have_no_exits_and_every_path_ends_in_one(machine):
    table = TRANSITIONS[machine]
    ends = terminal(machine)
    # a federation has none: serving is where it rests, and a cycle leaves it and comes back
    assert bool(ends) == (machine != Machine.federation), f"{machine}: terminal states {ends}"
    for state in ends:
        assert not any(a == state for a, _ in table.pairs)
        for other in table.states:
            with pytest.raises(IllegalTransition, match="terminal"):
                check(machine, state, other)
    # no loop: the machines only go forward, except a task's leased -> pending (a retry of the same
    # task) and a federation's cycle (serving -> root | probe, back to serving), which a late client
    # joins (ready -> cycle -> ready)
    retry = {(TaskStatus.leased, TaskStatus.pending), (FederationState.serving, FederationState.root),
             (FederationState.serving, FederationState.probe), (Onboarding.ready, Onboarding.cycle)}
    order: dict = {}

    def depth(state, stack=()):  # noqa: ANN001, ANN202
        assert state not in stack, f"{machine} cycle through {state}"
        if state not in order:
            order[state] = 1 + max((depth(n, (*stack, state)) for n in targets(machine, state)
                                    if (state, n) not in retry), default=0)
        return order[state]

    for state in table.initial:
        depth(state)


def test_initial_states():
    assert enter(Machine.federation, "enrolling") is FederationState.enrolling
    assert enter(Machine.round, RoundStatus.open) is RoundStatus.open
    assert enter(Machine.task, "pending") is TaskStatus.pending
    assert enter(Machine.client, "active") is ClientStatus.active
    assert {enter(Machine.onboarding, s) for s in ("none", "waiting")} == {Onboarding.none, Onboarding.waiting}
    for machine in MACHINES:
        table = TRANSITIONS[machine]
        for state in set(table.states) - set(table.initial):
            with pytest.raises(IllegalTransition, match="cannot start"):
                enter(machine, state)


def test_unknown_states_are_refused_with_the_known_ones_named():
    with pytest.raises(IllegalTransition, match="not a round state .*open, done, failed"):
        check(Machine.round, "open", "closed")
    with pytest.raises(IllegalTransition):
        move(Machine.task, SimpleNamespace(status="lost"), TaskStatus.done)


def test_state_enums_compare_hash_and_print_as_their_stored_text():
    for enum in (FederationState, RoundStatus, TaskStatus, ClientStatus, Onboarding, Stage, ScopeKind):
        for member in enum:
            assert member == member.value and hash(member) == hash(member.value)
            assert str(member) == f"{member}" == member.value and {member.value: 1}[member] == 1
    assert Stage.eval.value == "eval" and "eval" not in {s.value for s in FederationState}


def test_scopes_build_and_parse():
    cases = {("root", None): "root", ("all", None): "all", ("cluster", 3): "cluster:3", ("leaf", 4): "leaf:4",
             ("leaf", None): "leaf:none", ("eval", 5): "eval:5", ("eval", None): "eval:none",
             ("client", 12): "client:12"}
    for (kind, id_), text in cases.items():
        assert scope(kind, id_) == text
        assert parse_scope(text) == Scope(ScopeKind(kind), id_) and str(parse_scope(text)) == text
    for kind, id_ in (("root", 1), ("all", 2), ("cluster", None), ("client", None), ("nope", 1)):
        with pytest.raises(ValueError):
            scope(kind, id_)
    for text in ("", "root:1", "cluster:", "cluster:none", "client:x", "leaf:-1", "eval:1.5", "probe", "all:"):
        with pytest.raises(ValueError):
            parse_scope(text)
    assert scope_pattern("leaf") == "leaf:%" and scope_pattern(ScopeKind.client) == "client:%"
    with pytest.raises(ValueError):
        scope_pattern("root")


# ---------------------------------------------------------------- the coordinator uses the table

STATE_ATTRIBUTES = {"state", "status", "onboarding"}


def _coordinator_sources() -> list[Path]:
    return sorted(p for p in (ROOT / "coordinator").rglob("*.py"))


def test_the_coordinator_assigns_no_state_outside_the_table():
    """No ``x.state = ...``, ``x.status = ...`` or ``x.onboarding = ...`` in the coordinator: every
    change of a row's state goes through ``shared.states.move``."""
    offenders = []
    for path in _coordinator_sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            targets_ = []
            if isinstance(node, ast.Assign):
                targets_ = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets_ = [node.target]
            for target in targets_:
                if isinstance(target, ast.Attribute) and target.attr in STATE_ATTRIBUTES:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == [], f"state assigned directly, not through shared.states.move: {offenders}"


def test_the_coordinator_writes_no_state_literal():
    """``status=``/``state=``/``onboarding=`` of an UPDATE's ``.values(...)`` or of a new row is an
    enum of shared.states (checked by the transition table or ``enter``), never a bare string."""
    offenders = []
    for path in _coordinator_sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name not in {"values", "Federation", "Round", "Task", "Client"}:
                continue
            for kw in node.keywords:
                if kw.arg in STATE_ATTRIBUTES and isinstance(kw.value, ast.Constant):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {kw.arg}={kw.value.value!r}")
    assert offenders == [], offenders
