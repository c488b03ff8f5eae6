"""A real ``hilora worker`` process against a real coordinator process (uvicorn, SQLite) on the tiny
partition: SIGTERM with and without enough grace to finish the running task, and a coordinator
SIGKILLed and restarted on the same port and database while the worker trains."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from hilora.launcher import LocalCluster, wait_for
from worker.client import CoordinatorClient

pytestmark = [pytest.mark.integration]

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # in the child between fork and exec: no orphan if pytest dies
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


@pytest.fixture(scope="module")
def demo_backbone():
    from worker.backbone import pretrain_demo_backbone

    return pretrain_demo_backbone()


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(tmp_path / "run", scheduler_interval=0.2)
    yield c
    c.stop()


def _create_federation(cluster: LocalCluster, clients: int, local_epochs: int, root_rounds: int = 2,
                       lease_seconds: float = 30) -> tuple[int, str]:
    from hilora.federation_file import FederationFile, build_federation_config
    from worker.backbone import DEMO_BACKBONE_KWARGS, DEMO_BACKBONE_MODEL

    doc = {"name": "lifecycle", "backbone": {"model": DEMO_BACKBONE_MODEL, "model_kwargs": DEMO_BACKBONE_KWARGS,
                                             "checkpoint": "demo"},
           "adapter": {"rank": 4},
           "schedule": {"min_clients": clients, "root_rounds": root_rounds, "cluster_rounds": 1,
                        "leaf_rounds": 1, "local_epochs": local_epochs, "probe_epochs": 1, "lease_seconds": lease_seconds,
                        "retry_after_seconds": 0.25},
           "training": {"batch_size": 8}}
    config, checkpoint = build_federation_config(FederationFile.model_validate(doc))
    with CoordinatorClient(cluster.url) as client:
        client.put_blob(cluster.admin_token, checkpoint)
        created = client.create_federation(cluster.admin_token, config)
    return created.federation_id, created.enrollment_secret


def _start_worker(cluster: LocalCluster, name: str, fid: int, secret: str, clients: list[str],
                  grace: float) -> subprocess.Popen:
    config = cluster.workdir / f"{name}.json"
    config.write_text(json.dumps({"federation_id": fid, "enrollment_secret": secret,
                                  "clients": [{"name": c, "data": {"partition": "tiny", "client": c}}
                                              for c in clients]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(cluster.workdir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hilora.cli", "worker", "--coordinator", cluster.url, "--config", str(config),
             "--state-dir", str(cluster.workdir / "state"), "--threads", "1", "--device", "cpu",
             "--grace-seconds", str(grace), "--worker-id", name, "--max-seconds", "240", "--retries", "8"],
            env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)  # noqa: PLW1509
    cluster.workers.append(proc)
    return proc


def _log(cluster: LocalCluster, name: str) -> str:
    path = cluster.workdir / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _tasks(cluster: LocalCluster) -> list[dict]:
    with sqlite3.connect(cluster.workdir / "coordinator.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT id, stage, status, attempt, releases FROM tasks ORDER BY id")]


def _wait_training(cluster: LocalCluster, proc: subprocess.Popen, name: str, count: int = 1,
                   timeout: float = 90) -> None:
    def training() -> bool:
        assert proc.poll() is None, f"worker {name} exited with {proc.returncode}:\n{_log(cluster, name)[-3000:]}"
        return _log(cluster, name).count(": training task ") >= count

    assert wait_for(training, timeout, interval=0.2), _log(cluster, name)[-3000:]


def _sigterm_and_wait(proc: subprocess.Popen, limit: float) -> float:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit within {limit:.0f}s of SIGTERM")
    return time.monotonic() - t0


@pytest.mark.timeout(110)
def test_sigterm_past_the_grace_releases_the_task_and_exits_0(cluster, demo_backbone):
    """Grace 1 s and a task far longer: training stops between batches, the lease is released
    (the task is pending again, no attempt counted) and the worker exits 0 within grace + 10 s."""
    cluster.start_coordinator()
    # 2000 epochs: minutes of training on any machine (40 took 1.7 s on an idle one and finished
    # before the SIGTERM); the worker stops between batches once the 1 s grace is over
    fid, secret = _create_federation(cluster, clients=1, local_epochs=2000, root_rounds=1)
    proc = _start_worker(cluster, "w", fid, secret, ["upright-00"], grace=1)
    _wait_training(cluster, proc, "w")
    time.sleep(0.5)
    took = _sigterm_and_wait(proc, limit=1 + 10)
    log = _log(cluster, "w")
    assert proc.returncode == 0, log[-3000:]
    assert "lease released" in log and "Traceback" not in log
    [task] = _tasks(cluster)
    assert task["status"] == "pending" and task["releases"] == 1, task
    print(f"grace 1s: released, exited {took:.1f}s after SIGTERM")


@pytest.mark.timeout(110)
def test_sigterm_within_the_grace_lets_the_task_finish_and_takes_no_new_one(cluster, demo_backbone):
    """Grace 60 s: SIGTERM mid-task lets the task train, upload and complete (done, one attempt),
    then the worker exits 0 without leasing the next stage's task."""
    cluster.start_coordinator()
    fid, secret = _create_federation(cluster, clients=1, local_epochs=12, root_rounds=1)
    proc = _start_worker(cluster, "w", fid, secret, ["upright-00"], grace=60)
    _wait_training(cluster, proc, "w")
    took = _sigterm_and_wait(proc, limit=60 + 10)
    log = _log(cluster, "w")
    assert proc.returncode == 0, log[-3000:]
    assert "lease released" not in log and "Traceback" not in log
    assert log.count(": training task ") == 1
    tasks = _tasks(cluster)
    assert tasks[0]["status"] == "done" and tasks[0]["attempt"] == 1, tasks
    assert all(t["status"] == "pending" for t in tasks[1:]), tasks  # the next stage's task is not taken
    print(f"grace 60s: task finished, exited {took:.1f}s after SIGTERM")


@pytest.mark.timeout(110)
def test_worker_survives_a_coordinator_restart_mid_task(cluster, demo_backbone):
    """SIGKILL the coordinator while the worker trains, restart it on the same port and database a
    few seconds later: the worker keeps going (heartbeats and reports retried) and the federation
    reaches its next stage."""
    cluster.start_coordinator()
    # heartbeats every 5 s: the outage (>= 5 s) is met by at least one request; the lease (15 s) outlives it
    fid, secret = _create_federation(cluster, clients=2, local_epochs=6, root_rounds=2, lease_seconds=15)
    proc = _start_worker(cluster, "w", fid, secret, ["upright-00", "permuted-00"], grace=5)
    _wait_training(cluster, proc, "w")

    cluster.coordinator.kill()
    cluster.coordinator.wait(timeout=10)
    time.sleep(5)  # the worker meets connection refused for a while
    assert proc.poll() is None, _log(cluster, "w")[-3000:]
    cluster.start_coordinator()

    def next_stage() -> bool:
        assert proc.poll() is None, f"the worker died:\n{_log(cluster, 'w')[-3000:]}"
        with CoordinatorClient(cluster.url, max_retries=2) as client:
            status = client.federation_status(cluster.admin_token, fid)
        return status.state.value not in ("enrolling", "root")

    assert wait_for(next_stage, 100, interval=1.0), _log(cluster, "w")[-3000:]
    assert proc.poll() is None
    log = _log(cluster, "w")
    assert "Traceback" not in log
    assert "ConnectError" in log and "; retry 1/" in log  # it did meet the outage, and retried
    took = _sigterm_and_wait(proc, limit=5 + 10)
    assert proc.returncode == 0, log[-3000:]
    print(f"worker alive through the restart; exited {took:.1f}s after SIGTERM")


def _root_upload(cluster: LocalCluster) -> str | None:
    with sqlite3.connect(cluster.workdir / "coordinator.db") as db:
        row = db.execute("SELECT upload_sha256 FROM tasks WHERE stage = 'root' AND status = 'done'").fetchone()
    return row[0] if row else None


@pytest.mark.timeout(300)
def test_a_task_stopped_mid_training_resumes_from_its_checkpoint_to_the_same_upload(tmp_path, demo_backbone):
    """SIGTERM with no grace while a long root task trains: the worker saves the task's progress in
    its state directory, releases the lease and exits 0. Started again on the same state directory
    it leases the same task, resumes from the checkpoint and uploads exactly the bytes of an
    uninterrupted run of the same federation (a second coordinator), then removes the checkpoint."""
    epochs = 150   # 1,200 steps of batch 8: some seconds of training, checkpointed every 100 steps
    uploads = {}
    for run in ("reference", "resumed"):
        cluster = LocalCluster(tmp_path / run, scheduler_interval=0.2)
        try:
            cluster.start_coordinator()
            fid, secret = _create_federation(cluster, clients=1, local_epochs=epochs, root_rounds=1)
            proc = _start_worker(cluster, "w", fid, secret, ["upright-00"], grace=0)
            checkpoint = cluster.workdir / "state" / f"federation-{fid}" / "upright-00" / "task-checkpoint.safetensors"
            if run == "resumed":
                _wait_training(cluster, proc, "w")
                assert wait_for(checkpoint.is_file, 120, interval=0.05), _log(cluster, "w")[-3000:]  # 100 steps in
                _sigterm_and_wait(proc, limit=15)
                assert proc.returncode == 0 and "lease released" in _log(cluster, "w"), _log(cluster, "w")[-3000:]
                [task] = _tasks(cluster)
                assert task["status"] == "pending" and checkpoint.is_file()
                proc = _start_worker(cluster, "w2", fid, secret, ["upright-00"], grace=0)
            assert wait_for(lambda: _root_upload(cluster) is not None, 240, interval=0.2), _log(cluster, "w")[-3000:]
            uploads[run] = _root_upload(cluster)
            with sqlite3.connect(cluster.workdir / "coordinator.db") as db:
                metrics = json.loads(db.execute("SELECT metrics FROM tasks WHERE stage = 'root'").fetchone()[0])
            # the resumed run went on from where the SIGTERM stopped it (past the first save), not from scratch
            assert metrics["steps"] == 8 * epochs and (
                "resumed_at_step" not in metrics if run == "reference"
                else 100 <= metrics["resumed_at_step"] < 8 * epochs), metrics
            assert wait_for(lambda: not checkpoint.exists(), 30, interval=0.1)  # trained: nothing to resume
        finally:
            cluster.stop()
    assert uploads["resumed"] == uploads["reference"]
