"""Helpers of the hostile-world tests (tests/api/test_hostile_*.py): a small federation with every
kind of object a route can name, the credentials of the authorization matrix, valid and
malformed upload bodies, and a Prometheus scrape."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from conftest import (
    ADMIN_TOKEN,
    CLASSES,
    DEPTH,
    DIM,
    RANK,
    admin_headers,
    bearer,
    create_federation,
    register,
    tick,
    tiny_checkpoint,
)
from prometheus_client.parser import text_string_to_metric_families

from shared.manifest import qv_targets
from shared.tensors import pack_tensors

CREDENTIALS = ("none", "wrong", "client_a", "client_b", "secret", "admin")
WRONG_TOKEN = "hlc_" + "x" * 43


def valid_root_upload(seed: int = 0, scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {}
    for t in qv_targets(DEPTH, DIM):
        tensors[f"{t.name}.lora_A"] = rng.normal(size=(RANK, DIM)).astype(np.float32)
        tensors[f"{t.name}.lora_B"] = (scale * rng.normal(size=(DIM, RANK))).astype(np.float32)
    tensors["head.weight"] = rng.normal(size=(CLASSES, DIM)).astype(np.float32)
    tensors["head.bias"] = rng.normal(size=(CLASSES,)).astype(np.float32)
    return tensors


def raw_safetensors(tensors: dict[str, np.ndarray]) -> bytes:
    """Safetensors bytes without pack_tensors' float32 cast and finiteness check."""
    from safetensors.numpy import save

    return save({k: np.asarray(v, order="C") for k, v in tensors.items()})


@dataclass
class World:
    """One federation in its first root round: clients a and b (a's task leased), two spare
    clients (``victims``) for destructive routes, a second federation still enrolling."""

    federation_id: int
    secret: str
    backbone_sha: str
    client_a: int
    token_a: str
    client_b: int
    token_b: str
    task_a: int
    lease_a: str
    task_b: int
    round_id: int
    root_version_id: int
    victims: list[tuple[int, str]] = field(default_factory=list)
    enrolling_federation_id: int = 0
    enrolling_secret: str = ""

    def token(self, credential: str) -> str | None:
        return {"none": None, "wrong": WRONG_TOKEN, "client_a": self.token_a, "client_b": self.token_b,
                "secret": self.secret, "admin": ADMIN_TOKEN}[credential]

    def headers(self, credential: str) -> dict[str, str]:
        token = self.token(credential)
        return bearer(token) if token is not None else {}


_counter = {"n": 0}


def build_world(api, app, name: str | None = None, victims: int = 2, **overrides) -> World:
    _counter["n"] += 1
    name = name or f"world{_counter['n']}"
    schedule = {"min_clients": 2 + victims, "root_rounds": 5, "max_attempts": 5}
    schedule.update(overrides.pop("schedule", {}))
    fid, secret = create_federation(api, name=name, schedule=schedule, **overrides)
    a, token_a = register(api, fid, secret, "a")
    b, token_b = register(api, fid, secret, "b")
    spare = [register(api, fid, secret, f"victim{i}") for i in range(victims)]
    tick(app)
    lease = api.post(f"/v1/clients/{a}/lease", headers=bearer(token_a)).json()["task"]
    status = api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()
    enrolling, enrolling_secret = create_federation(api, name=f"{name}-enrolling",
                                                    schedule={"min_clients": 50})
    from sqlalchemy import select

    from coordinator.models import AdapterVersion, Task

    with app.state.session_factory() as s:
        task_b = s.scalars(select(Task.id).where(Task.client_id == b)).one()
        v0 = s.scalars(select(AdapterVersion.id).where(AdapterVersion.federation_id == fid)).one()
    return World(federation_id=fid, secret=secret, backbone_sha=hashlib.sha256(tiny_checkpoint()).hexdigest(),
                 client_a=a, token_a=token_a, client_b=b, token_b=token_b, task_a=lease["task_id"],
                 lease_a=lease["lease_id"], task_b=task_b, round_id=status["rounds"][-1]["id"],
                 root_version_id=v0, victims=spare, enrolling_federation_id=enrolling,
                 enrolling_secret=enrolling_secret)


def scrape(api, headers=None) -> dict[tuple[str, tuple], float]:
    r = api.get("/metrics", headers=headers or {})
    assert r.status_code == 200, r.text
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def rejected(metrics: dict, reason: str) -> float:
    return metrics.get(("hilora_uploads_total", (("reason", reason), ("result", "rejected"))), 0.0)


def accepted(metrics: dict) -> float:
    return metrics.get(("hilora_uploads_total", (("reason", ""), ("result", "accepted"))), 0.0)


def upload_body_sha(tensors: dict[str, np.ndarray]) -> tuple[bytes, str]:
    body = pack_tensors(tensors)
    return body, hashlib.sha256(body).hexdigest()
