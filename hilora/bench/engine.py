"""The one engine: every method of ``hilora bench`` is a federation that the real service runs.

A run is the coordinator (``coordinator.app.create_app`` on a SQLite database and a blob folder in
the run's work folder) and the worker code (``worker.daemon.WorkerDaemon``), in one of two transports:

- ``inprocess`` (the default): the app in this process, reached through Starlette's TestClient
  (``CoordinatorClient`` over a sync httpx transport), its background scheduler off; one
  ``WorkerDaemon`` hosts every client and this module drives it: lease every client's task and run
  it (``WorkerDaemon.execute``, the daemon's own task runner), and when no client has work, one
  ``scheduler_tick`` (aggregation, clustering, the next round). Nothing waits on a clock, so it is
  fast and deterministic.
- ``http``: ``hilora coordinator`` and ``hilora worker`` processes on loopback (``LocalCluster``,
  as ``hilora demo``), the coordinator's own scheduler loop.

A task's result depends only on its inputs (adapter versions, the client's data and files, seeds
derived from the task), so both transports produce the same adapter versions and accuracies; a
test checks it. Everything the bench reports is read back from the service's own views: the
federation report, the operator's accuracy view (tier accuracies the workers reported), the unseen
clients view and the clustering runs, as the dashboard reads them.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from hilora.bench.methods import BASELINES, MethodConfig, method_config, parse_methods
from hilora.bench.report import (
    accuracy_stats,
    check_resumed_setup,
    majority_clusters,
    partition_sha256,
    resumable_runs,
    summarize,
)
from hilora.bench.setup import BenchSetup, prepare
from hilora.options import RunOptions
from shared.schemas import FederationStatus
from worker.client import CoordinatorClient

Say = Callable[[str], None]
OnStatus = Callable[[FederationStatus], None]
MAX_IDLE_TICKS = 3           # in process: consecutive ticks without a change before a run is stuck
MAX_STEPS = 1_000_000        # in process: bound on the passes (leases + one tick) of one phase


class _ThroughTestClient(httpx.BaseTransport):
    """A sync httpx transport that hands each request to a Starlette TestClient (so to the app)."""

    def __init__(self, test_client: Any) -> None:
        self._tc = test_client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self._tc.request(request.method, str(request.url), headers=dict(request.headers),
                             content=request.read())
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)


def _no_open_rounds(status: FederationStatus) -> bool:
    return all(r.status != "open" for r in status.rounds)


def training_done(status: FederationStatus) -> bool:
    """The training cascade and its final evaluation are over."""
    return status.state.value == "serving" and _no_open_rounds(status)


def onboarding_done(expected_clients: int) -> Callable[[FederationStatus], bool]:
    def done(status: FederationStatus) -> bool:
        return (status.clients_total >= expected_clients and status.onboarding_pending == 0
                and _no_open_rounds(status))
    return done


def expected_rounds(name: str, opts: RunOptions, unseen: bool) -> int:
    """The rounds ``RoundCounter`` counts for method ``name``'s federation under ``opts``: root, probe,
    cluster, refinement and leaf rounds of the training cohort (a flat baseline: its root rounds and
    the final evaluation; a hierarchy without leaf rounds: the final evaluation too), then the unseen
    clients' probe (hierarchical methods) and leaf rounds. An estimate for progress bars only: the
    root stage may stop early."""
    if name in BASELINES:
        train, late = opts.total_rounds + 1, opts.unseen_leaf_rounds
    else:
        refine = 0 if name == "oracle" else min(opts.refine_rounds, opts.cluster_rounds)
        train = opts.root_rounds + 1 + opts.cluster_rounds + refine + opts.leaf_rounds + (0 if opts.leaf_rounds else 1)
        late = 1 + opts.unseen_leaf_rounds
    return train + (late if unseen else 0)


class RoundCounter:
    """Rounds of one federation that are over, from the statuses the bench reads: the training
    cohort's by (stage, number) (the clusters' rounds of one number count once), the unseen
    clients' by (stage, number) over all of them. Reading a status changes nothing in the run."""

    def __init__(self) -> None:
        self._seen: set[tuple[Any, ...]] = set()

    def update(self, status: FederationStatus) -> int:
        for r in status.rounds:
            if r.status != "open":
                cohort = "unseen" if r.scope.startswith("client:") else "train"
                self._seen.add((r.cycle, cohort, str(getattr(r.stage, "value", r.stage)), r.number))
        return len(self._seen)


def register(service: Any, setup: BenchSetup, fid: int, secret: str, clients: Sequence[Any],
             partition_file: Path) -> list[dict[str, Any]]:
    """Register ``clients`` in name order (so client ids do not depend on
    which worker process happens to register first) and return their worker-config entries with
    the credentials."""
    hosted = []
    for c in sorted(clients, key=lambda c: c.name):
        reg = service.admin.register(fid, secret, c.name, len(setup.data[c.name].y_train))
        hosted.append({"name": c.name, "token": reg.token, "client_id": reg.client_id,
                       "data": {"partition": str(partition_file), "client": c.name}})
    return hosted


class InProcessService:
    """The coordinator app in this process (scheduler ticks driven by ``run``), and one in-process
    worker per federation hosting its clients."""

    transport = "inprocess"

    def __init__(self, workdir: Path, opts: RunOptions) -> None:
        from starlette.testclient import TestClient

        from coordinator.app import create_app
        from coordinator.settings import Settings

        self.workdir = Path(workdir)
        self.opts = opts
        self.admin_token = "bench-" + secrets.token_hex(16)
        settings = Settings(database_url=f"sqlite:///{self.workdir / 'coordinator.db'}",
                            blob_dir=self.workdir / "blobs", admin_token=self.admin_token, dev=True,
                            run_scheduler=False, upload_retention_seconds=None, lease_rate_per_second=0,
                            registration_rate_per_second=0,
                            log_level="warning")
        self.app = create_app(settings)
        self._test_client = TestClient(self.app, base_url="http://hilora-bench")
        self._test_client.__enter__()
        self.admin = self.client("hilora-bench-admin")
        self._daemons: dict[int, Any] = {}

    def client(self, worker_id: str) -> CoordinatorClient:
        return CoordinatorClient("http://hilora-bench", worker_id=worker_id, max_retries=0,
                                 transport=_ThroughTestClient(self._test_client))

    def tick(self) -> int:
        from coordinator.services.scheduling import scheduler_tick

        return max(0, scheduler_tick(self.app.state.session_factory, self.app.state.blobs, self.app.state.clock()))

    def run(self, setup: BenchSetup, fid: int, secret: str, clients: Sequence[Any], partition_file: Path,
            done: Callable[[FederationStatus], bool], on_status: OnStatus | None = None) -> FederationStatus:
        """Host ``clients`` (registering them) and drive the federation until ``done``; ``on_status``
        (progress) gets the federation's status after every pass."""
        from worker.daemon import HostedClient, WorkerConfig, WorkerDaemon

        hosted = [HostedClient.model_validate(h) for h in register(self, setup, fid, secret, clients, partition_file)]
        daemon = self._daemons.get(fid)
        if daemon is None:
            daemon = WorkerDaemon(self.client(f"bench-worker-{fid}"),
                                  WorkerConfig(federation_id=fid, enrollment_secret=secret, clients=hosted,
                                               # the bench's backbone is the user's own choice
                                               allow_model_kwargs=sorted(setup.artifact.model_kwargs),
                                               allow_hub_models=True),
                                  self.workdir / "state", device=self.opts.device, data=setup.data)
            daemon.setup()
            self._daemons[fid] = daemon
        else:
            daemon.add_clients(hosted)
        names = {h.name for h in hosted}
        polled = [slot for slot in daemon.slots if slot.spec.name in names]   # this phase's clients
        idle_ticks = 0
        self.tick()   # training starts (or a newcomer's onboarding) before the first pass
        for _ in range(MAX_STEPS):
            # one pass: every client runs the task it has (one lease each), then one scheduler tick
            # (aggregation, clustering, the next round); no client is polled twice between ticks
            worked = False
            for slot in polled:
                response = daemon.client.lease(slot.client_id, slot.token)
                if response.task is not None:
                    if not daemon.execute(slot, response.task):
                        raise RuntimeError(f"task {response.task.task_id} of client {slot.spec.name} "
                                           f"({response.task.stage}) reported no result")
                    worked = True
            ticked = self.tick()
            if on_status is not None:
                on_status(self.admin.federation_status(self.admin_token, fid))
            if ticked or worked:
                idle_ticks = 0
                continue
            status = self.admin.federation_status(self.admin_token, fid)
            if done(status):
                return status
            idle_ticks += 1
            if idle_ticks >= MAX_IDLE_TICKS:
                raise RuntimeError(f"federation {fid} is stuck in state {status.state.value}: no task to run and "
                                   f"nothing for the scheduler to do")
        raise RuntimeError(f"federation {fid} did not finish within {MAX_STEPS} steps")

    def close(self) -> None:
        for daemon in self._daemons.values():
            daemon.client.close()
        self.admin.close()
        self._test_client.__exit__(None, None, None)
        self.app.state.engine.dispose()


class HttpService:
    """``hilora coordinator`` and ``hilora worker`` processes on loopback (``hilora.launcher``)."""

    transport = "http"

    def __init__(self, workdir: Path, opts: RunOptions) -> None:
        from hilora.launcher import LocalCluster

        self.workdir = Path(workdir)
        self.opts = opts
        self.cluster = LocalCluster(self.workdir)
        self.cluster.start_coordinator()
        self.admin_token = self.cluster.admin_token
        self.admin = CoordinatorClient(self.cluster.url, worker_id="hilora-bench-admin")
        self._started = 0

    def run(self, setup: BenchSetup, fid: int, secret: str, clients: Sequence[Any], partition_file: Path,
            done: Callable[[FederationStatus], bool], on_status: OnStatus | None = None) -> FederationStatus:
        """Start worker processes for ``clients`` and poll until ``done``; ``on_status`` (progress)
        gets every status polled."""
        from hilora.launcher import wait_for

        hosted = register(self, setup, fid, secret, clients, partition_file)
        n = max(1, min(self.opts.workers, len(hosted)))
        for w in range(n):
            self._started += 1
            self.cluster.start_worker(f"worker-{fid}-{self._started}", {"federation_id": fid, "clients": hosted[w::n]},
                                      threads=self.opts.threads, max_seconds=self.opts.timeout)
        last: dict[str, FederationStatus] = {}

        def finished() -> bool:
            self.cluster.check_workers()
            last["status"] = self.admin.federation_status(self.admin_token, fid)
            if on_status is not None:
                on_status(last["status"])
            return done(last["status"])

        if not wait_for(finished, self.opts.timeout, interval=0.2):
            state = last["status"].state.value if last else "unknown"
            raise RuntimeError(f"federation {fid} did not finish within {self.opts.timeout:.0f}s (state {state})")
        return last["status"]

    def close(self) -> None:
        self.admin.close()
        self.cluster.stop()


def open_service(workdir: Path, opts: RunOptions) -> InProcessService | HttpService:
    if opts.transport == "inprocess":
        return InProcessService(workdir, opts)
    if opts.transport == "http":
        return HttpService(workdir, opts)
    raise ValueError(f"unknown transport {opts.transport!r}: 'inprocess' or 'http'")


# --------------------------------------------------------------------------- one method

def _get(service: Any, path: str) -> Any:
    return service.admin.request("GET", path, token=service.admin_token).json()


def round_curve(steps: list[dict[str, Any]], cfg: MethodConfig) -> list[dict[str, Any]]:
    """Accuracy after each training round, from the accuracy view's steps. Root and cluster tasks
    evaluate the version they receive, so round k's version is measured by the next step that
    reports its tier (round k + 1, the next stage, or the final evaluation); leaf tasks evaluate
    after training, so a leaf round is measured by its own step."""
    curve: list[dict[str, Any]] = []
    for i, step in enumerate(steps):
        stage = step["stage"]
        if stage not in ("root", "cluster", "leaf"):
            continue
        tier = stage
        if stage == "leaf":
            measured = step["tiers"].get("leaf")
        else:
            measured = next((s["tiers"][tier] for s in steps[i + 1:] if tier in s["tiers"]), None)
        if measured is None:
            continue
        curve.append({"round": len(curve) + 1, "stage": stage, "stage_round": step["number"],
                      "mean": measured["mean"], "p10": measured["p10"]})
    return curve


def _stage_seconds(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Wall time per stage from the rounds' open and close times (training cohort, then unseen)."""
    from datetime import datetime

    spans: dict[str, list[datetime]] = {}
    for r in rounds:
        if r["closed_at"] is None:
            continue
        key = "unseen" if r["scope"].startswith("client:") else r["stage"]
        key = {"probe": "probe_clustering"}.get(key, key)
        created, closed = datetime.fromisoformat(r["created_at"]), datetime.fromisoformat(r["closed_at"])
        span = spans.setdefault(key, [created, closed])
        span[0], span[1] = min(span[0], created), max(span[1], closed)
    return {k: (v[1] - v[0]).total_seconds() for k, v in spans.items()}


def run_method(service: Any, setup: BenchSetup, name: str, partition_file: Path,
               say: Say | None = None, progress: Any = None) -> dict[str, Any]:
    """Run method ``name`` as a federation of ``service`` on one seed's set-up; its numbers as the
    service reports them. ``progress`` (``hilora.progress.RunProgress``) follows its rounds."""
    from sklearn.metrics import adjusted_rand_score

    from shared.config import FederationConfig

    opts = setup.opts
    cfg = method_config(name, opts, {c.name: c.group for c in setup.train + setup.unseen})
    t0 = time.monotonic()

    def log(message: str) -> None:
        if say is not None:
            say(f"[{time.monotonic() - t0:6.1f}s] {name}: {message}")

    config = FederationConfig.model_validate(cfg.federation_config(
        setup.backbone(), setup.manifest, name=f"bench-{name}-seed{opts.seed}",
        min_clients=len(setup.train)).model_dump())
    created = service.admin.create_federation(service.admin_token, config)
    fid = created.federation_id
    counter = RoundCounter()

    def watch(phase: str | None) -> OnStatus | None:
        if progress is None:
            return None
        return lambda status: progress.rounds(counter.update(status), phase or status.state.value)

    if progress is not None:
        progress.start_run(f"{name} seed {opts.seed}", expected_rounds(name, opts, bool(setup.unseen)))
    status = service.run(setup, fid, created.enrollment_secret, setup.train, partition_file, training_done,
                         on_status=watch(None))
    log(f"trained ({status.state.value}, {len(status.rounds)} rounds)")
    if setup.unseen:
        service.run(setup, fid, created.enrollment_secret, setup.unseen, partition_file,
                    onboarding_done(len(setup.train) + len(setup.unseen)), on_status=watch("unseen clients"))
        log(f"{len(setup.unseen)} unseen clients onboarded")
    wall = time.monotonic() - t0
    if progress is not None:
        progress.finish_run()

    report = _get(service, f"/v1/federations/{fid}/report")
    accuracy = _get(service, f"/v1/federations/{fid}/accuracy")
    unseen_view = {u["name"]: u for u in _get(service, f"/v1/federations/{fid}/unseen-clients")}
    groups = {c.name: c.group for c in setup.train + setup.unseen}
    by_name = {c["name"]: c for c in report["clients"]}
    latest = {c["name"]: c for c in accuracy["clients"]}
    train_names = [c.name for c in setup.train]

    def tier_values(tier: str, names: Sequence[str]) -> list[float]:
        return [latest[n][f"acc_{tier}"] for n in names if latest.get(n, {}).get(f"acc_{tier}") is not None]

    acc = {tier: {n: latest.get(n, {}).get(f"acc_{tier}") for n in train_names}
           for tier in ("root", "cluster", "leaf", "selected", "alone")}
    if cfg.hierarchical and cfg.training.validation_fraction > 0:
        final_tier = "selected"   # each client's model, chosen on its held-out validation part
    elif cfg.hierarchical:
        final_tier = "leaf" if cfg.schedule.leaf_rounds > 0 else "cluster"
    else:
        final_tier = "root"
    missing = [n for n in train_names if acc[final_tier][n] is None]
    if missing:
        raise RuntimeError(f"{name}: the service reported no final {final_tier} accuracy for {', '.join(missing)}")

    clustering_out = None
    labels: dict[str, int] = {}
    if cfg.hierarchical:
        runs = _get(service, f"/v1/federations/{fid}/clustering-runs")
        run = runs[-1]  # the scheduler's run on the probe round (newest first: the oldest is last)
        affinity = _get(service, f"/v1/federations/{fid}/clustering-runs/{run['id']}/affinity")
        # -1: unassigned (a refinement found no cluster better than the root for it); one group of its own for ARI
        labels = {n: -1 if by_name[n]["cluster_label"] is None else by_name[n]["cluster_label"] for n in train_names}
        order = [affinity["names"].index(n) for n in train_names]
        matrix = np.asarray(affinity["matrix"], dtype=np.float64)[np.ix_(order, order)]
        planted = [groups[n] for n in train_names]
        ari = float(adjusted_rand_score(planted, [labels[n] for n in train_names]))
        clustering_out = {"k": len(set(labels.values()) - {-1}), "lsac_k": int(run["k"]), "ari": ari,
                          "unassigned": sum(1 for v in labels.values() if v == -1),
                          "planted_groups": len(set(planted)), "clusterer": run["algorithm"],
                          "features": cfg.clustering.features, "contrast_ratio": run["contrast_ratio"],
                          "eigengaps": [float(x) for x in run["eigengaps"]], "clients": train_names,
                          "groups": planted, "labels": [labels[n] for n in train_names],
                          "affinity": matrix.round(6).tolist()}
        log(f"clustering ({cfg.clustering.algorithm}, {cfg.clustering.features}): K={clustering_out['k']} "
            f"ARI={ari:.3f}")

    rows = []
    for n in train_names:
        row = {"name": n, "group": groups[n], "acc_root": acc["root"][n], "final": acc[final_tier][n]}
        if cfg.hierarchical:
            row.update(cluster=labels[n], acc_cluster=acc["cluster"][n])
            if acc["leaf"][n] is not None:
                row["acc_leaf"] = acc["leaf"][n]
            if acc["selected"][n] is not None:
                row["acc_selected"] = acc["selected"][n]
            if acc["alone"][n] is not None:
                row["acc_alone"] = acc["alone"][n]
        rows.append(row)
    majority = majority_clusters({n: groups[n] for n in train_names}, labels) if labels else {}
    unseen_rows = []
    for c in setup.unseen:
        u = unseen_view.get(c.name)
        if u is None or u["zero_shot"] is None:
            raise RuntimeError(f"{name}: the service reported no zero-shot accuracy for unseen client {c.name}")
        label = u["cluster_label"]
        unseen_rows.append({"name": c.name, "group": c.group, "cluster": label,
                            "correct_cluster": (majority.get(c.group) == label) if label is not None else None,
                            "acc_root": by_name[c.name]["metrics"].get("acc_root"), "zero_shot": u["zero_shot"],
                            "after_leaf": u["after_leaf"] if u["after_leaf"] is not None else u["zero_shot"]})
    correct = [r["correct_cluster"] for r in unseen_rows if r["correct_cluster"] is not None]
    train_set, unseen_set = set(train_names), {c.name for c in setup.unseen}
    result: dict[str, Any] = {
        "method": name, "seed": opts.seed, "config": cfg.describe(), "federation_id": fid,
        "root_rho": [r["rho"] for r in report["rounds"] if r["stage"] == "root" and r["status"] == "done"],
        "final": accuracy_stats([acc[final_tier][n] for n in train_names]),
        "tiers": {"root": accuracy_stats(tier_values("root", train_names)),
                  **({"cluster": accuracy_stats(tier_values("cluster", train_names)),
                      "leaf": accuracy_stats(tier_values("leaf", train_names))} if cfg.hierarchical else {}),
                  **({"selected": accuracy_stats(tier_values("selected", train_names))}
                     if final_tier == "selected" else {}),
                  **({"alone": accuracy_stats(tier_values("alone", train_names))}
                     if tier_values("alone", train_names) else {})},
        "final_tier": final_tier,
        "clustering": clustering_out,
        "unseen": {"root": accuracy_stats([r["acc_root"] for r in unseen_rows if r["acc_root"] is not None]),
                   "zero_shot": accuracy_stats([r["zero_shot"] for r in unseen_rows]),
                   "after_leaf": accuracy_stats([r["after_leaf"] for r in unseen_rows]),
                   "assigned_to_majority_cluster": float(np.mean(correct)) if correct else None,
                   "bytes_uploaded": sum(by_name[n]["uploaded_bytes"] for n in unseen_set)},
        "rounds": round_curve(accuracy["steps"], cfg),
        "bytes_uploaded": sum(by_name[n]["uploaded_bytes"] for n in train_set),
        "clients": rows,
        "unseen_clients": unseen_rows,
        "seconds": {**_stage_seconds(report["rounds"]), "total": wall},
    }
    log(f"final {final_tier} mean {100 * result['final']['mean']:.1f}%")
    return result


# --------------------------------------------------------------------------- many methods and seeds

def run_bench(opts: RunOptions, methods: Sequence[str], seeds: Sequence[int], say: Say | None = None,
              keep: Callable[[dict[str, Any]], None] | None = None, progress: Any = None,
              resume: dict[str, Any] | None = None,
              on_report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every method for every seed (each seed shares one set-up), then ``summarize``. All of them
    are federations of one service in a work folder (``opts.workdir``, else a temporary one that is
    removed afterwards). ``keep`` is called with each method's result as soon as it is known, and
    ``on_report`` with the report of every run finished so far (``complete`` false until the last).

    ``resume``: a report of an earlier run (partial or not) with the same options, partition and
    backbone (ValueError otherwise): its finished (seed, method) runs are taken as they are, only
    the others run. ``progress`` (``hilora.progress.RunProgress``) follows the runs and rounds."""
    if not methods:
        raise ValueError("no method to run")
    parse_methods(methods)
    done = resumable_runs(resume, opts, methods, seeds) if resume is not None else {}
    runs: dict[int, dict[str, dict[str, Any]]] = {}
    workdir = Path(opts.workdir) if opts.workdir else Path(tempfile.mkdtemp(prefix="hilora-bench-"))
    setup = None
    service = None
    try:
        for seed in seeds:
            seed_opts = replace(opts, seed=int(seed))
            first = setup is None
            setup = prepare(seed_opts, say) if setup is None else replace(setup, opts=seed_opts)
            if first:
                if resume is not None:
                    check_resumed_setup(resume, partition_sha256(setup.partition), setup.partition.name,
                                        setup.artifact.sha256)
                if progress is not None:
                    todo_all = [m for s in seeds for m in methods if m not in done.get(int(s), {})]
                    progress.plan(sum(expected_rounds(m, opts, bool(setup.unseen)) for m in todo_all), len(todo_all))
            runs[int(seed)] = dict(done.get(int(seed), {}))
            todo = [m for m in methods if m not in runs[int(seed)]]
            if say is not None and len(todo) < len(methods):
                taken = [m for m in methods if m in runs[int(seed)]]
                say(f"seed {seed}: {', '.join(taken)} taken from the report being resumed")
            if not todo:
                continue
            if service is None:
                service = open_service(workdir, opts)
                service.admin.put_blob(service.admin_token, Path(setup.artifact.path).read_bytes())
            partition_file = setup.write_partition(workdir)
            if say is not None:
                say(f"seed {seed}: partition {setup.partition.name}: {len(setup.train)} training clients, "
                    f"{len(setup.unseen)} unseen; rounds {opts.root_rounds}/{opts.cluster_rounds}/{opts.leaf_rounds}; "
                    f"{service.transport} service in {workdir}")
            for m in todo:
                runs[int(seed)][m] = run_method(service, setup, m, partition_file, say, progress=progress)
                if keep is not None:
                    keep(runs[int(seed)][m])
                if on_report is not None:
                    on_report(_bench_report(runs, opts, methods, seeds, setup))
    finally:
        if service is not None:
            service.close()
        if not opts.workdir and not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    assert setup is not None
    return _bench_report(runs, opts, methods, seeds, setup)


def _bench_report(runs: dict[int, dict[str, dict[str, Any]]], opts: RunOptions, methods: Sequence[str],
                  seeds: Sequence[int], setup: BenchSetup) -> dict[str, Any]:
    """The report of the runs finished so far: the summary of every method finished on every seed
    (all of them once the bench is over: ``complete``), and every finished run in ``runs`` (seed,
    then method order), which is what ``--resume`` reads back."""
    from worker.backbone import demo_backbone_dataset

    planned = sorted(int(s) for s in seeds)
    finished = [m for m in methods if all(m in runs.get(s, {}) for s in planned)]
    ordered = {s: {m: runs[s][m] for m in methods if m in runs[s]} for s in planned if s in runs}
    weights = f"demo-{demo_backbone_dataset(setup.partition)}" if opts.demo_backbone else (opts.checkpoint or "random")
    report = summarize(ordered, opts, finished, setup.artifact.sha256, setup.partition.name)
    report["backbone"] = {"model": setup.artifact.model, "model_kwargs": dict(setup.artifact.model_kwargs),
                          "sha256": setup.artifact.sha256, "weights": weights, "rank": opts.rank}
    report["transport"] = opts.transport
    report["complete"] = len(finished) == len(methods)
    report["planned"] = {"methods": list(methods), "seeds": planned}
    report["partition_sha256"] = partition_sha256(setup.partition)
    report["seeds"] = planned
    report["runs"] = [run for s in planned for run in ordered.get(s, {}).values()]
    return report


__all__ = ["InProcessService", "HttpService", "RoundCounter", "expected_rounds", "open_service", "run_method",
           "run_bench", "round_curve", "training_done", "onboarding_done", "register"]
