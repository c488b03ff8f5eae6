"""What every method of one seed shares: the partition (and its data), the backbone and its manifest.

Checks here run before any work, so that bad input is refused with a clear message (``hilora bench``
exits 2): an unknown set-up or timm model, a missing folder or checkpoint, images that do not fit the
backbone, labels beyond its classes.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hilora.options import RunOptions

# The paper's set-ups (partition fields; ``root`` comes from ``--data-root``), run on ViT-B/16 with
# rank-8 tiers. The unseen fraction (10 % of each group) is ours: the paper does not say how many.
# The paper fine-tunes ViT-B/16 pretrained on ImageNet-21k: timm's tag for those weights, so that
# ``--checkpoint pretrained`` loads them and not the untagged name's default (21k fine-tuned on 1k).
PAPER_MODEL = "vit_base_patch16_224.augreg_in21k"
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

    opts: RunOptions
    artifact: Any
    partition: Any
    train: list[Any]
    unseen: list[Any]
    data: Mapping[str, Any]
    manifest: Any

    def backbone(self) -> dict[str, Any]:
        """The federation config's ``backbone`` section."""
        return {"model": self.artifact.model, "model_kwargs": dict(self.artifact.model_kwargs),
                "sha256": self.artifact.sha256}

    def write_partition(self, folder: Path) -> Path:
        """The resolved partition (seed override, data root) as a partition file that worker
        processes read their clients from."""
        path = Path(folder) / "partition.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.partition.model_dump(mode="json"), indent=1))
        return path


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


def bench_backbone(opts: RunOptions, spec: Any, sample: Any,
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


def prepare(opts: RunOptions, say: Callable[[str], None] | None = None) -> BenchSetup:
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
    for c in clients:
        check_client_data(c.name, data[c.name], kwargs)
    backbone = build_backbone(artifact.model, artifact.model_kwargs, artifact.path)
    manifest = manifest_for_model(backbone, rank=opts.rank, alpha=opts.alpha)
    return BenchSetup(opts=opts, artifact=artifact, partition=spec, train=train, unseen=unseen, data=data,
                      manifest=manifest)


