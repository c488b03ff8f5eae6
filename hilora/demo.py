"""``hilora demo``: the whole HiLoRA cascade on one machine, over real HTTP, with real training.

A coordinator on SQLite in a temp directory, worker processes that each host several clients of a
partition file, the root -> probe -> LSAC -> cluster -> leaf cascade, then the held-out (unseen)
clients onboarded while the federation serves. Ends with a table and, with ``report``, JSON.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from hilora.bench.engine import RoundCounter, expected_rounds, onboarding_done, training_done
from hilora.bench.report import accuracy_stats, majority_clusters
from hilora.launcher import LocalCluster, wait_for
from hilora.options import RunOptions
from hilora.progress import Bars, RunProgress, backbone_watcher
from worker.client import CoordinatorClient


def federation_file(opts: RunOptions, num_train_clients: int, checkpoint: str = "demo") -> dict[str, Any]:
    from worker.backbone import DEMO_BACKBONE_KWARGS, DEMO_BACKBONE_MODEL

    return {
        "name": f"demo-{opts.partition}-seed{opts.seed}",
        "backbone": {"model": DEMO_BACKBONE_MODEL, "model_kwargs": DEMO_BACKBONE_KWARGS, "checkpoint": checkpoint},
        "adapter": {"rank": opts.rank},
        "schedule": {"min_clients": num_train_clients, "root_rounds": opts.root_rounds,
                     "cluster_rounds": opts.cluster_rounds, "leaf_rounds": opts.leaf_rounds,
                     "unseen_leaf_rounds": opts.unseen_leaf_rounds, "local_epochs": opts.local_epochs,
                     "probe_epochs": opts.probe_epochs, "lease_seconds": 60, "retry_after_seconds": 0.25},
        "training": {"lr": opts.lr, "head_lr": opts.head_lr, "batch_size": opts.batch_size, "seed": opts.seed},
        "clustering": {"features": opts.features, "seed": opts.seed},
    }


def summarize(report: dict, groups: dict[str, str], wall_seconds: float) -> dict[str, Any]:
    """The demo's numbers from the coordinator's federation report and the planted groups."""
    from sklearn.metrics import adjusted_rand_score

    train = [c for c in report["clients"] if c["cohort"] == "train"]
    late = [c for c in report["clients"] if c["cohort"] == "late"]
    clustered = [c for c in train if c["cluster_label"] is not None]
    ari = (float(adjusted_rand_score([groups[c["name"]] for c in clustered], [c["cluster_label"] for c in clustered]))
           if clustered else None)
    unseen_correct = None
    if late and clustered:
        majority = majority_clusters(groups, {c["name"]: c["cluster_label"] for c in clustered})
        unseen_correct = float(np.mean([majority.get(groups[c["name"]]) == c["cluster_label"] for c in late]))

    def metric(clients: list[dict], key: str) -> list[float]:
        return [float(c["metrics"][key]) for c in clients if key in c["metrics"]]

    clustering = report.get("clustering") or {}
    return {
        "clustering": {"k": clustering.get("k"), "ari": ari, "planted_groups": len(set(groups.values())),
                       "features": clustering.get("features"), "eigengaps": clustering.get("eigengaps"),
                       "contrast_ratio": clustering.get("contrast_ratio")},
        "tiers": {"root": accuracy_stats(metric(train, "acc_root")), "cluster": accuracy_stats(metric(train, "acc_cluster")),
                  "leaf": accuracy_stats(metric(train, "acc_leaf"))},
        "unseen": {"zero_shot": accuracy_stats([float(c["zero_shot"]) for c in late if c["zero_shot"] is not None]),
                   "after_leaf": accuracy_stats(metric(late, "acc_leaf")),
                   "assigned_to_majority_cluster": unseen_correct},
        "clients": [{"name": c["name"], "group": groups.get(c["name"]), "cohort": c["cohort"],
                     "cluster": c["cluster_label"], **{k: c["metrics"][k] for k in ("acc_root", "acc_cluster", "acc_leaf")
                                                       if k in c["metrics"]}} for c in report["clients"]],
        "uploaded_bytes": report["uploaded_bytes"],
        "wall_seconds": wall_seconds,
    }


def format_table(summary: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "   -  " if x is None else f"{100 * x:6.1f}"

    c = summary["clustering"]
    lines = [
        "",
        f"clusters found K = {c['k']} (planted {c['planted_groups']}), ARI = "
        + ("-" if c["ari"] is None else f"{c['ari']:.3f}") + f", features = {c['features']}",
        "",
        "                          mean %   p10 %   clients",
    ]
    rows = [("training: root", summary["tiers"]["root"]), ("training: root+cluster", summary["tiers"]["cluster"]),
            ("training: +leaf", summary["tiers"]["leaf"]),
            ("unseen: zero-shot (r+c)", summary["unseen"]["zero_shot"]),
            ("unseen: after leaf", summary["unseen"]["after_leaf"])]
    for name, s in rows:
        lines.append(f"{name:<24} {pct(s['mean'])}  {pct(s['p10'])}   {s['n']:>4}")
    lines += ["", f"uploaded {summary['uploaded_bytes'] / 1e6:.2f} MB, wall time {summary['wall_seconds']:.1f} s", ""]
    return "\n".join(lines)


def _progress_printer(client: CoordinatorClient, token: str, fid: int, say: Callable[[str], None], t0: float,
                      on_status: Callable[[Any], None] | None = None):
    last: dict[str, Any] = {"key": None}

    def tick() -> None:
        status = client.federation_status(token, fid)
        if on_status is not None:
            on_status(status)
        open_rounds = [r for r in status.rounds if r.status == "open"]
        total = sum(r.tasks_total for r in open_rounds)
        stage = status.state.value
        number = max((r.number for r in open_rounds), default=status.stage_round)
        key = (stage, number, status.onboarding_pending if stage == "serving" else None)
        if key != last["key"]:
            last["key"] = key
            extra = ""
            if stage in ("cluster", "leaf", "serving") and status.clustering:
                extra = f"  K={status.clustering.k}"
            if status.last_rho is not None and stage == "root":
                extra += f"  rho={status.last_rho:.3f}"
            work = f"round {number} ({total} clients)" if total else "waiting for clients"
            if stage == "serving":
                work = (f"onboarding unseen clients: {status.onboarding_pending} pending"
                        if status.clients_total > status.clients_training else "training done")
            say(f"[{time.monotonic() - t0:6.1f}s] {stage:<9} {work}{extra}")
        last["status"] = status

    return tick, last


def run_demo(opts: RunOptions, say: Callable[[str], None] = print,
             serve: Callable[[dict[str, Any], LocalCluster], None] | None = None,
             bars: Bars | None = None) -> dict[str, Any]:
    """Run the demo and return its numbers. ``serve`` (``hilora demo --serve``) is called with them
    while the coordinator still runs; the coordinator stops when it returns. ``bars``
    (``hilora.progress``; default: those of a ``say`` made by ``Bars.sayer``, else none): the
    backbone's epochs and the federation's stages and rounds, stopped before ``serve``."""
    from hilora.federation_file import DEMO_CHECKPOINTS, FederationFile, build_federation_config
    from worker.backbone import demo_backbone_dataset, pretrain_demo_backbone
    from worker.data import load_partition, partition_clients

    t0 = time.monotonic()
    partition = load_partition(opts.partition)
    clients = partition_clients(partition)
    groups = {c.name: c.group for c in clients}
    train = [c for c in clients if not c.unseen]
    unseen = [c for c in clients if c.unseen]
    say(f"partition {partition.name}: {len(train)} training clients, {len(unseen)} unseen, "
        f"{len(set(groups.values()))} latent groups")
    dataset = demo_backbone_dataset(partition)
    bars = bars if bars is not None else getattr(say, "bars", None) or Bars(enabled=False)
    artifact = pretrain_demo_backbone(progress=backbone_watcher(bars, lambda msg: say(f"backbone: {msg}")),
                                      dataset=dataset)
    say(f"backbone: {artifact.model} sha256 {artifact.sha256[:12]} ({artifact.path})")
    config, checkpoint = build_federation_config(FederationFile.model_validate(
        federation_file(opts, len(train), next(k for k, v in DEMO_CHECKPOINTS.items() if v == dataset))))

    workdir = Path(opts.workdir) if opts.workdir else Path(tempfile.mkdtemp(prefix="hilora-demo-"))
    cluster = LocalCluster(workdir)
    try:
        cluster.start_coordinator()
        say(f"coordinator: {cluster.url} (SQLite in {workdir})")
        with CoordinatorClient(cluster.url) as client:
            client.put_blob(cluster.admin_token, checkpoint)
            created = client.create_federation(cluster.admin_token, config)
            fid = created.federation_id
            n_workers = max(1, min(opts.workers, len(train)))
            for w in range(n_workers):
                hosted = train[w::n_workers]
                cluster.start_worker(f"worker-{w}", {
                    "federation_id": fid, "enrollment_secret": created.enrollment_secret,
                    "clients": [{"name": c.name, "data": {"partition": opts.partition, "client": c.name}}
                                for c in hosted]}, threads=opts.threads, max_seconds=opts.timeout)
            say(f"started {n_workers} worker processes hosting {len(train)} clients")
            progress = RunProgress(bars, overall=False)
            progress.start_run(f"demo {partition.name}", expected_rounds("hilora", opts, bool(unseen)))
            counter = RoundCounter()

            def on_status(status: Any) -> None:
                onboarding = status.state.value == "serving" and status.clients_total > status.clients_training
                progress.rounds(counter.update(status), "unseen clients" if onboarding else status.state.value)

            tick, last = _progress_printer(client, cluster.admin_token, fid, say, t0, on_status)

            def serving() -> bool:   # and the final evaluation is over
                cluster.check_workers()
                return last.get("status") is not None and training_done(last["status"])

            if not wait_for(serving, opts.timeout, on_tick=tick):
                raise RuntimeError(f"the federation did not reach serving within {opts.timeout:.0f}s")
            if unseen:
                cluster.start_worker("worker-unseen", {
                    "federation_id": fid, "enrollment_secret": created.enrollment_secret,
                    "clients": [{"name": c.name, "data": {"partition": opts.partition, "client": c.name}}
                                for c in unseen]}, threads=opts.threads, max_seconds=opts.timeout)
                say(f"serving: started a worker for {len(unseen)} unseen clients")

                def onboarded() -> bool:
                    cluster.check_workers()
                    return last.get("status") is not None and onboarding_done(len(clients))(last["status"])

                if not wait_for(onboarded, opts.timeout, on_tick=tick):
                    raise RuntimeError(f"unseen clients were not onboarded within {opts.timeout:.0f}s")
            report = client.federation_report(cluster.admin_token, fid).model_dump(mode="json")
            progress.finish_run()
        summary = summarize(report, groups, time.monotonic() - t0)
        summary["options"] = asdict(opts)
        summary["backbone_sha256"] = artifact.sha256
        if serve is not None:
            bars.stop()
            serve(summary, cluster)
        return summary
    except Exception:
        say(f"demo failed; logs are in {workdir}")
        opts.keep = True
        raise
    finally:
        cluster.stop()
        if not opts.keep and not opts.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def write_report(summary: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(summary, indent=2, sort_keys=True))
