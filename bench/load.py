"""Load test of a real coordinator: a uvicorn ``hilora coordinator`` process on 127.0.0.1, simulated
polling workers (async httpx, one per client) and a stream of ~5 MB uploads, then an audit.

    python bench/load.py --pollers 200 --seconds 600 --backend postgres    # the full run (docs/benchmarks.md)
    python bench/load.py --pollers 50 --seconds 60 --backend sqlite        # what CI runs, per backend
    python bench/load.py --pollers 200 --seconds 600 --backend postgres --wait 20   # long-polling workers

Each poller leases for its client; when it gets a task it "trains" for 0.2-1.5 s (heartbeating if
that ever came near the lease), uploads a valid ~5 MB body (a root tier of 40 rank-16 LoRA targets
of 1024 x 1024, factor-averaged so aggregation stays cheap), and completes; with no task it waits
``retry_after`` (at least 1 s); a 429/503 waits its Retry-After. After ``--seconds`` the pollers stop
(releasing any lease they hold), every client is revoked (which ends its open tasks, so the
federation comes to rest), and the audit checks:

- no 5xx, no transport error, nothing in the coordinator's log about a pool timeout or a traceback;
- every task terminal; the done tasks are exactly the completions the pollers were told succeeded,
  each with the upload acknowledged for it (nothing lost, nothing counted twice);
- every aggregated round has one new version, and (for the newest rounds, re-computed here) the
  version is exactly the aggregate of its done tasks' uploads;
- a 200 MB upload streamed without a length is refused at the task's limit: the coordinator's RSS
  grows by far less than the body.

Prints one JSON object (lease latency p50/p95/p99, requests, uploads, rounds, RSS, audit) and exits
0 when the audit is clean (``run()`` returns the same dict for tests). ``--database-url`` uses an
existing database instead of a fresh one (Postgres: a throwaway server from tests/pg.py).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import httpx
import numpy as np

ADMIN_TOKEN = "load-admin-" + "0" * 16
DEPTH, DIM, RANK, CLASSES = 20, 1024, 16, 10  # 40 targets: (2 x 16 x 1024) floats each, ~5.3 MB
DISTINCT_BODIES = 6


# ------------------------------------------------------------------------------ the federation

def federation_config(name: str, backbone_sha: str, pollers: int, depth: int = DEPTH) -> dict:
    from shared.manifest import qv_targets

    return {
        "name": name,
        "backbone": {"model": "vit_load", "model_kwargs": {}, "sha256": backbone_sha},
        "manifest": {"targets": [t.model_dump() for t in qv_targets(depth, DIM)],
                     "tiers": {t: {"rank": RANK, "alpha": RANK} for t in ("root", "cluster", "leaf")},
                     "head": {"in_features": DIM, "num_classes": CLASSES}},
        "root": {"aggregation": "factor_avg"},
        "schedule": {"min_clients": pollers, "root_rounds": 100000, "lease_seconds": 60, "max_attempts": 3,
                     "retry_after_seconds": 1.0},
    }


def upload_bodies(seed: int = 0, depth: int = DEPTH) -> list[tuple[bytes, str]]:
    from shared.manifest import qv_targets
    from shared.tensors import pack_tensors

    out = []
    for i in range(DISTINCT_BODIES):
        rng = np.random.default_rng(seed + i)
        tensors = {}
        for t in qv_targets(depth, DIM):
            tensors[f"{t.name}.lora_A"] = rng.standard_normal((RANK, DIM), dtype=np.float32)
            tensors[f"{t.name}.lora_B"] = 0.01 * rng.standard_normal((DIM, RANK), dtype=np.float32)
        tensors["head.weight"] = 0.1 * rng.standard_normal((CLASSES, DIM), dtype=np.float32)
        tensors["head.bias"] = np.zeros(CLASSES, np.float32)
        body = pack_tensors(tensors)
        out.append((body, hashlib.sha256(body).hexdigest()))
    return out


# ------------------------------------------------------------------------------ the coordinator

def fresh_database(backend: str, workdir: Path):  # noqa: ANN201
    """(URL, server): a new SQLite file in ``workdir`` (server None), or a database on a throwaway
    PostgreSQL server (tests/pg.py) that the caller stops."""
    if backend == "sqlite":
        return f"sqlite:///{workdir / 'coordinator.db'}", None
    from pg import PostgresServer

    server = PostgresServer()
    server.start()
    return server.create_database(), server


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of /proc/<pid>/status in bytes: ``VmRSS`` (everything resident) or
    ``RssAnon`` (anonymous memory only: heap and buffers, not memory-mapped files such as the
    uploads an aggregation reads, whose pages the kernel can drop at will). 0 if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Coordinator:
    def __init__(self, workdir: Path, database_url: str, name: str = "coordinator",
                 extra_env: dict[str, str] | None = None) -> None:
        from hilora.launcher import free_port

        self.workdir, self.database_url = workdir, database_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        env = dict(os.environ)
        env.update({"HILORA_DATABASE_URL": self.database_url, "HILORA_BLOB_DIR": str(self.workdir / "blobs"),
                    "HILORA_ADMIN_TOKEN": ADMIN_TOKEN, "HILORA_HOST": "127.0.0.1", "HILORA_PORT": str(self.port),
                    "HILORA_SCHEDULER_INTERVAL": "0.5", "HILORA_LOG_LEVEL": "warning", "HILORA_DEV": "0",
                    # one federation of many pollers: the per-federation upload slots as wide as the replica's
                    "HILORA_MAX_UPLOADS_IN_FLIGHT_PER_FEDERATION": "64",
                    "HILORA_MAX_UPLOADS_IN_FLIGHT": "64",
                    "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        env.pop("HILORA_FAULT_AT", None)
        env.update(self.extra_env)
        fh = open(self.log, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([sys.executable, "-m", "hilora.cli", "coordinator"], env=env, cwd=ROOT,
                                     stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the coordinator exited at start:\n" + self.tail())
            try:
                if httpx.get(self.url + "/v1/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the coordinator was not ready in time:\n" + self.tail())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def tail(self, lines: int = 60) -> str:
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


# ------------------------------------------------------------------------------ the pollers

class Stats:
    def __init__(self) -> None:
        self.lease_ms: list[float] = []
        # long polling: (task id, request sent, answer read), wall clock, for each granted held lease;
        # its latency counts from the task's opening (or the request, if later) to the answer
        self.held_grants: list[tuple[int, float, float]] = []
        self.held_empty = 0
        self.statuses: Counter = Counter()
        self.server_errors: list[str] = []
        self.transport_errors: list[str] = []   # requests that failed every retry
        self.transport_retries: list[str] = []  # transport errors a retry got past
        self.acked_uploads: dict[int, str] = {}   # task id -> sha the coordinator acknowledged
        self.acked_done: dict[int, str] = {}      # task id -> sha of a completion acknowledged 200
        self.task_owner: dict[int, int] = {}      # task id -> client id
        self.rate_limited = 0

    def note(self, what: str, r: httpx.Response) -> None:
        self.statuses[f"{what} {r.status_code}"] += 1
        if r.status_code >= 500:
            self.server_errors.append(f"{what} {r.status_code} {r.text[:200]}")


def _retry_after(r: httpx.Response) -> float:
    try:
        return max(1.0, float(r.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


async def _send(http: httpx.AsyncClient, stats: Stats, what: str, method: str, url: str,
                **kwargs) -> httpx.Response | None:
    """One request, retried (like a worker) on a transport error, e.g. a keep-alive connection the
    server closed just as it was reused. Every protocol request is safe to repeat: a lost lease
    answer costs one lease expiry, the rest are idempotent. None if every try failed."""
    for attempt in range(3):
        try:
            return await http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            stats.transport_retries.append(f"{what}: {type(exc).__name__}")
            await asyncio.sleep(0.2 * (attempt + 1))
    stats.transport_errors.append(f"{what}: failed 3 times ({stats.transport_retries[-1]})")
    return None


async def poller(http: httpx.AsyncClient, cid: int, token: str, bodies, stats: Stats, stop_at: float,
                 rng: random.Random, wait: float = 0.0) -> None:
    headers = {"Authorization": f"Bearer {token}", "X-Hilora-Worker-Id": f"poller-{cid}"}
    await asyncio.sleep(rng.uniform(0, 1.0))  # do not start in lock step
    while time.monotonic() < stop_at:
        held = min(wait, stop_at - time.monotonic())
        params = {"wait": f"{held:.1f}"} if held >= 0.1 else {}
        t0, sent = time.perf_counter(), time.time()
        r = await _send(http, stats, "lease", "POST", f"/v1/clients/{cid}/lease", headers=headers, params=params)
        if r is None:
            await asyncio.sleep(1.0)
            continue
        if not params:
            stats.lease_ms.append((time.perf_counter() - t0) * 1000)
        elif r.status_code == 200 and r.json()["task"] is not None:
            stats.held_grants.append((r.json()["task"]["task_id"], sent, time.time()))
        elif r.status_code == 200:
            stats.held_empty += 1
        stats.note("lease", r)
        if r.status_code in (429, 503):
            stats.rate_limited += 1
            await asyncio.sleep(_retry_after(r))
            continue
        if r.status_code != 200:
            await asyncio.sleep(1.0)
            continue
        answer = r.json()
        task = answer["task"]
        if task is None:
            if not params or answer["retry_after"] > 0:
                await asyncio.sleep(max(1.0, float(answer["retry_after"])))
            continue
        stats.task_owner[task["task_id"]] = cid
        lease = {"lease_id": task["lease_id"]}
        await asyncio.sleep(rng.uniform(0.2, 1.5))  # training
        if time.monotonic() >= stop_at:  # stopping: give the lease back (it does not count as an attempt)
            r = await _send(http, stats, "release", "POST", f"/v1/tasks/{task['task_id']}/release", json=lease,
                            headers=headers)
            if r is not None:
                stats.note("release", r)
            return
        body, sha = bodies[rng.randrange(len(bodies))]
        for _ in range(20):  # 429/503 (too many uploads in flight): honour Retry-After
            r = await _send(http, stats, "upload", "PUT", f"/v1/tasks/{task['task_id']}/upload", params=lease,
                            content=body, headers={**headers, "X-Hilora-Sha256": sha,
                                                   "Content-Type": "application/octet-stream"})
            if r is None:
                break
            stats.note("upload", r)
            if r.status_code not in (429, 503):
                break
            await asyncio.sleep(_retry_after(r))
        if r is None or r.status_code != 200:
            continue
        stats.acked_uploads[task["task_id"]] = sha
        r = await _send(http, stats, "complete", "POST", f"/v1/tasks/{task['task_id']}/complete",
                        json={**lease, "num_samples": 10 + cid % 7}, headers=headers)
        if r is not None:
            stats.note("complete", r)
            if r.status_code == 200:
                stats.acked_done[task["task_id"]] = sha


async def run_pollers(url: str, clients: list[tuple[int, str]], bodies, seconds: float, stats: Stats,
                      wait: float = 0.0) -> None:
    limits = httpx.Limits(max_connections=len(clients) + 10, max_keepalive_connections=len(clients) + 10)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0), limits=limits) as http:
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(poller(http, cid, token, bodies, stats, stop_at, random.Random(cid), wait)
                               for cid, token in clients))


def histogram_quantiles(metrics_text: str, name: str, qs=(50, 95, 99)) -> dict | None:
    """Quantiles (ms) of a Prometheus histogram of the exposition text, interpolated within buckets
    as ``histogram_quantile`` does; None without observations."""
    buckets = []
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    out = {"count": int(total)}
    for q in qs:
        rank = q / 100 * total
        lower_le, lower_count = 0.0, 0.0
        for le, count in buckets:
            if count >= rank:
                if le == float("inf"):
                    value = lower_le
                else:
                    value = lower_le + (le - lower_le) * (rank - lower_count) / max(count - lower_count, 1e-12)
                out[f"p{q}"] = round(1000 * value, 1)
                break
            lower_le, lower_count = le, count
    return out


def held_latencies_ms(database_url: str, grants: list[tuple[int, float, float]]) -> list[float]:
    """Latency of each granted held lease: from the task's opening (its row's creation, or when its
    lease was requeued, bounded by the request: max(created, sent)) to the answer."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from coordinator.db import make_engine
    from coordinator.models import Task

    if not grants:
        return []
    engine = make_engine(database_url)
    try:
        with Session(engine) as s:
            created = dict(s.execute(select(Task.id, Task.created_at)
                                     .where(Task.id.in_([g[0] for g in grants]))).all())
    finally:
        engine.dispose()
    return [1000 * (answered - max(created[tid].timestamp(), sent)) for tid, sent, answered in grants]


# ------------------------------------------------------------------------------ the audit

def oversized_upload_rss(coord: Coordinator, cid: int, token: str, task_id: int, total: int) -> dict:
    """Stream ``total`` bytes without a length to a task's upload; sample the coordinator's anonymous
    memory (a buffered body would be anonymous; the scheduler may be memory-mapping uploads for an
    aggregation at the same time, and those file pages count in VmRSS but are not the body)."""
    before = rss_bytes(coord.proc.pid, "RssAnon")
    sent = {"n": 0}
    peak = {"rss": before}

    def body():
        chunk = b"\0" * (1 << 20)
        while sent["n"] < total:
            sent["n"] += len(chunk)
            peak["rss"] = max(peak["rss"], rss_bytes(coord.proc.pid, "RssAnon"))
            yield chunk

    status = None
    try:
        r = httpx.put(f"{coord.url}/v1/tasks/{task_id}/upload", params={"lease_id": "x" * 32}, content=body(),
                      headers={"Authorization": f"Bearer {token}"}, timeout=60)
        status = r.status_code
        error = r.json().get("error")
    except httpx.HTTPError as exc:  # the server may close while we still write: it refused the body
        error = f"{type(exc).__name__}"
    peak["rss"] = max(peak["rss"], rss_bytes(coord.proc.pid, "RssAnon"))
    return {"status": status, "error": error, "bytes_offered": total, "bytes_written_by_client": sent["n"],
            "memory": "RssAnon", "rss_before_mb": round(before / 2**20, 1),
            "rss_peak_mb": round(peak["rss"] / 2**20, 1), "rss_growth_mb": round((peak["rss"] - before) / 2**20, 1)}


def audit(database_url: str, blob_dir: Path, fid: int, stats: Stats, recompute_rounds: int = 2) -> dict:
    from sqlalchemy import func, select

    from coordinator.blobs import BlobStore
    from coordinator.db import make_engine
    from coordinator.models import AdapterVersion, Federation, Round, Task
    from shared.aggregate import combine_tier_uploads
    from shared.config import FederationConfig
    from shared.tensors import pack_tensors, unpack_tensors

    problems: list[str] = []
    engine = make_engine(database_url)
    blobs = BlobStore(blob_dir)
    try:
        from sqlalchemy.orm import Session

        with Session(engine) as s:
            cfg = FederationConfig.model_validate(s.get(Federation, fid).config)
            tasks = s.scalars(select(Task).where(Task.federation_id == fid)).all()
            open_tasks = [t.id for t in tasks if t.status not in ("done", "failed", "cancelled")]
            if open_tasks:
                problems.append(f"{len(open_tasks)} tasks not terminal: {open_tasks[:10]}")
            done = {t.id: t.upload_sha256 for t in tasks if t.status == "done"}
            if done != stats.acked_done:
                lost = sorted(set(stats.acked_done) - set(done))
                extra = sorted(set(done) - set(stats.acked_done))
                wrong = sorted(t for t in set(done) & set(stats.acked_done) if done[t] != stats.acked_done[t])
                problems.append(f"done tasks != acknowledged completions: lost {lost[:10]}, "
                                f"unacknowledged {extra[:10]}, other upload {wrong[:10]}")
            rounds = s.scalars(select(Round).where(Round.federation_id == fid).order_by(Round.id)).all()
            done_rounds = [r for r in rounds if r.status == "done"]
            versions = s.scalar(select(func.count()).select_from(AdapterVersion)
                                .where(AdapterVersion.federation_id == fid, AdapterVersion.tier == "root")) or 0
            if versions != len(done_rounds) + 1:
                problems.append(f"{versions} root versions for {len(done_rounds)} aggregated rounds (+ version 0)")
            for rnd in done_rounds:
                round_tasks = sorted((t for t in tasks if t.round_id == rnd.id and t.status == "done"),
                                     key=lambda t: t.client_id)
                if not round_tasks or rnd.result_version_id is None:
                    problems.append(f"round {rnd.number} is done without inputs or result")
            for rnd in done_rounds[-recompute_rounds:]:
                round_tasks = sorted((t for t in tasks if t.round_id == rnd.id and t.status == "done"),
                                     key=lambda t: t.client_id)
                previous = unpack_tensors(blobs.get_bytes(s.get(AdapterVersion, rnd.input_root_version_id).blob_sha256))
                uploads = [unpack_tensors(blobs.get_bytes(t.upload_sha256)) for t in round_tasks]
                expected = combine_tier_uploads(cfg.manifest, "root", cfg.root, previous, uploads,
                                                [float(max(t.num_samples or 0, 1)) for t in round_tasks])
                got = s.get(AdapterVersion, rnd.result_version_id).blob_sha256
                if hashlib.sha256(pack_tensors(expected)).hexdigest() != got:
                    problems.append(f"round {rnd.number}: the version is not the aggregate of its done tasks")
        return {"problems": problems, "tasks": len(tasks), "tasks_done": len(done),
                "rounds_aggregated": len(done_rounds), "rounds_failed": sum(r.status == "failed" for r in rounds),
                "rounds_recomputed": min(recompute_rounds, len(done_rounds))}
    finally:
        engine.dispose()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(float(np.percentile(np.asarray(values), q)), 2)


# ------------------------------------------------------------------------------ the run

def run(pollers: int = 50, seconds: float = 60.0, backend: str = "sqlite", database_url: str | None = None,
        workdir: Path | None = None, upload_depth: int = DEPTH, scheduler_replica: bool = False,
        wait: float = 0.0) -> dict:
    """``scheduler_replica``: the polled coordinator serves only (HILORA_RUN_SCHEDULER=0) and a
    second process on the same database and blobs runs the scheduler (aggregation off the serving
    process)."""
    from shared.tensors import pack_tensors

    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="hilora-load-")
        workdir = Path(own_tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    pg = None
    if database_url is None:
        database_url, pg = fresh_database(backend, workdir)
    env = {"HILORA_RUN_SCHEDULER": "0"} if scheduler_replica else {}
    if wait:  # long-polling pollers get their tasks, and so upload, together: a slot for each
        slots = str(max(64, pollers + 8))
        env.update({"HILORA_MAX_UPLOADS_IN_FLIGHT_PER_FEDERATION": slots, "HILORA_MAX_UPLOADS_IN_FLIGHT": slots})
    coord = Coordinator(workdir, database_url, extra_env=env or None)
    scheduler = Coordinator(workdir, database_url, name="scheduler") if scheduler_replica else None
    started = time.monotonic()
    try:
        coord.start()
        if scheduler is not None:
            scheduler.start()
        admin = httpx.Client(base_url=coord.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=120)
        backbone = pack_tensors({"head.weight": np.zeros((CLASSES, DIM), np.float32),
                                 "head.bias": np.zeros(CLASSES, np.float32)})
        sha = hashlib.sha256(backbone).hexdigest()
        admin.put(f"/v1/blobs/{sha}", content=backbone).raise_for_status()
        r = admin.post("/v1/federations", json={"config": federation_config(f"load-{secrets.token_hex(3)}", sha,
                                                                             pollers, upload_depth)})
        r.raise_for_status()
        fid, secret = r.json()["federation_id"], r.json()["enrollment_secret"]
        clients = []
        for i in range(pollers):
            r = httpx.post(f"{coord.url}/v1/federations/{fid}/clients", json={"name": f"p{i}", "num_samples": 10},
                           headers={"Authorization": f"Bearer {secret}"}, timeout=60)
            r.raise_for_status()
            clients.append((r.json()["client_id"], r.json()["token"]))
        bodies = upload_bodies(depth=upload_depth)
        stats = Stats()
        rss_start = rss_bytes(coord.proc.pid)
        t0 = time.monotonic()
        asyncio.run(run_pollers(coord.url, clients, bodies, seconds, stats, wait))
        polled_s = time.monotonic() - t0
        rss_after = rss_bytes(coord.proc.pid)
        # a huge body streamed without a length to a task of client 0: refused at the task's limit
        cid0, token0 = clients[0]
        task0 = next((t for t, owner in stats.task_owner.items() if owner == cid0), None)
        oversized = oversized_upload_rss(coord, cid0, token0, task0, 200 * 2**20) if task0 is not None else None
        # come to rest: revoke every client (their open tasks end); the scheduler then opens nothing
        for cid, _ in clients:
            admin.post(f"/v1/federations/{fid}/clients/{cid}/revoke", json={"reason": "load test over"})
        rest_deadline = time.monotonic() + 60
        while time.monotonic() < rest_deadline:
            status = admin.get(f"/v1/federations/{fid}").json()
            if all(rnd["status"] != "open" for rnd in status["rounds"]):
                break
            time.sleep(0.5)
        metrics = admin.get("/metrics").text
        admin.close()
        coord.stop()
        if scheduler is not None:
            scheduler.stop()
        log = "".join(c.log.read_text(errors="replace") for c in (coord, scheduler) if c is not None and c.log.exists())
        for needle in ("QueuePool limit", "TimeoutError", "Traceback", "Exception in ASGI"):
            if needle in log:
                stats.server_errors.append(f"coordinator log mentions {needle!r}")
        result = audit(database_url, workdir / "blobs", fid, stats)
        # held leases count from their task's opening; plain ones from the request
        lease_ms = stats.lease_ms + held_latencies_ms(database_url, stats.held_grants)
        problems = list(result.pop("problems"))
        if stats.server_errors:
            problems.append(f"{len(stats.server_errors)} server errors: {stats.server_errors[:5]}")
        if stats.transport_errors:
            problems.append(f"{len(stats.transport_errors)} transport errors: {stats.transport_errors[:5]}")
        # refused before it is read: 413 (over the limit) or, since issue 15, 409 (the lease is checked first)
        if oversized is not None and (oversized["status"] not in (413, 409, None) or oversized["rss_growth_mb"] > 64):
            problems.append(f"oversized upload: {oversized}")
        uploads_ok = stats.statuses.get("upload 200", 0)
        return {
            "backend": backend, "pollers": pollers, "seconds": seconds, "polled_seconds": round(polled_s, 1),
            "scheduler_replica": scheduler_replica,
            "wait": wait,
            "lease_requests": len(stats.lease_ms) + len(stats.held_grants) + stats.held_empty,
            "lease_ms": {"p50": _percentile(lease_ms, 50), "p95": _percentile(lease_ms, 95),
                         "p99": _percentile(lease_ms, 99), "max": _percentile(lease_ms, 100)},
            "held": {"granted": len(stats.held_grants), "empty_after_full_wait": stats.held_empty,
                     # the coordinator's own measure: from noticing the change that opened the task to the answer
                     "granted_ms_from_wakeup": histogram_quantiles(metrics, "hilora_held_lease_seconds")}
            if wait else None,
            "uploads_accepted": uploads_ok, "upload_mb": round(len(bodies[0][0]) / 2**20, 2),
            "upload_mb_per_s": round(uploads_ok * len(bodies[0][0]) / 2**20 / max(polled_s, 1e-9), 1),
            "rate_limited": stats.rate_limited, "statuses": dict(sorted(stats.statuses.items())),
            "transport_retries": len(stats.transport_retries),
            "rss_mb": {"start": round(rss_start / 2**20, 1), "after_polling": round(rss_after / 2**20, 1)},
            "oversized_upload": oversized,
            "uploads_rejected_metric": [line for line in metrics.splitlines()
                                        if line.startswith("hilora_uploads_total{") and "rejected" in line],
            **result, "problems": problems, "ok": not problems,
            "wall_seconds": round(time.monotonic() - started, 1),
        }
    except BaseException:
        sys.stderr.write("coordinator log tail:\n" + coord.tail() + "\n")
        raise
    finally:
        coord.stop()
        if scheduler is not None:
            scheduler.stop()
        if pg is not None:
            pg.stop()
        if own_tmp is not None:
            own_tmp.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pollers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--database-url", default=None, help="use this database instead of a fresh one")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the blobs and log here")
    parser.add_argument("--upload-depth", type=int, default=DEPTH,
                        help=f"blocks of q and v targets in the manifest ({DEPTH}: ~5 MB uploads; 1: ~0.26 MB)")
    parser.add_argument("--scheduler-replica", action="store_true",
                        help="run the scheduler in a second coordinator process (the polled one only serves)")
    parser.add_argument("--wait", type=float, default=0.0,
                        help="long polling: lease with ?wait=S (latency then counts from the task's opening)")
    args = parser.parse_args()
    result = run(args.pollers, args.seconds, args.backend, args.database_url, args.workdir, args.upload_depth,
                 args.scheduler_replica, args.wait)
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
