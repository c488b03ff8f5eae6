"""PNG plots of a bench report (matplotlib, imported only when plots are asked for)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def render_plots(report: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes by file name: accuracy per method (mean, p10 marked), accuracy per round per method
    and, when hilora ran, its per-tier accuracy and its LSAC affinity ordered by cluster (first seed)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ValueError("--plots needs matplotlib: pip install 'hilora[bench]'") from exc

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    def png(fig: Any) -> bytes:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return buffer.getvalue()

    methods = report["methods"]
    names = list(methods)
    out: dict[str, bytes] = {}
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(names) + 2), 4))
    x = np.arange(len(names))
    ax.bar(x, [100 * (methods[n]["mean"] or 0) for n in names], color="#4c72b0", label="mean")
    ax.scatter(x, [100 * (methods[n]["p10"] or 0) for n in names], color="#c44e52", marker="_", s=400, zorder=3,
               label="10th percentile")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylabel("client test accuracy %")
    ax.set_ylim(0, 100)
    ax.set_title(f"{report['partition']}: accuracy per method")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    out["accuracy_by_method.png"] = png(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for n in names:
        rounds = methods[n]["rounds"]
        ax.plot([r["round"] for r in rounds], [100 * r["mean"] for r in rounds], marker="o", ms=3, label=n)
    from matplotlib.ticker import MaxNLocator

    r = report["rounds"]
    for boundary in (r["root"] + 0.5, r["root"] + r["cluster"] + 0.5):
        if boundary < r["total"]:
            ax.axvline(boundary, color="grey", ls=":", lw=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (dotted: hilora's root | cluster | leaf stages)")
    ax.set_ylabel("mean client accuracy %")
    ax.set_title("accuracy per round")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    out["accuracy_by_round.png"] = png(fig)

    if "hilora" in report:
        tiers = report["hilora"]["tiers"]
        fig, ax = plt.subplots(figsize=(4.5, 4))
        labels = ["root", "+cluster", "+leaf"]
        keys = ["root", "cluster", "leaf"]
        x = np.arange(3)
        ax.bar(x - 0.2, [100 * (tiers[k]["mean"] or 0) for k in keys], width=0.4, label="mean")
        ax.bar(x + 0.2, [100 * (tiers[k]["p10"] or 0) for k in keys], width=0.4, label="10th percentile")
        ax.set_xticks(x, labels)
        ax.set_ylim(0, 100)
        ax.set_ylabel("client test accuracy %")
        ax.set_title("hilora: accuracy per tier")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        out["hilora_tiers.png"] = png(fig)

        run = next(r for r in report["runs"] if r["method"] == "hilora")
        c = run["clustering"]
        order = sorted(range(len(c["labels"])), key=lambda i: (c["labels"][i], c["groups"][i], c["clients"][i]))
        affinity = np.asarray(c["affinity"])[np.ix_(order, order)]
        fig, ax = plt.subplots(figsize=(5.5, 5))
        image = ax.imshow(affinity, cmap="viridis")
        fig.colorbar(image, ax=ax, shrink=0.8)
        ticks = [f"{c['groups'][i]} [{c['labels'][i]}]" for i in order]
        ax.set_xticks(range(len(order)), ticks, rotation=90, fontsize=6)
        ax.set_yticks(range(len(order)), ticks, fontsize=6)
        bounds = [i + 0.5 for i in range(len(order) - 1) if c["labels"][order[i]] != c["labels"][order[i + 1]]]
        for b in bounds:
            ax.axhline(b, color="white", lw=1)
            ax.axvline(b, color="white", lw=1)
        ax.set_title(f"LSAC affinity by cluster (seed {run['seed']}, K = {c['k']}, ARI = {c['ari']:.2f})")
        out["lsac_affinity.png"] = png(fig)
    return out


