"""A population that changes: accuracy per cycle of a federation that reclusters (cycles) against
one that never does, the real service on loopback (coordinator + worker processes, SQLite, the
digits ViT), same data and the same training rounds for the newcomers.

    python bench/living.py [--seeds 0,1] [--per-group 5] [--train 60] [--out DIR]

The population: two planted groups (upright digits, and digits with permuted labels) train the first
cascade (cycle 0). Then a new latent group arrives (another label permutation) and one client of the
first permuted group leaves; later it comes back.

- ``cycles``: the arrivals start cycle 1 (``schedule.cycle_min_new_clients`` = the group's size):
  everyone is reprobed, reclustered with stable ids, the clusters trained ``cluster_rounds`` more
  rounds, fresh leaves for clients that moved or are new, and everyone evaluated. Once the client
  is back, an admin asks for cycle 2.
- ``static`` (never reclusters): no cycle. The newcomers are onboarded as late clients (a probe,
  the nearest existing cluster, then ``cluster_rounds + leaf_rounds`` leaf rounds: as many training
  rounds of their own as a newcomer gets in a cycle's cluster and leaf rounds).

Reported per checkpoint (after cycle 0; after cycle 1 / after the newcomers' onboarding; after
cycle 2 / the same static federation) and per group: the mean test accuracy of each client's final
model (root + cluster + its leaf, ``acc_leaf`` as the workers measured it on their own test split),
and K. Both arms run the same seeds, partition and schedule; only the cycle settings differ.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hilora.launcher import LocalCluster, wait_for  # noqa: E402
from worker.client import CoordinatorClient  # noqa: E402

GROUP_SEEDS = {"upright": None, "perm-a": 1, "perm-b": 2}


def partition(path: Path, per_group: int, train: int, seed: int) -> Path:
    path.write_text(json.dumps({
        "name": "living", "dataset": "digits", "seed": seed, "train_per_client": train, "test_per_client": 60,
        "dirichlet_alpha": 1.0, "unseen_fraction": 0.0,
        "groups": [{"name": g, "clients": per_group,
                    "transforms": [] if s is None else [{"kind": "permute_labels", "seed": s}]}
                   for g, s in GROUP_SEEDS.items()]}))
    return path


def federation(arm: str, per_group: int, seed: int) -> dict:
    from worker.backbone import DEMO_BACKBONE_KWARGS, DEMO_BACKBONE_MODEL

    schedule = {"min_clients": 2 * per_group, "root_rounds": 3, "cluster_rounds": 3, "leaf_rounds": 1,
                "unseen_leaf_rounds": 1, "local_epochs": 2, "probe_epochs": 2, "lease_seconds": 8,
                "max_attempts": 1, "retry_after_seconds": 0.25, "max_consecutive_failures": 2}
    if arm == "cycles":
        schedule["cycle_min_new_clients"] = per_group
    else:  # a newcomer's own training rounds: as many as in a cycle's cluster and leaf rounds
        schedule["unseen_leaf_rounds"] = schedule["cluster_rounds"] + schedule["leaf_rounds"]
    return {"name": f"living-{arm}", "backbone": {"model": DEMO_BACKBONE_MODEL, "model_kwargs": DEMO_BACKBONE_KWARGS,
                                                  "checkpoint": "demo"},
            "adapter": {"rank": 4}, "schedule": schedule,
            "training": {"head_lr": 3e-2, "seed": seed}, "clustering": {"knn": 2, "k_max": 5}}


def run_arm(arm: str, workdir: Path, per_group: int, train: int, seed: int, log) -> dict:
    from hilora.federation_file import FederationFile, build_federation_config

    part = str(partition(workdir / "living.json", per_group, train, seed))
    names = {g: [f"{g}-{i:02d}" for i in range(per_group)] for g in GROUP_SEEDS}
    hosted = lambda ns: {"clients": [{"name": n, "data": {"partition": part, "client": n}} for n in ns]}  # noqa: E731
    config, checkpoint = build_federation_config(FederationFile.model_validate(federation(arm, per_group, seed)))
    cluster = LocalCluster(workdir / "run")
    leaver = names["perm-a"][-1]
    checkpoints = []
    t0 = time.monotonic()
    try:
        cluster.start_coordinator()
        with CoordinatorClient(cluster.url) as http:
            get = lambda path: http.request("GET", path, cluster.admin_token).json()  # noqa: E731
            http.put_blob(cluster.admin_token, checkpoint)
            created = http.create_federation(cluster.admin_token, config)
            fid = created.federation_id
            join = {"federation_id": fid, "enrollment_secret": created.enrollment_secret}
            start = lambda w, ns: cluster.start_worker(w, {**join, **hosted(ns)}, exit_when_idle=False,  # noqa: E731
                                                       max_seconds=3000)
            procs = {"w0": start("w0", names["upright"]), "w1": start("w1", names["perm-a"][:-1]),
                     "wl": start("wl", [leaver])}

            def settled(cycle: int) -> bool:
                cluster.check_workers()
                s = get(f"/v1/federations/{fid}")
                return (s["state"] == "serving" and s["cycle"] == cycle and s["onboarding_pending"] == 0
                        and all(r["status"] != "open" for r in s["rounds"]))

            def checkpoint(label: str) -> None:
                report = get(f"/v1/federations/{fid}/report")
                s = get(f"/v1/federations/{fid}")
                def means(tier: str) -> tuple[float, dict[str, float | None]]:
                    acc = {c["name"]: c["metrics"].get(f"acc_{tier}") for c in report["clients"]}
                    by_group = {}
                    for g, ns in names.items():
                        vals = [acc[n] for n in ns if acc.get(n) is not None]
                        by_group[g] = statistics.fmean(vals) if vals else None
                    return statistics.fmean(v for v in acc.values() if v is not None), by_group

                mean, by_group = means("leaf")
                cluster_mean, cluster_groups = means("cluster")
                checkpoints.append({"at": label, "k": sum(1 for c in s["clusters"] if c["members"]),
                                    "clusters": sorted(sorted(c["members"]) for c in s["clusters"] if c["members"]),
                                    "mean": mean, "groups": by_group, "cluster_tier_mean": cluster_mean,
                                    "cluster_tier_groups": cluster_groups, "seconds": round(time.monotonic() - t0, 1)})
                log(f"{arm} seed {seed} {label}: mean {mean:.3f}, K={checkpoints[-1]['k']}, "
                    + ", ".join(f"{g} {v:.3f}" for g, v in by_group.items() if v is not None)
                    + " | root+cluster " + ", ".join(f"{g} {v:.3f}" for g, v in cluster_groups.items() if v is not None))

            assert wait_for(lambda: settled(0), 1200, interval=1.0), cluster.tail("coordinator.log")
            checkpoint("cycle 0")
            procs["wl"].terminate()
            procs["wl"].wait(timeout=60)
            procs["w2"] = start("w2", names["perm-b"])
            if arm == "cycles":
                assert wait_for(lambda: get(f"/v1/federations/{fid}")["cycle"] == 1, 600, interval=1.0)
                assert wait_for(lambda: settled(1), 1800, interval=1.0), cluster.tail("coordinator.log")
                checkpoint("cycle 1")
            else:
                assert wait_for(lambda: settled(0) and [
                    c["onboarding"] for c in get(f"/v1/federations/{fid}/clients")
                    if c["name"] in names["perm-b"]] == ["ready"] * per_group, 1800, interval=1.0), \
                    cluster.tail("coordinator.log")
                checkpoint("newcomers onboarded")
            procs["wl2"] = start("wl2", [leaver])
            if arm == "cycles":
                wait_for(lambda: next(c for c in get(f"/v1/federations/{fid}/clients")
                                      if c["name"] == leaver)["inactive_since"] is None, 120, interval=1.0)
                subprocess.run([sys.executable, "-m", "hilora.cli", "admin", "cycle", "--coordinator", cluster.url,
                                "--admin-token", cluster.admin_token, "--federation", str(fid)],
                               check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
                assert wait_for(lambda: settled(2), 1800, interval=1.0), cluster.tail("coordinator.log")
                checkpoint("cycle 2")
            else:
                time.sleep(5)
                checkpoint("client back (no cycle)")
    finally:
        cluster.stop()
    return {"arm": arm, "seed": seed, "checkpoints": checkpoints, "seconds": round(time.monotonic() - t0, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--per-group", type=int, default=5)
    p.add_argument("--train", type=int, default=60, help="training images per client")
    p.add_argument("--out", type=Path, default=None, help="write results.json here")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from worker.backbone import pretrain_demo_backbone

    pretrain_demo_backbone()
    results = []
    with tempfile.TemporaryDirectory(prefix="hilora-living-") as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for arm in ("cycles", "static"):
                workdir = Path(tmp) / f"{arm}-{seed}"
                workdir.mkdir()
                results.append(run_arm(arm, workdir, args.per_group, args.train, seed,
                                       lambda m: print(m, flush=True)))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("\nfinal model (root + cluster + leaf); in brackets root + cluster alone")
    print("\n| seed | arm | checkpoint | K | mean | upright | perm-a | perm-b (new) |\n|---|---|---|---|---|---|---|---|")
    cell = lambda v, w: "-" if v is None else f"{100 * v:.1f} ({100 * w:.1f})"  # noqa: E731
    for r in results:
        for c in r["checkpoints"]:
            g, h = c["groups"], c["cluster_tier_groups"]
            print(f"| {r['seed']} | {r['arm']} | {c['at']} | {c['k']} | {cell(c['mean'], c['cluster_tier_mean'])} | "
                  + " | ".join(cell(g[k], h[k]) for k in GROUP_SEEDS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
