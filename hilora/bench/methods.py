"""The methods ``hilora bench`` compares, each a federation configuration the service runs.

HiLoRA, five federated-LoRA baselines and six ablations differ only in their ``FederationConfig``:
the root and cluster ``TierPolicy`` (a flat baseline has no cluster tier and spends every round on
its root), the ``Schedule``, ``Training`` and ``Clustering`` (``Clustering.algorithm`` picks the
clusterer: ``lsac``, ``kmeans-flat`` or ``lsac-paper``). Nothing here trains, aggregates or
clusters: the coordinator and the workers do, exactly as in a real federation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from hilora.options import RunOptions
from shared.config import Backbone, Clustering, FederationConfig, Schedule, TierPolicy, Training

BASELINES = ("local", "fedit", "flexlora", "fedsa", "ffa")
ABLATIONS = ("no-cluster", "no-ortho", "kmeans-flat", "lsac-subspace", "lsac-update", "lsac-paper")
REFERENCES = ("oracle",)   # not run by default: asked for with -m
METHODS = ("hilora",) + BASELINES + ABLATIONS + REFERENCES
METHOD_SUMMARIES = {
    "hilora": "root, probe + LSAC, cluster, leaf (method.md)",
    "local": "Local-LoRA: root kept local (A, B, head), nothing uploaded",
    "fedit": "FedIT: one global LoRA, A and B averaged separately",
    "flexlora": "FlexLoRA: one global LoRA, product space + SVD",
    "fedsa": "FedSA-LoRA: A averaged, B kept local",
    "ffa": "FFA-LoRA: A frozen at its initialisation, B averaged",
    "no-cluster": "hilora with K forced to 1",
    "no-ortho": "hilora with gamma_c = gamma_l = 0",
    "kmeans-flat": "hilora, k-means on the flattened B A probe updates with LSAC's K",
    "lsac-subspace": "hilora with the subspace feature set",
    "lsac-update": "hilora with the update feature set",
    "lsac-paper": "hilora, LSAC as the paper writes it: EMA of unit-norm root-stage B, median sigma",
    "oracle": "hilora with the partition's planted groups as its clusters (clustering.algorithm manual)",
}


PRESETS = ("quick", "standard", "full")


def preset(level: bool | str) -> RunOptions:
    """The training settings of every preset are the demo's tuned ones (rank, learning rates, batch,
    2 local and 2 probe epochs); they differ in rounds (root / cluster / leaf, unseen leaf):

    - ``quick`` (or True): the paper's 20 / 20 / 10 split scaled down tenfold, 2 / 2 / 1, 2 unseen
      leaf rounds, so that all methods run in minutes on 2 CPU cores;
    - ``standard``: 6 / 6 / 3, 2 unseen leaf rounds: every tier has converged on the demo ViT
      (docs/benchmarks.md, "The partition family", shows the per-round curves), about a minute per
      method on a partition of ~2,500 training images on one core;
    - ``full`` (or False): the paper's 20 / 20 / 10 and 5 unseen leaf rounds.
    """
    level = {True: "quick", False: "full"}.get(level, level) if isinstance(level, bool) else level
    if level not in PRESETS:
        raise ValueError(f"unknown preset {level!r}; presets are {', '.join(PRESETS)}")
    rounds = {"quick": (2, 2, 1, 2), "standard": (6, 6, 3, 2), "full": (20, 20, 10, 5)}[level]
    return replace(RunOptions(), root_rounds=rounds[0], cluster_rounds=rounds[1], leaf_rounds=rounds[2],
                   unseen_leaf_rounds=rounds[3])


def parse_rounds(text: str) -> tuple[int, int, int]:
    """``"R/C/L"`` -> (root, cluster, leaf) rounds; R >= 1, C and L >= 0. ValueError otherwise."""
    parts = text.strip().split("/")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--rounds must be R/C/L with three non-negative integers (e.g. 4/3/2), got {text!r}")
    root, cluster, leaf = (int(p) for p in parts)
    if root < 1:
        raise ValueError(f"--rounds: the root stage needs at least one round, got {text!r}")
    return root, cluster, leaf


def parse_methods(values: Sequence[str] | None) -> list[str]:
    """Method names from repeated and/or comma-separated values, in order, without repeats."""
    names: list[str] = []
    for value in values or ():
        for name in value.split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; methods are {', '.join(METHODS)}")
    return names


def default_methods(opts: RunOptions) -> list[str]:
    """Every method except the LSAC feature set that hilora already uses and the references
    (``oracle``), which run when asked for."""
    same_as_hilora = f"lsac-{opts.features}"
    return [m for m in METHODS if m != same_as_hilora and m not in REFERENCES]


@dataclass(frozen=True)
class MethodConfig:
    """One method: the parts of a ``FederationConfig`` it sets."""

    name: str
    root: TierPolicy
    cluster: TierPolicy
    leaf: TierPolicy
    schedule: Schedule
    training: Training
    clustering: Clustering

    @property
    def hierarchical(self) -> bool:
        return self.cluster.enabled

    def federation_config(self, backbone: Backbone | dict[str, Any], manifest: Any, name: str | None = None,
                          min_clients: int | None = None) -> FederationConfig:
        """The method as the coordinator's federation config. ``min_clients``: training starts once
        that many clients registered (the bench: all its training clients)."""
        schedule = self.schedule if min_clients is None else self.schedule.model_copy(
            update={"min_clients": int(min_clients)})
        return FederationConfig(name=name or f"bench-{self.name}", backbone=backbone, manifest=manifest,
                                root=self.root, cluster=self.cluster, leaf=self.leaf, schedule=schedule,
                                training=self.training, clustering=self.clustering)

    def describe(self) -> dict[str, Any]:
        return {"root": self.root.model_dump(), "cluster": self.cluster.model_dump(),
                "schedule": self.schedule.model_dump(), "training": self.training.model_dump(),
                "clustering": self.clustering.model_dump(), "clusterer": self.clustering.algorithm,
                "summary": METHOD_SUMMARIES[self.name]}


def planted_assignment(groups: Mapping[str, str]) -> dict[str, int]:
    """The planted groups as a manual clustering: client name -> the index of its group among the
    group names in sorted order."""
    index = {g: i for i, g in enumerate(sorted(set(groups.values())))}
    return {name: index[g] for name, g in sorted(groups.items())}


def method_config(name: str, opts: RunOptions, groups: Mapping[str, str] | None = None) -> MethodConfig:
    """The configuration of method ``name`` under ``opts`` (see ``METHOD_SUMMARIES``). ``groups``
    (client name -> planted group, training and unseen clients) is what ``oracle`` clusters by."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; methods are {', '.join(METHODS)}")
    if name == "oracle" and not groups:
        raise ValueError("the oracle method needs the partition's planted groups")
    schedule = Schedule(min_clients=1, root_rounds=opts.root_rounds, cluster_rounds=opts.cluster_rounds,
                        leaf_rounds=opts.leaf_rounds, unseen_leaf_rounds=opts.unseen_leaf_rounds,
                        local_epochs=opts.local_epochs, probe_epochs=opts.probe_epochs,
                        lease_seconds=600.0, retry_after_seconds=0.1)
    training = Training(lr=opts.lr, head_lr=opts.head_lr, weight_decay=opts.weight_decay, batch_size=opts.batch_size,
                        gamma_c=opts.gamma_c, gamma_l=opts.gamma_l, seed=opts.seed,
                        validation_fraction=opts.validation_fraction, leaf_lr_scale=opts.leaf_lr_scale,
                        leaf_bias_fit=opts.leaf_bias_fit, leaf_bias_fit_skewed=opts.leaf_bias_fit_skewed,
                        leaf_mix=opts.leaf_mix, alone_epochs=opts.alone_epochs)
    clustering = Clustering(features=opts.features, k_min=opts.k_min, k_max=opts.k_max, knn=opts.knn,
                            contrast=opts.contrast, force_k=opts.force_k, seed=opts.seed, ema=opts.ema,
                            probe_loss=opts.probe_loss, probe_steps=opts.probe_steps, head_weight=opts.head_weight,
                            classwise_weight=opts.classwise_weight,
                            k_rule=opts.k_rule, min_silhouette=opts.min_silhouette,
                            silhouette_tolerance=opts.silhouette_tolerance, partitions=opts.partitions,
                            refine_rounds=min(opts.refine_rounds, opts.cluster_rounds), refine_margin=opts.refine_margin,
                            refine_new_cluster=opts.refine_new_cluster, onboard=opts.onboard,
                            skip_single_cluster=opts.skip_single_cluster)
    root, cluster = TierPolicy(), TierPolicy()
    if name in BASELINES:
        root = {"local": TierPolicy(A="local", B="local", head="local"),
                "fedit": TierPolicy(aggregation="factor_avg"),
                "flexlora": TierPolicy(aggregation="product_svd"),
                "fedsa": TierPolicy(B="local", aggregation="factor_avg"),
                "ffa": TierPolicy(A="frozen", aggregation="factor_avg")}[name]
        cluster = TierPolicy(enabled=False)
        # equal budget: every round on the one global adapter, no leaf for the training clients
        schedule = schedule.model_copy(update={"root_rounds": opts.total_rounds, "cluster_rounds": 0,
                                               "leaf_rounds": 0})
    elif name == "no-cluster":
        clustering = clustering.model_copy(update={"force_k": 1})
    elif name == "no-ortho":
        training = training.model_copy(update={"gamma_c": 0.0, "gamma_l": 0.0})
    elif name == "kmeans-flat":
        clustering = clustering.model_copy(update={"algorithm": "kmeans-flat"})
    elif name in ("lsac-subspace", "lsac-update"):
        clustering = clustering.model_copy(update={"features": name.removeprefix("lsac-")})
    elif name == "lsac-paper":
        clustering = clustering.model_copy(update={"algorithm": "lsac-paper", "features": "subspace", "k_min": 1})
    elif name == "oracle":  # the planted groups stay as they are: no refinement
        clustering = Clustering.model_validate({**clustering.model_dump(), "algorithm": "manual",
                                                "assignment": planted_assignment(groups or {}), "refine_rounds": 0})
    robust = {"clip_relative": opts.clip_relative, "max_weight_ratio": opts.max_weight_ratio}
    root, cluster = root.model_copy(update=robust), cluster.model_copy(update=robust)
    leaf_lora = "frozen" if opts.leaf == "head" else "local"
    return MethodConfig(name=name, root=root, cluster=cluster, leaf=TierPolicy(A=leaf_lora, B=leaf_lora, head="local"),
                        schedule=schedule, training=training, clustering=clustering)
