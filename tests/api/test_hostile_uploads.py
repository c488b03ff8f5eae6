"""Malformed and misdirected uploads: 13 kinds x 20 seeded variants each, on SQLite and Postgres.

For every kind: each bad upload gets its documented 4xx and error code, nothing it sent is
accepted (no upload blob, no task row pointing at it), the round still completes with the valid
uploads of the three clients (the new root version is exactly the aggregate of those), and
/metrics counts each rejection under its reason (``hilora_uploads_total{result="rejected"}``).

| kind | what is sent | answer |
| --- | --- | --- |
| wrong_shape | one tensor with a wrong dimension | 422 wrong_shape |
| wrong_rank | a LoRA factor of another rank | 422 wrong_shape |
| missing_key | one tensor left out | 422 missing_key |
| extra_key | one tensor too many | 422 extra_key |
| nan | a NaN somewhere | 422 non_finite |
| inf | +Inf or -Inf somewhere | 422 non_finite |
| dtype | one tensor as float64, float16, int32 or int64 | 422 wrong_dtype |
| too_large | twice the task's limit, declared or streamed (chunked) | 413 too_large, read <= limit + 1 chunk |
| corrupt | truncated body, bogus header length or non-JSON header | 422 corrupt |
| sha256_mismatch | X-Hilora-Sha256 of another body | 422 sha256_mismatch |
| stale_or_future | a finished task of the last round / a task not leased yet | 409 task_finished / stale_lease |
| bad_token | a wrong token / a revoked client's token | 401 bad_token / 403 revoked |
| other_worker | the expired lease of a worker replaced by another / client b on a's task | 409 stale_lease / 403 not_your_task |
"""

from __future__ import annotations

import asyncio
import hashlib
import struct

import httpx
import numpy as np
import pytest
from conftest import (
    RANK,
    admin_headers,
    bearer,
    create_federation,
    register,
    tick,
)
from sqlalchemy import select
from support.hostile import (
    accepted,
    raw_safetensors,
    rejected,
    scrape,
    valid_root_upload,
)

from coordinator.models import AdapterVersion, Blob, Federation, Round, Task
from shared.aggregate import combine_tier_uploads
from shared.config import FederationConfig
from shared.tensors import pack_tensors, unpack_tensors

pytestmark = pytest.mark.api

SEEDS = range(20)
CHUNK = 1024  # small against the tiny federation's limit (~7 KB), so "read about the limit" is visible
KINDS = ("wrong_shape", "wrong_rank", "missing_key", "extra_key", "nan", "inf", "dtype", "too_large", "corrupt",
         "sha256_mismatch", "stale_or_future", "bad_token", "other_worker")


def _pick(rng: np.random.Generator, tensors: dict) -> str:
    return sorted(tensors)[int(rng.integers(len(tensors)))]


def bad_tensors(kind: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    t = valid_root_upload(seed=500 + seed)
    name = _pick(rng, t)
    if kind == "wrong_shape":
        shape = list(t[name].shape)
        axis = int(rng.integers(len(shape)))
        shape[axis] += int(rng.integers(1, 4)) * (1 if rng.random() < 0.5 or shape[axis] < 4 else -1)
        t[name] = np.zeros(shape, np.float32)
    elif kind == "wrong_rank":
        lora = [n for n in sorted(t) if ".lora_" in n]
        name = lora[int(rng.integers(len(lora)))]
        r = RANK + int(rng.integers(1, 3))
        t[name] = np.zeros((r, t[name].shape[1]) if name.endswith("lora_A") else (t[name].shape[0], r), np.float32)
    elif kind == "missing_key":
        del t[name]
    elif kind == "extra_key":
        t[f"blocks.{int(rng.integers(5, 99))}.attn.qkv.q.lora_A"] = np.zeros((RANK, 8), np.float32)
    elif kind in ("nan", "inf"):
        flat = t[name].reshape(-1).copy()
        flat[int(rng.integers(flat.size))] = np.nan if kind == "nan" else (np.inf if rng.random() < 0.5 else -np.inf)
        t[name] = flat.reshape(t[name].shape)
    elif kind == "dtype":
        dtype = [np.float64, np.float16, np.int32, np.int64][seed % 4]
        t[name] = t[name].astype(dtype)
    return t


def corrupt_body(seed: int) -> bytes:
    good = pack_tensors(valid_root_upload(seed=700 + seed))
    rng = np.random.default_rng(2000 + seed)
    (header_len,) = struct.unpack("<Q", good[:8])
    variant = seed % 3
    if variant == 0:  # truncated anywhere
        return good[: int(rng.integers(0, len(good) - 1))]
    if variant == 1:  # a header length pointing elsewhere
        bogus = int(rng.choice([len(good), header_len + 1 + int(rng.integers(1, 50)), 2**40, 2**63]))
        return struct.pack("<Q", bogus) + good[8:]
    garbage = bytes(rng.integers(0x80, 0xFF, size=header_len, dtype=np.uint8))  # not UTF-8 JSON
    return good[:8] + garbage + good[8 + header_len:]


# --------------------------------------------------------------------------------- the scenario

class Scenario:
    """Federation with clients a, b, c (and d, revoked, for the revoked-token kind), one root round."""

    def __init__(self, api, app, clock, kind: str) -> None:
        self.api, self.app, self.clock, self.kind = api, app, clock, kind
        self.fid, self.secret = create_federation(api, name=f"hostile-{kind}",
                                                  schedule={"min_clients": 3, "root_rounds": 3, "max_attempts": 5,
                                                            "lease_seconds": 30})
        self.clients = {n: register(api, self.fid, self.secret, n, num_samples=10 + i)
                        for i, n in enumerate("abc")}
        tick(app)
        self.leases: dict[str, dict] = {}
        self.valid: dict[int, dict[str, np.ndarray]] = {}

    def lease(self, name: str, worker: str = "w1") -> dict:
        cid, token = self.clients[name]
        r = self.api.post(f"/v1/clients/{cid}/lease", headers={**bearer(token), "X-Hilora-Worker-Id": worker})
        assert r.status_code == 200, r.text
        task = r.json()["task"]
        assert task is not None
        self.leases[name] = task
        return task

    def upload(self, task: dict, body: bytes, token: str, lease_id: str | None = None, headers=None):
        return self.api.put(f"/v1/tasks/{task['task_id']}/upload",
                            params={"lease_id": lease_id or task["lease_id"]}, content=body,
                            headers={**bearer(token), **(headers or {})})

    def finish_round(self, seed: int) -> None:
        """Valid uploads and completions for a, b and c (leasing where not leased yet)."""
        for i, name in enumerate("abc"):
            cid, token = self.clients[name]
            task = self.leases.get(name) or self.lease(name)
            tensors = valid_root_upload(seed=seed + i)
            r = self.upload(task, pack_tensors(tensors), token)
            assert r.status_code == 200, r.text
            r = self.api.post(f"/v1/tasks/{task['task_id']}/complete",
                              json={"lease_id": task["lease_id"], "num_samples": 10 + i}, headers=bearer(token))
            assert r.status_code == 200, r.text
            self.valid[cid] = tensors
        self.leases.clear()
        tick(self.app)


def _stream_too_large(app, url: str, params: dict, token: str, total: int) -> tuple[int, dict, int]:
    """PUT ``total`` bytes in 64 KiB chunks (no Content-Length) straight into the ASGI app; returns
    the status, the JSON body and how many bytes the coordinator pulled before answering."""
    pulled = {"bytes": 0}

    async def body():
        sent = 0
        while sent < total:
            n = min(CHUNK, total - sent)
            pulled["bytes"] += n
            sent += n
            yield b"\x00" * n

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.put(url, params=params, content=body(), headers=bearer(token))

    r = asyncio.run(go())
    return r.status_code, r.json(), pulled["bytes"]


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_uploads_are_refused_and_the_round_completes(api, app, clock, kind):
    sc = Scenario(api, app, clock, kind)
    cid_a, token_a = sc.clients["a"]
    _cid_b, token_b = sc.clients["b"]
    expected_reasons: dict[str, int] = {}
    round_number = 1

    if kind == "stale_or_future":
        stale = sc.lease("a")
        sc.finish_round(seed=100)
        round_number = 2
    if kind == "bad_token":
        cid_d, token_d = register(api, sc.fid, sc.secret, "d")  # joins round 2+; revoked now
        r = api.post(f"/v1/federations/{sc.fid}/clients/{cid_d}/revoke", json={"reason": "test"},
                     headers=admin_headers())
        assert r.status_code == 200
    if kind == "other_worker":
        old = sc.lease("a", worker="w1")
        clock.advance(31)
        tick(app)  # w1's lease expired: the task is pending again
        new = sc.lease("a", worker="w2")
        assert new["task_id"] == old["task_id"] and new["lease_id"] != old["lease_id"]
    if kind not in ("stale_or_future", "other_worker"):
        sc.lease("a")

    limit = None
    for seed in SEEDS:
        task = sc.leases.get("a")
        if kind in ("wrong_shape", "wrong_rank", "missing_key", "extra_key", "nan", "inf", "dtype"):
            r = sc.upload(task, raw_safetensors(bad_tensors(kind, seed)), token_a)
            want = {"wrong_rank": "wrong_shape", "nan": "non_finite", "inf": "non_finite",
                    "dtype": "wrong_dtype"}.get(kind, kind)
            assert (r.status_code, r.json()["error"]) == (422, want), r.text
        elif kind == "too_large":
            if limit is None:
                from coordinator.services.tasks import upload_limit

                with app.state.session_factory() as s:
                    cfg = FederationConfig.model_validate(s.get(Federation, sc.fid).config)
                limit = upload_limit(cfg, "root")
            if seed % 2 == 0:  # declared: refused before a byte is read
                r = sc.upload(task, b"\x00" * (2 * limit), token_a)
                status, body = r.status_code, r.json()
            else:  # streamed without a length: refused after reading at most the limit (+ 1 chunk)
                status, body, pulled = _stream_too_large(app, f"/v1/tasks/{task['task_id']}/upload",
                                                         {"lease_id": task["lease_id"]}, token_a, 2 * limit)
                assert pulled <= limit + CHUNK < 2 * limit, f"the coordinator read {pulled} bytes, limit {limit}"
            want = "too_large"
            assert (status, body["error"]) == (413, want), body
        elif kind == "corrupt":
            r = sc.upload(task, corrupt_body(seed), token_a)
            want = "corrupt"
            assert (r.status_code, r.json()["error"]) == (422, want), r.text
        elif kind == "sha256_mismatch":
            body = pack_tensors(valid_root_upload(seed=900 + seed))
            other = hashlib.sha256(body + b"x").hexdigest()
            r = sc.upload(task, body, token_a, headers={"X-Hilora-Sha256": other})
            want = "sha256_mismatch"
            assert (r.status_code, r.json()["error"]) == (422, want), r.text
        elif kind == "stale_or_future":
            body = pack_tensors(valid_root_upload(seed=900 + seed))
            if seed % 2 == 0:  # the round-1 task, finished, under its lease, with another body
                r = sc.upload(stale, body, token_a)
                want, status = "task_finished", 409
            else:  # a's round-2 task, not leased yet, with a made-up lease id
                with app.state.session_factory() as s:
                    pending = s.scalars(select(Task).where(Task.client_id == cid_a, Task.status == "pending")).one()
                r = sc.upload({"task_id": pending.id, "lease_id": f"{seed:032x}"}, body, token_a)
                want, status = "stale_lease", 409
            assert (r.status_code, r.json()["error"]) == (status, want), r.text
        elif kind == "bad_token":
            body = pack_tensors(valid_root_upload(seed=900 + seed))
            if seed % 2 == 0:
                r = sc.upload(task, body, f"hlc_{np.random.default_rng(seed).bytes(24).hex()}")
                want, status = "bad_token", 401
            else:
                r = sc.upload(task, body, token_d)
                want, status = "revoked", 403
            assert (r.status_code, r.json()["error"]) == (status, want), r.text
        elif kind == "other_worker":
            body = pack_tensors(valid_root_upload(seed=900 + seed))
            if seed % 2 == 0:
                r = sc.upload(task, body, token_a, lease_id=old["lease_id"])
                want, status = "stale_lease", 409
            else:
                r = sc.upload(task, body, token_b)
                want, status = "not_your_task", 403
            assert (r.status_code, r.json()["error"]) == (status, want), r.text
        expected_reasons[want] = expected_reasons.get(want, 0) + 1

    # nothing was accepted: no upload blob, no task pointing at an upload
    with app.state.session_factory() as s:
        assert s.scalars(select(Blob).where(Blob.kind == "upload")).all() == [] or kind == "stale_or_future"
        open_round = s.scalars(select(Round).where(Round.federation_id == sc.fid, Round.status == "open")).one()
        assert open_round.number == round_number
        assert all(t.upload_sha256 is None for t in s.scalars(select(Task).where(Task.round_id == open_round.id)))
    assert not list((app.state.blobs.root / "tmp").iterdir()), "a refused upload left a temp file"

    # the round completes with the valid uploads only
    valid_before = dict(sc.valid)
    sc.valid.clear()
    sc.finish_round(seed=300)
    with app.state.session_factory() as s:
        rnd = s.scalars(select(Round).where(Round.federation_id == sc.fid, Round.stage == "root",
                                            Round.number == round_number)).one()
        assert rnd.status == "done", rnd.failure
        done = s.scalars(select(Task).where(Task.round_id == rnd.id, Task.status == "done")
                         .order_by(Task.client_id)).all()
        assert [t.client_id for t in done] == sorted(sc.valid)
        upload_shas = {b.sha256 for b in s.scalars(select(Blob).where(Blob.kind == "upload"))}
        expected_shas = {hashlib.sha256(pack_tensors(t)).hexdigest() for t in sc.valid.values()} | {
            hashlib.sha256(pack_tensors(t)).hexdigest() for t in valid_before.values()}
        assert upload_shas == expected_shas
        prev = s.get(AdapterVersion, rnd.input_root_version_id)
        new = s.get(AdapterVersion, rnd.result_version_id)
        cfg = FederationConfig.model_validate(s.get(Federation, sc.fid).config)
    previous = unpack_tensors(app.state.blobs.get_bytes(prev.blob_sha256))
    reference = combine_tier_uploads(cfg.manifest, "root", cfg.root, previous,
                                     [sc.valid[c] for c in sorted(sc.valid)],
                                     [float(10 + i) for i in range(3)])
    assert hashlib.sha256(pack_tensors(reference)).hexdigest() == new.blob_sha256

    # each rejection counted under its reason; the valid ones as accepted
    m = scrape(api)
    for reason, n in expected_reasons.items():
        assert rejected(m, reason) == n, (reason, rejected(m, reason), n)
    assert accepted(m) == 3 * round_number
