"""The bench's report: per method the mean over seeds (with the spread across seeds) of each number,
the printed table, and the JSON and PNG outputs."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from hilora.bench.methods import METHOD_SUMMARIES
from hilora.options import RunOptions, recorded_defaults


def accuracy_stats(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, 10th percentile (the paper's worst case), minimum and count of per-client accuracies."""
    if not values:
        return {"mean": None, "p10": None, "worst": None, "n": 0}
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "p10": float(np.percentile(array, 10)), "worst": float(array.min()),
            "n": int(array.size)}


def majority_clusters(groups: Mapping[str, str], labels: Mapping[str, int]) -> dict[str, int]:
    """For each planted group, the cluster holding most of its clustered members (ties: the lowest
    label). Used to score where unseen clients were put, by the bench and the demo alike."""
    out: dict[str, int] = {}
    for group in sorted(set(groups[n] for n in labels)):
        member_labels = [labels[n] for n in labels if groups[n] == group]
        out[group] = max(sorted(set(member_labels)), key=member_labels.count)
    return out


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return float(np.mean(present)), (float(np.std(present, ddof=1)) if len(present) > 1 else 0.0)


def summarize(runs: dict[int, dict[str, dict[str, Any]]], opts: RunOptions, methods: Sequence[str],
              backbone_sha256: str, partition_name: str) -> dict[str, Any]:
    """The report: per method the mean over seeds (with the spread across seeds) of each number."""
    seeds = sorted(runs)
    report: dict[str, Any] = {
        "partition": partition_name, "seeds": seeds, "backbone_sha256": backbone_sha256,
        "rounds": {"root": opts.root_rounds, "cluster": opts.cluster_rounds, "leaf": opts.leaf_rounds,
                   "total": opts.total_rounds, "unseen_leaf": opts.unseen_leaf_rounds,
                   "local_epochs": opts.local_epochs, "probe_epochs": opts.probe_epochs},
        "options": {k: v for k, v in asdict(opts).items() if k != "seed"},
        "methods": {}, "unseen": {},
    }
    for name in methods:
        per_seed = [runs[s][name] for s in seeds]
        entry: dict[str, Any] = {"summary": METHOD_SUMMARIES[name], "config": per_seed[0]["config"]}
        for key in ("mean", "p10", "worst"):
            entry[key], entry[f"{key}_spread"] = _mean_std([r["final"][key] for r in per_seed])
        entry["bytes_uploaded"] = int(np.mean([r["bytes_uploaded"] for r in per_seed]))
        entry["seconds"] = float(np.mean([r["seconds"]["total"] for r in per_seed]))
        entry["per_seed"] = [{"seed": s, **{k: r["final"][k] for k in ("mean", "p10", "worst")}}
                             for s, r in zip(seeds, per_seed)]
        length = min(len(r["rounds"]) for r in per_seed)
        entry["rounds"] = [{"round": i + 1, "stage": per_seed[0]["rounds"][i]["stage"],
                            "mean": _mean_std([r["rounds"][i]["mean"] for r in per_seed])[0],
                            "p10": _mean_std([r["rounds"][i]["p10"] for r in per_seed])[0]} for i in range(length)]
        entry["tiers"] = {tier: {k: _mean_std([r["tiers"][tier][k] for r in per_seed])[0] for k in ("mean", "p10")}
                          for tier in per_seed[0]["tiers"]}
        if per_seed[0]["clustering"] is not None:
            entry["clustering"] = {k: _mean_std([r["clustering"][k] for r in per_seed])[0] for k in ("k", "ari")}
        report["methods"][name] = entry
        unseen = {}
        for key in ("root", "zero_shot", "after_leaf"):
            unseen[key], unseen[f"{key}_spread"] = _mean_std([r["unseen"][key]["mean"] for r in per_seed])
        unseen["n"] = per_seed[0]["unseen"]["zero_shot"]["n"]
        unseen["assigned_to_majority_cluster"] = _mean_std(
            [r["unseen"]["assigned_to_majority_cluster"] for r in per_seed])[0]
        report["unseen"][name] = unseen
    if "hilora" in methods:
        per_seed = [runs[s]["hilora"] for s in seeds]
        clustering = {}
        for key in ("ari", "k"):
            clustering[key], clustering[f"{key}_spread"] = _mean_std([r["clustering"][key] for r in per_seed])
        clustering["per_seed"] = [{"seed": s, "k": r["clustering"]["k"], "ari": r["clustering"]["ari"]}
                                  for s, r in zip(seeds, per_seed)]
        clustering["planted_groups"] = per_seed[0]["clustering"]["planted_groups"]
        tiers = {}
        for tier in ("root", "cluster", "leaf"):
            tiers[tier] = {}
            for key in ("mean", "p10"):
                tiers[tier][key], tiers[tier][f"{key}_spread"] = _mean_std([r["tiers"][tier][key] for r in per_seed])
        report["hilora"] = {"clustering": clustering, "tiers": tiers}
    report["runs"] = [runs[s][m] for s in seeds for m in methods]
    return report


# options that say where and how fast a run goes, not what it computes: a resumed run may change them
RUNTIME_OPTIONS = frozenset({"seed", "partition", "workdir", "keep", "transport", "workers", "timeout", "threads",
                             "cache_dir", "data_cache_bytes"})


def partition_sha256(spec: Any) -> str:
    """The resolved partition (seed override and data root included) as a digest: what a resumed
    run must train on (``partition`` may name it by another path)."""
    import hashlib

    return hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def resumable_runs(previous: Mapping[str, Any], opts: RunOptions, methods: Sequence[str],
                   seeds: Sequence[int]) -> dict[int, dict[str, dict[str, Any]]]:
    """The finished runs of ``previous`` (a report ``hilora bench --report`` wrote, partial or not)
    that this bench asks for: seed -> method -> the run as it was written. ValueError, in one line,
    when it is not a bench report or was made with other options (every option but where and how
    fast it runs, ``RUNTIME_OPTIONS``; an option added since is read as what that run did: its default,
    or ``hilora.options.VALUE_BEFORE_IT_EXISTED``)."""
    if not isinstance(previous, Mapping) or not isinstance(previous.get("options"), Mapping) \
            or not isinstance(previous.get("runs"), list) or "family" in previous:
        raise ValueError("not a report of `hilora bench --report` (no options and runs)")
    now = {k: v for k, v in asdict(opts).items() if k not in RUNTIME_OPTIONS}
    defaults = recorded_defaults()
    before = {k: previous["options"].get(k, defaults[k]) for k in now}
    changed = [k for k in sorted(now) if _plain(before[k]) != _plain(now[k])]
    if changed:
        raise ValueError("the report was made with other options (" + "; ".join(
            f"{k}: {before[k]!r} there, {now[k]!r} now" for k in changed) + "): run with the same options, or "
            "without --resume")
    wanted_seeds, wanted_methods = {int(s) for s in seeds}, set(methods)
    done: dict[int, dict[str, dict[str, Any]]] = {}
    for run in previous["runs"]:
        if not isinstance(run, Mapping) or "method" not in run or "seed" not in run:
            raise ValueError("not a report of `hilora bench --report` (a run without method and seed)")
        if int(run["seed"]) in wanted_seeds and run["method"] in wanted_methods:
            done.setdefault(int(run["seed"]), {})[run["method"]] = dict(run)
    return done


def check_resumed_setup(previous: Mapping[str, Any], partition_digest: str, partition_name: str,
                        backbone_sha256: str) -> None:
    """ValueError (one line) when the report being resumed was made on another partition or
    backbone than this run's."""
    if previous.get("partition") != partition_name:
        raise ValueError(f"the report was made on partition {previous.get('partition')!r}, this run's is "
                         f"{partition_name!r}: run with the same partition, or without --resume")
    if previous.get("partition_sha256", partition_digest) != partition_digest:
        raise ValueError(f"the report was made on other data for partition {partition_name!r} (its file, seed or "
                         f"data root changed): run with the same partition, or without --resume")
    if previous.get("backbone_sha256") != backbone_sha256:
        raise ValueError(f"the report was made with another backbone (sha256 {str(previous.get('backbone_sha256'))[:12]}, "
                         f"not {backbone_sha256[:12]}): run with the same backbone, or without --resume")


def _plain(value: Any) -> Any:
    """As JSON has it (tuples are lists), to compare options read back from a report."""
    return json.loads(json.dumps(value))


def _pct(x: float | None) -> str:
    return "    -" if x is None else f"{100 * x:5.1f}"


def format_table(report: dict[str, Any]) -> str:
    """The printed summary: method x mean / p10 / worst / bytes uploaded / wall time, then unseen
    clients and hilora's tiers and clustering."""
    seeds = report["seeds"]
    r = report["rounds"]
    lines = ["", (f"partition {report['partition']}, seeds {seeds}, rounds {r['root']}/{r['cluster']}/{r['leaf']} "
                  f"(total {r['total']}), {r['local_epochs']} local epochs"),
             "", f"{'method':<14} {'mean %':>7} {'(spread)':>8} {'p10 %':>7} {'(spread)':>8} {'worst %':>8} "
                 f"{'uploaded MB':>12} {'seconds':>8}"]

    def spread(value: float | None) -> str:  # the standard deviation over seeds, in points
        return f"+-{100 * value:.1f}" if len(seeds) > 1 and value is not None else "-"

    for name, m in report["methods"].items():
        lines.append(f"{name:<14} {_pct(m['mean']):>7} {spread(m['mean_spread']):>8} {_pct(m['p10']):>7} "
                     f"{spread(m['p10_spread']):>8} {_pct(m['worst']):>8} "
                     f"{m['bytes_uploaded'] / 1e6:>12.3f} {m['seconds']:>8.1f}")
    unseen = {k: v for k, v in report["unseen"].items() if v["n"]}
    if unseen:
        lines += ["", (f"unseen clients (n = {next(iter(unseen.values()))['n']}): "
                       f"{'zero-shot %':>12} {'after leaf %':>13}")]
        for name, u in unseen.items():
            lines.append(f"  {name:<14}                {_pct(u['zero_shot']):>12} {_pct(u['after_leaf']):>13}")
    if "hilora" in report:
        h = report["hilora"]
        t = h["tiers"]
        lines += ["", (f"hilora: K = {h['clustering']['k']:g} (planted {h['clustering']['planted_groups']}), "
                       f"ARI = {h['clustering']['ari']:.3f}; tiers mean / p10 %: "
                       f"root {_pct(t['root']['mean'])} / {_pct(t['root']['p10'])}, "
                       f"+cluster {_pct(t['cluster']['mean'])} / {_pct(t['cluster']['p10'])}, "
                       f"+leaf {_pct(t['leaf']['mean'])} / {_pct(t['leaf']['p10'])}")]
    return "\n".join(lines + [""])


def write_outputs(report: dict[str, Any], report_path: str | os.PathLike | None,
                  plots_dir: str | os.PathLike | None) -> list[Path]:
    """Render everything first, then write (the report and each PNG atomically)."""
    from worker.files import atomic_write

    from hilora.bench.plots import render_plots

    plots = render_plots(report) if plots_dir is not None else {}
    body = json.dumps(_finite(report), indent=2, sort_keys=True).encode() if report_path is not None else b""
    umask = os.umask(0)
    os.umask(umask)
    targets = ([(Path(report_path), body)] if report_path is not None else []) + [
        (Path(plots_dir) / file_name, data) for file_name, data in plots.items()]
    for path, data in targets:
        atomic_write(path, data)
        os.chmod(path, 0o666 & ~umask)   # an ordinary output file, not atomic_write's private temp mode
    return [path for path, _ in targets]


def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats (an infinite contrast ratio) become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
