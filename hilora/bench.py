"""``hilora bench``: HiLoRA against federated-LoRA baselines and its own ablations, in one process.

Every method is a **configuration** of one engine (``run_method``), the cascade of
``bench/cascade_library.py`` generalised to the tier policies of ``shared.config``:

    root rounds -> [probe round -> clustering -> cluster rounds -> leaf rounds] -> unseen clients

- Local work is the worker's ``worker.train.train_tier`` / ``evaluate`` on a
  ``worker.lora.TieredLoRAModel`` with ``load_tier`` / ``export_tier`` around it, as in the daemon:
  factors a tier keeps ``local`` are the client's own and are laid over the federation's version
  before it trains or predicts; ``frozen`` factors are not trained; only ``aggregate`` factors are
  uploaded (and counted in ``bytes_uploaded`` as the safetensors bodies the daemon would send).
- Server work is the coordinator's ``shared.aggregate.combine_tier_uploads`` (uploads in client
  order, weights = training sample counts) and ``shared.subspace`` / ``shared.probes`` for the
  clustering and the assignment of unseen clients.

A method is a ``MethodConfig``: the root and cluster ``TierPolicy`` (a flat baseline has no cluster
tier and spends every round on its root), the ``Schedule``, ``Training`` and ``Clustering`` of a
federation, and which clusterer runs at the root-to-cluster switch (``lsac``, ``kmeans-flat`` or
``lsac-paper``). Budgets are equal: hilora splits the rounds root / cluster / leaf, flat baselines
run them all on their global adapter; every method trains the same local epochs per round from
the same seeded initial root, on the same data and backbone. Unseen clients: a hierarchical method
probes from its final root, joins the nearest cluster and predicts with root + cluster (zero-shot);
a flat one predicts with its global adapter; then a leaf trains for ``unseen_leaf_rounds`` rounds
on top (after_leaf), the same for every method.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from shared.aggregate import combine_tier_uploads, relative_change
from shared.config import Clustering, FederationConfig, Schedule, TierPolicy, Training
from shared.manifest import FACTORS

Tensors = dict[str, np.ndarray]

CLUSTERERS = ("lsac", "kmeans-flat", "lsac-paper")
BASELINES = ("local", "fedit", "flexlora", "fedsa", "ffa")
ABLATIONS = ("no-cluster", "no-ortho", "kmeans-flat", "lsac-subspace", "lsac-update", "lsac-paper")
METHODS = ("hilora",) + BASELINES + ABLATIONS
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
}

# The paper's set-ups (partition fields; ``root`` comes from ``--data-root``), run on ViT-B/16 with
# rank-8 tiers. The unseen fraction (10 % of each group) is ours: the paper does not say how many.
PAPER_MODEL = "vit_base_patch16_224"
PAPER_RANK = 8
PAPER_PARTITIONS: dict[str, dict[str, Any]] = {
    "cifar100-scdir": {"dataset": "cifar100", "scheme": "scdir", "clients": 100, "superclass_groups": 3,
                       "dirichlet_alpha": 0.3, "image_size": 224, "unseen_fraction": 0.1},
    "cifar100-gldir": {"dataset": "cifar100", "scheme": "gldir", "clients": 100, "dirichlet_alpha": 0.3,
                       "image_size": 224, "unseen_fraction": 0.1},
    "cifar100-patho": {"dataset": "cifar100", "scheme": "patho", "clients": 100, "classes_per_client": 10,
                       "image_size": 224, "unseen_fraction": 0.1},
    "domainnet": {"dataset": "domainnet", "clients_per_domain": 15, "dirichlet_alpha": 0.6, "top_classes": 10,
                  "test_fraction": 0.2, "image_size": 224, "unseen_fraction": 0.1},
}


@dataclass
class BenchOptions:
    """Everything but the methods. The defaults are the ``quick`` preset (the demo's tuned settings)."""

    partition: str = "demo"
    partition_seed: int | None = None   # override the partition file's data seed
    seed: int = 0
    root_rounds: int = 4
    cluster_rounds: int = 3
    leaf_rounds: int = 2
    unseen_leaf_rounds: int = 2
    local_epochs: int = 2
    probe_epochs: int = 2
    rank: int = 4
    alpha: float | None = None
    lr: float = 3e-3
    head_lr: float = 3e-2
    batch_size: int = 32
    weight_decay: float = 0.0
    gamma_c: float = 0.1
    gamma_l: float = 0.1
    features: str = "update"
    k_min: int = 1
    k_max: int = 10
    knn: int = 5
    contrast: float = 1.25
    force_k: int | None = None  # every hierarchical method but no-cluster (which forces 1)
    ema: float = 0.9            # lsac-paper: EMA factor lambda of the smoothed root-stage B
    threads: int = 1           # the demo backbone is tiny: more threads only wait on each other
    device: str = "cpu"
    backbone_epochs: int = 60
    cache_dir: str | None = None
    # paper-scale runs (module ``PAPER_PARTITIONS``) and other backbones than the demo's
    paper: str | None = None          # a PAPER_PARTITIONS name: the partition, built over data_root
    data_root: str | None = None      # the data folder of a disk partition (overrides its ``root``)
    model: str | None = None          # a timm model name; None: the demo backbone (paper: ViT-B/16)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # beyond num_classes / img_size / in_chans
    checkpoint: str | None = None     # None: random init (seeded); "pretrained": timm's weights; or a file
    data_cache_bytes: int = 8 << 30   # client arrays kept in memory (least recently used are dropped)

    @property
    def total_rounds(self) -> int:
        return self.root_rounds + self.cluster_rounds + self.leaf_rounds

    @property
    def demo_backbone(self) -> bool:
        """No model and no paper set-up named: the cached demo ViT."""
        return self.model is None and self.paper is None


def preset(quick: bool) -> BenchOptions:
    """``quick``: the demo's tuned training settings (rank, learning rates, batch, 2 local and 2 probe
    epochs, 2 unseen leaf rounds) with the paper's 20 / 20 / 10 split scaled down tenfold, 2 / 2 / 1
    rounds, so that all methods run in minutes on 2 CPU cores. Otherwise the paper's 20 / 20 / 10
    rounds and 5 unseen leaf rounds, with the same training settings."""
    from hilora.demo import DemoOptions

    demo = DemoOptions()
    opts = BenchOptions(partition=demo.partition, root_rounds=2, cluster_rounds=2, leaf_rounds=1,
                        unseen_leaf_rounds=demo.unseen_leaf_rounds, local_epochs=demo.local_epochs,
                        probe_epochs=demo.probe_epochs, rank=demo.rank, lr=demo.lr, head_lr=demo.head_lr,
                        batch_size=demo.batch_size, features=demo.features)
    if not quick:
        opts = replace(opts, root_rounds=20, cluster_rounds=20, leaf_rounds=10, unseen_leaf_rounds=5)
    return opts


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
    """Method names from repeated and/or comma-separated values, in order, without repeats.
    None or empty: every method except the LSAC feature set that is the default (it is hilora)."""
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


def default_methods(opts: BenchOptions) -> list[str]:
    same_as_hilora = f"lsac-{opts.features}"
    return [m for m in METHODS if m != same_as_hilora]


# --------------------------------------------------------------------------- method configurations

@dataclass(frozen=True)
class MethodConfig:
    """One method: the parts of a ``FederationConfig`` it sets, plus the clusterer."""

    name: str
    root: TierPolicy
    cluster: TierPolicy
    leaf: TierPolicy
    schedule: Schedule
    training: Training
    clustering: Clustering
    clusterer: str = "lsac"

    @property
    def hierarchical(self) -> bool:
        return self.cluster.enabled

    def federation_config(self, backbone: dict[str, Any], manifest: Any) -> FederationConfig:
        """The same method as a coordinator federation config (the clusterer aside: the service
        runs ``lsac``)."""
        return FederationConfig(name=f"bench-{self.name}", backbone=backbone, manifest=manifest, root=self.root,
                                cluster=self.cluster, leaf=self.leaf, schedule=self.schedule, training=self.training,
                                clustering=self.clustering)

    def describe(self) -> dict[str, Any]:
        return {"root": self.root.model_dump(), "cluster": self.cluster.model_dump(),
                "schedule": self.schedule.model_dump(), "training": self.training.model_dump(),
                "clustering": self.clustering.model_dump(), "clusterer": self.clusterer,
                "summary": METHOD_SUMMARIES[self.name]}


def method_config(name: str, opts: BenchOptions) -> MethodConfig:
    """The configuration of method ``name`` under ``opts`` (see ``METHOD_SUMMARIES``)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; methods are {', '.join(METHODS)}")
    schedule = Schedule(min_clients=1, root_rounds=opts.root_rounds, cluster_rounds=opts.cluster_rounds,
                        leaf_rounds=opts.leaf_rounds, unseen_leaf_rounds=opts.unseen_leaf_rounds,
                        local_epochs=opts.local_epochs, probe_epochs=opts.probe_epochs)
    training = Training(lr=opts.lr, head_lr=opts.head_lr, weight_decay=opts.weight_decay, batch_size=opts.batch_size,
                        gamma_c=opts.gamma_c, gamma_l=opts.gamma_l, seed=opts.seed)
    clustering = Clustering(features=opts.features, k_min=opts.k_min, k_max=opts.k_max, knn=opts.knn,
                            contrast=opts.contrast, force_k=opts.force_k, seed=opts.seed)
    root, cluster, clusterer = TierPolicy(), TierPolicy(), "lsac"
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
        clusterer = "kmeans-flat"
    elif name in ("lsac-subspace", "lsac-update"):
        clustering = clustering.model_copy(update={"features": name.removeprefix("lsac-")})
    elif name == "lsac-paper":
        clusterer = "lsac-paper"
        clustering = clustering.model_copy(update={"features": "subspace", "k_min": 1})
    return MethodConfig(name=name, root=root, cluster=cluster, leaf=TierPolicy(A="local", B="local", head="local"),
                        schedule=schedule, training=training, clustering=clustering, clusterer=clusterer)


# --------------------------------------------------------------------------- shared set-up

def accuracy_stats(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, 10th percentile (the paper's worst case), minimum and count of per-client accuracies."""
    if not values:
        return {"mean": None, "p10": None, "worst": None, "n": 0}
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "p10": float(np.percentile(array, 10)), "worst": float(array.min()),
            "n": int(array.size)}


class ClientDataCache(Mapping[str, Any]):
    """Clients' arrays by name, loaded on first use and kept while they fit in ``max_bytes``
    (least recently used dropped first), so a paper-scale partition (CIFAR-100 at 224 x 224 is
    ~36 GB of float32) runs in bounded memory; the built-in partitions stay loaded."""

    def __init__(self, spec: Any, names: Sequence[str], max_bytes: int) -> None:
        self.spec, self.names, self.max_bytes = spec, list(names), int(max_bytes)
        self._held: OrderedDict[str, tuple[Any, int]] = OrderedDict()   # name -> (arrays, bytes)
        self._bytes = 0

    def __getitem__(self, name: str) -> Any:
        from worker.data import client_arrays

        if name in self._held:
            self._held.move_to_end(name)
            return self._held[name][0]
        if name not in self.names:
            raise KeyError(name)
        data = client_arrays(self.spec, name)
        size = sum(int(a.nbytes) for a in (data.x_train, data.y_train, data.x_test, data.y_test))
        while self._held and self._bytes + size > self.max_bytes:
            self._bytes -= self._held.popitem(last=False)[1][1]
        if size <= self.max_bytes:
            self._held[name] = (data, size)
            self._bytes += size
        return data

    def __iter__(self) -> Any:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class BenchSetup:
    """What every method of one seed shares: partition, data, backbone artifact and manifest."""

    opts: BenchOptions
    artifact: Any
    partition: Any
    train: list[Any]
    unseen: list[Any]
    data: Mapping[str, Any]
    manifest: Any
    weights: dict[str, float] = field(default_factory=dict)

    def new_model(self) -> Any:
        """A fresh TieredLoRAModel on the backbone (every method starts from untouched tiers)."""
        from worker.backbone import build_backbone
        from worker.lora import TieredLoRAModel

        backbone = build_backbone(self.artifact.model, self.artifact.model_kwargs, self.artifact.path)
        return TieredLoRAModel(backbone, self.manifest).to(self.opts.device)


def _data_folder(data_root: str) -> str:
    """``--data-root`` as an absolute path; ValueError if it is not a directory."""
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise ValueError(f"--data-root {data_root}: no such directory")
    return str(root.resolve())


def _checkpoint_file(checkpoint: str) -> Path:
    """``--checkpoint FILE`` as a path; ValueError if there is no such file."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise ValueError(f"--checkpoint {checkpoint}: no such file (a safetensors file, 'pretrained' or 'random')")
    return path


def paper_partition(name: str, data_root: str | None) -> Any:
    """The partition spec of a ``PAPER_PARTITIONS`` set-up over the data in ``data_root``."""
    from worker.data import parse_partition

    if name not in PAPER_PARTITIONS:
        raise ValueError(f"unknown paper set-up {name!r}; set-ups are {', '.join(PAPER_PARTITIONS)}")
    if not data_root:
        where = ("<root>/cifar-100-safetensors/{train,test}" if name.startswith("cifar100")
                 else "<root>/<domain>/<class>/*.jpg")
        raise ValueError(f"--paper {name} needs --data-root: the folder holding {where} (docs/partitions.md)")
    return parse_partition({"name": name, "root": _data_folder(data_root), **PAPER_PARTITIONS[name]},
                           f"paper set-up {name!r}")


def check_partition(partition: str, paper: str | None = None, data_root: str | None = None) -> Any:
    """Load and validate a partition (built-in name, file, or a paper set-up over ``data_root``)
    without touching its data. ``data_root`` replaces a disk partition's ``root``."""
    from worker.data import PartitionSpec, load_partition, partition_clients

    if paper is not None:
        spec = paper_partition(paper, data_root)
    else:
        spec = load_partition(partition)
        if data_root is not None:
            if isinstance(spec, PartitionSpec):
                raise ValueError(f"--data-root: partition {partition!r} is built from the offline {spec.dataset} "
                                 f"data and reads no folder")
            spec = spec.model_copy(update={"root": _data_folder(data_root)})
    clients = partition_clients(spec)
    if not any(not c.unseen for c in clients):
        raise ValueError(f"partition {spec.name!r} has no training client")
    return spec


def partition_num_classes(spec: Any) -> int:
    """How many classes the partition's labels range over (the backbone's head size)."""
    from worker.data import PartitionSpec
    from worker.datasets import imagefolder_classes

    if isinstance(spec, PartitionSpec):
        return 10
    if spec.dataset == "cifar100":
        return 100
    if spec.dataset == "domainnet":
        return int(spec.top_classes)
    return len(imagefolder_classes(spec.root))


def check_client_data(name: str, data: Any, kwargs: Mapping[str, Any] | None = None) -> None:
    """A client's arrays must fit the backbone (``kwargs``: its ``in_chans``, ``img_size`` and
    ``num_classes``; default the demo backbone's): ValueError otherwise."""
    from worker.backbone import DEMO_BACKBONE_KWARGS

    kw = dict(DEMO_BACKBONE_KWARGS if kwargs is None else kwargs)
    size = kw.get("img_size", 224)
    side = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    shape = (kw.get("in_chans", 3), *side)
    which = "the demo backbone" if kwargs is None else "the backbone"
    if tuple(data.x_train.shape[1:]) != shape or tuple(data.x_test.shape[1:]) != shape:
        raise ValueError(f"client {name!r} has images of shape {tuple(data.x_train.shape[1:])}; {which} takes "
                         f"{shape} (channels, height, width): set the partition's image_size/channels, or "
                         f"pass --model for another backbone")
    top = max(int(np.max(data.y_train, initial=0)), int(np.max(data.y_test, initial=0)))
    if top >= kw.get("num_classes", 1000):
        raise ValueError(f"client {name!r} has label {top}; {which} has {kw.get('num_classes', 1000)} classes")


def _backbone_kwargs(model_kwargs: Mapping[str, Any], spec: Any, sample: Any) -> dict[str, Any]:
    """timm kwargs sized for the partition (classes) and a client's images, plus ``model_kwargs``."""
    channels, height, width = (int(v) for v in sample.x_train.shape[1:])
    size: Any = height if height == width else [height, width]
    return {"num_classes": partition_num_classes(spec), "img_size": size, "in_chans": channels, **model_kwargs}


def check_partition_data(partition: str, paper: str | None = None, data_root: str | None = None,
                         model: str | None = None, model_kwargs: Mapping[str, Any] | None = None,
                         checkpoint: str | None = None) -> Any:
    """``check_partition`` plus one client's arrays checked against the backbone, the model name and
    the checkpoint file (cheap, before a run): the demo backbone unless ``model`` (or ``paper``)
    names another."""
    from worker.data import client_arrays, partition_clients

    if checkpoint not in (None, "pretrained"):
        _checkpoint_file(checkpoint)
    if model is not None:
        import timm

        if not timm.is_model(model):
            raise ValueError(f"--model {model!r}: timm has no such model (timm.list_models() lists them)")
    spec = check_partition(partition, paper, data_root)
    first = next(c for c in partition_clients(spec) if not c.unseen)
    data = client_arrays(spec, first.name)
    if model is None and paper is None:
        check_client_data(first.name, data)
    else:
        check_client_data(first.name, data, _backbone_kwargs(model_kwargs or {}, spec, data))
    return spec


def bench_backbone(opts: BenchOptions, spec: Any, sample: Any,
                   say: Callable[[str], None] | None = None) -> Any:
    """The backbone artifact for a run: the demo backbone (pretrained on the partition's offline
    dataset) when no model is named, else ``opts.model`` (ViT-B/16 for a paper set-up) sized for the
    partition, from ``opts.checkpoint``: a safetensors file, ``"pretrained"`` (timm's published
    weights, downloaded by timm) or None (a seeded random initialisation, e.g. to time training).
    Generated weights are cached under ``{cache}/bench-backbones/`` by a hash of what made them."""
    import hashlib

    import torch

    from worker.backbone import (
        BackboneArtifact,
        checkpoint_sha256,
        create_model,
        default_cache_dir,
        demo_backbone_dataset,
        pretrain_demo_backbone,
    )
    from worker.files import atomic_write

    if opts.demo_backbone:
        return pretrain_demo_backbone(cache_dir=opts.cache_dir, epochs=opts.backbone_epochs,
                                      progress=(lambda m: say(f"backbone: {m}")) if say else None,
                                      dataset=demo_backbone_dataset(spec))
    model = opts.model or PAPER_MODEL
    kwargs = _backbone_kwargs(opts.model_kwargs, spec, sample)
    checkpoint = opts.checkpoint
    if checkpoint not in (None, "pretrained"):
        path = _checkpoint_file(checkpoint)
        return BackboneArtifact(path=path, sha256=checkpoint_sha256(path), model=model, model_kwargs=kwargs)
    recipe = {"model": model, "model_kwargs": kwargs, "weights": checkpoint or "random", "seed": 0}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(opts.cache_dir) if opts.cache_dir is not None else default_cache_dir()
    path = cache / "bench-backbones" / f"{key}.safetensors"
    if not path.is_file():
        from safetensors.torch import save

        if checkpoint == "pretrained":
            import timm

            if say is not None:
                say(f"backbone: timm's pretrained {model} (timm downloads it unless cached)")
            try:
                module = timm.create_model(model, pretrained=True, **kwargs)
            except Exception as exc:  # noqa: BLE001 - network, hub or unknown-weights errors alike
                raise ValueError(f"--checkpoint pretrained: timm could not load {model}'s weights: {exc}") from exc
        else:
            if say is not None:
                say(f"backbone: {model}, randomly initialised (seed 0)")
            torch.manual_seed(0)
            module = create_model(model, kwargs)
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        atomic_write(path, save(state, metadata={"recipe": json.dumps(recipe, sort_keys=True)}))
    return BackboneArtifact(path=path, sha256=checkpoint_sha256(path), model=model, model_kwargs=kwargs)


def prepare(opts: BenchOptions, say: Callable[[str], None] | None = None) -> BenchSetup:
    """Backbone, partition data and manifest for one seed's runs.

    Raises:
        ValueError: the partition or the data cannot be loaded, or its images do not fit the
            backbone, or the backbone cannot be built from its checkpoint.
    """
    import torch

    from worker.backbone import build_backbone, manifest_for_model
    from worker.data import partition_clients

    torch.set_num_threads(max(1, opts.threads))
    spec = check_partition(opts.partition, opts.paper, opts.data_root)
    if opts.partition_seed is not None:
        spec = spec.model_copy(update={"seed": opts.partition_seed})
    clients = partition_clients(spec)
    train = sorted((c for c in clients if not c.unseen), key=lambda c: c.name)
    unseen = sorted((c for c in clients if c.unseen), key=lambda c: c.name)
    data = ClientDataCache(spec, [c.name for c in clients], opts.data_cache_bytes)
    artifact = bench_backbone(opts, spec, data[train[0].name], say)
    kwargs = None if opts.demo_backbone else artifact.model_kwargs
    weights = {}
    for c in clients:
        arrays = data[c.name]
        check_client_data(c.name, arrays, kwargs)
        weights[c.name] = float(len(arrays.y_train))
    backbone = build_backbone(artifact.model, artifact.model_kwargs, artifact.path)
    manifest = manifest_for_model(backbone, rank=opts.rank, alpha=opts.alpha)
    return BenchSetup(opts=opts, artifact=artifact, partition=spec, train=train, unseen=unseen, data=data,
                      manifest=manifest, weights=weights)


# --------------------------------------------------------------------------- the engine

def _packed_size(tensors: Tensors) -> int:
    from shared.tensors import pack_tensors

    return len(pack_tensors(tensors)) if tensors else 0


def _normalised_b(manifest: Any, tensors: Tensors) -> dict[str, np.ndarray]:
    """Per target, B scaled to unit Frobenius norm (lsac-paper's input)."""
    out = {}
    for t in manifest.targets:
        b = np.asarray(tensors[f"{t.name}.lora_B"], dtype=np.float64)
        norm = float(np.linalg.norm(b))
        out[t.name] = b / norm if norm > 0 else b
    return out


def run_method(setup: BenchSetup, name: str, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one method on one seed's set-up and return its numbers (module docstring)."""
    from sklearn.metrics import adjusted_rand_score

    from shared.probes import factor_pairs, probe_distance
    from shared.subspace import (
        assign_to_clusters,
        gram_kmeans_labels,
        lsac,
        lsac_paper,
        subspace_distance,
        top_left_singular_vectors,
        update_gram,
    )
    from worker.daemon import task_seed
    from worker.train import evaluate, train_tier

    opts, manifest = setup.opts, setup.manifest
    cfg = method_config(name, opts)
    sched, training = cfg.schedule, cfg.training
    seed = opts.seed
    model = setup.new_model()
    device = opts.device
    t0 = time.monotonic()
    mark = t0
    seconds: dict[str, float] = {}
    uploaded = 0
    curve: list[dict[str, Any]] = []
    local: dict[str, dict[str, Tensors]] = {c.name: {} for c in setup.train}   # client -> tier -> own factors

    def log(message: str) -> None:
        if say is not None:
            say(f"[{time.monotonic() - t0:6.1f}s] {name}: {message}")

    def lap(stage: str) -> None:
        nonlocal mark
        now = time.monotonic()
        seconds[stage] = now - mark
        mark = now

    def fit(tier: str, client: str, epochs: int, task_seed_value: int, trainable: Sequence[str]) -> None:
        train_tier(model, tier, setup.data[client], epochs=epochs, lr=training.lr, head_lr=training.head_lr,
                   batch_size=training.batch_size, weight_decay=training.weight_decay, gamma_c=training.gamma_c,
                   gamma_l=training.gamma_l, seed=task_seed_value, trainable=tuple(trainable), device=device)

    def load(tier: str, version: Tensors, client: str | None) -> None:
        """The federation's version of a tier with the client's own (local) factors laid over it."""
        model.load_tier(tier, version)
        own = local.get(client, {}).get(tier) if client is not None else None
        if own:
            model.load_tier(tier, own, partial=True)

    def accuracy(client: str, tiers: tuple[str, ...]) -> float:
        d = setup.data[client]
        return evaluate(model, d.x_test, d.y_test, tiers, device)

    def record(stage: str, number: int, values: Sequence[float]) -> None:
        stats = accuracy_stats(values)
        curve.append({"round": len(curve) + 1, "stage": stage, "stage_round": number,
                      "mean": stats["mean"], "p10": stats["p10"]})

    def federated_round(tier: str, policy: TierPolicy, version: Tensors, members: Sequence[Any], stage: str,
                        rnd: int, before_train: Callable[[str], None] | None = None,
                        after_train: Callable[[str], None] | None = None) -> Tensors:
        """One round of a tier over ``members``: local training, uploads, the coordinator's combine."""
        nonlocal uploaded
        keep = tuple(f for f in FACTORS if getattr(policy, f) == "local")
        send = policy.uploaded_factors()
        uploads, weights = [], []
        for c in members:
            if before_train is not None:
                before_train(c.name)
            load(tier, version, c.name)
            fit(tier, c.name, sched.local_epochs, task_seed(seed, stage, rnd, c.name), policy.trained_factors())
            if after_train is not None:
                after_train(c.name)
            if keep:
                local[c.name][tier] = model.export_tier(tier, keep)
            upload = model.export_tier(tier, send) if send else {}
            uploaded += _packed_size(upload)
            uploads.append(upload)
            weights.append(setup.weights[c.name])
        return combine_tier_uploads(manifest, tier, policy, version, uploads, weights)

    # ------------------------------------------------------------ root stage (all rounds of a flat method)
    model.init_tier("root", seed=task_seed(seed, "root", "init"))
    root = model.export_tier("root")
    rhos: list[float | None] = []
    ema: dict[str, dict[str, np.ndarray]] = {}

    def track_ema(client: str) -> None:   # lsac-paper: EMA of the unit-norm local root-stage B
        b = _normalised_b(manifest, model.export_tier("root", ("B",)))
        previous = ema.get(client)
        ema[client] = b if previous is None else {k: opts.ema * previous[k] + (1 - opts.ema) * v
                                                  for k, v in b.items()}

    for rnd in range(sched.root_rounds):
        new_root = federated_round("root", cfg.root, root, setup.train, "root", rnd,
                                   after_train=track_ema if cfg.clusterer == "lsac-paper" else None)
        old_pairs = factor_pairs(manifest, root)
        starts_at_zero = all(not np.any(b) or not np.any(a) for b, a in old_pairs.values())
        rhos.append(None if starts_at_zero else relative_change(factor_pairs(manifest, new_root), old_pairs))
        root = new_root
        accs = []
        for c in setup.train:
            load("root", root, c.name)
            accs.append(accuracy(c.name, ("root",)))
        record("root", rnd + 1, accs)
        log(f"root round {rnd + 1}/{sched.root_rounds}: mean {100 * np.mean(accs):.1f}%")
    acc_root = {}
    for c in setup.train:
        load("root", root, c.name)
        acc_root[c.name] = accuracy(c.name, ("root",))
    for c in setup.unseen:
        model.load_tier("root", root)
        acc_root[c.name] = accuracy(c.name, ("root",))
    lap("root")

    result: dict[str, Any] = {"method": name, "seed": seed, "config": cfg.describe(), "root_rho": rhos}
    labels: dict[str, int] = {}
    cluster_state: dict[int, Tensors] = {}
    acc_cluster: dict[str, float] = {}
    acc_leaf: dict[str, float] = {}
    probes: list[Tensors] = []
    clustering_out: dict[str, Any] | None = None
    member_bases: list[dict[str, np.ndarray]] = []

    def probe(client: str) -> Tensors:
        """E probe epochs from the final root alone (no local factors), whole root tier uploaded."""
        model.load_tier("root", root)
        fit("root", client, sched.probe_epochs, task_seed(seed, "probe", client), cfg.root.trained_factors())
        return model.export_tier("root")

    def subspace_bases_of(b_by_target: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        r = manifest.tiers["root"].rank
        return {k: top_left_singular_vectors(v, r) for k, v in b_by_target.items()}

    if cfg.hierarchical:
        # -------------------------------------------------------- probe round + clustering
        probes = [probe(c.name) for c in setup.train]
        uploaded += sum(_packed_size(p) for p in probes)
        model.load_tier("root", root)
        features = cfg.clustering.features
        cl = cfg.clustering
        if cfg.clusterer == "lsac-paper":
            member_bases = [subspace_bases_of(ema[c.name]) for c in setup.train]
            distance = subspace_distance(member_bases)
            found = lsac_paper(distance, k_min=cl.k_min, k_max=cl.k_max, seed=cl.seed)
            assignment = found.labels
        else:
            distance = probe_distance(manifest, features, root, probes)
            found = lsac(distance, k_min=cl.k_min, k_max=cl.k_max, knn=cl.knn, contrast=cl.contrast,
                         force_k=cl.force_k, seed=cl.seed)
            assignment = found.labels
            if cfg.clusterer == "kmeans-flat":
                root_pairs = factor_pairs(manifest, root)
                gram = update_gram([factor_pairs(manifest, p) for p in probes], root_pairs)
                assignment = gram_kmeans_labels(gram, found.k, seed=cl.seed)
        labels = {c.name: int(label) for c, label in zip(setup.train, assignment)}
        groups = [c.group for c in setup.train]
        ari = float(adjusted_rand_score(groups, [labels[c.name] for c in setup.train]))
        clustering_out = {"k": len(set(labels.values())), "lsac_k": int(found.k), "ari": ari,
                          "planted_groups": len(set(groups)), "clusterer": cfg.clusterer,
                          "features": features, "contrast_ratio": found.contrast_ratio,
                          "eigengaps": [float(x) for x in found.eigengaps],
                          "clients": [c.name for c in setup.train], "groups": groups,
                          "labels": [labels[c.name] for c in setup.train],
                          "affinity": np.asarray(found.affinity, dtype=np.float64).round(6).tolist()}
        log(f"clustering ({cfg.clusterer}, {features}): K={clustering_out['k']} ARI={ari:.3f}")
        lap("probe_clustering")

        # -------------------------------------------------------- cluster stage (root frozen)
        cluster_ids = sorted(set(labels.values()))
        for label in cluster_ids:
            model.init_tier("cluster", seed=task_seed(seed, "cluster", "init", label), head_from="root")
            cluster_state[label] = model.export_tier("cluster")
        for rnd in range(sched.cluster_rounds):
            for label in cluster_ids:
                members = [c for c in setup.train if labels[c.name] == label]
                cluster_state[label] = federated_round(
                    "cluster", cfg.cluster, cluster_state[label], members, "cluster", rnd,
                    before_train=lambda client: load("root", root, client))
            accs = []
            for c in setup.train:
                load("root", root, c.name)
                load("cluster", cluster_state[labels[c.name]], c.name)
                accs.append(accuracy(c.name, ("root", "cluster")))
            record("cluster", rnd + 1, accs)
            log(f"cluster round {rnd + 1}/{sched.cluster_rounds}: mean {100 * np.mean(accs):.1f}%")
        for c in setup.train:
            load("root", root, c.name)
            load("cluster", cluster_state[labels[c.name]], c.name)
            acc_cluster[c.name] = accuracy(c.name, ("root", "cluster"))
        lap("cluster")

    # ------------------------------------------------------------ leaf (never uploaded)
    def train_leaf(client: str, label: int | None, rounds: int, trained_client: bool) -> list[float]:
        """A leaf on top of root (+ the client's cluster); accuracy after each of its rounds."""
        owner = client if trained_client else None
        load("root", root, owner)
        upper = ("root",)
        if label is not None:
            load("cluster", cluster_state[label], owner)
            upper = ("root", "cluster")
        model.init_tier("leaf", seed=task_seed(seed, "leaf", "init", client), head_from=upper[-1])
        accs = []
        for rnd in range(rounds):
            fit("leaf", client, sched.local_epochs, task_seed(seed, "leaf", rnd, client), cfg.leaf.trained_factors())
            accs.append(accuracy(client, upper + ("leaf",)))
        return accs

    if cfg.hierarchical and sched.leaf_rounds > 0:
        per_client = {c.name: train_leaf(c.name, labels[c.name], sched.leaf_rounds, True) for c in setup.train}
        for rnd in range(sched.leaf_rounds):
            record("leaf", rnd + 1, [per_client[c.name][rnd] for c in setup.train])
        acc_leaf = {k: v[-1] for k, v in per_client.items()}
        log(f"leaf stage: mean {100 * np.mean(list(acc_leaf.values())):.1f}%")
        lap("leaf")

    # ------------------------------------------------------------ unseen clients
    unseen_rows: list[dict[str, Any]] = []
    unseen_uploaded = 0
    if setup.unseen:
        assigned: list[int | None] = [None] * len(setup.unseen)
        if cfg.hierarchical:
            unseen_probes = [probe(c.name) for c in setup.unseen]
            unseen_uploaded = sum(_packed_size(p) for p in unseen_probes)
            model.load_tier("root", root)
            if cfg.clusterer == "lsac-paper":
                bases = member_bases + [subspace_bases_of(_normalised_b(manifest, p)) for p in unseen_probes]
                similarity = 1.0 - subspace_distance(bases)
            else:
                similarity = 1.0 - probe_distance(manifest, cfg.clustering.features, root, probes + unseen_probes)
            n = len(setup.train)
            assigned = [int(x) for x in assign_to_clusters(similarity[n:, :n],
                                                           np.array([labels[c.name] for c in setup.train]))]
        majority: dict[str, int] = {}
        if cfg.hierarchical:
            for group in {c.group for c in setup.train}:
                member_labels = [labels[c.name] for c in setup.train if c.group == group]
                majority[group] = max(set(member_labels), key=member_labels.count)
        for c, label in zip(setup.unseen, assigned):
            model.load_tier("root", root)
            tiers: tuple[str, ...] = ("root",)
            if label is not None:
                model.load_tier("cluster", cluster_state[label])
                tiers = ("root", "cluster")
            zero_shot = accuracy(c.name, tiers)
            leaf_accs = train_leaf(c.name, label, sched.unseen_leaf_rounds, False)
            unseen_rows.append({"name": c.name, "group": c.group, "cluster": label,
                                "correct_cluster": (majority.get(c.group) == label) if label is not None else None,
                                "acc_root": acc_root[c.name], "zero_shot": zero_shot,
                                "after_leaf": leaf_accs[-1] if leaf_accs else zero_shot})
        log(f"unseen clients: zero-shot {100 * np.mean([r['zero_shot'] for r in unseen_rows]):.1f}%, "
            f"after leaf {100 * np.mean([r['after_leaf'] for r in unseen_rows]):.1f}%")
    lap("unseen")

    # ------------------------------------------------------------ numbers
    if cfg.hierarchical:
        final = acc_leaf if sched.leaf_rounds > 0 else acc_cluster
    else:
        final = {c.name: acc_root[c.name] for c in setup.train}
    rows = []
    for c in setup.train:
        row = {"name": c.name, "group": c.group, "acc_root": acc_root[c.name], "final": final[c.name]}
        if cfg.hierarchical:
            row.update(cluster=labels[c.name], acc_cluster=acc_cluster[c.name])
            if c.name in acc_leaf:
                row["acc_leaf"] = acc_leaf[c.name]
        rows.append(row)
    correct = [r["correct_cluster"] for r in unseen_rows if r["correct_cluster"] is not None]
    result.update({
        "final": accuracy_stats([final[c.name] for c in setup.train]),
        "tiers": {"root": accuracy_stats([acc_root[c.name] for c in setup.train]),
                  **({"cluster": accuracy_stats(list(acc_cluster.values())),
                      "leaf": accuracy_stats(list(acc_leaf.values()))} if cfg.hierarchical else {})},
        "clustering": clustering_out,
        "unseen": {"root": accuracy_stats([r["acc_root"] for r in unseen_rows]),
                   "zero_shot": accuracy_stats([r["zero_shot"] for r in unseen_rows]),
                   "after_leaf": accuracy_stats([r["after_leaf"] for r in unseen_rows]),
                   "assigned_to_majority_cluster": float(np.mean(correct)) if correct else None,
                   "bytes_uploaded": unseen_uploaded},
        "rounds": curve,
        "bytes_uploaded": uploaded,
        "clients": rows,
        "unseen_clients": unseen_rows,
        "seconds": {**seconds, "total": time.monotonic() - t0},
    })
    return result


# --------------------------------------------------------------------------- many methods and seeds

def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return float(np.mean(present)), (float(np.std(present, ddof=1)) if len(present) > 1 else 0.0)


def summarize(runs: dict[int, dict[str, dict[str, Any]]], opts: BenchOptions, methods: Sequence[str],
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


def run_bench(opts: BenchOptions, methods: Sequence[str], seeds: Sequence[int],
              say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every method for every seed (each seed shares one set-up), then ``summarize``."""
    if not methods:
        raise ValueError("no method to run")
    parse_methods(methods)
    runs: dict[int, dict[str, dict[str, Any]]] = {}
    setup = None
    for seed in seeds:
        seed_opts = replace(opts, seed=int(seed))
        setup = prepare(seed_opts, say) if setup is None else replace(setup, opts=seed_opts)
        if say is not None:
            say(f"seed {seed}: partition {setup.partition.name}: {len(setup.train)} training clients, "
                f"{len(setup.unseen)} unseen; rounds {opts.root_rounds}/{opts.cluster_rounds}/{opts.leaf_rounds}")
        runs[int(seed)] = {m: run_method(setup, m, say) for m in methods}
    assert setup is not None
    from worker.backbone import demo_backbone_dataset

    if opts.demo_backbone:
        weights = f"demo-{demo_backbone_dataset(setup.partition)}"
    else:
        weights = opts.checkpoint or "random"
    report = summarize(runs, opts, methods, setup.artifact.sha256, setup.partition.name)
    report["backbone"] = {"model": setup.artifact.model, "model_kwargs": dict(setup.artifact.model_kwargs),
                          "sha256": setup.artifact.sha256, "weights": weights, "rank": opts.rank}
    return report


# --------------------------------------------------------------------------- output

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


def render_plots(report: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes by file name: accuracy per method (mean, p10 marked), accuracy per round per method
    and, when hilora ran, its per-tier accuracy and its LSAC affinity ordered by cluster (first seed)."""
    import matplotlib

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


def write_outputs(report: dict[str, Any], report_path: str | os.PathLike | None,
                  plots_dir: str | os.PathLike | None) -> list[Path]:
    """Render everything first, then write (the report and each PNG atomically)."""
    from worker.files import atomic_write

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
