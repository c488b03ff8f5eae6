"""The whole HiLoRA cascade in one process, with the functions the worker daemon and the coordinator
call, but no HTTP, no database and no worker processes.

root rounds -> probe round -> LSAC -> cluster rounds -> leaf rounds -> unseen clients
(probe from the final root, nearest cluster, zero-shot root+cluster, then a local leaf).

A thin wrapper over the engine of ``hilora bench`` (``hilora.bench.run_method`` with the method
``hilora``): local work is ``worker.train.train_tier`` / ``evaluate`` on a
``worker.lora.TieredLoRAModel``, server work is ``shared.aggregate.combine_tier_uploads`` and
``shared.subspace`` / ``shared.probes`` for the probe features, ``lsac`` and ``assign_to_clusters``.

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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hilora.bench import BenchOptions, prepare, run_method  # noqa: E402
from hilora.demo import DemoOptions  # noqa: E402

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


def run_cascade(opts: CascadeOptions, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the cascade once and return its numbers (see the module docstring)."""
    t0 = time.monotonic()
    bench_fields = {f.name for f in fields(BenchOptions)}
    bench_opts = BenchOptions(**{k: v for k, v in asdict(opts).items() if k in bench_fields})
    setup = prepare(bench_opts)
    setup_seconds = time.monotonic() - t0
    result = run_method(setup, "hilora", say)
    seconds = {"setup": setup_seconds}
    seconds.update({("probe_lsac" if k == "probe_clustering" else k): v for k, v in result["seconds"].items()})
    seconds["total"] = time.monotonic() - t0
    clustering = result["clustering"]
    unseen = result["unseen"]
    return {
        "options": asdict(opts),
        "backbone_sha256": setup.artifact.sha256,
        "clustering": {"k": clustering["k"], "ari": clustering["ari"], "planted_groups": clustering["planted_groups"],
                       "contrast_ratio": clustering["contrast_ratio"], "eigengaps": clustering["eigengaps"]},
        "tiers": result["tiers"],
        "unseen": {key: unseen[key] for key in ("root", "zero_shot", "after_leaf", "assigned_to_majority_cluster")},
        "root_rho": [rho for rho in result["root_rho"] if rho is not None],
        "clients": [{k: row[k] for k in ("name", "group", "cluster", "acc_root", "acc_cluster", "acc_leaf") if k in row}
                    for row in result["clients"]],
        "unseen_clients": result["unseen_clients"],
        "seconds": seconds,
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
