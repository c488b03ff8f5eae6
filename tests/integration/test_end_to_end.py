"""The real thing on loopback: a coordinator subprocess (uvicorn, SQLite), worker subprocesses
training the tiny ViT, the whole cascade to serving, and the ``hilora demo`` command itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from hilora.launcher import LocalCluster, wait_for
from worker.client import CoordinatorClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def demo_backbone():
    from worker.backbone import pretrain_demo_backbone

    return pretrain_demo_backbone()


def _federation_file(num_clients: int, **clustering) -> dict:
    from worker.backbone import DEMO_BACKBONE_KWARGS, DEMO_BACKBONE_MODEL

    return {"name": "it", "backbone": {"model": DEMO_BACKBONE_MODEL, "model_kwargs": DEMO_BACKBONE_KWARGS,
                                       "checkpoint": "demo"},
            "adapter": {"rank": 4},
            "schedule": {"min_clients": num_clients, "root_rounds": 2, "cluster_rounds": 2, "leaf_rounds": 1,
                         "unseen_leaf_rounds": 1, "local_epochs": 2, "probe_epochs": 2, "lease_seconds": 60,
                         "retry_after_seconds": 0.25},
            "training": {"head_lr": 3e-2},
            "clustering": {"knn": 2, "k_max": 4, **clustering}}


def _run_to_serving(cluster: LocalCluster, doc: dict, clients: list, workers: int, timeout: float = 400,
                    worker_env: dict[str, str] | None = None) -> int:
    """Start the coordinator, create the federation of ``doc``, host ``clients`` on ``workers``
    worker processes (the last one with ``worker_env``) and wait until the federation serves and no
    round is open (a final evaluation, when the schedule has no leaf rounds). Returns its id."""
    from hilora.federation_file import FederationFile, build_federation_config

    config, checkpoint = build_federation_config(FederationFile.model_validate(doc))
    cluster.start_coordinator()
    with CoordinatorClient(cluster.url) as client:
        client.put_blob(cluster.admin_token, checkpoint)
        created = client.create_federation(cluster.admin_token, config)
        fid = created.federation_id
        for w in range(workers):
            cluster.start_worker(f"w{w}", {
                "federation_id": fid, "enrollment_secret": created.enrollment_secret,
                "clients": [{"name": c.name, "data": {"partition": "tiny", "client": c.name}}
                            for c in clients[w::workers]]}, max_seconds=timeout,
                extra_env=worker_env if w == workers - 1 else None)

        def serving() -> bool:
            cluster.check_workers()
            status = client.federation_status(cluster.admin_token, fid)
            return status.state.value == "serving" and all(r.status.value != "open" for r in status.rounds)

        assert wait_for(serving, timeout, interval=1.0), cluster.tail("w0.log")
    return fid


def test_cascade_over_real_http_with_worker_processes(tmp_path, demo_backbone):
    from worker.data import load_partition, partition_clients

    clients = [c for c in partition_clients(load_partition("tiny")) if not c.unseen]
    cluster = LocalCluster(tmp_path / "run")
    try:
        fid = _run_to_serving(cluster, _federation_file(len(clients), refine_rounds=1), clients, workers=2,
                              worker_env={"HILORA_LOG_FORMAT": "json"})
        with CoordinatorClient(cluster.url) as client:
            status = client.federation_status(cluster.admin_token, fid)
            report = client.federation_report(cluster.admin_token, fid)
        # every stage ran, in order, and finished; one refinement after the first cluster round
        stages = [r.stage for r in report.rounds]
        assert stages[:3] == ["root", "root", "probe"] and "cluster" in stages and stages[-1] == "leaf"
        assert stages.count("refine") == 1 and stages.index("refine") > stages.index("cluster")
        assert "eval" not in stages   # the leaf round evaluated every final version: no evaluation round
        assert all(r.status == "done" for r in report.rounds)
        assert status.root_version == 2 and status.clustering is not None and status.clustering.k == 2
        # the refinement: every client's real losses (root and both clusters); the planted groups kept
        assert status.clustering.algorithm == "refine" and status.unassigned == 0
        for c in report.clients:
            losses = [v for k, v in c.metrics.items() if k.startswith("refine_loss_c")]
            assert len(losses) == 2 and all(v > 0 for v in losses) and c.metrics["refine_loss_root"] > 0
        groups = {c.cluster_label for c in report.clients if c.name.startswith("upright")}
        assert len(groups) == 1 and groups.isdisjoint(
            {c.cluster_label for c in report.clients if c.name.startswith("permuted")})
        # every client reported all three tiers, each a real accuracy
        assert len(report.clients) == len(clients)
        for c in report.clients:
            for key in ("acc_root", "acc_cluster", "acc_leaf"):
                assert 0.0 <= c.metrics[key] <= 1.0
            assert c.uploaded_bytes > 0 and c.cluster_label is not None
            # each task's time per phase (issue 17): training and evaluation take time, so does an upload
            assert c.metrics["time_compute"] > 0 and c.metrics["time_eval"] > 0 and c.metrics["time_upload"] > 0
            assert c.metrics["time_data"] >= 0 and c.metrics["time_fetch"] > 0
        # the shared root serves the permuted group badly; its cluster and leaf fix that
        permuted = [c for c in report.clients if c.name.startswith("permuted")]
        assert len(permuted) == 3
        mean = lambda key, cs: sum(c.metrics[key] for c in cs) / len(cs)  # noqa: E731
        assert mean("acc_root", permuted) < 0.6
        assert mean("acc_cluster", report.clients) > mean("acc_root", report.clients) + 0.15
        assert mean("acc_leaf", report.clients) > 0.75
        # the second worker logged JSON lines, each line of a task with its task, client and federation
        lines = [json.loads(line) for line in (tmp_path / "run" / "w1.log").read_text().splitlines()
                 if line.startswith("{")]
        training = [e for e in lines if "training task" in e["message"]]
        assert training and all(e["federation_id"] == fid and e["client"] in {c.name for c in clients[1::2]}
                                and e["task_id"] >= 1 and e["level"] == "info" for e in training)
        assert all(set(e) >= {"time", "level", "logger", "message"} for e in lines)
        # tokens and leaves stayed on the worker side
        saved = list((tmp_path / "run" / "state").glob("federation-*/*/leaf.safetensors"))
        assert len(saved) == len(clients)
        creds = list((tmp_path / "run" / "state").glob("federation-*/*/credentials.json"))
        assert all(oct(p.stat().st_mode)[-3:] == "600" for p in creds)
        # workers exit by themselves once their clients are ready
        assert wait_for(lambda: all(p.poll() is not None for p in cluster.workers), 60)
        assert all(p.returncode == 0 for p in cluster.workers)
    finally:
        cluster.stop()


def test_worker_with_a_wrong_enrollment_secret_fails_clearly(tmp_path, demo_backbone):
    from hilora.federation_file import FederationFile, build_federation_config

    config, checkpoint = build_federation_config(FederationFile.model_validate(_federation_file(2)))
    cluster = LocalCluster(tmp_path / "run")
    try:
        cluster.start_coordinator()
        with CoordinatorClient(cluster.url) as client:
            client.put_blob(cluster.admin_token, checkpoint)
            fid = client.create_federation(cluster.admin_token, config).federation_id
        proc = cluster.start_worker("bad", {"federation_id": fid, "enrollment_secret": "hle_wrong",
                                            "clients": [{"name": "x", "data": {"partition": "tiny",
                                                                               "client": "upright-00"}}]})
        proc.wait(timeout=120)
        assert proc.returncode == 2
        assert "enrollment secret is wrong" in cluster.tail("bad.log")
    finally:
        cluster.stop()


def test_hilora_demo_command_smoke(tmp_path, demo_backbone):
    report = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "hilora.cli", "demo", "--partition", "tiny", "--workers", "2", "--root-rounds", "1",
         "--cluster-rounds", "1", "--leaf-rounds", "1", "--report", str(report), "--timeout", "400"],
        env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ARI" in proc.stdout and "training: +leaf" in proc.stdout
    data = json.loads(report.read_text())
    for key in ("root", "cluster", "leaf"):
        assert 0.0 <= data["tiers"][key]["mean"] <= 1.0 and data["tiers"][key]["p10"] is not None
    assert data["clustering"]["k"] >= 1 and data["clustering"]["ari"] is not None
    assert 0 < data["wall_seconds"] < time.monotonic() - t0 + 1


def test_fedsa_configuration_keeps_b_on_the_workers(tmp_path, demo_backbone):
    """A FedSA-style federation (A averaged, B local, no clusters) through real workers: B lives
    only in the workers' state directories and the coordinator's root keeps B at zero."""
    from shared.tensors import unpack_tensors
    from worker.data import load_partition, partition_clients

    clients = [c for c in partition_clients(load_partition("tiny")) if not c.unseen][:4]
    doc = _federation_file(len(clients))
    doc.update(name="fedsa", root={"B": "local", "aggregation": "factor_avg"}, cluster={"enabled": False})
    cluster = LocalCluster(tmp_path / "run")
    try:
        fid = _run_to_serving(cluster, doc, clients, workers=1, timeout=300)
        with CoordinatorClient(cluster.url) as client:
            report = client.federation_report(cluster.admin_token, fid)
            stages = [r.stage for r in report.rounds]
            assert stages == ["root", "root", "leaf"]
            assert client.federation_status(cluster.admin_token, fid).root_version == 2
        local = sorted((tmp_path / "run" / "state").glob("federation-*/*/local-root.safetensors"))
        assert len(local) == len(clients)
        tensors = unpack_tensors(local[0].read_bytes())
        assert tensors and all(k.endswith("lora_B") for k in tensors)
        assert any(float(abs(v).max()) > 0 for v in tensors.values())  # B trained, on the worker
        # the root versions (the only blobs holding both A and B) never saw a client's B
        stored = [p.read_bytes() for p in (tmp_path / "run" / "blobs").glob("??/*")]
        roots = [unpack_tensors(b) for b in stored if b"lora_A" in b[:4096] and b"lora_B" in b[:4096]]
        assert roots and all(float(abs(v).max()) == 0.0 for r in roots for k, v in r.items() if k.endswith("lora_B"))
    finally:
        cluster.stop()


def test_worker_with_a_class_the_federation_does_not_list_stops_in_one_line(tmp_path):
    """``hilora worker`` on ImageFolder data holding a class outside the federation's ``classes``:
    exit 2 and one line naming the class, before any task is leased."""
    import hashlib

    from conftest import ADMIN_TOKEN, tiny_checkpoint, tiny_config
    from support.datasets import imagefolder_site

    partition = imagefolder_site(tmp_path / "site", "site-a", {"train": {"cat": 1, "fox": 1}, "test": {"cat": 1}})
    cluster = LocalCluster(tmp_path / "run", admin_token=ADMIN_TOKEN)
    try:
        cluster.start_coordinator()
        with CoordinatorClient(cluster.url) as client:
            data = tiny_checkpoint()
            sha = client.put_blob(ADMIN_TOKEN, data)
            assert sha == hashlib.sha256(data).hexdigest()
            created = client.request("POST", "/v1/federations", ADMIN_TOKEN, json={"config": tiny_config(
                "classes", sha, classes=["cat", "dog", "eel"], schedule={"min_clients": 1})}).json()
            fid, secret = created["federation_id"], created["enrollment_secret"]
            proc = cluster.start_worker("w", {"federation_id": fid, "enrollment_secret": secret, "clients": [
                {"name": "site-a", "data": {"partition": str(partition), "client": "site-a"}}]})
            proc.wait(timeout=120)
            log = cluster.tail("w.log")
            assert proc.returncode == 2, log
            assert "error: client site-a holds classes the federation does not list: 'fox'" in log
            assert "Traceback" not in log
            rows = client.request("GET", f"/v1/federations/{fid}/clients", ADMIN_TOKEN).json()
            assert [r["tasks_done"] for r in rows] == [0]
    finally:
        cluster.stop()


def test_one_worker_on_two_devices_runs_a_process_per_device(tmp_path, demo_backbone):
    """``--device cpu,cpu`` (as ``cuda:0,cuda:1`` would on a machine with two GPUs): the clients are
    registered once, then two processes, one per device, take their tasks; the federation serves
    and both processes trained."""
    from hilora.federation_file import FederationFile, build_federation_config
    from worker.data import load_partition, partition_clients

    clients = [c for c in partition_clients(load_partition("tiny")) if not c.unseen]
    config, checkpoint = build_federation_config(FederationFile.model_validate(_federation_file(len(clients))))
    cluster = LocalCluster(tmp_path / "run")
    try:
        cluster.start_coordinator()
        with CoordinatorClient(cluster.url) as client:
            client.put_blob(cluster.admin_token, checkpoint)
            created = client.create_federation(cluster.admin_token, config)
            fid = created.federation_id
            spec = cluster.workdir / "w.json"
            spec.write_text(json.dumps({"federation_id": fid, "enrollment_secret": created.enrollment_secret,
                                        "clients": [{"name": c.name, "data": {"partition": "tiny", "client": c.name}}
                                                    for c in clients]}))
            with open(cluster.workdir / "w.log", "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "hilora.cli", "worker", "--coordinator", cluster.url, "--config", str(spec),
                     "--state-dir", str(cluster.workdir / "state"), "--device", "cpu,cpu", "--threads", "1",
                     "--worker-id", "two", "--exit-when-idle", "--max-seconds", "400"],
                    env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT)
            assert proc.wait(timeout=420) == 0, cluster.tail("w.log")
            status = client.federation_status(cluster.admin_token, fid)
            workers = client.request("GET", f"/v1/federations/{fid}/workers", cluster.admin_token).json()["workers"]
        assert status.state.value == "serving" and len(status.clusters) == 2
        assert sorted(w["worker_id"] for w in workers) == ["two-0", "two-1"]
        assert all(w["tasks_done"] > 0 for w in workers)
        registered = [line for line in cluster.tail("w.log", 400).splitlines() if "registered client" in line]
        assert len(registered) == len(clients)   # once each, by the parent
    finally:
        cluster.stop()
