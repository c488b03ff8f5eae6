"""Round turnaround: from the last accepted upload of a root round to the next round's first lease,
100 clients at ViT-B shapes, on SQLite and on PostgreSQL (a throwaway server, tests/pg.py).

    python bench/round_turnaround.py [--quick] [--json] [--clients 100] [--rounds 4]

The coordinator app runs in this process (``create_app`` with an injected clock, no background
scheduler); clients lease, upload and complete through its HTTP routes (in-process ASGI client).
Uploads are realistic root-round uploads for a ViT-B manifest (q and v of 12 blocks, d = 768,
r = 8, 100-class head: 1.49 MB each): every client moves a little from the current root, by a move
shared by all clients of the round plus one of its own of the same size. Once the
last client's ``complete`` returns, the clock stops at the next round's first granted lease:

    turnaround = scheduler_tick (expire leases, decide the round, aggregate it, write the new
                 version, open the next round with its 100 tasks) + the first POST /lease.

That is the whole of the coordinator's work in between: in production ``complete`` wakes the
scheduler thread, which runs the same tick at once (the worker's own poll interval is not
coordinator time and is not counted).

Split: ``aggregation math`` = the time inside ``shared.aggregate.combine_tier_uploads`` and
``relative_change`` as the coordinator calls them (timed by wrapping the names
``coordinator.services.aggregation`` uses); ``bookkeeping`` = turnaround - math (database work,
reading and parsing 100 uploads, writing the version, opening the round, the lease); the reading
part (``BlobStore.map_tensors`` as aggregation calls it: the header check and the memory map; the
uploads' pages are read from the page cache inside the math, as the stacks are built) is reported
too. Targets:
bookkeeping <= 200 ms per backend; math <= 2 x its floor. The floor is measured in the same run:
the irreducible work of the method on these inputs, with no validation, Python loops or SVDs: per
target, widening the n float32 B's and A's into float64 stacks (one pass) and the 5 thin
products of the subspace iteration (what the sum path needs at n r >= d, observed: 2
iterations), plus the head average (one axpy per client), timed just before and just after each
tick (their mean is that transition's floor). Medians over the round transitions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import _common  # noqa: F401
from _common import ROOT, emit, load, machine, median, result, set_threads

import numpy as np  # noqa: E402

from shared.manifest import AdapterManifest, HeadSpec, TierSpec, qv_targets  # noqa: E402
from shared.schemas import PROTOCOL_HEADER  # noqa: E402
from shared.tensors import pack_tensors, unpack_tensors  # noqa: E402

ADMIN = "bench-admin-token-0123456789"
DIM, DEPTH, RANK, CLASSES = 768, 12, 8, 100


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now


def manifest() -> AdapterManifest:
    return AdapterManifest(targets=qv_targets(DEPTH, DIM), tiers={t: TierSpec(rank=RANK, alpha=RANK)
                                                                   for t in ("root", "cluster", "leaf")},
                           head=HeadSpec(in_features=DIM, num_classes=CLASSES))


class Timed:
    """Wraps a function and adds its wall time to ``seconds``."""

    def __init__(self, fn) -> None:  # noqa: ANN001
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


def floor_seconds(uploads: list[dict[str, np.ndarray]], weights: np.ndarray) -> float:
    """The method's irreducible work on these uploads (see the module docstring)."""
    m = manifest()
    n = len(uploads)
    w = weights / weights.sum()
    t0 = time.perf_counter()
    X = np.ones((DIM, 2 * RANK))
    for t in m.targets:
        Bt = np.stack([u[f"{t.name}.lora_B"] for u in uploads]).transpose(0, 2, 1).astype(np.float64)
        A = np.stack([u[f"{t.name}.lora_A"] for u in uploads]).astype(np.float64)
        Bt, A = Bt.reshape(n * RANK, DIM), A.reshape(n * RANK, DIM)
        for _ in range(3):                                   # 5 applications: dW X x3, dW^T Y x2
            Y = Bt.T @ (A @ X)
        for _ in range(2):
            X = A.T @ (Bt @ Y) / max(1.0, float(np.abs(Y).max()))
    for name in ("head.weight", "head.bias"):
        acc = np.zeros(uploads[0][name].shape)
        for wi, u in zip(w, uploads):
            acc += wi * u[name]
    return time.perf_counter() - t0


def run_backend(name: str, database_url: str, workdir: Path, clients: int, rounds: int,
                profile_dir: str | None = None) -> dict[str, object]:
    from fastapi.testclient import TestClient

    import coordinator.services.aggregation as aggregation_service
    from coordinator.app import create_app
    from coordinator.services.scheduling import scheduler_tick
    from coordinator.settings import Settings

    clock = Clock()
    settings = Settings(database_url=database_url, blob_dir=workdir / f"blobs-{name}", admin_token=ADMIN,
                        dev=False, run_scheduler=False, lease_rate_per_second=0,
                        registration_rate_per_second=0)
    app = create_app(settings, clock=clock)
    math_combine = Timed(aggregation_service.combine_tier_uploads)
    math_rho = Timed(aggregation_service.relative_change)
    aggregation_service.combine_tier_uploads = math_combine
    aggregation_service.relative_change = math_rho
    read_map = Timed(app.state.blobs.map_tensors)  # header check + mmap; pages come in during the math
    app.state.blobs.map_tensors = read_map
    turnarounds, ticks, leases, maths, floors, reads = [], [], [], [], [], []
    try:
        with TestClient(app) as api:
            admin = {"Authorization": f"Bearer {ADMIN}", PROTOCOL_HEADER: "1"}
            rng = np.random.default_rng(0)
            checkpoint = pack_tensors({"head.weight": rng.standard_normal((CLASSES, DIM)).astype(np.float32),
                                       "head.bias": np.zeros(CLASSES, np.float32)})
            import hashlib

            sha = hashlib.sha256(checkpoint).hexdigest()
            assert api.put(f"/v1/blobs/{sha}", content=checkpoint, headers=admin).status_code in (200, 201)
            config = {"name": f"turnaround-{name}", "backbone": {"model": "vit_base_patch16_224", "model_kwargs": {},
                                                                 "sha256": sha},
                      "manifest": manifest().model_dump(),
                      "schedule": {"min_clients": clients, "root_rounds": rounds + 1, "cluster_rounds": 1,
                                   "leaf_rounds": 1, "unseen_leaf_rounds": 1, "lease_seconds": 3600,
                                   "max_attempts": 2}}
            r = api.post("/v1/federations", json={"config": config}, headers=admin)
            assert r.status_code == 201, r.text
            fid, secret = r.json()["federation_id"], r.json()["enrollment_secret"]
            tokens = []
            for i in range(clients):
                r = api.post(f"/v1/federations/{fid}/clients", json={"name": f"c{i:03d}", "num_samples": 50 + i},
                             headers={"Authorization": f"Bearer {secret}", PROTOCOL_HEADER: "1"})
                assert r.status_code == 201, r.text
                tokens.append((r.json()["client_id"], {"Authorization": f"Bearer {r.json()['token']}",
                                                       PROTOCOL_HEADER: "1"}))
            scheduler_tick(app.state.session_factory, app.state.blobs, clock())     # opens root round 1

            def lease(client_id: int, headers: dict) -> dict:
                r = api.post(f"/v1/clients/{client_id}/lease", json={}, headers=headers)
                assert r.status_code == 200 and r.json().get("task"), r.text
                return r.json()["task"]

            pending_first: dict | None = None
            for round_index in range(rounds):
                uploads = []
                drift_rng = np.random.default_rng((round_index, 10**6))
                drift: dict[str, np.ndarray] = {}
                for i, (client_id, headers) in enumerate(tokens):
                    task = pending_first if (i == 0 and pending_first is not None) else lease(client_id, headers)
                    root = unpack_tensors(app.state.blobs.get_bytes(task["root"]["sha256"]))
                    crng = np.random.default_rng((round_index, i))
                    body = {}
                    for key, value in root.items():
                        # a move shared by all clients this round plus one of their own, same size
                        if key not in drift:
                            drift[key] = drift_rng.standard_normal(value.shape)
                        scale = 0.01 * (float(np.abs(value).mean()) + 0.05)
                        body[key] = (value + scale * (drift[key] + crng.standard_normal(value.shape))).astype(np.float32)
                    uploads.append(body)
                    data = pack_tensors(body)
                    r = api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                                content=data, headers={**headers, "Content-Type": "application/octet-stream"})
                    assert r.status_code == 200, r.text
                    r = api.post(f"/v1/tasks/{task['task_id']}/complete",
                                 json={"lease_id": task["lease_id"], "num_samples": 50 + i, "metrics": {}},
                                 headers=headers)
                    assert r.status_code == 200, r.text
                clock.now += timedelta(seconds=1)
                weights = np.array([50.0 + i for i in range(clients)])
                floor_before = floor_seconds(uploads, weights)
                math_combine.seconds = math_rho.seconds = read_map.seconds = 0.0
                profiler = None
                if profile_dir is not None:
                    import cProfile

                    profiler = cProfile.Profile()
                    profiler.enable()
                t0 = time.perf_counter()
                scheduler_tick(app.state.session_factory, app.state.blobs, clock())
                t1 = time.perf_counter()
                if profiler is not None:
                    profiler.disable()
                    profiler.dump_stats(str(Path(profile_dir) / f"tick-{name}-{round_index + 1}.prof"))
                pending_first = lease(*tokens[0])                              # the next round's first lease
                t2 = time.perf_counter()
                turnarounds.append(t2 - t0)
                ticks.append(t1 - t0)
                leases.append(t2 - t1)
                maths.append(math_combine.seconds + math_rho.seconds)
                reads.append(read_map.seconds)
                floors.append((floor_before + floor_seconds(uploads, weights)) / 2)   # around the tick
                print(f"# {name} round {round_index + 1}: turnaround {1000 * (t2 - t0):.0f} ms, math "
                      f"{1000 * maths[-1]:.0f} ms, floor {1000 * floors[-1]:.0f} ms, load {load()}",
                      file=sys.stderr, flush=True)
    finally:
        aggregation_service.combine_tier_uploads = math_combine.fn
        aggregation_service.relative_change = math_rho.fn
        app.state.engine.dispose()
    book = [t - m for t, m in zip(turnarounds, maths)]
    return {"turnaround_ms": round(1000 * median(turnarounds), 1), "tick_ms": round(1000 * median(ticks), 1),
            "first_lease_ms": round(1000 * median(leases), 1), "math_ms": round(1000 * median(maths), 1),
            "bookkeeping_ms": round(1000 * median(book), 1), "floor_ms": round(1000 * median(floors), 1),
            "bookkeeping_reading_uploads_ms": round(1000 * median(reads), 1),
            "bookkeeping_database_and_rest_ms": round(1000 * median([b - r for b, r in zip(book, reads)]), 1),
            "math_over_floor": median([m / f for m, f in zip(maths, floors)]), "transitions": len(turnarounds),
            "per_transition_ms": {"turnaround": [round(1000 * t) for t in turnarounds],
                                  "math": [round(1000 * m) for m in maths], "floor": [round(1000 * f) for f in floors]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds (2 transitions) per backend")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=4, help="root rounds timed (transitions to the next)")
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", metavar="DIR", help="write a cProfile of every timed tick here")
    args = parser.parse_args()
    set_threads(args.threads)
    rounds = 2 if args.quick else args.rounds
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="turnaround-") as tmp:
        work = Path(tmp)
        for backend in args.backends:
            load_before = load()
            if backend == "sqlite":
                stats = run_backend("sqlite", f"sqlite:///{work / 'coordinator.db'}", work, args.clients, rounds,
                                    args.profile)
            else:
                sys.path.insert(0, str(ROOT / "tests"))
                from pg import PostgresServer, PostgresUnavailable

                try:
                    server = PostgresServer()
                except PostgresUnavailable as exc:
                    results.append(result(f"round turnaround bookkeeping ({backend})", float("nan"), "<= 200 ms",
                                          False, skipped=str(exc)))
                    continue
                server.start()
                try:
                    stats = run_backend("postgres", server.create_database(), work, args.clients, rounds, args.profile)
                finally:
                    server.stop()
            common = {**stats, "clients": args.clients, "load_before": load_before, "load_after": load()}
            results.append(result(f"round turnaround bookkeeping ({backend}), ms", stats["bookkeeping_ms"], "<= 200",
                                  stats["bookkeeping_ms"] <= 200, **common))
            results.append(result(f"round turnaround aggregation math / floor ({backend})", stats["math_over_floor"],
                                  "<= 2", stats["math_over_floor"] <= 2))
    header = {"bench": "round_turnaround", "machine": machine(), "threads": args.threads,
              "command": "python " + " ".join(sys.argv), "bench_wall_s": round(time.perf_counter() - started, 1)}
    emit(results, args.json, header)


if __name__ == "__main__":
    main()
