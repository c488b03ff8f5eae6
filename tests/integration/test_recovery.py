"""Crash, kill and quorum behaviour of the production coordinator: real ``hilora coordinator``
uvicorn subprocesses on 127.0.0.1 and deterministic, torch-free fake workers
(``tests/support/fake_worker.py``) as subprocesses.

- a worker SIGKILLed mid-lease: its task is requeued after the lease TTL and finished by another
  process hosting the same client; the dead lease's late upload is refused and changes nothing;
- the coordinator SIGKILLed at fault points (``HILORA_FAULT_AT``) and restarted on the same
  database and blob store: the run reaches serving with exactly the adapter versions of an
  uninterrupted run, bit for bit, and no accepted upload lost or counted twice;
- quorum: rounds aggregate only with enough accepted uploads; short of it a round fails and a fresh
  one opens; at a deadline the round is decided and its open tasks cancelled;
- two replicas on one PostgreSQL database: versions unique and consecutive, no round aggregated twice.

Every process is killed in a fixture finalizer, every wait is bounded, and every subprocess dies
with the test process (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ADMIN_TOKEN, tiny_checkpoint, tiny_config
from sqlalchemy import select
from sqlalchemy.orm import Session
from support.fake_worker import read_events, register_clients

from coordinator.db import make_engine
from coordinator.models import AdapterVersion, Blob, Client, Federation, Round, Task
from hilora.launcher import free_port, wait_for
from shared.config import FederationConfig
from shared.tensors import pack_tensors
from worker.client import CoordinatorClient

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
FAKE_WORKER = REPO / "tests" / "support" / "fake_worker.py"
PR_SET_PDEATHSIG = 1


try:  # loaded here, so the child only makes the call (no import, no lookup after fork)
    _PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGKILL it when the test process dies, so no
    coordinator outlives an aborted test run."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path.name}: no log)"
    return f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Processes:
    """Every subprocess a test starts; ``kill_all`` runs in the fixture finalizer."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def popen(self, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as fh:
            proc = subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                    preexec_fn=_die_with_parent)  # noqa: PLW1509 - see _die_with_parent
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def procs():
    p = Processes()
    try:
        yield p
    finally:
        p.kill_all()


class Coordinator:
    """A ``hilora coordinator`` subprocess; restartable on the same database, blobs and port."""

    def __init__(self, procs: Processes, workdir: Path, database_url: str, blob_dir: Path,
                 port: int | None = None, name: str = "coordinator", scheduler_interval: float = 0.1) -> None:
        self.procs, self.workdir, self.database_url, self.blob_dir = procs, workdir, database_url, blob_dir
        self.port = port or free_port()
        self.name = name
        self.log = workdir / f"{name}.log"
        self.scheduler_interval = scheduler_interval
        self.proc: subprocess.Popen | None = None
        self.exits: list[int] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, fault_at: str | None = None, timeout: float = 60.0) -> None:
        env = dict(os.environ)
        env.pop("HILORA_FAULT_AT", None)
        env.update({
            "HILORA_DATABASE_URL": self.database_url, "HILORA_BLOB_DIR": str(self.blob_dir),
            "HILORA_ADMIN_TOKEN": ADMIN_TOKEN, "HILORA_HOST": "127.0.0.1", "HILORA_PORT": str(self.port),
            "HILORA_SCHEDULER_INTERVAL": str(self.scheduler_interval), "HILORA_LOG_LEVEL": "warning",
            "HILORA_DEV": "0", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        })
        if fault_at:
            env["HILORA_FAULT_AT"] = fault_at
        with open(self.log, "a") as fh:
            fh.write(f"\n=== start {time.strftime('%H:%M:%S')} fault_at={fault_at}\n")
        self.proc = self.procs.popen([sys.executable, "-m", "hilora.cli", "coordinator"], env, self.log)
        if timeout:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start ({self.proc.returncode}):\n{_tail(self.log)}")
            try:
                if httpx.get(f"{self.url}/v1/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready within {timeout:.0f}s:\n{_tail(self.log)}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def reap(self) -> int | None:
        """If the process ended, record and return its exit code (negative: killed by a signal)."""
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            self.exits.append(code)
            self.proc = None
            return code
        return None

    def terminate(self, timeout: float = 20.0) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


class FakeWorkerProc:
    def __init__(self, procs: Processes, workdir: Path, name: str, url: str, fid: int, secret: str,
                 clients: list[str], credentials: Path, hang: bool = False, max_seconds: float = 120,
                 work_seconds: float = 0.0) -> None:
        self.name = name
        self.log = workdir / f"{name}.jsonl"
        args = [sys.executable, str(FAKE_WORKER), "--coordinator", url, "--federation", str(fid),
                "--secret", secret, "--clients", ",".join(clients), "--credentials", str(credentials),
                "--max-seconds", str(max_seconds), "--worker-id", name, "--poll-interval", "0.05"]
        if hang:
            args.append("--hang-after-lease")
        if work_seconds:
            args += ["--work-seconds", str(work_seconds)]
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        self.proc = procs.popen(args, env, self.log)

    def events(self, event: str | None = None, **match) -> list[dict]:
        out = read_events(self.log)
        return [e for e in out if (event is None or e.get("event") == event)
                and all(e.get(k) == v for k, v in match.items())]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


# ---------------------------------------------------------------------------- federation helpers

def create_tiny_federation(url: str, name: str, schedule: dict) -> tuple[int, str, FederationConfig]:
    with CoordinatorClient(url, max_retries=2) as client:
        sha = client.put_blob(ADMIN_TOKEN, tiny_checkpoint())
        # the fake workers' uploads are random, without groups: their clustering may find K = 1, whose
        # cluster stage is skipped by default; these runs cover the cluster rounds' recovery too
        config = FederationConfig.model_validate(tiny_config(
            name, sha, schedule=schedule, clustering={"k_max": 4, "knn": 2, "skip_single_cluster": False}))
        created = client.create_federation(ADMIN_TOKEN, config)
    return created.federation_id, created.enrollment_secret, config


def api_state(url: str, fid: int, trained: bool = False) -> str | None:
    """The federation's state, or None while the coordinator is unreachable. ``trained``: report
    'serving' only once no round is open (the final evaluation rounds of a schedule without leaf
    rounds open on entering serving)."""
    try:
        r = httpx.get(f"{url}/v1/federations/{fid}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                      timeout=5)
    except httpx.TransportError:
        return None
    if r.status_code != 200:
        return None
    body = r.json()
    if trained and body["state"] == "serving" and any(x["status"] == "open" for x in body["rounds"]):
        return "evaluating"
    return body["state"]


class DB:
    """Read-only views of the coordinator's tables (the tests' source of truth)."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)

    def close(self) -> None:
        self.engine.dispose()

    def rows(self, model, *where, order=None):
        with Session(self.engine) as s:
            stmt = select(model).where(*where)
            if order is not None:
                stmt = stmt.order_by(order)
            return list(s.scalars(stmt))

    def rounds(self, fid: int, stage: str | None = None) -> list[Round]:
        where = [Round.federation_id == fid] + ([Round.stage == stage] if stage else [])
        return self.rows(Round, *where, order=Round.id)

    def tasks(self, round_id: int | None = None, fid: int | None = None) -> list[Task]:
        where = ([Task.round_id == round_id] if round_id is not None else []) + (
            [Task.federation_id == fid] if fid is not None else [])
        return self.rows(Task, *where, order=Task.id)

    def versions(self, fid: int) -> list[AdapterVersion]:
        return self.rows(AdapterVersion, AdapterVersion.federation_id == fid, order=AdapterVersion.id)

    def client_names(self, fid: int) -> dict[int, str]:
        return {c.id: c.name for c in self.rows(Client, Client.federation_id == fid)}

    def state(self, fid: int) -> str:
        return self.rows(Federation, Federation.id == fid)[0].state

    def trained(self, fid: int) -> bool:
        """Serving, and no round open (a schedule without leaf rounds ends with evaluation rounds)."""
        return self.state(fid) == "serving" and all(r.status != "open" for r in self.rounds(fid))


def check_consistency(db: DB, fid: int, schedule: dict) -> None:
    """Invariants of any finished run: one task per (round, client); every done root/cluster
    round met its quorum and produced exactly one version, versions consecutive per scope and
    each the result of exactly one round; round numbers consecutive per (stage, scope)."""
    rounds = db.rounds(fid)
    tasks = db.tasks(fid=fid)
    versions = db.versions(fid)
    assert len({(t.round_id, t.client_id) for t in tasks}) == len(tasks), "two tasks for one (round, client)"
    by_round: dict[int, list[Task]] = defaultdict(list)
    for t in tasks:
        by_round[t.round_id].append(t)
    numbers: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in rounds:
        numbers[(r.stage, r.scope)].append(r.number)
    for key, nums in numbers.items():
        assert sorted(nums) == list(range(1, len(nums) + 1)), f"round numbers of {key}: {nums}"
    per_scope: dict[str, list[int]] = defaultdict(list)
    for v in versions:
        per_scope[v.scope].append(v.version)
    for scope, vs in per_scope.items():
        assert sorted(vs) == list(range(len(vs))), f"versions of {scope}: {vs}"
    results = [r.result_version_id for r in rounds if r.result_version_id is not None]
    assert len(results) == len(set(results)), "one adapter version is the result of two rounds"
    version_by_id = {v.id: v for v in versions}
    quorum_min = schedule.get("quorum_min_clients", 1)
    for r in rounds:
        done = [t for t in by_round[r.id] if t.status == "done"]
        if r.stage in ("root", "cluster", "probe") and r.status == "done":
            n = len(by_round[r.id])
            need = max(1, min(quorum_min, n), int(np.ceil(schedule.get("quorum_min_fraction", 0.0) * n - 1e-9)))
            assert len(done) >= need, f"round {r.stage}/{r.scope}#{r.number} done with {len(done)} < {need}"
            assert r.quorum == need
            assert all(t.upload_sha256 for t in done), "a done upload task without its upload"
        if r.stage in ("root", "cluster") and r.status == "done":
            v = version_by_id[r.result_version_id]
            assert v.scope == (r.scope if r.stage == "cluster" else "root")
        if r.stage in ("root", "cluster"):
            assert (r.result_version_id is not None) == (r.status == "done")
    for scope, vs in per_scope.items():
        done_rounds = [r for r in rounds if r.status == "done" and r.stage in ("root", "cluster")
                       and (r.scope if r.stage == "cluster" else "root") == scope]
        assert len(vs) == len(done_rounds) + 1, f"{scope}: {len(vs)} versions for {len(done_rounds)} done rounds"
        # version n is the result of the n-th done round of its scope, in round order
        assert [version_by_id[r.result_version_id].version for r in sorted(done_rounds, key=lambda r: r.number)] \
            == list(range(1, len(done_rounds) + 1))


# ---------------------------------------------------------------------------- a. worker killed mid-lease

@pytest.mark.timeout(180)
def test_worker_killed_mid_lease_is_requeued_and_its_late_upload_refused(tmp_path, procs):
    t0 = time.monotonic()
    schedule = {"min_clients": 2, "root_rounds": 1, "cluster_rounds": 1, "leaf_rounds": 1,
                "lease_seconds": 2, "max_attempts": 3, "retry_after_seconds": 0.2}
    db_url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    coord = Coordinator(procs, tmp_path, db_url, tmp_path / "blobs")
    coord.start()
    db = DB(db_url)
    try:
        fid, secret, config = create_tiny_federation(coord.url, "killed-worker", schedule)
        creds = tmp_path / "credentials.json"
        register_clients(coord.url, fid, secret, ["a", "b"], creds)
        hung = FakeWorkerProc(procs, tmp_path, "hung", coord.url, fid, secret, ["a"], creds, hang=True)
        assert wait_for(lambda: hung.events("hanging"), 30, interval=0.1), _tail(hung.log)
        dead = hung.events("leased")[0]
        assert dead["stage"] == "root" and dead["attempt"] == 1
        hung.kill()
        other = FakeWorkerProc(procs, tmp_path, "b", coord.url, fid, secret, ["b"], creds)
        with Session(db.engine) as s:  # not finished by anyone yet (maybe requeued already)
            row = s.get(Task, dead["task_id"])
            assert row.status in ("leased", "pending") and row.attempt == 1 and row.upload_sha256 is None
        # the same client, from another process with the shared credentials, finishes the task
        again = FakeWorkerProc(procs, tmp_path, "a-again", coord.url, fid, secret, ["a"], creds)
        assert wait_for(lambda: again.events("completed", task_id=dead["task_id"]), 30, interval=0.1), \
            _tail(again.log) + _tail(coord.log)
        retried = again.events("leased", task_id=dead["task_id"])[0]
        assert retried["attempt"] == 2 and retried["lease_id"] != dead["lease_id"]
        root1 = db.rounds(fid, "root")[0]
        assert wait_for(lambda: db.rounds(fid, "root")[0].status == "done", 30, interval=0.1)
        # the dead lease's late upload: refused (same bytes or others) and nothing changes
        token = json.loads(creds.read_text())[f"{fid}/a"]["token"]
        with Session(db.engine) as s:
            before = s.get(Task, dead["task_id"])
            snapshot = (before.status, before.lease_id, before.upload_sha256, before.attempt, before.num_samples)
            blobs_before = sorted(s.scalars(select(Blob.sha256)))
        accepted_body = (tmp_path / "blobs" / snapshot[2][:2] / snapshot[2]).read_bytes()
        rng = np.random.default_rng(123)
        other_body = pack_tensors({k: (0.1 * rng.standard_normal(size=shape)).astype(np.float32)
                                   for k, shape in config.manifest.tier_shapes("root").items()})
        other_sha = hashlib.sha256(other_body).hexdigest()
        for body in (accepted_body, other_body):
            r = httpx.put(f"{coord.url}/v1/tasks/{dead['task_id']}/upload", params={"lease_id": dead["lease_id"]},
                          content=body, headers={"Authorization": f"Bearer {token}"}, timeout=10)
            assert r.status_code == 409, r.text
            assert r.json()["error"] == "stale_lease"
        r = httpx.post(f"{coord.url}/v1/tasks/{dead['task_id']}/complete", json={
            "lease_id": dead["lease_id"], "num_samples": 1}, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 409
        with Session(db.engine) as s:
            after = s.get(Task, dead["task_id"])
            assert (after.status, after.lease_id, after.upload_sha256, after.attempt, after.num_samples) == snapshot
            # (the run goes on meanwhile, so other blobs appear; never the refused body)
            assert s.get(Blob, other_sha) is None and set(blobs_before) <= set(s.scalars(select(Blob.sha256)))
        assert not (tmp_path / "blobs" / other_sha[:2] / other_sha).exists()
        assert snapshot[0] == "done" and snapshot[3] == 2
        assert root1.id == db.rounds(fid, "root")[0].id and len(db.rounds(fid, "root")) == 1
        # and the run finishes
        assert wait_for(lambda: db.trained(fid), 60, interval=0.2), _tail(coord.log)
        assert again.wait(30) == 0 and other.wait(30) == 0
        check_consistency(db, fid, schedule)
    finally:
        db.close()
        coord.terminate()
    print(f"\n[recovery] killed worker: {time.monotonic() - t0:.1f}s")


# ---------------------------------------------------------------------------- b. coordinator crashes

CRASH_SCHEDULE = {"min_clients": 5, "root_rounds": 2, "cluster_rounds": 1, "leaf_rounds": 1,
                  "lease_seconds": 6, "max_attempts": 5, "retry_after_seconds": 0.2}
CRASH_CLIENTS = ["c0", "c1", "c2", "c3"]


def admin_start(url: str, fid: int) -> None:
    """POST start; the coordinator may die inside this request (round_open fault): that is fine."""
    try:
        httpx.post(f"{url}/v1/federations/{fid}/start", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                   timeout=30)
    except httpx.TransportError:
        pass


def run_crash_federation(procs: Processes, workdir: Path, fault_at: str | None) -> dict:
    """Run the tiny federation with a coordinator started with ``HILORA_FAULT_AT=fault_at``:
    clients registered in a fixed order (so ids match across runs), two fake workers polling,
    then the admin starts training (min_clients is out of reach). When the coordinator dies it is
    restarted without the fault (and training started again if the start was lost). Returns what
    the database holds once the federation serves."""
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    db_url = f"sqlite:///{workdir / 'coordinator.db'}"
    coord = Coordinator(procs, workdir, db_url, workdir / "blobs")
    coord.start(fault_at=fault_at)
    db = DB(db_url)
    try:
        fid, secret, _ = create_tiny_federation(coord.url, "crash", CRASH_SCHEDULE)
        creds = workdir / "credentials.json"
        register_clients(coord.url, fid, secret, CRASH_CLIENTS, creds)
        workers = [FakeWorkerProc(procs, workdir, f"w{i}", coord.url, fid, secret, CRASH_CLIENTS[i::2], creds,
                                  max_seconds=150) for i in range(2)]
        assert wait_for(lambda: all(w.events("polling") for w in workers), 60, interval=0.1)
        admin_start(coord.url, fid)
        restarts = []

        def serving() -> bool:
            code = coord.reap()
            if code is not None:
                restarts.append(code)
                assert fault_at is not None and len(restarts) == 1, \
                    f"coordinator exited with {code}:\n{_tail(coord.log)}"
                coord.start()  # without the fault
                if api_state(coord.url, fid) == "enrolling":
                    admin_start(coord.url, fid)
                return False
            return coord.alive() and api_state(coord.url, fid, trained=True) == "serving"

        assert wait_for(serving, 120, interval=0.1), _tail(coord.log) + "\n" + _tail(workers[0].log)
        codes = [w.wait(40) for w in workers]
        assert codes == [0, 0], "\n".join(_tail(w.log) for w in workers)
        names = db.client_names(fid)
        rounds = {r.id: r for r in db.rounds(fid)}
        tasks = db.tasks(fid=fid)
        with Session(db.engine) as s:
            upload_blobs = set(s.scalars(select(Blob.sha256).where(Blob.kind == "upload")))
        events = [e for w in workers for e in w.events()]
        check_consistency(db, fid, CRASH_SCHEDULE)
        return {
            "restarts": restarts,
            "versions": {(v.tier, v.scope, v.version): v.blob_sha256 for v in db.versions(fid)},
            "rounds": sorted((r.stage, r.scope, r.number, r.status) for r in rounds.values()),
            "done": sorted((rounds[t.round_id].stage, rounds[t.round_id].scope, rounds[t.round_id].number,
                            names[t.client_id], t.upload_sha256, t.num_samples)
                           for t in tasks if t.status == "done"),
            "done_ids": {t.id for t in tasks if t.status == "done"},
            "statuses": Counter(t.status for t in tasks),
            "upload_blobs": upload_blobs,
            "completed_ids": {e["task_id"] for e in events if e["event"] == "completed"},
            "uploaded": {(e["task_id"], e["sha256"]) for e in events if e["event"] == "uploaded"},
            "task_uploads": {t.id: t.upload_sha256 for t in tasks},
            "events": Counter(e["event"] for e in events),
            "seconds": time.monotonic() - t0,
        }
    finally:
        db.close()
        coord.terminate()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    p = Processes()
    try:
        return run_crash_federation(p, tmp_path_factory.mktemp("reference"), None)
    finally:
        p.kill_all()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault_at", [
    "round_open",            # the first round, opened by the admin's start request
    "round_open:2",          # root round 2, opened in the transaction that aggregates round 1
    "after_accept:2",        # half of root round 1's uploads accepted
    "during_aggregation",    # root round 1's new version written, its row not committed
    "during_aggregation:3",  # a later aggregation (a cluster round)
])
def test_coordinator_killed_at_a_fault_point_recovers_to_the_same_versions(tmp_path, procs, reference_run,
                                                                          fault_at):
    ref = reference_run
    assert ref["restarts"] == [] and ref["statuses"]["done"] == len(ref["done"])
    run = run_crash_federation(procs, tmp_path / "run", fault_at)
    print(f"\n[recovery] {fault_at}: {run['seconds']:.1f}s (reference {ref['seconds']:.1f}s), "
          f"worker events {dict(run['events'])}")
    assert run["restarts"] == [-signal.SIGKILL], "the fault point was never reached"
    # the same rounds, the same accepted uploads (none lost, none twice), the same versions
    assert run["rounds"] == ref["rounds"]
    assert run["done"] == ref["done"]
    assert len(run["done"]) == len({(d[0], d[1], d[2], d[3]) for d in run["done"]})
    assert run["versions"] == ref["versions"]
    # every upload blob recorded is one a done task holds: an upload accepted before the crash
    # was taken up again after it, not left behind or duplicated
    assert run["upload_blobs"] == {d[4] for d in run["done"] if d[4]}
    # what the workers saw matches the database
    assert run["completed_ids"] == run["done_ids"]
    for task_id, sha in run["uploaded"]:
        assert run["task_uploads"][task_id] == sha


# ---------------------------------------------------------------------------- d. quorum

QUORUM_CLIENTS = [f"q{i}" for i in range(10)]


def _quorum_setup(procs: Processes, tmp_path: Path, schedule: dict, name: str, clients: list[str] = QUORUM_CLIENTS):
    """A coordinator on a fresh SQLite database with one tiny federation and ``clients`` registered
    (their credentials in ``tmp_path/credentials.json``)."""
    db_url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    coord = Coordinator(procs, tmp_path, db_url, tmp_path / "blobs")
    coord.start()
    fid, secret, _config = create_tiny_federation(coord.url, name, schedule)
    creds = tmp_path / "credentials.json"
    register_clients(coord.url, fid, secret, clients, creds)
    return coord, DB(db_url), fid, secret, creds


def _start_workers(procs, tmp_path, coord, fid, secret, creds, hung: int):
    """Five workers of two clients each, the first ``hung`` of which lease and hang; once all of
    them poll, the admin starts training (so the round's clock starts with every worker up)."""
    workers = []
    for w in range(5):
        workers.append(FakeWorkerProc(procs, tmp_path, f"w{w}", coord.url, fid, secret, QUORUM_CLIENTS[2 * w:2 * w + 2],
                                      creds, hang=w < hung, max_seconds=150))
    assert wait_for(lambda: all(w.events("polling") for w in workers), 60, interval=0.1), \
        "\n".join(_tail(w.log) for w in workers)
    with CoordinatorClient(coord.url, max_retries=2) as client:
        assert client.start_federation(ADMIN_TOKEN, fid).state.value == "root"
    for w in workers[:hung]:
        assert wait_for(lambda w=w: w.events("hanging"), 30, interval=0.1), _tail(w.log)
        assert len(w.events("leased")) == 2, w.events()
    return workers


@pytest.mark.timeout(240)
def test_quorum_one_worker_killed_the_round_aggregates_with_eight(tmp_path, procs):
    t0 = time.monotonic()
    schedule = {"min_clients": 11, "root_rounds": 1, "cluster_rounds": 1, "leaf_rounds": 1,
                "quorum_min_clients": 8, "lease_seconds": 4, "max_attempts": 1, "retry_after_seconds": 0.2}
    coord, db, fid, secret, creds = _quorum_setup(procs, tmp_path, schedule, "quorum-one")
    try:
        workers = _start_workers(procs, tmp_path, coord, fid, secret, creds, hung=1)
        workers[0].kill()
        assert wait_for(lambda: db.rounds(fid, "root")[0].status != "open", 30, interval=0.1), _tail(coord.log)
        root1 = db.rounds(fid, "root")[0]
        statuses = Counter(t.status for t in db.tasks(root1.id))
        assert root1.status == "done" and root1.quorum == 8, (root1.status, root1.failure)
        assert statuses == {"done": 8, "failed": 2}
        v1 = [v for v in db.versions(fid) if v.version == 1 and v.tier == "root"]
        assert len(v1) == 1 and root1.result_version_id == v1[0].id
        # the killed worker's clients come back in another process; the run finishes
        again = FakeWorkerProc(procs, tmp_path, "w0-again", coord.url, fid, secret, QUORUM_CLIENTS[:2], creds)
        assert wait_for(lambda: db.trained(fid), 90, interval=0.2), _tail(coord.log) + _tail(again.log)
        assert [w.wait(30) for w in workers[1:] + [again]] == [0] * 5
        assert all(r.status == "done" for r in db.rounds(fid))
        check_consistency(db, fid, schedule)
    finally:
        db.close()
        coord.terminate()
    print(f"\n[recovery] quorum, one worker killed: {time.monotonic() - t0:.1f}s")


@pytest.mark.timeout(240)
def test_quorum_three_workers_killed_the_round_fails_and_reopens(tmp_path, procs):
    t0 = time.monotonic()
    schedule = {"min_clients": 11, "root_rounds": 1, "cluster_rounds": 1, "leaf_rounds": 1,
                "quorum_min_clients": 8, "lease_seconds": 4, "max_attempts": 1, "retry_after_seconds": 0.2}
    coord, db, fid, secret, creds = _quorum_setup(procs, tmp_path, schedule, "quorum-three")
    try:
        workers = _start_workers(procs, tmp_path, coord, fid, secret, creds, hung=3)
        for w in workers[:3]:
            w.kill()
        assert wait_for(lambda: len(db.rounds(fid, "root")) >= 2, 30, interval=0.1), _tail(coord.log)
        first, second = db.rounds(fid, "root")[:2]
        assert first.status == "failed" and first.result_version_id is None and first.failure
        # the six dead leases expire (max_attempts 1: failed); once 8 is out of reach the round is
        # decided and the dead tasks still open are cancelled
        statuses = Counter(t.status for t in db.tasks(first.id))
        assert statuses["done"] == 4 and statuses["failed"] >= 1 and statuses["failed"] + statuses["cancelled"] == 6
        assert second.number == 2 and second.status == "open" and second.quorum == 8
        assert len(db.tasks(second.id)) == 10
        assert {t.id for t in db.tasks(second.id)}.isdisjoint(t.id for t in db.tasks(first.id))
        assert [v.version for v in db.versions(fid) if v.tier == "root"] == [0]  # nothing from 4 uploads
        # the six clients come back; the fresh round completes with all ten
        again = FakeWorkerProc(procs, tmp_path, "again", coord.url, fid, secret, QUORUM_CLIENTS[:6], creds)
        assert wait_for(lambda: db.trained(fid), 90, interval=0.2), _tail(coord.log) + _tail(again.log)
        assert [w.wait(30) for w in workers[3:] + [again]] == [0] * 3
        roots = db.rounds(fid, "root")
        assert [(r.number, r.status) for r in roots] == [(1, "failed"), (2, "done")]
        assert Counter(t.status for t in db.tasks(roots[1].id)) == {"done": 10}
        assert [v.version for v in db.versions(fid) if v.tier == "root"] == [0, 1]
        check_consistency(db, fid, schedule)
    finally:
        db.close()
        coord.terminate()
    print(f"\n[recovery] quorum, three workers killed: {time.monotonic() - t0:.1f}s")


@pytest.mark.timeout(240)
def test_quorum_at_the_deadline_aggregates_and_cancels_the_open_tasks(tmp_path, procs):
    t0 = time.monotonic()
    schedule = {"min_clients": 11, "root_rounds": 1, "cluster_rounds": 1, "leaf_rounds": 1,
                "quorum_min_clients": 8, "lease_seconds": 120, "max_attempts": 2,
                "round_deadline_seconds": 4, "retry_after_seconds": 0.2}
    coord, db, fid, secret, creds = _quorum_setup(procs, tmp_path, schedule, "quorum-deadline")
    try:
        workers = _start_workers(procs, tmp_path, coord, fid, secret, creds, hung=1)
        hung_leases = workers[0].events("leased")
        assert wait_for(lambda: db.rounds(fid, "root")[0].status != "open", 30, interval=0.1), _tail(coord.log)
        root1 = db.rounds(fid, "root")[0]
        assert root1.status == "done" and root1.deadline_at is not None
        assert Counter(t.status for t in db.tasks(root1.id)) == {"done": 8, "cancelled": 2}
        assert (root1.closed_at - root1.created_at).total_seconds() >= 4 - 0.5
        # the hung worker's late upload is refused: its task was cancelled
        creds_doc = json.loads(creds.read_text())
        for lease in hung_leases:
            token = creds_doc[f"{fid}/{lease['client']}"]["token"]
            rng = np.random.default_rng(5)
            body = pack_tensors({k: (0.1 * rng.standard_normal(size=s)).astype(np.float32) for k, s in
                                 FederationConfig.model_validate(tiny_config("x", "0" * 64)).manifest
                                 .tier_shapes("root").items()})
            r = httpx.put(f"{coord.url}/v1/tasks/{lease['task_id']}/upload", params={"lease_id": lease["lease_id"]},
                          content=body, headers={"Authorization": f"Bearer {token}"}, timeout=10)
            assert r.status_code == 409 and r.json()["error"] == "task_cancelled", r.text
        assert all(t.upload_sha256 is None for t in db.tasks(root1.id) if t.status == "cancelled")
        workers[0].kill()
        again = FakeWorkerProc(procs, tmp_path, "w0-again", coord.url, fid, secret, QUORUM_CLIENTS[:2], creds)
        assert wait_for(lambda: db.trained(fid), 90, interval=0.2), _tail(coord.log) + _tail(again.log)
        check_consistency(db, fid, schedule)
    finally:
        db.close()
        coord.terminate()
    print(f"\n[recovery] quorum at the deadline: {time.monotonic() - t0:.1f}s")


# ---------------------------------------------------------------------------- release on SIGTERM

@pytest.mark.timeout(180)
def test_a_stopping_worker_releases_its_lease_without_spending_an_attempt(tmp_path, procs):
    schedule = {"min_clients": 2, "root_rounds": 1, "cluster_rounds": 1, "leaf_rounds": 1,
                "lease_seconds": 60, "max_attempts": 1, "retry_after_seconds": 0.2}
    db_url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    coord = Coordinator(procs, tmp_path, db_url, tmp_path / "blobs")
    coord.start()
    db = DB(db_url)
    try:
        fid, secret, _ = create_tiny_federation(coord.url, "release", schedule)
        creds = tmp_path / "credentials.json"
        register_clients(coord.url, fid, secret, ["a", "b"], creds)
        slow = FakeWorkerProc(procs, tmp_path, "slow", coord.url, fid, secret, ["a"], creds, work_seconds=60)
        assert wait_for(lambda: slow.events("leased"), 30, interval=0.1), _tail(slow.log)
        first = slow.events("leased")[0]
        slow.proc.send_signal(signal.SIGTERM)
        assert slow.wait(20) == 4, _tail(slow.log)
        assert slow.events("released", task_id=first["task_id"])
        with Session(db.engine) as s:
            task = s.get(Task, first["task_id"])
            assert task.status == "pending" and task.releases == 1 and task.lease_id is None
        # max_attempts is 1, yet the released task is leased and finished again
        workers = [FakeWorkerProc(procs, tmp_path, n, coord.url, fid, secret, [n], creds) for n in ("a", "b")]
        assert wait_for(lambda: db.trained(fid), 60, interval=0.2), _tail(coord.log)
        assert [w.wait(30) for w in workers] == [0, 0]
        with Session(db.engine) as s:
            task = s.get(Task, first["task_id"])
            assert task.status == "done" and task.attempt == 2 and task.releases == 1
        check_consistency(db, fid, schedule)
    finally:
        db.close()
        coord.terminate()


# ---------------------------------------------------------------------------- e. two replicas, one Postgres

@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_two_replicas_on_one_postgres_database(tmp_path, procs, pg_server):
    t0 = time.monotonic()
    schedule = {"min_clients": 8, "root_rounds": 2, "cluster_rounds": 2, "leaf_rounds": 1,
                "lease_seconds": 30, "max_attempts": 3, "retry_after_seconds": 0.2}
    db_url = pg_server.create_database()
    blob_dir = tmp_path / "blobs"  # the replicas share the blob store as they share the database
    replicas = [Coordinator(procs, tmp_path, db_url, blob_dir, name=f"replica{i}") for i in range(2)]
    db = None
    try:
        for r in replicas:  # both at once: they also migrate the empty database concurrently
            r.start(timeout=0)
        for r in replicas:
            r.wait_ready(90)
        db = DB(db_url)
        fid, secret, _ = create_tiny_federation(replicas[0].url, "replicas", schedule)
        creds = tmp_path / "credentials.json"
        names = [f"r{i}" for i in range(8)]
        workers = [FakeWorkerProc(procs, tmp_path, f"w{w}", replicas[w % 2].url, fid, secret, names[w::4], creds,
                                  max_seconds=200) for w in range(4)]

        def serving() -> bool:
            for r in replicas:
                assert r.alive(), _tail(r.log)
            return db.trained(fid)

        assert wait_for(serving, 200, interval=0.3), "\n".join(_tail(r.log) for r in replicas)
        assert [w.wait(40) for w in workers] == [0] * 4, "\n".join(_tail(w.log) for w in workers)
        # both replicas served the workers
        assert all(w.events("completed") for w in workers)
        rounds = db.rounds(fid)
        assert all(r.status == "done" for r in rounds), [(r.stage, r.scope, r.number, r.status) for r in rounds]
        assert [r.number for r in rounds if r.stage == "root"] == [1, 2]
        assert Counter(t.status for r in rounds if r.stage == "root" for t in db.tasks(r.id)) == {"done": 16}
        check_consistency(db, fid, schedule)
        for r in replicas:
            assert "Traceback" not in r.log.read_text(errors="replace"), _tail(r.log, 80)
    finally:
        if db is not None:
            db.close()
        for r in replicas:
            r.terminate()
        pg_server.drop_database(db_url)
    print(f"\n[recovery] two replicas on postgres: {time.monotonic() - t0:.1f}s")


@pytest.mark.timeout(240)
def test_a_dead_workers_clients_go_inactive_and_the_federation_completes_without_an_admin(tmp_path, procs):
    """Issue 16 (partial participation) with the default 'auto' deadline of issue 15: the worker of
    c and d leases their first tasks and dies. Round 1 decides when their leases expire at their last
    attempt, round 2 (never leased) at its auto deadline; after 2 missed rounds in a row they are
    inactive, later rounds ask only a and b, and the cascade reaches serving with no admin action."""
    t0 = time.monotonic()
    schedule = {"min_clients": 4, "root_rounds": 4, "cluster_rounds": 1, "leaf_rounds": 1,
                "lease_seconds": 2, "max_attempts": 1, "max_consecutive_failures": 2, "retry_after_seconds": 0.2}
    coord, db, fid, secret, creds = _quorum_setup(procs, tmp_path, schedule, "dead-worker", ["a", "b", "c", "d"])
    try:
        dead = FakeWorkerProc(procs, tmp_path, "dead", coord.url, fid, secret, ["c", "d"], creds, hang=True)
        assert wait_for(lambda: dead.events("hanging"), 30, interval=0.1), _tail(dead.log)
        dead.kill()
        alive = FakeWorkerProc(procs, tmp_path, "alive", coord.url, fid, secret, ["a", "b"], creds)
        assert wait_for(lambda: db.trained(fid), 120, interval=0.2), _tail(coord.log) + _tail(alive.log)
        names = db.client_names(fid)
        per_round = [(r.stage, r.number, sorted(names[t.client_id] for t in db.tasks(r.id))) for r in db.rounds(fid)]
        roots = [tasks for stage, _n, tasks in per_round if stage == "root"]
        assert roots[:2] == [["a", "b", "c", "d"]] * 2 and roots[2:] == [["a", "b"]] * 2, per_round
        assert all(tasks == ["a", "b"] for stage, _n, tasks in per_round if stage != "root"), per_round
        with Session(db.engine) as s:
            rows = {c.name: c for c in s.scalars(select(Client).where(Client.federation_id == fid))}
            assert {n: (c.inactive_since is not None, c.missed_rounds) for n, c in rows.items()} == {
                "a": (False, 0), "b": (False, 0), "c": (True, 2), "d": (True, 2)}
            assert {c.status for c in rows.values()} == {"active"}
        assert [r for r in db.rounds(fid, "root")][1].deadline_at is not None  # decided by its auto deadline
        assert alive.wait(60) == 0
        check_consistency(db, fid, schedule)
    finally:
        db.close()
        coord.terminate()
    print(f"\n[recovery] dead worker, inactive clients: {time.monotonic() - t0:.1f}s")


# ---------------------------------------------------------------------------- e. a crash inside a cycle

def _labelled(scope: str, labels: dict[int, int]) -> str:
    """A scope with its cluster id replaced by the cluster's label (ids from a sequence may differ
    between backends' crash histories; labels are what the federation decides)."""
    kind, _, rest = scope.partition(":")
    return f"{kind}:label{labels[int(rest)]}" if rest.isdigit() and int(rest) in labels else scope


CYCLE_CLIENTS = ["c0", "c1", "c2", "c3"]
CYCLE_NEWCOMERS = ["n0", "n1"]
# the fake workers' probes carry no groups, so the clusters are given by hand: two in the first
# cascade; the newcomers, onboarded meanwhile into the nearest one, get a third in the cycle
CYCLE_ASSIGNMENT = {"c0": 0, "c1": 0, "c2": 1, "c3": 1, "n0": 2, "n1": 2}


def run_cycle_crash(procs: Processes, workdir: Path, db_url: str, fault_at: str | None) -> dict:
    """The tiny federation to serving (no fault), two newcomers onboarded, then the coordinator
    restarted with ``HILORA_FAULT_AT=fault_at`` (counted from that start) and a cycle requested: the
    fault fires inside the cycle (its probe round opened by the scheduler, the reclustering
    transaction that makes the newcomers' cluster and opens the cluster rounds, an accepted probe
    upload, a cluster round's aggregation). The coordinator is restarted without the fault and the
    cycle runs to serving (probe, a new cluster warm-started from the newcomers' old one, cluster
    rounds, fresh leaves for the newcomers, an evaluation of everyone). Returns what the database
    holds then, cluster scopes by label."""
    from coordinator.models import Cluster

    workdir.mkdir(parents=True, exist_ok=True)
    coord = Coordinator(procs, workdir, db_url, workdir / "blobs")
    coord.start()
    db = DB(db_url)
    try:
        with CoordinatorClient(coord.url, max_retries=2) as client:
            config = FederationConfig.model_validate(tiny_config(
                "cycle-crash", client.put_blob(ADMIN_TOKEN, tiny_checkpoint()), schedule=CRASH_SCHEDULE,
                clustering={"algorithm": "manual", "assignment": CYCLE_ASSIGNMENT, "k_max": 4, "knn": 2}))
            created = client.create_federation(ADMIN_TOKEN, config)
        fid, secret = created.federation_id, created.enrollment_secret
        creds = workdir / "credentials.json"
        register_clients(coord.url, fid, secret, CYCLE_CLIENTS, creds)

        def workers(tag: str, names: list[str]) -> list[FakeWorkerProc]:
            return [FakeWorkerProc(procs, workdir, f"{tag}{i}", coord.url, fid, secret, names[i::2], creds,
                                   max_seconds=150) for i in range(2)]

        def settled(ws: list[FakeWorkerProc]) -> None:
            assert wait_for(lambda: db.trained(fid) and all(w.proc.poll() is not None for w in ws), 120,
                            interval=0.1), _tail(coord.log) + "\n".join(_tail(w.log) for w in ws)
            assert [w.wait(1) for w in ws] == [0, 0], "\n".join(_tail(w.log) for w in ws)

        first = workers("w", CYCLE_CLIENTS)
        assert wait_for(lambda: all(w.events("polling") for w in first), 60, interval=0.1)
        admin_start(coord.url, fid)
        settled(first)
        register_clients(coord.url, fid, secret, CYCLE_NEWCOMERS, creds)
        settled(workers("late", CYCLE_NEWCOMERS))   # onboarded: probe, nearest cluster, leaf

        coord.terminate()
        coord.start(fault_at=fault_at)
        try:
            httpx.post(f"{coord.url}/v1/federations/{fid}/cycle", json={"reason": "test"},
                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30).raise_for_status()
        except httpx.TransportError:
            pass
        restarts: list[int] = []
        cycle_workers: list[FakeWorkerProc] = []

        def cycled() -> bool:
            code = coord.reap()
            if code is not None:
                restarts.append(code)
                assert fault_at is not None and len(restarts) == 1, \
                    f"coordinator exited with {code}:\n{_tail(coord.log)}"
                coord.start()  # without the fault
                return False
            if not coord.alive():
                return False
            with Session(db.engine) as s:
                fed = s.get(Federation, fid)
                cycle, state = fed.cycle, fed.state
            # the workers start once the cycle's first round is open (an idle worker whose
            # clients are all ready exits)
            if not cycle_workers and cycle == 1 and state != "serving":
                cycle_workers.extend(workers("c", CYCLE_CLIENTS + CYCLE_NEWCOMERS))
            return cycle == 1 and db.trained(fid) and bool(cycle_workers)

        assert wait_for(cycled, 150, interval=0.1), _tail(coord.log)
        assert [w.wait(40) for w in cycle_workers] == [0, 0], "\n".join(_tail(w.log) for w in cycle_workers)
        check_consistency(db, fid, CRASH_SCHEDULE)
        labels = {c.id: c.label for c in db.rows(Cluster, Cluster.federation_id == fid)}
        names = db.client_names(fid)
        rounds = {r.id: r for r in db.rounds(fid)}
        return {
            "restarts": restarts,
            "versions": {(v.tier, _labelled(v.scope, labels), v.version): v.blob_sha256 for v in db.versions(fid)},
            "rounds": sorted((r.cycle, r.stage, _labelled(r.scope, labels), r.number, r.status)
                             for r in rounds.values()),
            "done": sorted((rounds[t.round_id].stage, _labelled(rounds[t.round_id].scope, labels),
                            rounds[t.round_id].number, names[t.client_id], t.upload_sha256)
                           for t in db.tasks(fid=fid) if t.status == "done"),
            "clusters": sorted((labels[c.cluster_id] if c.cluster_id in labels else None, c.name)
                               for c in db.rows(Client, Client.federation_id == fid)),
        }
    finally:
        db.close()
        coord.terminate()


@pytest.fixture(scope="module")
def cycle_references():
    """The uninterrupted run, once per backend (computed on first use)."""
    return {}


CYCLE_FAULTS = [
    "round_open",            # the cycle's probe round, opened by the scheduler
    "after_accept:2",        # half of the cycle's probe uploads accepted
    "round_open:2",          # the reclustering transaction, which opens the cycle's cluster rounds
    "during_aggregation",    # the first cluster round of the cycle: its version written, not committed
]


@pytest.mark.timeout(420)
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize("fault_at", CYCLE_FAULTS)
def test_coordinator_killed_inside_a_cycle_recovers_to_the_same_versions(tmp_path, procs, request, backend, fault_at,
                                                                        cycle_references):
    def database(name: str) -> tuple[str, object]:
        if backend == "sqlite":
            return f"sqlite:///{tmp_path / name}.db", None
        server = request.getfixturevalue("pg_server")
        return server.create_database(), server

    if backend not in cycle_references:
        url, server = database("reference")
        try:
            cycle_references[backend] = run_cycle_crash(procs, tmp_path / "reference", url, None)
        finally:
            if server is not None:
                server.drop_database(url)
    ref = cycle_references[backend]
    assert ref["restarts"] == [] and {r[0] for r in ref["rounds"]} == {0, 1}
    # the cycle made the newcomers' cluster, trained the three, gave the newcomers fresh leaves
    assert ref["clusters"] == sorted((CYCLE_ASSIGNMENT[n], n) for n in CYCLE_CLIENTS + CYCLE_NEWCOMERS)
    cycle_rounds = [(stage, scope) for cycle, stage, scope, _n, _s in ref["rounds"] if cycle == 1]
    assert sorted(cycle_rounds) == sorted([("probe", "all")] + [("cluster", f"cluster:label{k}") for k in range(3)]
                                          + [("leaf", "leaf:label2")] + [("eval", f"eval:label{k}") for k in range(3)])
    url, server = database("run")
    try:
        run = run_cycle_crash(procs, tmp_path / "run", url, fault_at)
    finally:
        if server is not None:
            server.drop_database(url)
    assert run["restarts"] == [-signal.SIGKILL], "the fault point was never reached"
    assert run["rounds"] == ref["rounds"]
    assert run["done"] == ref["done"]
    assert run["versions"] == ref["versions"]
    assert run["clusters"] == ref["clusters"]
