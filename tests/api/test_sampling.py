"""Client sampling (schedule.clients_per_round) and partial participation
(schedule.max_consecutive_failures), issue 16: a round's tasks are the drawn set, reproducible from
the seed recorded on the round; cluster rounds draw per cluster; a client that is not drawn is not
penalised; one that misses rounds in a row is marked inactive, gets no task, and is back once it
asks for work again. Driven with the injected clock, on SQLite and Postgres."""

from __future__ import annotations

import pytest
from conftest import admin_headers, bearer, create_federation, register, tick
from sqlalchemy import select
from test_cascade_state_machine import group_directions, run_pending
from test_quorum import finish, lease, rounds

from coordinator.models import Client, Task
from shared import sampling
from shared.config import ClientsPerRound, Schedule

pytestmark = pytest.mark.api

@pytest.mark.unit
@pytest.mark.parametrize("n,fraction,lo,hi,k", [
    (10, 0.3, 2, None, 3), (10, 0.3, 5, None, 5), (10, 0.3, 1, 2, 2), (10, 1.0, 2, None, 10),
    (3, 0.1, 2, None, 2), (1, 0.1, 2, None, 1), (0, 0.5, 2, None, 0), (7, 0.5, 1, None, 4), (100, 0.01, 1, None, 1),
])
def test_sample_size(n, fraction, lo, hi, k):
    assert sampling.sample_size(n, fraction, lo, hi) == k

@pytest.mark.unit
def test_draw_is_a_reproducible_subset():
    eligible = [17, 3, 9, 40, 22, 5, 11, 8, 30, 2]
    for seed in (0, 1, 12345, sampling.MAX_SEED):
        got = sampling.draw(eligible, 4, seed)
        assert got == sampling.draw(list(reversed(eligible)), 4, seed)  # order of the input does not matter
        assert got == sorted(got) and len(set(got)) == 4 and set(got) <= set(eligible)
    # pinned: a change of the draw (generator, order of the ids) would make recorded seeds lie
    assert sampling.draw(eligible, 4, 0) == [5, 9, 11, 22] and sampling.draw(eligible, 4, 12345) == [3, 8, 9, 22]
    assert sampling.draw(eligible, 10, 7) == sorted(eligible) == sampling.draw(eligible, 99, 7)
    draws = {tuple(sampling.draw(eligible, 3, s)) for s in range(40)}
    assert len(draws) > 20  # different seeds, different sets
    with pytest.raises(ValueError):
        sampling.draw(eligible, 3, -1)

@pytest.mark.unit
def test_round_seed_is_pinned_and_depends_on_every_part():
    base = sampling.round_seed(0, "root", "root", 1)
    assert base == 1228118822  # pinned, as the draw
    assert len({base, sampling.round_seed(1, "root", "root", 1), sampling.round_seed(0, "cluster", "root", 1),
                sampling.round_seed(0, "root", "cluster:1", 1), sampling.round_seed(0, "root", "root", 2)}) == 5

@pytest.mark.unit
def test_clients_per_round_validation():
    assert not ClientsPerRound().samples and ClientsPerRound(fraction=0.5).samples and ClientsPerRound(max=5).samples
    for bad in ({"fraction": 0}, {"fraction": 1.5}, {"min": 0}, {"min": 4, "max": 3}, {"fraction": float("nan")},
                {"every": 2}):
        with pytest.raises(ValueError):
            ClientsPerRound(**bad)
    assert Schedule().max_consecutive_failures == 3
    with pytest.raises(ValueError):
        Schedule(max_consecutive_failures=0)

def _tasks_of(app, round_id):
    with app.state.session_factory() as s:
        return sorted(s.scalars(select(Task.client_id).where(Task.round_id == round_id)))

def test_root_rounds_train_the_drawn_set(api, app, clock):
    fid, secret = create_federation(api, schedule={
        "min_clients": 10, "root_rounds": 3, "clients_per_round": {"fraction": 0.3, "min": 2}})
    clients = {f"c{i}": register(api, fid, secret, f"c{i}") for i in range(10)}
    tick(app)
    ids = sorted(cid for cid, _t in clients.values())
    seen = []
    for number in (1, 2, 3):
        rnd = rounds(app)[-1]
        assert (rnd.number, rnd.sampled_from) == (number, 10)
        assert rnd.sample_seed == sampling.round_seed(0, "root", "root", number)
        drawn = _tasks_of(app, rnd.id)
        assert drawn == sampling.draw(ids, 3, rnd.sample_seed) and len(drawn) == 3
        assert rnd.quorum == 1
        seen.append(drawn)
        info = api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()["rounds"]
        assert {(r["number"], r["sample_seed"], r["sampled_from"]) for r in info if r["number"] == number} == {
            (number, rnd.sample_seed, 10)}
        for name, (cid, tok) in clients.items():
            task = lease(api, cid, tok)
            assert (task is not None) == (cid in drawn)
            if task is not None:
                finish(api, task, tok, seed=cid)
        tick(app)
    assert len({tuple(s) for s in seen}) > 1
    table = api.get(f"/v1/federations/{fid}/clients", headers=admin_headers()).json()
    assert all(c["missed_rounds"] == 0 and c["inactive_since"] is None for c in table)  # not drawn is not missed

def test_cluster_rounds_draw_within_each_cluster(api, app, clock):
    groups = {f"a{i}": 0 for i in range(4)} | {f"b{i}": 1 for i in range(4)}
    fid, secret = create_federation(api, schedule={
        "min_clients": 8, "root_rounds": 1, "cluster_rounds": 2, "leaf_rounds": 1,
        "clients_per_round": {"fraction": 0.5, "min": 1}},
        clustering={"algorithm": "manual", "assignment": {"a0": 0, "b0": 1, "a1": 0, "b1": 1,
                                                          "a2": 0, "b2": 1, "a3": 0, "b3": 1}})
    clients = {name: register(api, fid, secret, name) for name in sorted(groups)}
    tick(app)
    dirs = group_directions()
    ran = run_pending(api, clients, dirs, seed=0, groups=groups)  # root round: 4 of 8 drawn
    assert [t["stage"] for t in ran] == ["root"] * 4
    ran = run_pending(api, clients, dirs, seed=1, groups=groups)  # probe: everyone
    assert [t["stage"] for t in ran] == ["probe"] * 8
    members = {"cluster:" + str(c["id"]): {clients[m][0] for m in c["members"]}
               for c in api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()["clusters"]}
    cluster_rounds = rounds(app, "cluster")
    assert len(cluster_rounds) == 2
    for rnd in cluster_rounds:
        drawn = _tasks_of(app, rnd.id)
        assert rnd.sampled_from == 4 and len(drawn) == 2 and set(drawn) <= members[rnd.scope]
        assert drawn == sampling.draw(sorted(members[rnd.scope]), 2, rnd.sample_seed)
    ran = run_pending(api, clients, dirs, seed=2, groups=groups)
    assert sorted(t["stage"] for t in ran) == ["cluster"] * 4

def test_a_client_that_keeps_missing_goes_inactive_and_comes_back(api, app, clock):
    fid, secret = create_federation(api, schedule={
        "min_clients": 3, "root_rounds": 6, "round_deadline_seconds": 60, "lease_seconds": 30,
        "max_consecutive_failures": 2})
    clients = [register(api, fid, secret, f"c{i}") for i in range(3)]
    tick(app)
    dead_id, dead_token = clients[2]

    def play_round(with_dead: bool):
        playing = rounds(app)[-1].id
        for cid, tok in clients[:2]:
            finish(api, lease(api, cid, tok), tok, seed=cid)
        if with_dead:
            task = lease(api, dead_id, dead_token)
            finish(api, task, dead_token, seed=dead_id)
        tick(app)
        if [r for r in rounds(app) if r.id == playing][0].status == "open":
            clock.advance(61)  # the dead client's task is cancelled at the deadline
            tick(app)

    def row():
        table = {c["name"]: c for c in api.get(f"/v1/federations/{fid}/clients", headers=admin_headers()).json()}
        return table["c2"]

    play_round(False)
    assert row()["missed_rounds"] == 1 and row()["inactive_since"] is None
    play_round(False)
    assert row()["missed_rounds"] == 2 and row()["inactive_since"] is not None
    third = rounds(app)[-1]
    assert third.number == 3 and dead_id not in _tasks_of(app, third.id) and len(_tasks_of(app, third.id)) == 2
    play_round(False)  # no task for it, so the round needs no deadline
    assert rounds(app)[2].status == "done" and row()["missed_rounds"] == 2
    # it asks for work again: active at once, tasks from the next round on
    assert api.post(f"/v1/clients/{dead_id}/lease", headers=bearer(dead_token)).json()["task"] is None
    assert row()["missed_rounds"] == 0 and row()["inactive_since"] is None
    play_round(False)
    fifth = rounds(app)[-1]
    assert fifth.number == 5 and dead_id in _tasks_of(app, fifth.id)
    play_round(True)
    assert row()["missed_rounds"] == 0
    with app.state.session_factory() as s:
        assert s.get(Client, dead_id).status == "active"  # inactive is not revoked

def test_null_never_marks_a_client_inactive(api, app, clock):
    fid, secret = create_federation(api, schedule={
        "min_clients": 2, "root_rounds": 5, "round_deadline_seconds": 60, "max_consecutive_failures": None})
    clients = [register(api, fid, secret, f"c{i}") for i in range(2)]
    tick(app)
    for _ in range(4):
        cid, tok = clients[0]
        finish(api, lease(api, cid, tok), tok, seed=cid)
        clock.advance(61)
        tick(app)
    assert all(len(_tasks_of(app, r.id)) == 2 for r in rounds(app))
    table = {c["name"]: c for c in api.get(f"/v1/federations/{fid}/clients", headers=admin_headers()).json()}
    assert table["c1"]["inactive_since"] is None and table["c1"]["missed_rounds"] == 0


def test_an_inactive_late_client_gets_no_new_onboarding_round_until_it_is_back(api, app, clock):
    from test_cascade_state_machine import GROUP_OF

    dirs = group_directions()
    fid, secret = create_federation(api, schedule={
        "min_clients": 6, "root_rounds": 1, "cluster_rounds": 1, "leaf_rounds": 1, "unseen_leaf_rounds": 1,
        "round_deadline_seconds": 60, "max_consecutive_failures": 2})
    clients = {name: register(api, fid, secret, name) for name in GROUP_OF}
    tick(app)
    for seed in range(4):  # root, probe, cluster, leaf
        run_pending(api, clients, dirs, seed=seed)
    assert api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()["state"] == "serving"
    cid, token = register(api, fid, secret, "a-late")
    tick(app)
    for _ in range(4):  # it never asks for work: two failed probe rounds, then nothing new
        clock.advance(61)
        tick(app)
    probes = [r for r in rounds(app, "probe") if r.scope == f"client:{cid}"]
    assert [r.status for r in probes] == ["failed", "failed", "open"]
    table = {c["name"]: c for c in api.get(f"/v1/federations/{fid}/clients", headers=admin_headers()).json()}
    assert table["a-late"]["inactive_since"] is not None and table["a-late"]["onboarding"] == "probe"
    # back: the open probe round is its task, and onboarding goes on
    ran = run_pending(api, {"a-late": (cid, token)}, dirs, seed=9, groups={"a-late": 0})
    assert [t["stage"] for t in ran] == ["probe"]
    ran = run_pending(api, {"a-late": (cid, token)}, dirs, seed=10, groups={"a-late": 0})
    assert [t["stage"] for t in ran] == ["leaf"]
    table = {c["name"]: c for c in api.get(f"/v1/federations/{fid}/clients", headers=admin_headers()).json()}
    assert table["a-late"]["onboarding"] == "ready" and table["a-late"]["inactive_since"] is None
