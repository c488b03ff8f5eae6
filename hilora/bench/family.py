"""Benchmark families: a fixed design of partitions (cells) that defaults are chosen on, instead of
a single hand-made partition.

A cell is a partition over the offline mnist5k data with planted groups (or none), defined here in
code so that every run of a family measures exactly the same cells. The design is fixed before
any default is tuned on it; a cell is never dropped or changed after its results are seen (a
change is a new family name). ``run_family`` runs cells x seeds x methods through the one engine
(``run_bench``), one result file per (cell, seed, method) as soon as it is known, and skips the
files that already exist: a family run that stops resumes where it stopped, and several processes
may run disjoint ``cells`` of one family into the same folder at once (every file is written
through a rename).

Family ``core`` (docs/benchmarks.md, "The partition family"): 16 cells with planted groups over

- training images per client: 20, 30, 50, 160 (4 cells each);
- group sizes equal (9 cells) and unequal (7 cells), 2 to 15 clients per group;
- label skew inside a client: Dirichlet(0.3) (7), Dirichlet(1.0) (4), uniform (5);
- group kinds: label permutation (4), rotation (3), inversion (3), disjoint label subsets (3) and
  mixtures of kinds in one cell (3);

plus 3 cells without structure (one group: K must be 1) at 20, 50 and 160 images.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from hilora.bench.methods import REFERENCES
from hilora.options import VALUE_BEFORE_IT_EXISTED, RunOptions

TEST_PER_CLIENT = 100  # mnist5k's test pool has 150 per class: one test image is one point at most
KINDS = ("perm", "rot", "inv", "subset", "mix", "none")

# group kind -> the (name, transforms, classes) of its groups, in order; a cell takes the first
# len(sizes) of them
_KIND_GROUPS: dict[str, list[tuple[str, list[dict[str, Any]], list[int] | None]]] = {
    "perm": [("identity", [], None),
             ("perm-1", [{"kind": "permute_labels", "seed": 1}], None),
             ("perm-2", [{"kind": "permute_labels", "seed": 2}], None),
             ("perm-3", [{"kind": "permute_labels", "seed": 3}], None)],
    "rot": [("upright", [], None),
            ("rot180", [{"kind": "rotate", "quarter_turns": 2}], None),
            ("rot90", [{"kind": "rotate", "quarter_turns": 1}], None),
            ("rot270", [{"kind": "rotate", "quarter_turns": 3}], None)],
    "inv": [("upright", [], None),
            ("inverted", [{"kind": "invert"}], None)],
    "subset": [("digits-0-3", [], [0, 1, 2, 3]),
               ("digits-4-6", [], [4, 5, 6]),
               ("digits-7-9", [], [7, 8, 9])],
    "mix": [("upright", [], None),
            ("perm-1", [{"kind": "permute_labels", "seed": 1}], None),
            ("rot180", [{"kind": "rotate", "quarter_turns": 2}], None),
            ("inverted-perm-2", [{"kind": "invert"}, {"kind": "permute_labels", "seed": 2}], None)],
    "none": [("all", [], None)],
}


@dataclass(frozen=True)
class FamilyCell:
    """One partition of a family: ``train`` images per client, one group per entry of ``sizes``
    (its clients), label skew Dirichlet(``alpha``) (None: uniform) and the groups' ``kind``."""

    train: int
    kind: str
    sizes: tuple[int, ...]
    alpha: float | None

    @property
    def name(self) -> str:
        equal = "eq" if len(set(self.sizes)) == 1 else "uneq"
        skew = "uni" if self.alpha is None else f"d{self.alpha:g}".replace(".", "")
        shape = f"{len(self.sizes)}x{self.sizes[0]}" if equal == "eq" else "-".join(map(str, self.sizes))
        return f"n{self.train}-{self.kind}-{shape}-{skew}"

    @property
    def structured(self) -> bool:
        """Planted groups exist (more than one group): the clustering should find them."""
        return len(self.sizes) > 1

    @property
    def clients(self) -> int:
        return sum(self.sizes)

    def partition(self, seed: int = 0) -> dict[str, Any]:
        """The cell as a partition document (worker.data's format) with data seed ``seed``."""
        groups = _KIND_GROUPS[self.kind]
        if len(self.sizes) > len(groups):
            raise ValueError(f"cell {self.name}: kind {self.kind!r} has only {len(groups)} groups")
        doc_groups = []
        for (name, transforms, classes), size in zip(groups, self.sizes):
            group: dict[str, Any] = {"name": name, "clients": int(size), "transforms": transforms}
            if classes is not None:
                group["classes"] = classes
            doc_groups.append(group)
        return {"name": self.name, "dataset": "mnist5k", "seed": int(seed), "train_per_client": self.train,
                "test_per_client": TEST_PER_CLIENT, "dirichlet_alpha": self.alpha, "unseen_fraction": 0.0,
                "groups": doc_groups}


# The ``core`` design, fixed on 2026-12-05 before any default was tuned on it (issue 14).
CORE: tuple[FamilyCell, ...] = (
    FamilyCell(20, "perm", (8, 8, 8, 8), 0.3),
    FamilyCell(20, "rot", (3, 6, 10), None),
    FamilyCell(20, "mix", (10, 10, 10, 10), 1.0),
    FamilyCell(20, "subset", (2, 5, 12), 0.3),
    FamilyCell(30, "perm", (15, 15, 15, 15), 0.3),
    FamilyCell(30, "inv", (4, 12), 1.0),
    FamilyCell(30, "subset", (8, 8, 8), None),
    FamilyCell(30, "mix", (2, 4, 6, 15), 0.3),
    FamilyCell(50, "rot", (6, 6, 6, 6), 0.3),
    FamilyCell(50, "perm", (2, 6, 10), 1.0),
    FamilyCell(50, "mix", (5, 5, 5, 5), None),
    FamilyCell(50, "inv", (8, 8), 0.3),
    FamilyCell(160, "perm", (2, 3, 5, 8), None),
    FamilyCell(160, "rot", (5, 5, 5), 1.0),
    FamilyCell(160, "subset", (3, 5, 7), 0.3),
    FamilyCell(160, "inv", (6, 6), None),
    # no structure: one group, K must be 1
    FamilyCell(20, "none", (24,), 0.3),
    FamilyCell(50, "none", (16,), None),
    FamilyCell(160, "none", (10,), 1.0),
)
# ``smoke``: two small cells, for tests and for trying the runner
SMOKE: tuple[FamilyCell, ...] = (
    FamilyCell(20, "perm", (3, 3), 1.0),
    FamilyCell(20, "none", (4,), 1.0),
)
FAMILIES: dict[str, tuple[FamilyCell, ...]] = {"core": CORE, "smoke": SMOKE}
# the methods the issue's targets name: hilora, the reference and the baselines it is read against
FAMILY_METHODS = ("hilora", "oracle", "local", "fedit", "flexlora", "fedsa", "ffa")


def family_cells(family: str, only: Sequence[str] | None = None) -> list[FamilyCell]:
    """The cells of ``family`` (all, or those named in ``only``, in the family's order);
    ValueError for an unknown family or cell."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; families are {', '.join(FAMILIES)}")
    cells = list(FAMILIES[family])
    if not only:
        return cells
    names = [c.name for c in cells]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ValueError(f"family {family} has no cell {', '.join(map(repr, unknown))}; its cells are "
                         f"{', '.join(names)}")
    return [c for c in cells if c.name in set(only)]


def result_path(out: Path, cell: str, seed: int, method: str) -> Path:
    return Path(out) / "results" / cell / f"seed{seed}" / f"{method}.json"


def _compact(result: Mapping[str, Any]) -> dict[str, Any]:
    """What the family report needs of one method's result (the affinity matrix is left out)."""
    keep = {k: result[k] for k in ("method", "seed", "final", "tiers", "rounds", "seconds", "bytes_uploaded",
                                   "clients")}
    clustering = result.get("clustering")
    keep["clustering"] = None if clustering is None else {
        k: clustering[k] for k in ("k", "lsac_k", "ari", "planted_groups", "clusterer", "contrast_ratio", "unassigned")
        if k in clustering}
    return keep


_MISSING = object()


def settings_to_record(recorded: Path, settings: dict[str, Any], family: str) -> dict[str, Any]:
    """The settings a results folder keeps: ``settings`` if the folder has none yet, else its own
    when they match (ValueError naming the differences otherwise). An option added to hilora since
    that run is read as what that run did (its default, or ``VALUE_BEFORE_IT_EXISTED``)."""
    if not recorded.is_file():
        return settings
    before = json.loads(recorded.read_text())
    defaults = {**run_settings(RunOptions(), family), **VALUE_BEFORE_IT_EXISTED}
    before = {**{k: v for k, v in defaults.items() if k not in before}, **before}
    changed = sorted(k for k in set(before) | set(settings) if before.get(k, _MISSING) != settings.get(k, _MISSING))
    if changed:
        raise ValueError(f"{recorded.parent} holds results of a run with other settings ({', '.join(changed)}: "
                         f"{ {k: before.get(k) for k in changed} }); use another --out folder")
    return {**before, **settings}


def run_family(opts: RunOptions, family: str, methods: Sequence[str], seeds: Sequence[int], out: Path,
               cells: Sequence[str] | None = None, say: Callable[[str], None] | None = None,
               progress: Any = None, on_report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every (cell, seed, method) of ``family`` not already in ``out``, through ``run_bench``; each
    result is written as ``out/results/<cell>/seed<s>/<method>.json`` as soon as it is known, and
    the family report (``family_report``) as ``out/family.json`` after every method (``on_report``
    gets it too). ``progress`` (``hilora.progress.RunProgress``): every run still to do, and the
    cells and seeds."""
    from hilora.bench.engine import expected_rounds, run_bench
    from hilora.bench.methods import parse_methods

    chosen = family_cells(family, cells)
    parse_methods(methods)
    out = Path(out)
    settings = run_settings(opts, family)
    recorded = out / "settings.json"
    settings = settings_to_record(recorded, settings, family)
    (out / "partitions").mkdir(parents=True, exist_ok=True)
    _write_atomic(recorded, json.dumps(settings, indent=1, sort_keys=True))
    started = time.monotonic()

    def todo_of(cell: FamilyCell, seed: int) -> list[str]:
        return [m for m in methods if not result_path(out, cell.name, seed, m).is_file()]

    def write_report() -> dict[str, Any]:
        report = family_report(out, family, methods, seeds, opts)
        _write_atomic(out / "family.json", json.dumps(report, indent=1))
        if on_report is not None:
            on_report(report)
        return report

    groups = [(cell, int(seed)) for cell in chosen for seed in seeds if todo_of(cell, int(seed))]
    if progress is not None:   # family cells have no unseen clients (unseen_fraction 0)
        todo_all = [m for cell, seed in groups for m in todo_of(cell, seed)]
        progress.plan(sum(expected_rounds(m, opts, False) for m in todo_all), len(todo_all), fixed=True)
    for cell in chosen:
        partition_file = out / "partitions" / f"{cell.name}.json"
        _write_atomic(partition_file, json.dumps(cell.partition(), indent=1))
        for seed in seeds:
            todo = todo_of(cell, int(seed))
            if not todo:
                continue
            if say is not None:
                say(f"[{time.monotonic() - started:7.0f}s] cell {cell.name} seed {seed}: {', '.join(todo)}")
            if progress is not None:
                at = groups.index((cell, int(seed))) if (cell, int(seed)) in groups else 0
                progress.group(f"cell {cell.name} seed {seed}", at, len(groups))

            def keep(result: dict[str, Any], cell_name: str = cell.name, seed_: int = int(seed)) -> None:
                path = result_path(out, cell_name, seed_, result["method"])
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_atomic(path, json.dumps(_compact(result)))
                write_report()

            cell_opts = replace(opts, partition=str(partition_file), partition_seed=int(seed), workdir=None)
            run_bench(cell_opts, todo, [int(seed)], say=say, keep=keep, progress=progress)
    if progress is not None and groups:
        progress.group("cells and seeds", len(groups), len(groups))
    return write_report()


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file of this process and a rename, so that several processes
    running disjoint ``--cells`` of one family into the same folder never leave a torn file."""
    import os

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run_settings(opts: RunOptions, family: str) -> dict[str, Any]:
    """What makes results comparable: the family and every option but the seed, the partition and
    where it runs (``settings.json`` of a results folder; a resumed run must match it)."""
    from dataclasses import asdict

    skip = {"seed", "partition", "partition_seed", "workdir", "keep", "transport", "workers", "timeout", "threads",
            "device", "cache_dir", "data_cache_bytes"}
    return {"family": family, **{k: v for k, v in asdict(opts).items() if k not in skip}}


def load_results(out: Path, cells: Sequence[FamilyCell], methods: Sequence[str],
                 seeds: Sequence[int]) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """cell -> method -> seed -> result, for the result files present."""
    found: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for cell in cells:
        for method in methods:
            for seed in seeds:
                path = result_path(out, cell.name, seed, method)
                if path.is_file():
                    found.setdefault(cell.name, {}).setdefault(method, {})[int(seed)] = json.loads(path.read_text())
    return found


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def cell_summary(per_seed: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """One method on one cell: means over its seeds of final mean / p10, tier means, K and ARI."""
    runs = [per_seed[s] for s in sorted(per_seed)]
    entry: dict[str, Any] = {
        "seeds": sorted(per_seed),
        "mean": _mean([r["final"]["mean"] for r in runs]),
        "p10": _mean([r["final"]["p10"] for r in runs]),
        "mean_per_seed": [r["final"]["mean"] for r in runs],
        "tiers": {t: _mean([r["tiers"][t]["mean"] for r in runs]) for t in runs[0]["tiers"]},
        "seconds": _mean([r["seconds"]["total"] for r in runs]),
    }
    if runs[0].get("clustering"):
        entry["k"] = _mean([r["clustering"]["k"] for r in runs])
        entry["ari"] = _mean([r["clustering"]["ari"] for r in runs])
        entry["ari_per_seed"] = [r["clustering"]["ari"] for r in runs]
        entry["k_per_seed"] = [r["clustering"]["k"] for r in runs]
    return entry


FLAT_BASELINES = ("fedit", "flexlora", "fedsa", "ffa")


def targets(cells: Sequence[FamilyCell], table: Mapping[str, Mapping[str, Mapping[str, Any]]],
            method: str = "hilora") -> dict[str, Any]:
    """The issue's targets for ``method`` over the cells present in ``table`` (cell -> method ->
    ``cell_summary``): each target with the cells it was checked on and the cells that miss it."""
    def have(cell: FamilyCell, *names: str) -> bool:
        return all(n in table.get(cell.name, {}) for n in names)

    out: dict[str, Any] = {}
    # clustering: ARI >= 0.9 on every seed's run of a structured cell with >= 30 images; K = 1 on no-structure
    checked = [c for c in cells if c.structured and c.train >= 30 and have(c, method)]
    miss = [c.name for c in checked if min(table[c.name][method]["ari_per_seed"]) < 0.9]
    out["ari>=0.9 (>=30 images)"] = {"checked": len(checked), "missed": miss,
                                     "met": len(checked) - len(miss) >= 0.9 * len(checked) if checked else None}
    checked = [c for c in cells if not c.structured and have(c, method)]
    miss = [c.name for c in checked if max(table[c.name][method]["k_per_seed"]) != 1]
    out["K=1 (no structure)"] = {"checked": len(checked), "missed": miss, "met": not miss if checked else None}
    checked = [c for c in cells if c.structured and have(c, method, "oracle")]
    miss = [c.name for c in checked if table[c.name][method]["mean"] < table[c.name]["oracle"]["mean"] - 0.01]
    out["within 1 point of oracle"] = {"checked": len(checked), "missed": miss,
                                       "met": len(checked) - len(miss) >= 0.9 * len(checked) if checked else None}
    small = [c for c in cells if c.structured and c.train <= 50 and min(c.sizes) >= 4]
    checked = [c for c in small if have(c, method, *FLAT_BASELINES)]
    miss = []
    for c in checked:
        row = table[c.name]
        best_mean = max(row[b]["mean"] for b in FLAT_BASELINES)
        best_p10 = max(row[b]["p10"] for b in FLAT_BASELINES)
        if row[method]["mean"] < best_mean + 0.03 or row[method]["p10"] < best_p10 + 0.03:
            miss.append(c.name)
    out["+3 over best flat (<=50 images, groups >=4)"] = {"checked": len(checked), "missed": miss,
                                                          "met": not miss if checked else None}
    checked = [c for c in small if have(c, method, "local", "oracle")
               and table[c.name]["oracle"]["mean"] >= table[c.name]["local"]["mean"] + 0.04]
    miss = [c.name for c in checked if table[c.name][method]["mean"] < table[c.name]["local"]["mean"] + 0.03
            or table[c.name][method]["p10"] < table[c.name]["local"]["p10"] + 0.03]
    out["+3 over local where oracle leads by 4"] = {"checked": len(checked), "missed": miss,
                                                    "met": not miss if checked else None}
    checked = [c for c in cells if have(c, method, "local")]
    miss = [c.name for c in checked if table[c.name][method]["mean"] < table[c.name]["local"]["mean"] - 0.01]
    out["never >1 point below local"] = {"checked": len(checked), "missed": miss, "met": not miss if checked else None}
    checked = [c for c in cells if have(c, method) and {"root", "cluster", "leaf"} <= set(table[c.name][method]["tiers"])]
    miss = [c.name for c in checked
            if not (table[c.name][method]["tiers"]["root"] <= table[c.name][method]["tiers"]["cluster"]
                    <= table[c.name][method]["tiers"]["leaf"])]
    out["root <= +cluster <= +leaf"] = {"checked": len(checked), "missed": miss, "met": not miss if checked else None}
    return out


def family_report(out: Path, family: str, methods: Sequence[str], seeds: Sequence[int],
                  opts: RunOptions | None = None) -> dict[str, Any]:
    """The family's table (cell -> method -> ``cell_summary``) from the result files in ``out``,
    with the targets checked for every hierarchical method present."""
    cells = family_cells(family)
    found = load_results(out, cells, methods, seeds)
    table = {cell: {m: cell_summary(per_seed) for m, per_seed in by_method.items()}
             for cell, by_method in found.items()}
    report: dict[str, Any] = {
        "family": family, "methods": list(methods), "seeds": [int(s) for s in seeds],
        "cells": [{"name": c.name, "train": c.train, "kind": c.kind, "sizes": list(c.sizes), "alpha": c.alpha,
                   "structured": c.structured} for c in cells],
        "table": table,
        "complete": sum(len(per_seed) for by_method in found.values() for per_seed in by_method.values()),
        "expected": len(cells) * len(methods) * len(seeds),
    }
    if opts is not None:
        report["clustering"] = {"probe_loss": opts.probe_loss, "probe_steps": opts.probe_steps,
                                "k_rule": opts.k_rule, "partitions": opts.partitions,
                                "head_weight": opts.head_weight, "classwise_weight": opts.classwise_weight,
                                "probe_epochs": opts.probe_epochs,
                                "refine_rounds": opts.refine_rounds, "refine_margin": opts.refine_margin,
                                "refine_new_cluster": opts.refine_new_cluster}
        report["rounds"] = {"root": opts.root_rounds, "cluster": opts.cluster_rounds, "leaf": opts.leaf_rounds,
                            "local_epochs": opts.local_epochs, "probe_epochs": opts.probe_epochs}
    report["targets"] = {m: targets(cells, table, m) for m in methods if m not in REFERENCES
                         and any(table[c].get(m, {}).get("ari") is not None for c in table)}
    return report


def format_family(report: Mapping[str, Any]) -> str:
    """The family table as markdown: one row per cell, per method mean / p10 (and K, ARI)."""
    methods = report["methods"]
    lines = ["| cell | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for cell in report["cells"]:
        row = report["table"].get(cell["name"], {})
        parts = []
        for m in methods:
            e = row.get(m)
            if e is None:
                parts.append("")
                continue
            text = f"{100 * e['mean']:.1f} / {100 * e['p10']:.1f}"
            if e.get("ari") is not None:
                text += f" (K {e['k']:.1f}, ARI {e['ari']:.2f})"
            parts.append(text)
        lines.append(f"| {cell['name']} | " + " | ".join(parts) + " |")
    for method, checks in report.get("targets", {}).items():
        lines.append("")
        lines.append(f"targets for {method}:")
        for name, check in checks.items():
            state = {True: "met", False: "MISSED", None: "not checked"}[check["met"]]
            missed = f" (missed: {', '.join(check['missed'])})" if check["missed"] else ""
            lines.append(f"- {name}: {state} (checked on {check['checked']} cells){missed}")
    lines.append("")
    lines.append(f"{report['complete']} of {report['expected']} runs present")
    return "\n".join(lines)


def render_heatmap(report: Mapping[str, Any], against: str = "local") -> bytes:
    """PNG: per cell (rows) and method (columns), mean accuracy minus ``against``'s, in points."""
    import io

    try:
        import matplotlib
    except ImportError as exc:
        raise ValueError("--plots needs matplotlib: pip install 'hilora[bench]'") from exc

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    methods = [m for m in report["methods"] if m != against]
    cells = [c["name"] for c in report["cells"]]
    grid = np.full((len(cells), len(methods)), np.nan)
    for i, cell in enumerate(cells):
        row = report["table"].get(cell, {})
        if against not in row:
            continue
        for j, m in enumerate(methods):
            if m in row:
                grid[i, j] = 100 * (row[m]["mean"] - row[against]["mean"])
    fig, ax = plt.subplots(figsize=(1.1 * len(methods) + 3, 0.38 * len(cells) + 1.5))
    bound = max(5.0, float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 5.0)
    image = ax.imshow(grid, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    for i in range(len(cells)):
        for j in range(len(methods)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:+.1f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right")
    ax.set_yticks(range(len(cells)), cells, fontsize=8)
    fig.colorbar(image, ax=ax, label=f"mean accuracy minus {against}'s (points)")
    ax.set_title(f"family {report['family']}: each method against {against}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


__all__ = ["CORE", "FAMILIES", "FAMILY_METHODS", "FamilyCell", "cell_summary", "family_cells", "family_report",
           "format_family", "load_results", "run_settings", "render_heatmap", "result_path", "run_family", "targets"]
