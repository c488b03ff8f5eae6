"""The lease state machine under random interleavings (hypothesis, stateful), on SQLite with a
MutableClock, through the real routes and services.

Two workers lease for three clients; steps: lease, heartbeat, upload, complete, release, time
passing with a scheduler tick (leases expire, rounds aggregate), and a crash (the worker forgets
its leases, the clock jumps, and half the time the coordinator restarts on the same database and
blob store). After every step:

- nothing acknowledged is lost and nothing is counted twice: the done tasks are exactly the
  completions the workers were told succeeded, each with the upload acknowledged under that lease;
- a terminal task never changes again; a leased task has a lease id and an expiry, a pending one
  neither;
- a heartbeat or upload is accepted only under the task's current lease;
- every aggregated round's new version is exactly the aggregate of its done tasks' uploads (checked
  when the example ends).
"""

from __future__ import annotations

import hashlib

import pytest
from conftest import (
    ADMIN_TOKEN,
    MutableClock,
    bearer,
    create_federation,
    register,
    tick,
)
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select
from support.hostile import valid_root_upload

from coordinator.app import create_app
from coordinator.models import AdapterVersion, Federation, Round, Task
from coordinator.settings import Settings
from shared.aggregate import combine_tier_uploads
from shared.config import FederationConfig
from shared.tensors import pack_tensors, unpack_tensors

pytestmark = pytest.mark.api

TERMINAL = {"done", "failed", "cancelled"}
LEASE_SECONDS = 30


class LeaseMachine(RuleBasedStateMachine):
    tmp = None  # a directory for the database and blobs, set by the test
    examples = 0

    @initialize()
    def setup(self):
        LeaseMachine.examples += 1
        root = self.tmp / f"ex{LeaseMachine.examples}"
        self.settings = Settings(database_url=f"sqlite:///{root / 'coordinator.db'}", blob_dir=root / "blobs",
                                 admin_token=ADMIN_TOKEN, run_scheduler=False, lease_rate_per_second=0)
        self.clock = MutableClock()
        self._start()
        self.fid, secret = create_federation(self.api, schedule={
            "min_clients": 3, "root_rounds": 1000, "lease_seconds": LEASE_SECONDS, "max_attempts": 3})
        self.clients = [register(self.api, self.fid, secret, n, num_samples=5 + i) for i, n in enumerate("abc")]
        tick(self.app)
        self.held: dict[str, dict[int, dict]] = {"w1": {}, "w2": {}}  # worker -> task id -> lease
        self.acked_done: dict[int, str] = {}  # task id -> upload sha of the completion we were told succeeded
        self.terminal: dict[int, str] = {}

    def _start(self):
        self.app = create_app(self.settings, clock=self.clock)
        self.client_cm = TestClient(self.app)
        self.api = self.client_cm.__enter__()

    def _stop(self):
        self.client_cm.__exit__(None, None, None)
        self.app.state.engine.dispose()

    def teardown(self):
        if getattr(self, "app", None) is None:
            return
        try:
            self._check_aggregates()
        finally:
            self._stop()

    # ------------------------------------------------------------------ helpers

    def _tasks(self) -> dict[int, Task]:
        with self.app.state.session_factory() as s:
            return {t.id: t for t in s.scalars(select(Task).where(Task.federation_id == self.fid))}

    def _pick_lease(self, data) -> tuple[str, int, dict] | None:
        choices = [(w, tid) for w in sorted(self.held) for tid in sorted(self.held[w])]
        if not choices:
            return None
        worker, tid = data.draw(st.sampled_from(choices))
        return worker, tid, self.held[worker][tid]

    # ------------------------------------------------------------------ steps

    @rule(worker=st.sampled_from(["w1", "w2"]), who=st.integers(0, 2))
    def lease(self, worker, who):
        cid, token = self.clients[who]
        r = self.api.post(f"/v1/clients/{cid}/lease", headers={**bearer(token), "X-Hilora-Worker-Id": worker})
        assert r.status_code == 200, r.text
        task = r.json()["task"]
        if task is not None:
            current = self._tasks()[task["task_id"]]
            assert current.status == "leased" and current.lease_id == task["lease_id"]
            self.held[worker][task["task_id"]] = {**task, "token": token, "sha": None}

    @rule(worker=st.sampled_from(["w1", "w2"]))
    def lease_all(self, worker):
        for who in range(len(self.clients)):
            self.lease(worker, who)

    @rule(worker=st.sampled_from(["w1", "w2"]), seed=st.integers(0, 3))
    def work(self, worker, seed):
        """What a healthy worker does with its leases: upload, complete, and the scheduler wakes."""
        for tid in sorted(self.held[worker]):
            lease = self.held[worker][tid]
            self._upload(worker, tid, lease, seed)
            self._complete(worker, tid, lease)
        tick(self.app)

    @rule(data=st.data())
    def heartbeat(self, data):
        picked = self._pick_lease(data)
        if picked is None:
            return
        _worker, tid, lease = picked
        r = self.api.post(f"/v1/tasks/{tid}/heartbeat", json={"lease_id": lease["lease_id"]},
                          headers=bearer(lease["token"]))
        assert r.status_code in (200, 409), r.text
        if r.status_code == 200:
            current = self._tasks()[tid]
            assert current.status == "leased" and current.lease_id == lease["lease_id"]

    @rule(data=st.data(), seed=st.integers(0, 3))
    def upload(self, data, seed):
        picked = self._pick_lease(data)
        if picked is None:
            return
        self._upload(*picked, seed)

    def _upload(self, worker, tid, lease, seed):
        body = pack_tensors(valid_root_upload(seed=seed))
        r = self.api.put(f"/v1/tasks/{tid}/upload", params={"lease_id": lease["lease_id"]}, content=body,
                         headers=bearer(lease["token"]))
        assert r.status_code in (200, 409), r.text
        if r.status_code == 200:
            current = self._tasks()[tid]
            assert current.lease_id == lease["lease_id"]
            if current.status == "leased":
                lease["sha"] = hashlib.sha256(body).hexdigest()
            else:  # the same body again after completion: the first answer, nothing changes
                assert current.status == "done" and current.upload_sha256 == hashlib.sha256(body).hexdigest()

    @rule(data=st.data())
    def complete(self, data):
        picked = self._pick_lease(data)
        if picked is None:
            return
        self._complete(*picked)

    def _complete(self, worker, tid, lease):
        r = self.api.post(f"/v1/tasks/{tid}/complete", json={"lease_id": lease["lease_id"], "num_samples": 5},
                          headers=bearer(lease["token"]))
        assert r.status_code in (200, 409), r.text
        if r.status_code == 200:
            assert lease["sha"] is not None, "completed without an acknowledged upload"
            previous = self.acked_done.setdefault(tid, lease["sha"])
            assert previous == lease["sha"], "a task completed twice with different uploads"
            del self.held[worker][tid]
        elif r.json()["error"] != "upload_missing":
            del self.held[worker][tid]  # the lease is gone (expired, replaced or cancelled)

    @rule(data=st.data())
    def release(self, data):
        picked = self._pick_lease(data)
        if picked is None:
            return
        worker, tid, lease = picked
        r = self.api.post(f"/v1/tasks/{tid}/release", json={"lease_id": lease["lease_id"]},
                          headers=bearer(lease["token"]))
        assert r.status_code in (200, 409), r.text
        del self.held[worker][tid]
        if r.status_code == 200:
            assert self._tasks()[tid].status == "pending"

    @rule(seconds=st.sampled_from([0, 1, 10, LEASE_SECONDS + 1]))
    def time_passes(self, seconds):
        self.clock.advance(seconds)
        tick(self.app)

    @rule(worker=st.sampled_from(["w1", "w2"]), jump=st.sampled_from([0, 5, LEASE_SECONDS + 5, 300]),
          restart=st.booleans())
    def crash(self, worker, jump, restart):
        self.held[worker].clear()
        self.clock.advance(jump)
        if restart:
            self._stop()
            self._start()
        tick(self.app)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def nothing_lost_nothing_counted_twice(self):
        if getattr(self, "app", None) is None:
            return
        tasks = self._tasks()
        done = {tid: t.upload_sha256 for tid, t in tasks.items() if t.status == "done"}
        assert done == self.acked_done
        for tid, t in tasks.items():
            assert t.status in ("pending", "leased", "done", "failed", "cancelled")
            if t.status == "leased":
                assert t.lease_id is not None and t.lease_expires_at is not None
            if t.status == "pending":
                assert t.lease_id is None and t.upload_sha256 is None
            if tid in self.terminal:
                assert t.status == self.terminal[tid], f"terminal task {tid} went {self.terminal[tid]} -> {t.status}"
            elif t.status in TERMINAL:
                self.terminal[tid] = t.status

    def _check_aggregates(self):
        with self.app.state.session_factory() as s:
            cfg = FederationConfig.model_validate(s.get(Federation, self.fid).config)
            for rnd in s.scalars(select(Round).where(Round.federation_id == self.fid, Round.status == "done")):
                tasks = s.scalars(select(Task).where(Task.round_id == rnd.id, Task.status == "done")
                                  .order_by(Task.client_id)).all()
                previous = unpack_tensors(self.app.state.blobs.get_bytes(
                    s.get(AdapterVersion, rnd.input_root_version_id).blob_sha256))
                uploads = [unpack_tensors(self.app.state.blobs.get_bytes(t.upload_sha256)) for t in tasks]
                expected = combine_tier_uploads(cfg.manifest, "root", cfg.root, previous, uploads,
                                                [float(t.num_samples) for t in tasks])
                got = s.get(AdapterVersion, rnd.result_version_id).blob_sha256
                assert hashlib.sha256(pack_tensors(expected)).hexdigest() == got, f"round {rnd.id}"
                event("a round aggregated")


def test_lease_state_machine_never_loses_or_double_counts(tmp_path):
    LeaseMachine.tmp = tmp_path
    run_state_machine_as_test(LeaseMachine, settings=settings(
        max_examples=30, stateful_step_count=40, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck)))
