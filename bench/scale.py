"""Scale harness: N simulated clients against a real ``hilora coordinator`` (uvicorn on 127.0.0.1,
one process that serves and runs the scheduler) on PostgreSQL (a throwaway server from tests/pg.py)
or SQLite, through root rounds, one probe round, the clustering run and cluster rounds.

    python bench/scale.py --quick --json --snapshot     # N = 100 and 1000 on Postgres (docs/benchmarks.md)
    python bench/scale.py --clients 10000 --cluster-rounds 0 --clustering-timeout 600 --snapshot --json
    python bench/scale.py --clients 50 --backend sqlite

The clients are simulated in this process (no torch; asyncio + httpx, many clients per process),
speaking the real protocol over HTTP the way tests/support/fake_worker.py does and reusing its
helpers: each client long-polls ``POST /v1/clients/{id}/lease?wait=S``; with a task it fetches the
task's input adapter (once per version for the whole process), uploads input + a move, and
completes with fake_worker's metrics and num_samples. The move is ``--move-scale`` x (a shared move
+ 0.5 x its planted group's offset + 0.1 x its own noise), each drawn by
``fake_worker.deterministic_upload`` (for the names "shared", "group-g" and the client's own), so
the probe round's uploads fall into ``--groups`` planted groups (client i is in group i mod groups)
that the clustering should find.

Connections are bounded: held lease requests go through ``--connections`` keep-alive connections
(shards of at most 50 per httpx client: httpx's pool scans its connections for every queued
request, so one big pool with thousands of requests queued is quadratic), uploads and completions
through 32 more; a semaphore per shard keeps requests out of httpx's own queue, and a client waiting
for a connection waits in FIFO order. With N <= ``--connections`` every client holds its own
connection, as one worker per site would; beyond it, clients that finished their task of the round
queue behind those that have not (the coordinator sees at most ``--connections`` held requests).

What it reports, per N (one JSON object with ``--json``):

- per round (``rounds``): from the workers' clocks, the first and last grant of the round's tasks,
  the last accepted upload and the last completion, and the next round's first grant; from the
  database, the round's open and close timestamps and ``aggregation_seconds``. ``round_s`` (first
  grant -> the next round's first grant) is the round's bookkeeping time: the simulated clients
  train for 0 s, so it is all leasing, uploading, completing, deciding, aggregating and opening;
  ``close_s`` (the last completion -> the next round's first grant) is the scheduler's part.
- lease latency percentiles, measured by the workers: per granted lease, from the moment its task
  could be had (the round's first grant, or the request's sending if later) to the answer in the
  worker's hands; so a held request woken by the round's opening counts from the opening, not from
  when it began to wait. Also the coordinator's own ``hilora_lease_seconds`` histogram.
- coordinator CPU (``/proc/<pid>/stat`` utime + stime of the serving process, which also runs the
  scheduler) per lease request and per task, per phase; Postgres's CPU (the postmaster and its
  children) and this process's CPU alongside.
- clustering: ``hilora_clustering_seconds`` from ``/metrics``, the wall time from the probe round's
  last completion to the first cluster round's grant, K and the ARI against the planted groups. It
  runs inside the scheduler's tick; past ``--clustering-timeout`` seconds the run stops and reports
  it as timed out (the root-round numbers stay in the report).
- the coordinator's RSS (``VmRSS`` sampled every 0.5 s: peak per phase; ``VmHWM`` at the end),
  and the disk the blobs took (per kind, and the probe uploads).

A clean run (``ok``, ``problems`` empty): no 5xx, no request failed in transport after its
retries, nothing refused, no traceback in the coordinator's log, every root, probe and cluster round
done, every client leased in each root round and the probe, and no task leased twice (a simulated
client never drops a task, so a second lease means a grant never reached its client and the round
waited ``--lease-seconds`` for it to expire). ``--snapshot`` runs the coordinator from
``git archive HEAD`` instead of the working tree.

The coordinator runs with HILORA_REGISTRATION_RATE_PER_SECOND=0 (N registrations at once); the
lease rate limit stays at its default (10/s per client: a long-polling client asks about once per
``--wait`` seconds); 429s are counted. The Postgres server is tests/pg.py's (fsync off: test-speed
settings), with autovacuum turned back on, as a production server has it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import resource
import secrets
import shutil
import signal
import subprocess
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests", ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import httpx
import numpy as np

from _common import load, machine
from lease_cpu import cpu_seconds
from load import ADMIN_TOKEN, Coordinator, _percentile, fresh_database, rss_bytes
from support.fake_worker import client_num_samples, deterministic_metrics, deterministic_upload

SHARD = 50  # connections per httpx client (see the module docstring)
WORK_CONNECTIONS = 32  # uploads, completions, adapter downloads, registrations
GROUP_SCALE, NOISE_SCALE = 0.5, 0.1  # of the move: the planted group's offset, the client's own noise
TRAINING_STATES = ("enrolling", "root", "probe", "cluster")
MiB = 2**20


# ------------------------------------------------------------------------------ the federation

def manifest_dict(depth: int, dim: int, rank: int, classes: int) -> dict:
    from shared.manifest import qv_targets

    return {"targets": [t.model_dump() for t in qv_targets(depth, dim)],
            "tiers": {t: {"rank": rank, "alpha": rank} for t in ("root", "cluster", "leaf")},
            "head": {"in_features": dim, "num_classes": classes}}


def upload_floats(depth: int, dim: int, rank: int, classes: int) -> int:
    """Floats of one root-tier upload (A, B and head): q and v of ``depth`` blocks, each target
    A (rank x dim) and B (dim x rank), and the head (classes x dim + classes)."""
    return 2 * depth * 2 * dim * rank + classes * (dim + 1)


def federation_config(name: str, backbone_sha: str, n: int, manifest: dict, root_rounds: int,
                      cluster_rounds: int, groups: int) -> dict:
    return {
        "name": name,
        "backbone": {"model": "vit_scale", "model_kwargs": {}, "sha256": backbone_sha},
        "manifest": manifest,
        "schedule": {"min_clients": n, "max_clients": max(n, 10_000), "root_rounds": root_rounds,
                     "cluster_rounds": cluster_rounds, "leaf_rounds": 0,
                     "lease_seconds": 900, "max_attempts": 3, "retry_after_seconds": 1.0},
        "clustering": {"k_max": max(10, groups + 2)},
    }


# ------------------------------------------------------------------------------ measurements

def postgres_cpu_seconds(pg) -> float | None:  # noqa: ANN001
    """CPU of the PostgreSQL server: the postmaster (with its reaped children) and its live children."""
    try:
        pid = int((pg.data / "postmaster.pid").read_text().split()[0])
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            try:
                cf = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(cf[11]) + int(cf[12])
            except OSError:
                pass
        return total / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def self_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Sampler(threading.Thread):
    """Every ``interval`` seconds (bounded by ``stopped``): the coordinator's VmRSS and CPU, the
    Postgres server's CPU and this process's CPU, so that any span of the run can be measured
    after the fact (``span``)."""

    def __init__(self, pid: int, pg=None, interval: float = 0.25) -> None:  # noqa: ANN001
        super().__init__(name="scale-sampler", daemon=True)
        self.pid, self.pg, self.interval = pid, pg, interval
        self.samples: list[tuple[float, int, float, float | None, float]] = []  # t, rss, cpu, pg cpu, self cpu
        self.stopped = threading.Event()

    def sample(self) -> None:
        try:
            cpu = cpu_seconds(self.pid)
        except (OSError, IndexError, ValueError):
            return
        self.samples.append((time.time(), rss_bytes(self.pid), cpu,
                             postgres_cpu_seconds(self.pg) if self.pg is not None else None, self_cpu_seconds()))

    def run(self) -> None:
        self.sample()
        while not self.stopped.wait(self.interval):
            self.sample()

    def _at(self, t: float, i: int) -> float | None:
        """Counter ``i`` of the samples at time ``t`` (linear between the two samples around it)."""
        xs = [s for s in self.samples if s[i] is not None]
        if not xs:
            return None
        if t <= xs[0][0]:
            return xs[0][i]
        for a, b in zip(xs, xs[1:]):
            if a[0] <= t <= b[0]:
                return a[i] + (b[i] - a[i]) * (t - a[0]) / max(b[0] - a[0], 1e-9)
        return xs[-1][i]

    def span(self, start: float, end: float) -> dict:
        def delta(i: int) -> float | None:
            a, b = self._at(start, i), self._at(end, i)
            return None if a is None or b is None else round(b - a, 2)

        rss = [s[1] for s in self.samples if start <= s[0] <= end]
        return {"coordinator_cpu_s": delta(2), "postgres_cpu_s": delta(3), "simulation_cpu_s": delta(4),
                "rss_peak_mb": round(max(rss) / MiB, 1) if rss else None}


def percentiles(values: list[float]) -> dict:
    return {"n": len(values), "p50": _percentile(values, 50), "p95": _percentile(values, 95),
            "p99": _percentile(values, 99), "max": _percentile(values, 100)}


def histogram_quantiles(metrics_text: str, name: str, labels: dict, qs=(50, 95, 99)) -> dict:
    """Upper bucket bounds holding the q-th percentile of a Prometheus histogram (so "<= x s")."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(metrics_text):
        if family.name != name:
            continue
        for s in family.samples:
            if s.name == name + "_bucket" and all(s.labels.get(k) == v for k, v in labels.items()):
                buckets.append((float(s.labels["le"]), s.value))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return {}
    total = buckets[-1][1]
    out = {"n": int(total)}
    for q in qs:
        bound = next(le for le, count in buckets if count >= total * q / 100)
        out[f"p{q}_le_s"] = bound if math.isfinite(bound) else "+Inf"
    return out


def metric_values(metrics_text: str, name: str) -> dict[str, float]:
    """Samples of one metric family as {"label=value,...": value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name:
                out[",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))] = s.value
    return out


def du_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def code_version() -> dict:
    """The commit measured, and the files of coordinator/ and shared/ that differ from it (other
    work in progress in the checkout is in the coordinator the run starts)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "modified": [line[3:] for line in git("status", "--short", "--", "coordinator", "shared").splitlines()]}


def snapshot_head(dest: Path) -> str:
    """The committed code (``git archive HEAD``) of the packages the coordinator runs, in ``dest``;
    returns the commit. The working tree may hold other people's edits in progress."""
    import io
    import tarfile

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True,
                            timeout=30).stdout.strip()
    data = subprocess.run(["git", "archive", "--format=tar", commit, "coordinator", "hilora", "migrations",
                           "shared", "worker"], cwd=ROOT, capture_output=True, check=True, timeout=120).stdout
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return commit


def start_coordinator(coord: Coordinator, code_dir: Path | None) -> None:
    """``coord.start()``, from ``code_dir`` when given (``python -m hilora.cli`` in that directory
    imports its packages first; load.Coordinator starts it in load.ROOT, swapped for the call)."""
    if code_dir is None:
        coord.start()
        return
    import load as load_module

    saved = load_module.ROOT
    load_module.ROOT = code_dir
    try:
        coord.start()
    finally:
        load_module.ROOT = saved


def ari(a: list[int], b: list[int]) -> float | None:
    try:
        from sklearn.metrics import adjusted_rand_score
    except ImportError:
        return None
    return round(float(adjusted_rand_score(a, b)), 4)


# ------------------------------------------------------------------------------ the simulated clients

@dataclass
class SimClient:
    index: int
    name: str
    cid: int
    headers: dict
    group: int


@dataclass
class Record:
    """What the simulated clients saw (times are time.time(), the coordinator's clock too)."""

    grants: list = field(default_factory=list)      # (round key, client id, sent, answered)
    uploads: list = field(default_factory=list)     # (round key, answered)
    completes: list = field(default_factory=list)   # (round key, client id, answered)
    lease_requests: int = 0
    lease_times: list = field(default_factory=list)  # when each lease request was answered
    probe_completes: int = 0
    released: int = 0
    first_release_at: float | None = None
    empty_leases: int = 0
    rate_limited: int = 0
    upload_bytes: int = 0
    statuses: Counter = field(default_factory=Counter)
    server_errors: list = field(default_factory=list)
    refused: list = field(default_factory=list)
    transport_retries: Counter = field(default_factory=Counter)
    transport_errors: list = field(default_factory=list)


def _retry_after(r: httpx.Response) -> float:
    try:
        return max(1.0, float(r.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


class Pool:
    """One httpx client of at most ``size`` connections, entered through a FIFO semaphore of the
    same size so that no request ever waits in httpx's own queue."""

    def __init__(self, url: str, size: int, read_timeout: float) -> None:
        self.http = httpx.AsyncClient(
            base_url=url, limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
            timeout=httpx.Timeout(connect=30.0, read=read_timeout, write=60.0, pool=None))
        self.sem = asyncio.Semaphore(size)

    async def aclose(self) -> None:
        await self.http.aclose()


class Simulation:
    def __init__(self, url: str, manifest, rec: Record, connections: int, wait: float, move_scale: float) -> None:  # noqa: ANN001
        self.url, self.manifest, self.rec, self.wait, self.move_scale = url, manifest, rec, wait, move_scale
        self.hold = [Pool(url, min(SHARD, connections - i), wait + 300.0) for i in range(0, connections, SHARD)]
        self.work = [Pool(url, WORK_CONNECTIONS // 2, 300.0) for _ in range(2)]
        self.stop = asyncio.Event()
        self._adapters: dict[int, asyncio.Task] = {}
        self._parts: dict[tuple, dict[str, np.ndarray]] = {}

    async def aclose(self) -> None:
        for pool in self.hold + self.work:
            await pool.aclose()

    async def pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def send(self, pool: Pool, what: str, method: str, url: str, **kwargs) -> httpx.Response | None:
        """One request, retried twice on a transport error (a keep-alive connection the server
        closed as it was reused; every protocol request is safe to repeat). None if all failed."""
        last = ""
        for attempt in range(3):
            async with pool.sem:
                try:
                    r = await pool.http.request(method, url, **kwargs)
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"[:200]
                    self.rec.transport_retries[what] += 1
                else:
                    self.rec.statuses[f"{what} {r.status_code}"] += 1
                    if r.status_code >= 500:
                        self.rec.server_errors.append(f"{what} {r.status_code} {r.text[:200]}")
                    return r
            await self.pause(0.2 * (attempt + 1))
        self.rec.transport_errors.append(f"{what}: failed 3 times ({last})")
        return None

    async def register(self, fid: int, secret: str, names: list[str], concurrency: int = 32) -> list[tuple[int, str]]:
        sem = asyncio.Semaphore(concurrency)
        out: list[tuple[int, str] | None] = [None] * len(names)

        async def one(i: int, name: str) -> None:
            async with sem:
                r = await self.send(self.work[i % 2], "register", "POST", f"/v1/federations/{fid}/clients",
                                    json={"name": name, "num_samples": client_num_samples(name)},
                                    headers={"Authorization": f"Bearer {secret}"})
            if r is None or r.status_code != 201:
                raise RuntimeError(f"registering {name}: {None if r is None else (r.status_code, r.text[:300])}")
            out[i] = (r.json()["client_id"], r.json()["token"])

        await asyncio.gather(*(one(i, name) for i, name in enumerate(names)))
        return out  # type: ignore[return-value]

    # -- a task's upload ---------------------------------------------------------------------
    async def _adapter(self, ref, c: SimClient) -> dict[str, np.ndarray]:  # noqa: ANN001
        """An input adapter version, fetched once for the whole process (by the first client
        that needs it, with its own token: cluster versions are for members only)."""
        from shared.tensors import unpack_tensors

        async def fetch() -> dict[str, np.ndarray]:
            r = await self.send(self.work[c.index % 2], "adapter", "GET", f"/v1/adapters/{ref.id}", headers=c.headers)
            if r is None or r.status_code != 200:
                raise RuntimeError(f"adapter {ref.id}: {None if r is None else (r.status_code, r.text[:200])}")
            return unpack_tensors(r.content)

        if ref.id not in self._adapters or (self._adapters[ref.id].done() and self._adapters[ref.id].exception()):
            self._adapters[ref.id] = asyncio.ensure_future(fetch())
        return await asyncio.shield(self._adapters[ref.id])

    def _part(self, name: str, task) -> dict[str, np.ndarray]:  # noqa: ANN001
        """fake_worker's deterministic tensors for ``name`` and this task's round (cached: the
        shared move and the group offsets are the same for every client of a round)."""
        key = (name, task.stage, task.scope.split(":")[0], task.round_number,
               task.root.sha256 if task.root else "-", task.cluster.sha256 if task.cluster else "-",
               tuple(task.upload), task.train_tier)
        if key not in self._parts:
            if len(self._parts) > 256:
                self._parts.clear()
            self._parts[key] = deterministic_upload(self.manifest, name, task)
        return self._parts[key]

    async def body(self, c: SimClient, task) -> bytes:  # noqa: ANN001
        from shared.tensors import pack_tensors

        ref = task.cluster if task.train_tier == "cluster" else task.root
        base = await self._adapter(ref, c) if ref is not None else {}
        shared, group = self._part("shared", task), self._part(f"group-{c.group}", task)
        own = deterministic_upload(self.manifest, c.name, task)
        s = self.move_scale
        return pack_tensors({k: (base.get(k, 0.0) + s * (shared[k] + GROUP_SCALE * group[k] + NOISE_SCALE * own[k]))
                             .astype(np.float32) for k in own})

    # -- one client ----------------------------------------------------------------------------
    async def client(self, c: SimClient, deadline: float) -> None:
        from shared.schemas import SHA256_HEADER, TaskAssignment

        pool = self.hold[c.index % len(self.hold)]
        params = {"wait": f"{self.wait:g}"}
        while not self.stop.is_set() and time.monotonic() < deadline:
            sent = time.time()
            r = await self.send(pool, "lease", "POST", f"/v1/clients/{c.cid}/lease", params=params, headers=c.headers)
            answered = time.time()
            if r is None:
                await self.pause(1.0)
                continue
            self.rec.lease_requests += 1
            self.rec.lease_times.append(answered)
            if r.status_code in (429, 503):
                self.rec.rate_limited += 1
                await self.pause(_retry_after(r))
                continue
            if r.status_code != 200:
                self.rec.refused.append(f"lease {r.status_code} {r.text[:200]}")
                await self.pause(1.0)
                continue
            answer = r.json()
            if answer["task"] is None:
                self.rec.empty_leases += 1
                if answer["client_state"] == "revoked":
                    return
                if answer["retry_after"] > 0:  # not held (paused, or a coordinator without long polling)
                    await self.pause(float(answer["retry_after"]))
                continue
            task = TaskAssignment.model_validate(answer["task"])
            key = (str(task.stage.value if hasattr(task.stage, "value") else task.stage), task.scope, task.round_number)
            lease = {"lease_id": task.lease_id}
            if key[0] not in ("root", "probe", "cluster"):  # the run ends with the cluster stage: give it back
                r = await self.send(self.work[c.index % 2], "release", "POST", f"/v1/tasks/{task.task_id}/release",
                                    json=lease, headers=c.headers)
                self.rec.released += 1
                self.rec.first_release_at = self.rec.first_release_at or time.time()
                return
            self.rec.grants.append((key, c.cid, sent, answered))
            if task.upload:
                body = await self.body(c, task)
                sha = hashlib.sha256(body).hexdigest()
                r = None
                for _ in range(20):  # 429/503 (uploads in flight): honour Retry-After
                    r = await self.send(self.work[c.index % 2], "upload", "PUT", f"/v1/tasks/{task.task_id}/upload",
                                        params=lease, content=body,
                                        headers={**c.headers, SHA256_HEADER: sha,
                                                 "Content-Type": "application/octet-stream"})
                    if r is None or r.status_code not in (429, 503):
                        break
                    await self.pause(_retry_after(r))
                if r is None or r.status_code != 200:
                    self.rec.refused.append(f"upload {None if r is None else (r.status_code, r.text[:200])}")
                    continue
                self.rec.uploads.append((key, time.time()))
                self.rec.upload_bytes += len(body)
            r = await self.send(self.work[c.index % 2], "complete", "POST", f"/v1/tasks/{task.task_id}/complete",
                                json={**lease, "num_samples": client_num_samples(c.name),
                                      "metrics": deterministic_metrics(c.name, task)}, headers=c.headers)
            if r is not None and r.status_code == 200:
                self.rec.completes.append((key, c.cid, time.time()))
                self.rec.probe_completes += key[0] == "probe"
            elif r is not None:
                self.rec.refused.append(f"complete {r.status_code} {r.text[:200]}")


# ------------------------------------------------------------------------------ the run

def phase_spans_of(sampler: Sampler, rec: Record, bounds: list[tuple[str, float | None, float | None]]) -> dict:
    """Per phase (name, start, end; times of the workers' clocks): wall time, CPU of the
    coordinator, Postgres and this process, lease requests answered, grants, uploads and
    completions in it, and the coordinator's CPU per lease request and per granted task."""
    out = {}
    for name, start, end in bounds:
        if start is None or end is None or end < start:
            continue
        span = sampler.span(start, end)

        def within(times) -> int:  # noqa: ANN001
            return sum(start <= t < end for t in times)

        leases, grants = within(rec.lease_times), within(a for _k, _c, _s, a in rec.grants)
        cpu, pg_cpu = span["coordinator_cpu_s"], span["postgres_cpu_s"]
        out[name] = {"wall_s": round(end - start, 2), **span, "lease_requests": leases, "grants": grants,
                     "uploads": within(a for _k, a in rec.uploads), "completes": within(a for _k, _c, a in rec.completes),
                     "coordinator_cpu_ms_per_lease": round(1000 * cpu / leases, 2) if leases and cpu is not None else None,
                     "coordinator_cpu_ms_per_task": round(1000 * cpu / grants, 2) if grants and cpu is not None else None,
                     "postgres_cpu_ms_per_task": round(1000 * pg_cpu / grants, 2) if grants and pg_cpu is not None
                     else None}
    return out


def _db_state(engine, fid: int) -> tuple[str, int | None, int, int]:  # noqa: ANN001
    """(federation state, the open probe round's id, its done tasks, its tasks)."""
    from sqlalchemy import text

    with engine.connect() as conn:
        state = conn.execute(text("SELECT state FROM federations WHERE id = :f"), {"f": fid}).scalar_one()
        probe = conn.execute(text("SELECT id FROM rounds WHERE federation_id = :f AND stage = 'probe' "
                                  "AND status = 'open' ORDER BY id DESC LIMIT 1"), {"f": fid}).scalar()
        done = total = 0
        if probe is not None:
            done, total = conn.execute(text(
                "SELECT COALESCE(SUM(CASE WHEN status = 'done' THEN 1 ELSE 0 END), 0), COUNT(*) "
                "FROM tasks WHERE round_id = :r"), {"r": probe}).one()
    return str(state), probe, int(done), int(total)


async def drive(sim: Simulation, clients: list[SimClient], engine, fid: int, clustering_timeout: float,  # noqa: ANN001
                deadline: float) -> dict:
    """Run the clients until the cluster stage is over (or the clustering times out, or
    ``deadline`` passes, or every client stopped)."""
    tasks = [asyncio.ensure_future(sim.client(c, deadline)) for c in clients]
    outcome = {"finished": False, "clustering_timed_out": False, "deadline_passed": False}
    probe_done_at: float | None = None
    n = len(clients)
    try:
        while True:
            state, probe_id, done, total = await asyncio.to_thread(_db_state, engine, fid)
            # the probe round is over: every client completed it (or the database says so)
            if probe_done_at is None and (sim.rec.probe_completes >= n or (probe_id is not None and total
                                                                           and done == total)):
                probe_done_at = time.monotonic()
            if state not in TRAINING_STATES:  # the cluster stage is over (leaf_rounds 0: serving)
                outcome["finished"] = True
                break
            if probe_done_at is not None and state == "probe" and time.monotonic() - probe_done_at > clustering_timeout:
                outcome["clustering_timed_out"] = True
                break
            if time.monotonic() > deadline:
                outcome["deadline_passed"] = True
                break
            if all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.25)
    finally:
        outcome["stopped_at"] = time.time()
        sim.stop.set()
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        crashed = [repr(r) for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        outcome["client_crashes"] = crashed[:5]
        outcome["client_crash_count"] = len(crashed)
    return outcome


def analyse_rounds(engine, fid: int, rec: Record, n: int) -> tuple[list[dict], dict]:  # noqa: ANN001
    """One row per round (database and worker timestamps) and the grant latencies by stage."""
    from sqlalchemy import text

    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT id, stage, scope, number, status, created_at, closed_at, aggregation_seconds, failure "
            "FROM rounds WHERE federation_id = :f ORDER BY id"), {"f": fid}).all()
        tasks = {r[0]: (r[1], r[2], r[3], r[4]) for r in conn.execute(text(
            "SELECT round_id, COUNT(*), SUM(CASE WHEN status = 'done' THEN 1 ELSE 0 END), MAX(finished_at), "
            "SUM(CASE WHEN attempt > 1 THEN 1 ELSE 0 END) "
            "FROM tasks WHERE federation_id = :f GROUP BY round_id"), {"f": fid}).all()}

    def ts(value) -> float | None:  # noqa: ANN001
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            from datetime import timezone

            value = value.replace(tzinfo=timezone.utc)
        return value.timestamp()

    grants, uploads, completes = defaultdict(list), defaultdict(list), defaultdict(list)
    for key, cid, sent, answered in rec.grants:
        grants[key].append((cid, sent, answered))
    for key, answered in rec.uploads:
        uploads[key].append(answered)
    for key, _cid, answered in rec.completes:
        completes[key].append(answered)
    first_grant = {k: min(a for _c, _s, a in v) for k, v in grants.items()}

    out = []
    latency: dict[str, list[float]] = defaultdict(list)
    for rid, stage, scope, number, status, created, closed, agg, failure in rows:
        key = (str(stage), scope, number)
        g = grants.get(key, [])
        t_first = first_grant.get(key)
        # the next round of the run: the same scope's next number, else (stage done) the next stage's first
        later = [(r[0], (str(r[1]), r[2], r[3])) for r in rows if r[0] > rid]
        same = [k for _i, k in later if k[0] == str(stage) and k[1] == scope]
        nxt = same[0] if same else next((k for _i, k in later if k[0] != str(stage)), None)
        t_next = first_grant.get(nxt) if nxt else None
        count, done, finished, reissued = tasks.get(rid, (0, 0, None, 0))
        last_complete = max(completes[key]) if completes.get(key) else None
        row = {"stage": str(stage), "scope": scope, "number": number, "status": str(status),
               "tasks": int(count or 0), "done": int(done or 0), "clients_leased": len({c for c, _s, _a in g}),
               "grants": len(g), "leased_again": int(reissued or 0), "aggregation_s": None if agg is None else round(float(agg), 3),
               "db_open_to_closed_s": None if closed is None else round(ts(closed) - ts(created), 2),
               "db_open_to_last_done_s": None if finished is None else round(ts(finished) - ts(created), 2),
               "db_open_to_first_grant_s": None if t_first is None else round(t_first - ts(created), 2)}
        if str(stage) not in ("root", "probe", "cluster"):  # the eval rounds after it: not run
            continue
        if failure:
            row["failure"] = failure[:200]
        if t_first is not None:
            row["leasing_s"] = round(max(a for _c, _s, a in g) - t_first, 2)
            if uploads.get(key):
                row["uploads_s"] = round(max(uploads[key]) - t_first, 2)
            if last_complete is not None:
                row["done_s"] = round(last_complete - t_first, 2)
            if t_next is not None:
                row["round_s"] = round(t_next - t_first, 2)
                if last_complete is not None:
                    row["close_s"] = round(t_next - last_complete, 2)
            latency[str(stage)].extend(1000 * (a - max(s, t_first)) for _c, s, a in g)
        out.append(row)
    lat = {stage: percentiles(v) for stage, v in latency.items()}
    lat["all"] = percentiles([x for v in latency.values() for x in v])
    return out, lat


def clustering_result(engine, fid: int, clients: list[SimClient]) -> dict:  # noqa: ANN001
    from sqlalchemy import text

    with engine.connect() as conn:
        run = conn.execute(text("SELECT k, num_clients, features, algorithm FROM clustering_runs "
                                "WHERE federation_id = :f ORDER BY id DESC LIMIT 1"), {"f": fid}).first()
        labels = dict(conn.execute(text(
            "SELECT c.id, k.label FROM clients c JOIN clusters k ON k.id = c.cluster_id WHERE c.federation_id = :f"),
            {"f": fid}).all())
    if run is None:
        return {"k": None}
    planted = [c.group for c in clients if c.cid in labels]
    found = [labels[c.cid] for c in clients if c.cid in labels]
    return {"k": run[0], "num_clients": run[1], "features": run[2], "algorithm": run[3],
            "clustered_clients": len(found), "ari_vs_planted": ari(planted, found) if found else None}


def disk_use(engine, fid: int, blob_dir: Path) -> dict:  # noqa: ANN001
    from sqlalchemy import text

    with engine.connect() as conn:
        by_kind = {k: int(v) for k, v in conn.execute(text("SELECT kind, SUM(size) FROM blobs GROUP BY kind")).all()}
        by_stage = {str(k): int(v or 0) for k, v in conn.execute(text(
            "SELECT stage, SUM(upload_bytes) FROM tasks WHERE federation_id = :f GROUP BY stage"), {"f": fid}).all()}
    return {"blob_dir_mb": round(du_bytes(blob_dir) / MiB, 1),
            "blobs_mb_by_kind": {k: round(v / MiB, 2) for k, v in sorted(by_kind.items())},
            "uploads_mb_by_stage": {k: round(v / MiB, 2) for k, v in sorted(by_stage.items())}}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def summarise_stage(rows: list[dict], stage: str) -> dict:
    rs = [r for r in rows if r["stage"] == stage]
    if not rs:
        return {}
    keys = ("round_s", "leasing_s", "uploads_s", "done_s", "close_s", "aggregation_s", "db_open_to_closed_s")
    return {"rounds": len(rs), **{f"median_{k}": _median([r.get(k) for r in rs]) for k in keys},
            **{f"max_{k}": (max((r[k] for r in rs if r.get(k) is not None), default=None)) for k in ("round_s",)}}


def run(n: int, backend: str = "postgres", database_url: str | None = None, workdir: Path | None = None,
        root_rounds: int = 3, cluster_rounds: int = 2, lease_seconds: float = 900.0, groups: int = 4, wait: float = 10.0,
        connections: int = 1000, clustering_timeout: float = 600.0, max_seconds: float = 5400.0,
        depth: int = 2, dim: int = 64, rank: int = 4, classes: int = 10, move_scale: float = 0.02,
        keep_blobs: bool = False, pg_server=None, snapshot: bool = False) -> dict:  # noqa: ANN001
    """One scale run of ``n`` clients; returns the report (``problems`` empty when clean).
    ``database_url``: an existing empty database instead of a fresh server (``pg_server``: the
    tests/pg.py server it is on, whose CPU is then measured). ``snapshot``: run the coordinator
    from the committed code (``git archive HEAD``), not from the working tree."""
    from shared.manifest import AdapterManifest
    from shared.tensors import pack_tensors
    from coordinator.db import make_engine

    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="hilora-scale-")
        workdir = Path(own_tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    pg = own_pg = None
    if database_url is None:
        database_url, pg = fresh_database(backend, workdir)
        own_pg = pg
        if pg is not None:
            pg._admin.execute("ALTER SYSTEM SET autovacuum = on")
            pg._admin.execute("SELECT pg_reload_conf()")
    else:
        pg = pg_server
    backend = "sqlite" if database_url.startswith("sqlite") else "postgres"
    env = {"HILORA_REGISTRATION_RATE_PER_SECOND": "0",
           # room for every held request and upload of the simulation (the default is 2048)
           "HILORA_LIMIT_CONCURRENCY": str(max(2048, connections + WORK_CONNECTIONS + 64))}
    coord = Coordinator(workdir, database_url, name="coordinator", extra_env=env)
    manifest = manifest_dict(depth, dim, rank, classes)
    floats = upload_floats(depth, dim, rank, classes)
    report: dict = {"clients": n, "backend": backend, "machine": machine(), "code": code_version(),
                    "load_before": load(),
                    "settings": {"root_rounds": root_rounds, "cluster_rounds": cluster_rounds, "groups": groups,
                                 "wait_s": wait, "lease_seconds": lease_seconds, "connections": min(connections, n), "clustering_timeout_s":
                                 clustering_timeout, "move_scale": move_scale},
                    "manifest": {"depth": depth, "dim": dim, "rank": rank, "classes": classes,
                                 "targets": 2 * depth, "root_upload_floats": floats}}
    problems: list[str] = []
    started = time.monotonic()
    engine = make_engine(database_url)
    sampler = None
    try:
        if snapshot:
            report["code"] = {"commit": snapshot_head(workdir / "code")[:7], "modified": [], "snapshot": True}
        start_coordinator(coord, workdir / "code" if snapshot else None)
        admin = httpx.Client(base_url=coord.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=300)
        backbone = pack_tensors({"head.weight": np.zeros((classes, dim), np.float32),
                                 "head.bias": np.zeros(classes, np.float32)})
        sha = hashlib.sha256(backbone).hexdigest()
        admin.put(f"/v1/blobs/{sha}", content=backbone).raise_for_status()
        cfg = federation_config(f"scale-{n}-{secrets.token_hex(3)}", sha, n, manifest, root_rounds,
                                cluster_rounds, groups)
        cfg["schedule"]["lease_seconds"] = lease_seconds
        r = admin.post("/v1/federations", json={"config": cfg})
        r.raise_for_status()
        fid, secret = r.json()["federation_id"], r.json()["enrollment_secret"]
        manifest_obj = AdapterManifest.model_validate(manifest)
        rec = Record()
        sampler = Sampler(coord.proc.pid, pg)
        sampler.start()
        names = [f"s{i:05d}" for i in range(n)]
        marks: dict[str, float] = {}

        async def main() -> dict:
            sim = Simulation(coord.url, manifest_obj, rec, min(connections, n), wait, move_scale)
            try:
                t0, marks["registration"] = time.monotonic(), time.time()
                registered = await sim.register(fid, secret, names)
                marks["registered"] = time.time()
                report["registration"] = {"seconds": round(time.monotonic() - t0, 2),
                                          "per_second": round(n / max(time.monotonic() - t0, 1e-9), 1)}
                clients = [SimClient(i, name, cid, {"Authorization": f"Bearer {token}",
                                                    "X-Hilora-Worker-Id": f"scale-{i}"}, i % groups)
                           for i, (name, (cid, token)) in enumerate(zip(names, registered))]
                deadline = started + max_seconds
                outcome = await drive(sim, clients, engine, fid, clustering_timeout, deadline)
                return {"outcome": outcome, "clients": clients}
            finally:
                await sim.aclose()

        try:
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                driven = runner.run(main())
        except ImportError:
            driven = asyncio.run(main())
        outcome, clients = driven["outcome"], driven["clients"]
        metrics_text = admin.get("/metrics").text
        admin.close()
        report["rss_mb"] = {"hwm": round(rss_bytes(coord.proc.pid, "VmHWM") / MiB, 1),
                            "end": round(rss_bytes(coord.proc.pid) / MiB, 1)}
        sampler.stopped.set()
        coord.stop()
        log = coord.log.read_text(errors="replace") if coord.log.exists() else ""
        for needle in ("QueuePool limit", "TimeoutError", "Traceback", "Exception in ASGI"):
            if needle in log:
                problems.append(f"coordinator log mentions {needle!r}")

        rows, latency = analyse_rounds(engine, fid, rec, n)
        first = {stage: min((a for k, _c, _s, a in rec.grants if k[0] == stage), default=None)
                 for stage in ("root", "probe", "cluster")}
        probe_done = max((a for k, _c, a in rec.completes if k[0] == "probe"), default=None) \
            if rec.probe_completes >= n else None
        stopped = outcome["stopped_at"]
        clustering_end = first["cluster"] or rec.first_release_at or (stopped if probe_done else None)
        phase_spans = phase_spans_of(sampler, rec, [
            ("registration", marks.get("registration"), marks.get("registered")),
            ("root", first["root"], first["probe"] or stopped),
            ("probe", first["probe"], probe_done or (stopped if first["probe"] else None)),
            ("clustering", probe_done, clustering_end),
            ("cluster", first["cluster"], max((a for k, _c, a in rec.completes if k[0] == "cluster"), default=None)),
            ("whole", first["root"], stopped)])
        report["phases"] = phase_spans
        report["rss_mb"]["peak_by_phase"] = {k: v["rss_peak_mb"] for k, v in phase_spans.items()}
        if "registration" in phase_spans and "registration" in report:
            report["registration"]["coordinator_cpu_ms_per_registration"] = round(
                1000 * phase_spans["registration"]["coordinator_cpu_s"] / n, 2)
        report["rounds"] = rows
        report["summary"] = {stage: summarise_stage(rows, stage) for stage in ("root", "probe", "cluster")}
        report["lease_latency_ms"] = latency
        report["server_lease_seconds"] = {
            o: histogram_quantiles(metrics_text, "hilora_lease_seconds", {"outcome": o}) for o in ("granted", "empty")}
        clustering_hist = metric_values(metrics_text, "hilora_clustering_seconds_sum")
        clustering = {"timed_out": outcome["clustering_timed_out"], "timeout_s": clustering_timeout,
                      "seconds_metric": round(sum(clustering_hist.values()), 2) if clustering_hist else None}
        if probe_done is not None and clustering_end is not None:
            # from the probe round's last completion to the next stage's first grant (or the stop)
            clustering["wall_s"] = round(clustering_end - probe_done, 2)
        clustering.update(clustering_result(engine, fid, clients))
        report["clustering"] = clustering
        report["scheduler"] = {
            "ticks": metric_values(metrics_text, "hilora_scheduler_ticks_total"),
            "aggregation_seconds_sum": metric_values(metrics_text, "hilora_aggregation_seconds_sum"),
            "aggregation_count": metric_values(metrics_text, "hilora_aggregation_seconds_count")}
        report["disk"] = disk_use(engine, fid, workdir / "blobs")
        per_upload = rec.upload_bytes / max(len(rec.uploads), 1)
        report["disk"]["mean_upload_bytes"] = round(per_upload)
        report["requests"] = {"lease": rec.lease_requests, "lease_empty": rec.empty_leases,
                              "grants": len(rec.grants), "uploads": len(rec.uploads), "completes": len(rec.completes),
                              "rate_limited": rec.rate_limited, "eval_tasks_released": rec.released, "statuses": dict(sorted(rec.statuses.items())),
                              "transport_retries": dict(rec.transport_retries)}
        report["outcome"] = {k: v for k, v in outcome.items() if k != "stopped_at"}

        # what a clean run is
        if rec.server_errors:
            problems.append(f"{len(rec.server_errors)} server errors: {rec.server_errors[:3]}")
        if rec.transport_errors:
            problems.append(f"{len(rec.transport_errors)} requests failed in transport: {rec.transport_errors[:3]}")
        if rec.refused:
            problems.append(f"{len(rec.refused)} refused: {rec.refused[:3]}")
        if outcome["client_crash_count"]:
            problems.append(f"{outcome['client_crash_count']} simulated clients crashed: {outcome['client_crashes']}")
        if outcome["deadline_passed"]:
            problems.append(f"--max-seconds {max_seconds} passed before the cluster stage ended")
        if outcome["clustering_timed_out"]:
            problems.append(f"the clustering did not finish within --clustering-timeout {clustering_timeout} s")
        for row in rows:
            if row["stage"] in ("root", "probe", "cluster"):
                if row["status"] != "done" and outcome["finished"]:
                    problems.append(f"{row['stage']} round {row['scope']} #{row['number']} is {row['status']}")
                if row["stage"] in ("root", "probe") and row["status"] == "done" and row["clients_leased"] != n:
                    problems.append(f"{row['stage']} round #{row['number']}: {row['clients_leased']} of {n} clients "
                                    f"leased")
            if row["leased_again"]:  # a lease ran out: a grant no simulated client received (they never drop one)
                problems.append(f"{row['stage']} round {row['scope']} #{row['number']}: {row['leased_again']} tasks "
                                f"leased more than once (a lease expired after "
                                f"{row.get('leasing_s')} s of leasing)")
        done_root = sum(r["stage"] == "root" and r["status"] == "done" for r in rows)
        if done_root < root_rounds:
            problems.append(f"{done_root} of {root_rounds} root rounds done")
        return report
    except BaseException:
        sys.stderr.write("coordinator log tail:\n" + coord.tail() + "\n")
        raise
    finally:
        report["problems"] = problems
        report["ok"] = not problems
        report["load_after"] = load()
        report["wall_seconds"] = round(time.monotonic() - started, 1)
        if sampler is not None:
            sampler.stopped.set()
        coord.stop()
        engine.dispose()
        if own_pg is not None:
            own_pg.stop()
        if own_tmp is not None and not keep_blobs:
            own_tmp.cleanup()
        elif own_tmp is None and not keep_blobs:
            shutil.rmtree(workdir / "blobs", ignore_errors=True)


# ------------------------------------------------------------------------------ the command

def _table(report: dict) -> str:
    lines = [f"N = {report['clients']} on {report['backend']}: ok={report['ok']} wall {report['wall_seconds']} s, "
             f"load {report['load_before']} -> {report['load_after']}"]
    reg = report.get("registration")
    if reg:
        lines.append(f"  registration: {reg['seconds']} s ({reg['per_second']}/s)")
    for row in report.get("rounds", []):
        lines.append("  {stage:7s} {scope:12s} #{number:<3d} {status:6s} leased {clients_leased:6d}  round {r} s "
                     "(leasing {l}, uploads {u}, done {d}, close {c}; aggregation {a} s)".format(
                         r=row.get("round_s"), l=row.get("leasing_s"), u=row.get("uploads_s"), d=row.get("done_s"),
                         c=row.get("close_s"), a=row.get("aggregation_s"), **row))
    lines.append(f"  lease latency ms: {json.dumps(report.get('lease_latency_ms', {}))}")
    for name, span in report.get("phases", {}).items():
        lines.append(f"  phase {name}: {json.dumps(span)}")
    lines.append(f"  clustering: {json.dumps(report.get('clustering'))}")
    lines.append(f"  rss: {json.dumps(report.get('rss_mb'))}  disk: {json.dumps(report.get('disk'))}")
    if report["problems"]:
        lines.append(f"  problems: {report['problems']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--clients", type=int, default=None, help="one run of this many clients")
    sizes.add_argument("--quick", action="store_true", help="N = 100 and 1000 (default: 100, 1000 and 10000)")
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--root-rounds", type=int, default=3)
    parser.add_argument("--cluster-rounds", type=int, default=2,
                        help="0: the run ends with the clustering (no cluster round)")
    parser.add_argument("--lease-seconds", type=float, default=900.0,
                        help="the federation's lease_seconds: long enough for a client to wait for an upload "
                             "connection at large N; a grant that never reaches its client holds its round this long")
    parser.add_argument("--groups", type=int, default=4, help="planted groups of clients")
    parser.add_argument("--wait", type=float, default=10.0, help="long polling: ?wait=S on every lease request")
    parser.add_argument("--connections", type=int, default=1000,
                        help="keep-alive connections for the held lease requests (plus 32 for uploads)")
    parser.add_argument("--clustering-timeout", type=float, default=600.0,
                        help="seconds from the probe round's last completion; past it the run stops and the "
                             "clustering is reported as timed out")
    parser.add_argument("--max-seconds", type=float, default=5400.0, help="bound on one N's run")
    parser.add_argument("--depth", type=int, default=2, help="manifest: blocks of q and v targets")
    parser.add_argument("--dim", type=int, default=64, help="manifest: the targets' and the head's width")
    parser.add_argument("--rank", type=int, default=4, help="manifest: LoRA rank of every tier")
    parser.add_argument("--classes", type=int, default=10, help="manifest: the head's outputs")
    parser.add_argument("--snapshot", action="store_true",
                        help="run the coordinator from the committed code (git archive HEAD) rather than the "
                             "working tree, which may hold edits in progress")
    parser.add_argument("--keep", type=Path, default=None, help="keep the blobs and the log under this directory")
    parser.add_argument("--json", action="store_true", help="one JSON object per N")
    args = parser.parse_args()

    def _terminate(signum, _frame):  # noqa: ANN001 - SIGTERM: unwind, so the coordinator and Postgres stop too
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    ns = [args.clients] if args.clients else ([100, 1000] if args.quick else [100, 1000, 10_000])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    failed = False
    for n in ns:
        workdir = (args.keep / f"n{n}") if args.keep else None
        report = run(n, args.backend, workdir=workdir, root_rounds=args.root_rounds,
                     cluster_rounds=args.cluster_rounds, groups=args.groups, wait=args.wait,
                     connections=args.connections, lease_seconds=args.lease_seconds, clustering_timeout=args.clustering_timeout,
                     max_seconds=args.max_seconds, depth=args.depth, dim=args.dim, rank=args.rank,
                     classes=args.classes, keep_blobs=args.keep is not None, snapshot=args.snapshot)
        report["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        print(json.dumps(report) if args.json else _table(report), flush=True)
        failed = failed or not report["ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
