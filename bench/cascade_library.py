"""The whole HiLoRA cascade in one process, with the functions the worker daemon and the coordinator
call, but no HTTP, no database and no worker processes.

root rounds -> probe round -> LSAC -> cluster rounds -> leaf rounds -> unseen clients
(probe from the final root, nearest cluster, zero-shot root+cluster, then a local leaf).

- Local work is ``worker.train.train_tier`` / ``evaluate_tiers`` on one shared
  ``worker.lora.TieredLoRAModel`` with ``load_tier`` / ``export_tier`` around it, as in the daemon.
- Server work is ``shared.aggregate.aggregate_product_space`` (per target, uploads sorted by client
  name, weights = training sample counts) and ``average_factors`` for heads, and
  ``shared.subspace`` for the probe features, ``lsac`` and ``assign_to_clusters``.

Reports ARI against the planted groups, K, mean and 10th-percentile test accuracy of root,
root+cluster and root+cluster+leaf for training clients, zero-shot and after-leaf accuracy for unseen
clients, and wall time per stage. Run::

    python bench/cascade_library.py --partition demo --seeds 0 1 2 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hilora.demo import DemoOptions, accuracy_stats  # noqa: E402
from shared.aggregate import combine_tier_uploads, relative_change  # noqa: E402
from shared.config import TierPolicy  # noqa: E402
from shared.manifest import AdapterManifest  # noqa: E402
from shared.probes import factor_pairs, probe_distance  # noqa: E402
from shared.subspace import assign_to_clusters, lsac  # noqa: E402

Tensors = dict[str, np.ndarray]


_DEMO = DemoOptions()  # the tuned demo settings are defined once, in hilora.demo


@dataclass
class CascadeOptions:
    """Every knob of one cascade run (the defaults are the tuned demo settings)."""

    partition: str = _DEMO.partition
    partition_seed: int | None = None   # override the partition file's data seed
    seed: int = 0                       # training, initialisation and clustering seed
    root_rounds: int = _DEMO.root_rounds
    cluster_rounds: int = _DEMO.cluster_rounds
    leaf_rounds: int = _DEMO.leaf_rounds
    unseen_leaf_rounds: int = _DEMO.unseen_leaf_rounds
    local_epochs: int = _DEMO.local_epochs
    probe_epochs: int = _DEMO.probe_epochs
    rank: int = _DEMO.rank
    alpha: float | None = None
    lr: float = _DEMO.lr
    head_lr: float = _DEMO.head_lr
    batch_size: int = _DEMO.batch_size
    weight_decay: float = 0.0
    gamma_c: float = 0.1
    gamma_l: float = 0.1
    features: str = _DEMO.features
    k_min: int = 1
    k_max: int = 10
    knn: int = 5
    contrast: float = 1.25
    force_k: int | None = None
    threads: int = 2
    backbone_epochs: int = 60
    cache_dir: str | None = None


def aggregate_tier(manifest: AdapterManifest, tier: str, previous: Tensors, uploads: Sequence[Tensors],
                   weights: Sequence[float]) -> Tensors:
    """The coordinator's aggregation of a fully aggregated tier (product space + SVD, head mean)."""
    return combine_tier_uploads(manifest, tier, TierPolicy(), previous, uploads, weights)


def run_cascade(opts: CascadeOptions, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the cascade once and return its numbers (see the module docstring)."""
    import torch
    from sklearn.metrics import adjusted_rand_score

    from worker.backbone import build_backbone, manifest_for_model, pretrain_demo_backbone
    from worker.daemon import task_seed
    from worker.data import client_arrays, load_partition, partition_clients
    from worker.lora import TieredLoRAModel
    from worker.train import evaluate_tiers, train_tier

    def log(message: str) -> None:
        if say is not None:
            say(f"[{time.monotonic() - t0:6.1f}s] {message}")

    torch.set_num_threads(opts.threads)
    artifact = pretrain_demo_backbone(cache_dir=opts.cache_dir, epochs=opts.backbone_epochs)
    t0 = time.monotonic()
    spec = load_partition(opts.partition)
    if opts.partition_seed is not None:
        spec = spec.model_copy(update={"seed": opts.partition_seed})
    clients = partition_clients(spec)
    train = sorted((c for c in clients if not c.unseen), key=lambda c: c.name)
    unseen = sorted((c for c in clients if c.unseen), key=lambda c: c.name)
    data = {c.name: client_arrays(spec, c.name) for c in clients}
    weights = [float(len(data[c.name].y_train)) for c in train]
    backbone = build_backbone(artifact.model, artifact.model_kwargs, artifact.path)
    manifest = manifest_for_model(backbone, rank=opts.rank, alpha=opts.alpha)
    model = TieredLoRAModel(backbone, manifest)
    fit = dict(lr=opts.lr, head_lr=opts.head_lr, batch_size=opts.batch_size, weight_decay=opts.weight_decay,
               gamma_c=opts.gamma_c, gamma_l=opts.gamma_l)
    timings: dict[str, float] = {}
    mark = time.monotonic()

    def lap(stage: str) -> None:
        nonlocal mark
        now = time.monotonic()
        timings[stage] = now - mark
        mark = now

    # ---------------------------------------------------------------- root stage
    model.init_tier("root", seed=task_seed(opts.seed, "root", "init"))
    root = model.export_tier("root")
    rhos: list[float] = []
    for rnd in range(opts.root_rounds):
        uploads = []
        for c in train:
            model.load_tier("root", root)
            train_tier(model, "root", data[c.name], epochs=opts.local_epochs,
                       seed=task_seed(opts.seed, "root", rnd, c.name), **fit)
            uploads.append(model.export_tier("root"))
        new_root = aggregate_tier(manifest, "root", root, uploads, weights)
        if rnd > 0:
            rhos.append(relative_change(factor_pairs(manifest, new_root), factor_pairs(manifest, root)))
        root = new_root
        log(f"root round {rnd + 1}/{opts.root_rounds}" + (f" rho={rhos[-1]:.3f}" if rhos else ""))
    model.load_tier("root", root)
    acc_root = {c.name: evaluate_tiers(model, data[c.name], ("root",), "cpu")["acc_root"] for c in clients}
    lap("root")

    # ---------------------------------------------------------------- probe + LSAC
    def probe(name: str) -> Tensors:
        model.load_tier("root", root)
        train_tier(model, "root", data[name], epochs=opts.probe_epochs, seed=task_seed(opts.seed, "probe", name),
                   **fit)
        return model.export_tier("root")

    probes = [probe(c.name) for c in train]
    model.load_tier("root", root)
    distance = probe_distance(manifest, opts.features, root, probes)
    result = lsac(distance, k_min=opts.k_min, k_max=opts.k_max, knn=opts.knn, contrast=opts.contrast,
                  force_k=opts.force_k, seed=opts.seed)
    labels = {c.name: int(label) for c, label in zip(train, result.labels)}
    ari = float(adjusted_rand_score([c.group for c in train], [labels[c.name] for c in train]))
    log(f"probe + LSAC: K={result.k} ARI={ari:.3f} contrast={result.contrast_ratio}")
    lap("probe_lsac")

    # ---------------------------------------------------------------- cluster stage (root frozen)
    cluster_ids = sorted(set(labels.values()))
    cluster_state: dict[int, Tensors] = {}
    for label in cluster_ids:
        model.init_tier("cluster", seed=task_seed(opts.seed, "cluster", "init", label), head_from="root")
        cluster_state[label] = model.export_tier("cluster")
    for rnd in range(opts.cluster_rounds):
        for label in cluster_ids:
            members = [c for c in train if labels[c.name] == label]
            uploads = []
            for c in members:
                model.load_tier("cluster", cluster_state[label])
                train_tier(model, "cluster", data[c.name], epochs=opts.local_epochs,
                           seed=task_seed(opts.seed, "cluster", rnd, c.name), **fit)
                uploads.append(model.export_tier("cluster"))
            cluster_state[label] = aggregate_tier(manifest, "cluster", cluster_state[label], uploads,
                                                  [float(len(data[c.name].y_train)) for c in members])
        log(f"cluster round {rnd + 1}/{opts.cluster_rounds}")
    acc_cluster: dict[str, float] = {}
    for c in train:
        model.load_tier("cluster", cluster_state[labels[c.name]])
        acc_cluster[c.name] = evaluate_tiers(model, data[c.name], ("root", "cluster"), "cpu")["acc_cluster"]
    lap("cluster")

    # ---------------------------------------------------------------- leaf stage (local only)
    def train_leaf(name: str, label: int, rounds: int) -> float:
        model.load_tier("cluster", cluster_state[label])
        model.init_tier("leaf", seed=task_seed(opts.seed, "leaf", "init", name), head_from="cluster")
        for rnd in range(rounds):
            train_tier(model, "leaf", data[name], epochs=opts.local_epochs,
                       seed=task_seed(opts.seed, "leaf", rnd, name), **fit)
        return evaluate_tiers(model, data[name], ("root", "cluster", "leaf"), "cpu")["acc_leaf"]

    acc_leaf = {c.name: train_leaf(c.name, labels[c.name], opts.leaf_rounds) for c in train}
    log("leaf stage done")
    lap("leaf")

    # ---------------------------------------------------------------- unseen clients
    unseen_rows: list[dict[str, Any]] = []
    if unseen:
        unseen_probes = [probe(c.name) for c in unseen]
        model.load_tier("root", root)
        similarity = 1.0 - probe_distance(manifest, opts.features, root, probes + unseen_probes)
        n = len(train)
        assigned = assign_to_clusters(similarity[n:, :n], np.array([labels[c.name] for c in train]))
        majority = {}
        for group in {c.group for c in train}:
            member_labels = [labels[c.name] for c in train if c.group == group]
            majority[group] = max(set(member_labels), key=member_labels.count)
        for c, label in zip(unseen, assigned.tolist()):
            model.load_tier("cluster", cluster_state[label])
            zero_shot = evaluate_tiers(model, data[c.name], ("root", "cluster"), "cpu")["acc_cluster"]
            after_leaf = train_leaf(c.name, label, opts.unseen_leaf_rounds)
            unseen_rows.append({"name": c.name, "group": c.group, "cluster": label,
                                "correct_cluster": majority.get(c.group) == label, "acc_root": acc_root[c.name],
                                "zero_shot": zero_shot, "after_leaf": after_leaf})
        log("unseen clients done")
    lap("unseen")

    train_rows = [{"name": c.name, "group": c.group, "cluster": labels[c.name], "acc_root": acc_root[c.name],
                   "acc_cluster": acc_cluster[c.name], "acc_leaf": acc_leaf[c.name]} for c in train]
    return {
        "options": asdict(opts),
        "backbone_sha256": artifact.sha256,
        "clustering": {"k": int(result.k), "ari": ari, "planted_groups": len({c.group for c in train}),
                       "contrast_ratio": result.contrast_ratio,
                       "eigengaps": [float(x) for x in result.eigengaps]},
        "tiers": {"root": accuracy_stats([r["acc_root"] for r in train_rows]),
                  "cluster": accuracy_stats([r["acc_cluster"] for r in train_rows]),
                  "leaf": accuracy_stats([r["acc_leaf"] for r in train_rows])},
        "unseen": {"root": accuracy_stats([r["acc_root"] for r in unseen_rows]),
                   "zero_shot": accuracy_stats([r["zero_shot"] for r in unseen_rows]),
                   "after_leaf": accuracy_stats([r["after_leaf"] for r in unseen_rows]),
                   "assigned_to_majority_cluster": (float(np.mean([r["correct_cluster"] for r in unseen_rows]))
                                                    if unseen_rows else None)},
        "root_rho": rhos,
        "clients": train_rows,
        "unseen_clients": unseen_rows,
        "seconds": {**timings, "total": time.monotonic() - t0},
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines of text: clustering, per-tier mean / p10 accuracy, unseen clients and time."""
    def pct(x: float | None) -> str:
        return "   -  " if x is None else f"{100 * x:6.1f}"

    c, t, u = summary["clustering"], summary["tiers"], summary["unseen"]
    lines = [f"seed {summary['options']['seed']}: K = {c['k']} (planted {c['planted_groups']}), ARI = {c['ari']:.3f}",
             "                      mean %   p10 %   n"]
    for name, s in [("root", t["root"]), ("root+cluster", t["cluster"]), ("+leaf", t["leaf"]),
                    ("unseen root", u["root"]), ("unseen zero-shot", u["zero_shot"]),
                    ("unseen after leaf", u["after_leaf"])]:
        lines.append(f"  {name:<18} {pct(s['mean'])}  {pct(s['p10'])}  {s['n']:>3}")
    seconds = summary["seconds"]
    lines.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the cascade for one or more seeds and print (and optionally save) the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = CascadeOptions()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    for name, value in asdict(defaults).items():
        if name == "seed":
            continue
        kind = type(value) if value is not None else (str if name in ("cache_dir",) else
                                                      float if name == "alpha" else int)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    parser.add_argument("--json", type=Path, default=None, help="write all runs' numbers here")
    parser.add_argument("--quiet", action="store_true")
    args = vars(parser.parse_args(argv))
    seeds, out, quiet = args.pop("seeds"), args.pop("json"), args.pop("quiet")
    runs = []
    for seed in seeds:
        opts = CascadeOptions(seed=seed, **args)
        summary = run_cascade(opts, say=None if quiet else print)
        print(format_summary(summary), flush=True)
        runs.append(summary)
    if out is not None:
        out.write_text(json.dumps(runs, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
