"""Coordinator CPU per lease: a real ``hilora coordinator`` (uvicorn, 127.0.0.1) that only serves
(``HILORA_RUN_SCHEDULER=0``; a second process on the same database runs the scheduler), N clients,
and sequential lease requests over one keep-alive connection:

- **granted**: once the first round is open every client has one pending task; each client leases
  it (N granted leases; the first tenth warm the process up and are not counted);
- **empty**: every client then leases again, ``--empty-per-client`` times round robin (each already
  holds its task, so every answer is "no work, retry after");
- **upload** and **complete**: then two thirds of the clients upload their task's result (a valid
  root-tier body of the 1-block test manifest, ``upload_bytes`` in the output) and complete it, one
  request each (the scheduler runs in no process by then: a completion's wake-up costs nothing
  here); **upload_complete**: the last third uploads with the completion in ``X-Hilora-Complete``,
  one request for both, as the worker does.

The figure is the serving process's CPU time (user + system, /proc/<pid>/stat) over the requests
divided by their number: everything the coordinator spends on a lease (HTTP parsing, routing,
authentication, the database round trips, the answer's JSON), on SQLite and on PostgreSQL (a
throwaway server from tests/pg.py; its own CPU is not counted), and for scale 1,000 requests to
``GET /v1/healthz`` (a route that does nothing). Prints one JSON object.

    python bench/lease_cpu.py --clients 200 --empty-per-client 10      # docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests", ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import httpx
import numpy as np

from load import ADMIN_TOKEN, CLASSES, DIM, Coordinator, federation_config, fresh_database, upload_bodies

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15)


def _wait_open(admin: httpx.Client, fid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["status"] == "open" for r in admin.get(f"/v1/federations/{fid}").json()["rounds"]):
            return
        time.sleep(0.2)
    raise RuntimeError("the first round did not open")


def measure(backend: str, clients: int, empty_per_client: int, workdir: Path) -> dict:
    from shared.tensors import pack_tensors

    url, pg = fresh_database(backend, workdir)
    # the limiter would answer 429 to a tight loop; it is not what is measured
    env = {"HILORA_RUN_SCHEDULER": "0", "HILORA_LEASE_RATE_PER_SECOND": "0", "HILORA_REGISTRATION_RATE_PER_SECOND": "0"}
    serving = Coordinator(workdir, url, name="serving", extra_env=env)
    scheduler = Coordinator(workdir, url, name="scheduler")
    try:
        serving.start()
        scheduler.start()
        admin = httpx.Client(base_url=serving.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
        backbone = pack_tensors({"head.weight": np.zeros((CLASSES, DIM), np.float32),
                                 "head.bias": np.zeros(CLASSES, np.float32)})
        sha = hashlib.sha256(backbone).hexdigest()
        admin.put(f"/v1/blobs/{sha}", content=backbone).raise_for_status()
        cfg = federation_config(f"lease-cpu-{secrets.token_hex(3)}", sha, clients, depth=1)
        cfg["schedule"]["lease_seconds"] = 3600
        r = admin.post("/v1/federations", json={"config": cfg})
        r.raise_for_status()
        fid, secret = r.json()["federation_id"], r.json()["enrollment_secret"]
        tokens = []
        http = httpx.Client(base_url=serving.url, timeout=60)
        for i in range(clients):
            r = http.post(f"/v1/federations/{fid}/clients", json={"name": f"c{i}", "num_samples": 10},
                          headers={"Authorization": f"Bearer {secret}"})
            r.raise_for_status()
            tokens.append((r.json()["client_id"], {"Authorization": f"Bearer {r.json()['token']}"}))
        _wait_open(admin, fid)
        scheduler.stop()  # nothing else runs on the database while we measure
        pid = serving.proc.pid

        held: dict[int, dict] = {}   # client id -> its granted task

        def run(rounds: int, clients: list) -> tuple[float, float, int]:
            granted = 0
            c0, t0 = cpu_seconds(pid), time.perf_counter()
            for _ in range(rounds):
                for cid, headers in clients:
                    r = http.post(f"/v1/clients/{cid}/lease", headers=headers)
                    r.raise_for_status()
                    task = r.json()["task"]
                    if task is not None:
                        granted += 1
                        held[cid] = task
            return cpu_seconds(pid) - c0, time.perf_counter() - t0, granted

        # the first requests of a process compile its SQL statements: a tenth of the clients warm up
        warm = max(1, clients // 10)
        _, _, w_n = run(1, tokens[:warm])
        g_cpu, g_wall, g_n = run(1, tokens[warm:])
        if w_n + g_n != clients:
            raise RuntimeError(f"{w_n + g_n} of {clients} first leases were granted")
        e_cpu, e_wall, e_granted = run(empty_per_client, tokens)
        if e_granted:
            raise RuntimeError(f"{e_granted} later leases were granted")
        e_n = clients * empty_per_client
        # the floor under any request of this stack: a route that does nothing
        h0 = cpu_seconds(pid)
        for _ in range(1000):
            http.get("/v1/healthz").raise_for_status()
        healthz_ms = cpu_seconds(pid) - h0  # seconds over 1,000 requests = ms per request
        # each client's result: one upload, then one completion (the first tenth warm up each route)
        body, _sha = upload_bodies(depth=1)[0]

        completion = json.dumps({"num_samples": 10, "metrics": {"acc": 0.5}})

        def report(step: str, clients: list) -> tuple[float, float, int]:
            c0, t0 = cpu_seconds(pid), time.perf_counter()
            for cid, headers in clients:
                task = held[cid]
                if step in ("upload", "upload_complete"):
                    extra = {"X-Hilora-Complete": completion} if step == "upload_complete" else {}
                    r = http.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                                 content=body, headers={**headers, **extra})
                    if step == "upload_complete" and r.json().get("status") != "done":
                        raise RuntimeError(f"the upload did not complete its task: {r.text}")
                else:
                    r = http.post(f"/v1/tasks/{task['task_id']}/complete", headers=headers,
                                  json={"lease_id": task["lease_id"], "num_samples": 10, "metrics": {"acc": 0.5}})
                r.raise_for_status()
            return cpu_seconds(pid) - c0, time.perf_counter() - t0, len(clients)

        steps = {}
        apart, merged = tokens[:clients - clients // 3], tokens[clients - clients // 3:]
        for step, group in (("upload", apart), ("complete", apart), ("upload_complete", merged)):
            warm = max(1, len(group) // 10)
            report(step, group[:warm])
            cpu, wall, n = report(step, group[warm:])
            steps[step] = {"requests": n, "cpu_ms_per_request": round(1000 * cpu / n, 2),
                           "wall_ms_per_request": round(1000 * wall / n, 2)}
        return {"backend": backend, "clients": clients,
                "granted": {"requests": g_n, "cpu_ms_per_lease": round(1000 * g_cpu / g_n, 2),
                            "wall_ms_per_lease": round(1000 * g_wall / g_n, 2)},
                "empty": {"requests": e_n, "cpu_ms_per_lease": round(1000 * e_cpu / e_n, 2),
                          "wall_ms_per_lease": round(1000 * e_wall / e_n, 2)},
                "upload": {**steps["upload"], "upload_bytes": len(body)}, "complete": steps["complete"],
                "upload_complete": steps["upload_complete"],
                "healthz_cpu_ms_per_request": round(healthz_ms, 2)}
    finally:
        serving.stop()
        scheduler.stop()
        if pg is not None:
            pg.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--empty-per-client", type=int, default=10)
    args = parser.parse_args()
    results = []
    for backend in (("sqlite", "postgres") if args.backend == "both" else (args.backend,)):
        with tempfile.TemporaryDirectory(prefix="hilora-lease-cpu-") as tmp:
            results.append(measure(backend, args.clients, args.empty_per_client, Path(tmp)))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
