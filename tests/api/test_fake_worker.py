"""The test suite's fake worker (tests/support/fake_worker.py): deterministic, manifest-valid
uploads, and the whole tiny cascade run by fake workers in threads over the in-process app."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from conftest import create_federation, tick, tiny_config
from support.fake_worker import FakeWorker, deterministic_body, task_seed

from coordinator.services.tasks import upload_limit
from shared.config import FederationConfig
from shared.schemas import AdapterRef, TaskAssignment, Training
from shared.tensors import validate_tensors

pytestmark = pytest.mark.api


def assignment(stage: str, upload: list[str], tier: str, round_number: int = 1, root_sha: str = "a" * 64,
               scope: str = "root") -> TaskAssignment:
    from datetime import datetime, timezone

    root = AdapterRef(id=1, tier="root", version=0, sha256=root_sha)
    return TaskAssignment(task_id=1, lease_id="x", attempt=1, lease_expires_at=datetime.now(timezone.utc),
                          lease_seconds=30, federation_id=1, client_id=1, stage=stage, round_number=round_number,
                          scope=scope, root=root, cluster=None, train_tier=tier, epochs=1, trainable=["A", "B", "head"],
                          upload=upload, local=[], training=Training())


class ThroughTestClient(httpx.BaseTransport):
    """An httpx transport that sends each request through a TestClient (so through the app)."""

    def __init__(self, client) -> None:
        self.client = client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self.client.request(request.method, str(request.url), headers=dict(request.headers),
                                content=request.read())
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)


@pytest.mark.unit
def test_fake_uploads_are_deterministic_and_pass_the_coordinators_checks():
    cfg = FederationConfig.model_validate(tiny_config("x", "0" * 64))
    for stage, tier in (("root", "root"), ("probe", "root"), ("cluster", "cluster")):
        task = assignment(stage, ["A", "B", "head"], tier)
        body = deterministic_body(cfg.manifest, "c0", task)
        assert body == deterministic_body(cfg.manifest, "c0", task)
        validate_tensors(body, cfg.manifest.tier_shapes(tier), upload_limit(cfg, stage))
    base = assignment("root", ["A", "B", "head"], "root")
    others = [assignment("root", ["A", "B", "head"], "root", round_number=2),
              assignment("root", ["A", "B", "head"], "root", root_sha="b" * 64),
              assignment("probe", ["A", "B", "head"], "root")]
    seeds = {task_seed("c0", t) for t in [base, *others]} | {task_seed("c1", base)}
    assert len(seeds) == 5


def test_fake_workers_in_threads_run_the_tiny_cascade_in_process(api, app):
    # every stage, the cluster's included (the fake uploads have no groups: K = 1 is found)
    fid, secret = create_federation(api, schedule={"min_clients": 4, "root_rounds": 2, "cluster_rounds": 1,
                                                   "leaf_rounds": 1},
                                    clustering={"k_max": 4, "knn": 2, "skip_single_cluster": False})
    events: list[dict] = []
    workers = [FakeWorker(coordinator=str(api.base_url), federation_id=fid, secret=secret, clients=names,
                          max_seconds=60, poll_interval=0.01, emit=events.append, transport=ThroughTestClient(api),
                          worker_id=f"t{i}")
               for i, names in enumerate((["a", "b"], ["c", "d"]))]
    codes: dict[int, int] = {}
    threads = [threading.Thread(target=lambda i=i, w=w: codes.__setitem__(i, w.run()), daemon=True)
               for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(t.is_alive() for t in threads):
            tick(app)  # the in-process app runs no scheduler thread
            time.sleep(0.02)
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(timeout=10)
    assert codes == {0: 0, 1: 0}, [e for e in events if e["event"] in ("refused", "unavailable", "exit")]
    kinds = [e["event"] for e in events]
    assert kinds.count("registered") == 4 and "refused" not in kinds and "unavailable" not in kinds
    stages = sorted({e["stage"] for e in events if e["event"] == "completed"})
    assert stages == ["cluster", "leaf", "probe", "root"]   # ends with leaf rounds: no evaluation round
    assert api.get(f"/v1/federations/{fid}", headers={"Authorization": "Bearer test-admin-token-0123456789"}
                   ).json()["state"] == "serving"
