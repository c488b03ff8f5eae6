"""Shared fixtures: a coordinator app on a fresh database per test (SQLite, and PostgreSQL on a
throwaway server, see tests/pg.py), an injectable clock, and a tiny federation (a fake checkpoint
holding only a head, a hand-made manifest) that needs no torch."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

ADMIN_TOKEN = "test-admin-token-0123456789"
DIM = 8
DEPTH = 2
CLASSES = 3
RANK = 2


class MutableClock:
    """A clock the test moves by hand, so lease expiry is deterministic."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> MutableClock:
    return MutableClock()


@pytest.fixture(scope="session")
def pg_server():
    """One throwaway PostgreSQL server for the session (tests/pg.py). Without PostgreSQL binaries the
    postgres tests are skipped, unless HILORA_TEST_POSTGRES=required (CI), where they fail."""
    from pg import PostgresServer, PostgresUnavailable  # tests/pg.py (tests/ is on sys.path)

    try:
        server = PostgresServer()
    except PostgresUnavailable as exc:
        unavailable = str(exc)
    else:
        unavailable = None
    if unavailable is not None:
        if os.environ.get("HILORA_TEST_POSTGRES", "").lower() == "required":
            pytest.fail(f"HILORA_TEST_POSTGRES=required but {unavailable}", pytrace=False)
        pytest.skip(f"postgres backend skipped: {unavailable}")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    """A fresh, empty database per test, on each backend (select one with -m 'not postgres')."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'coordinator.db'}"
        return
    server = request.getfixturevalue("pg_server")
    url = server.create_database()
    try:
        yield url
    finally:
        server.drop_database(url)


@pytest.fixture
def settings(tmp_path, database_url):
    from coordinator.settings import Settings

    return Settings(database_url=database_url, blob_dir=tmp_path / "blobs",
                    admin_token=ADMIN_TOKEN, dev=False, run_scheduler=False)


@pytest.fixture
def app(settings, clock):
    from coordinator.app import create_app

    app = create_app(settings, clock=clock)
    yield app
    app.state.engine.dispose()


@pytest.fixture
def api(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        yield client


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tiny_checkpoint() -> bytes:
    from shared.tensors import pack_tensors

    rng = np.random.default_rng(0)
    return pack_tensors({"head.weight": rng.normal(size=(CLASSES, DIM)).astype(np.float32),
                         "head.bias": np.zeros(CLASSES, np.float32),
                         "blocks.0.attn.qkv.weight": rng.normal(size=(3 * DIM, DIM)).astype(np.float32)})


def tiny_config(name: str = "fed", sha: str = "0" * 64, **overrides) -> dict:
    from shared.manifest import qv_targets

    schedule = {"min_clients": 2, "root_rounds": 2, "cluster_rounds": 1, "leaf_rounds": 1,
                "unseen_leaf_rounds": 1, "lease_seconds": 30, "max_attempts": 2}
    schedule.update(overrides.pop("schedule", {}))
    config = {
        "name": name,
        "backbone": {"model": "vit_tiny_patch16_224", "model_kwargs": {}, "sha256": sha},
        "manifest": {"targets": [t.model_dump() for t in qv_targets(DEPTH, DIM)],
                     "tiers": {t: {"rank": RANK, "alpha": RANK} for t in ("root", "cluster", "leaf")},
                     "head": {"in_features": DIM, "num_classes": CLASSES}},
        "schedule": schedule,
        "clustering": {"k_max": 4, "knn": 2},
    }
    config.update(overrides)
    return config


def tiny_root_body(seed: int) -> bytes:
    """A valid root-tier upload for ``tiny_config``'s manifest: small random factors (safetensors)."""
    from shared.config import FederationConfig
    from shared.tensors import pack_tensors

    manifest = FederationConfig.model_validate(tiny_config("x", "0" * 64)).manifest
    rng = np.random.default_rng(seed)
    return pack_tensors({k: (0.1 * rng.standard_normal(size=s)).astype(np.float32)
                         for k, s in manifest.tier_shapes("root").items()})


def create_federation_over_http(http, admin_token: str, name: str, **overrides) -> int:
    """Through a ``worker.client.CoordinatorClient`` on a real coordinator: upload the tiny backbone
    and create a federation; its id."""
    data = tiny_checkpoint()
    sha = hashlib.sha256(data).hexdigest()
    http.request("PUT", f"/v1/blobs/{sha}", token=admin_token, content=data)
    return http.request("POST", "/v1/federations", token=admin_token,
                        json={"config": tiny_config(name, sha, **overrides)}).json()["federation_id"]


def upload_backbone(api) -> str:
    data = tiny_checkpoint()
    sha = hashlib.sha256(data).hexdigest()
    r = api.put(f"/v1/blobs/{sha}", content=data, headers=admin_headers())
    assert r.status_code == 201, r.text
    return sha


def create_federation(api, name: str = "fed", **overrides) -> tuple[int, str]:
    sha = upload_backbone(api)
    r = api.post("/v1/federations", json={"config": tiny_config(name, sha, **overrides)}, headers=admin_headers())
    assert r.status_code == 201, r.text
    body = r.json()
    return body["federation_id"], body["enrollment_secret"]


def register(api, fid: int, secret: str, name: str, num_samples: int = 10) -> tuple[int, str]:
    r = api.post(f"/v1/federations/{fid}/clients", json={"name": name, "num_samples": num_samples},
                 headers=bearer(secret))
    assert r.status_code == 201, r.text
    return r.json()["client_id"], r.json()["token"]


def tick(app) -> int:
    """Run the scheduler once, synchronously, at the app's clock."""
    from coordinator.services.scheduling import scheduler_tick

    return scheduler_tick(app.state.session_factory, app.state.blobs, app.state.clock())
