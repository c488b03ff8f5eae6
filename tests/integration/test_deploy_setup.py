"""The compose demo's setup flow without Docker: ``deploy/setup.py`` against a real coordinator
process creates the federation of ``deploy/federation.json`` and writes worker configs that a real
``hilora worker`` registers with; a second run changes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hilora.launcher import LocalCluster, wait_for
from worker.client import CoordinatorClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

REPO = Path(__file__).resolve().parents[2]


def test_setup_script_creates_the_federation_and_configs_workers_accept(tmp_path):
    from worker.backbone import pretrain_demo_backbone

    pretrain_demo_backbone()  # cached; the setup script resolves "checkpoint": "demo" the same way
    cluster = LocalCluster(tmp_path / "run")
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    env = {**os.environ, "HILORA_COORDINATOR": "", "HILORA_ADMIN_TOKEN": cluster.admin_token,
           "DEPLOY_DIR": str(REPO / "deploy"), "CONFIG_DIR": str(config_dir), "SETUP_TIMEOUT": "30",
           "OMP_NUM_THREADS": "1"}
    try:
        cluster.start_coordinator()
        env["HILORA_COORDINATOR"] = cluster.url
        first = subprocess.run([sys.executable, str(REPO / "deploy" / "setup.py")], env=env, capture_output=True,
                               text=True, timeout=120, check=False)
        assert first.returncode == 0, first.stdout + first.stderr
        created = json.loads((config_dir / "federation.json").read_text())
        fid = created["federation_id"]
        assert sorted(p.name for p in config_dir.glob("worker-*.json")) == ["worker-1.json", "worker-2.json"]
        with CoordinatorClient(cluster.url) as client:
            status = client.federation_status(cluster.admin_token, fid)
            assert status.name == "compose-demo" and status.state.value == "enrolling"

        again = subprocess.run([sys.executable, str(REPO / "deploy" / "setup.py")], env=env, capture_output=True,
                               text=True, timeout=120, check=False)
        assert again.returncode == 0 and "exists" in again.stdout, again.stdout + again.stderr

        # a worker started with a written config (as compose's worker-2 is) registers its clients
        log = open(cluster.workdir / "w2.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "hilora.cli", "worker", "--state-dir", str(tmp_path / "state"),
             "--coordinator", cluster.url, "--config", str(config_dir / "worker-2.json"), "--device", "cpu"],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)
        cluster.workers.append(proc)
        expected = len(json.loads((REPO / "deploy" / "worker-2.json").read_text())["clients"])

        def registered() -> bool:
            assert proc.poll() is None, cluster.tail("w2.log")
            with CoordinatorClient(cluster.url) as client:
                return client.federation_status(cluster.admin_token, fid).clients_total == expected

        assert wait_for(registered, 90, interval=0.5), cluster.tail("w2.log")
        proc.send_signal(signal.SIGTERM)  # idle (waiting for min_clients): stops at once, exit 0
        assert proc.wait(timeout=30) == 0, cluster.tail("w2.log")
    finally:
        cluster.stop()
