"""Upload ingest: a real ``hilora coordinator`` (uvicorn subprocess, SQLite) against a bare uvicorn
endpoint, both on loopback, receiving the same 5 MB safetensors bodies.

    python bench/upload_path.py [--quick] [--json] [--repeats 5]

- ``coordinator``: ``PUT /v1/tasks/{id}/upload?lease_id=...`` of a valid root-tier upload for a
  manifest sized so (ViT-B q and v, 24 targets, d = 768, rank 32, 100-class head: 5.03 MB), under a
  live lease of one of 16 registered clients (re-uploading under a live lease replaces the task's
  upload, so every upload does the full work: stream to a temp file while hashing, validate against
  the manifest, adopt into the blob store, update the task row). Every body is distinct (no dedupe).
- ``bare``: a raw ASGI app (no framework) in the same uvicorn, that reads the body chunk by chunk,
  writes it to a new file, fsyncs and answers 200.

Uploaders are threads of this process (``http.client``, bodies and sha256 prepared before the clock
starts), 1 or 16 at a time; throughput = bytes / wall time of a batch; batches for the two servers
are interleaved (order alternating), medians; target coordinator / bare >= 0.70 at 1 and 16.
RSS: the coordinator's VmRSS (/proc/<pid>/status) after a warm-up, after U more uploads and after
10 U more (U = 20, quick 16); target: the second step grows RSS by at most 10% of the first
reading (flat while uploads grow 10x).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common  # noqa: F401
from _common import ROOT, emit, load, machine, median, result, set_threads

import numpy as np  # noqa: E402

from shared.manifest import AdapterManifest, HeadSpec, TierSpec, qv_targets  # noqa: E402
from shared.schemas import PROTOCOL_HEADER, SHA256_HEADER  # noqa: E402
from shared.tensors import pack_tensors  # noqa: E402

ADMIN = "bench-admin-token-0123456789"
DIM, DEPTH, RANK, CLASSES = 768, 12, 32, 100
CLIENTS = 16


# --------------------------------------------------------------------------- the bare endpoint

def bare_app(directory: str):  # noqa: ANN201
    async def app(scope, receive, send):  # noqa: ANN001, ANN202
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        fd, _ = tempfile.mkstemp(dir=directory)
        size = 0
        with os.fdopen(fd, "wb") as fh:
            while True:
                message = await receive()
                chunk = message.get("body", b"")
                if chunk:
                    fh.write(chunk)
                    size += len(chunk)
                if not message.get("more_body"):
                    break
            fh.flush()
            os.fsync(fh.fileno())
        body = json.dumps({"bytes": size}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    return app


def serve_bare(port: int, directory: str) -> None:
    import uvicorn

    uvicorn.run(bare_app(directory), host="127.0.0.1", port=port, log_level="warning")


# ------------------------------------------------------------------------------- helpers

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing answers on port {port}")


def call(port: int, method: str, path: str, body: object = None, token: str | None = None,
         raw: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {PROTOCOL_HEADER: "1"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    text = response.read()
    conn.close()
    try:
        return response.status, json.loads(text) if text else {}
    except ValueError:
        return response.status, {"raw": text.decode(errors="replace")}


def vm_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def manifest() -> AdapterManifest:
    return AdapterManifest(targets=qv_targets(DEPTH, DIM), tiers={t: TierSpec(rank=RANK, alpha=RANK)
                                                                   for t in ("root", "cluster", "leaf")},
                           head=HeadSpec(in_features=DIM, num_classes=CLASSES))


class Bodies:
    """Distinct valid root uploads: one packed template, a counter patched into its last value."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        tensors = {name: (0.01 * rng.standard_normal(shape)).astype(np.float32)
                   for name, shape in manifest().tier_shapes("root").items()}
        self.template = pack_tensors(tensors)
        self.counter = 0

    def make(self) -> tuple[bytes, str]:
        self.counter += 1
        body = bytearray(self.template)
        body[-4:] = np.float32(self.counter * 1e-6).tobytes()
        data = bytes(body)
        return data, hashlib.sha256(data).hexdigest()


# -------------------------------------------------------------------------- the coordinator

class CoordinatorUnderTest:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        env = dict(os.environ, HILORA_DATABASE_URL=f"sqlite:///{workdir / 'coordinator.db'}",
                   HILORA_BLOB_DIR=str(workdir / "blobs"), HILORA_ADMIN_TOKEN=ADMIN, HILORA_LOG_LEVEL="warning",
                   HILORA_UPLOAD_RETENTION_SECONDS="never")
        self.log = open(workdir / "coordinator.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "hilora.cli", "coordinator", "--port", str(self.port)],
                                     env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        wait_http(self.port, "/healthz")
        self.tasks: list[tuple[int, str, str]] = []           # (task_id, lease_id, token)

    def setup(self) -> None:
        rng = np.random.default_rng(1)
        checkpoint = pack_tensors({"head.weight": rng.standard_normal((CLASSES, DIM)).astype(np.float32),
                                   "head.bias": np.zeros(CLASSES, np.float32)})
        sha = hashlib.sha256(checkpoint).hexdigest()
        status, body = call(self.port, "PUT", f"/v1/blobs/{sha}", token=ADMIN, raw=checkpoint)
        assert status in (200, 201), (status, body)
        m = manifest()
        config = {"name": "upload-bench", "backbone": {"model": "vit_base_patch16_224", "model_kwargs": {}, "sha256": sha},
                  "manifest": m.model_dump(),
                  "schedule": {"min_clients": CLIENTS, "root_rounds": 2, "cluster_rounds": 1, "leaf_rounds": 1,
                               "unseen_leaf_rounds": 1, "lease_seconds": 3600, "max_attempts": 2}}
        status, body = call(self.port, "POST", "/v1/federations", {"config": config}, token=ADMIN)
        assert status == 201, (status, body)
        fid, secret = body["federation_id"], body["enrollment_secret"]
        clients = []
        for i in range(CLIENTS):
            status, body = call(self.port, "POST", f"/v1/federations/{fid}/clients",
                                {"name": f"c{i:02d}", "num_samples": 100}, token=secret)
            assert status == 201, (status, body)
            clients.append((body["client_id"], body["token"]))
        deadline = time.monotonic() + 60
        for client_id, token in clients:
            while True:
                status, body = call(self.port, "POST", f"/v1/clients/{client_id}/lease", {}, token=token)
                if status == 200 and body.get("task"):
                    self.tasks.append((body["task"]["task_id"], body["task"]["lease_id"], token))
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no task leased: {status} {body}")
                time.sleep(0.3)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# ----------------------------------------------------------------------------- uploading

def upload_batch(port: int, jobs: list[list[tuple[str, dict[str, str], bytes]]]) -> float:
    """Run each list of (path, headers, body) in its own thread, sequentially; wall seconds."""
    errors: list[str] = []

    def worker(items: list[tuple[str, dict[str, str], bytes]]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for path, headers, body in items:
            conn.request("PUT", path, body=body, headers=headers)
            response = conn.getresponse()
            text = response.read()
            if response.status not in (200, 201):
                errors.append(f"{response.status} {text[:200]!r}")
        conn.close()

    threads = [threading.Thread(target=worker, args=(items,)) for items in jobs]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} uploads failed, e.g. {errors[0]}")
    return seconds


def coordinator_jobs(coord: CoordinatorUnderTest, bodies: Bodies, concurrency: int, per_thread: int):  # noqa: ANN201
    jobs = []
    for i in range(concurrency):
        task_id, lease_id, token = coord.tasks[i % len(coord.tasks)]
        items = []
        for _ in range(per_thread):
            data, sha = bodies.make()
            items.append((f"/v1/tasks/{task_id}/upload?lease_id={lease_id}",
                          {"Authorization": f"Bearer {token}", PROTOCOL_HEADER: "1", SHA256_HEADER: sha,
                           "Content-Type": "application/octet-stream", "Content-Length": str(len(data))}, data))
        jobs.append(items)
    return jobs


def bare_jobs(bodies: Bodies, concurrency: int, per_thread: int):  # noqa: ANN201
    jobs = []
    for _ in range(concurrency):
        items = []
        for _ in range(per_thread):
            data, sha = bodies.make()
            items.append(("/upload", {"Content-Type": "application/octet-stream", SHA256_HEADER: sha,
                                      "Content-Length": str(len(data))}, data))
        jobs.append(items)
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads of the servers (numpy validation)")
    parser.add_argument("--serve-bare", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(int(args.serve_bare[0]), args.serve_bare[1])
        return
    set_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    per_thread = {1: 4 if args.quick else 8, 16: 2}
    rss_step = 16 if args.quick else 20
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="upload-bench-") as tmp:
        work = Path(tmp)
        (work / "bare").mkdir()
        bare_port = free_port()
        bare_log = open(work / "bare.log", "ab")  # noqa: SIM115
        bare = subprocess.Popen([sys.executable, __file__, "--serve-bare", str(bare_port), str(work / "bare")],
                                cwd=ROOT, stdout=bare_log, stderr=subprocess.STDOUT)
        coord = CoordinatorUnderTest(work)
        try:
            wait_http(bare_port, "/")
            coord.setup()
            bodies = Bodies()
            size = len(bodies.template)
            upload_batch(coord.port, coordinator_jobs(coord, bodies, 4, 1))     # warm-up
            upload_batch(bare_port, bare_jobs(bodies, 4, 1))
            for concurrency in (1, 16):
                load_before = load()
                times: dict[str, list[float]] = {"coordinator": [], "bare": []}
                count = concurrency * per_thread[concurrency]
                for rep in range(repeats):
                    order = ("coordinator", "bare") if rep % 2 == 0 else ("bare", "coordinator")
                    for name in order:
                        jobs = (coordinator_jobs(coord, bodies, concurrency, per_thread[concurrency]) if name == "coordinator"
                                else bare_jobs(bodies, concurrency, per_thread[concurrency]))
                        times[name].append(upload_batch(coord.port if name == "coordinator" else bare_port, jobs))
                mbps = {k: count * size / median(v) / 2**20 for k, v in times.items()}
                ratio = mbps["coordinator"] / mbps["bare"]
                print(f"# concurrency {concurrency}: coordinator {mbps['coordinator']:.0f} MB/s, bare {mbps['bare']:.0f} MB/s",
                      file=sys.stderr, flush=True)
                results.append(result(f"upload throughput coordinator / bare, {concurrency} uploader(s)", ratio, ">= 0.70",
                                      ratio >= 0.70, coordinator_MBps=round(mbps["coordinator"], 1),
                                      bare_MBps=round(mbps["bare"], 1), uploads_per_batch=count, body_bytes=size,
                                      repeats=repeats,
                                      seconds_per_batch={k: round(median(v), 3) for k, v in times.items()},
                                      load_before=load_before, load_after=load()))
            rss = [vm_rss_kb(coord.proc.pid)]
            for steps in (rss_step, 10 * rss_step):
                remaining = steps
                while remaining > 0:
                    batch = min(remaining, 32)
                    upload_batch(coord.port, coordinator_jobs(coord, bodies, 16, max(1, batch // 16)))
                    remaining -= 16 * max(1, batch // 16)
                rss.append(vm_rss_kb(coord.proc.pid))
            first_growth, second_growth = rss[1] - rss[0], rss[2] - rss[1]
            flat = second_growth <= 0.10 * rss[1]
            results.append(result("coordinator RSS growth over 10x more uploads / RSS", second_growth / rss[1], "<= 0.10",
                                  flat, rss_kb_after_warmup=rss[0], rss_kb_after_U=rss[1], rss_kb_after_11U=rss[2],
                                  U=rss_step, growth_first_kb=first_growth, growth_second_kb=second_growth))
        finally:
            coord.stop()
            bare.send_signal(signal.SIGTERM)
            try:
                bare.wait(timeout=10)
            except subprocess.TimeoutExpired:
                bare.kill()
            bare_log.close()
    header = {"bench": "upload_path", "machine": machine(), "command": "python " + " ".join(sys.argv),
              "database": "sqlite", "bench_wall_s": round(time.perf_counter() - started, 1)}
    emit(results, args.json, header)


if __name__ == "__main__":
    main()
