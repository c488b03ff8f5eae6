"""Offline client data: partition files over scikit-learn's digits, with latent groups.

A **partition file** (JSON) says how many clients there are, which latent group each belongs to,
and how each group's images and labels are transformed::

    {
      "name": "demo", "dataset": "digits", "seed": 0,
      "train_per_client": 120, "test_per_client": 40,
      "dirichlet_alpha": 0.5,          # label skew within a group; null = no skew
      "unseen_fraction": 0.2,          # held out per group as unseen (late) clients
      "groups": [
        {"name": "upright", "clients": 6, "transforms": []},
        {"name": "permuted", "clients": 6,
         "transforms": [{"kind": "permute_labels", "seed": 1}]},
        {"name": "inverted", "clients": 6, "transforms": [{"kind": "invert"}]}
      ]
    }

Clients are named ``{group}-{i:02d}``; in each group the last ``round(unseen_fraction * clients)``
clients are the unseen ones.

The 1,797 digits (8 x 8, upsampled to 16 x 16 by pixel repetition, scaled to [0, 1]) are split
once, with a fixed seed and stratified by class, into three disjoint pools:

- ``pretrain`` (600 images, upright): only for pretraining the demo backbone;
- ``test`` (400 images): clients' test samples come from here only;
- ``train`` (the remaining 797): clients' training samples (pools overlap across clients).

Each client draws class proportions ``p ~ Dirichlet(alpha)`` (uniform without skew) from a seed
derived from the partition seed and its name, allocates its train and test counts to classes by
the same proportions, and samples the images of each class without replacement from the pool
(with replacement only when a class needs more images than the pool holds). Everything is a
deterministic function of (partition spec, client name).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

NUM_CLASSES = 10
IMAGE_SIZE = 16
DIGITS_SPLIT_SEED = 20260101
PRETRAIN_POOL_SIZE = 600
TEST_POOL_SIZE = 400
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
    """One latent group: a number of clients sharing the same transforms (applied in order)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=_NAME_PATTERN)
    clients: int = Field(ge=1, le=1000)
    transforms: list[Transform] = Field(default_factory=list)


class PartitionSpec(BaseModel):
    """A validated partition file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    dataset: Literal["digits"] = "digits"
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


@dataclass(frozen=True)
class ClientInfo:
    """A client of a partition: its name, its latent group and whether it is held out (unseen)."""

    name: str
    group: str
    unseen: bool


@dataclass(frozen=True)
class ClientData:
    """One client's arrays: images (N, 1, 16, 16) float32 in [0, 1], labels (N,) int64.

    ``train_indices`` / ``test_indices`` are the indices into ``load_digits()`` of each sample.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_indices: np.ndarray
    test_indices: np.ndarray


def unseen_count(spec: PartitionSpec, group: GroupSpec) -> int:
    """Number of unseen clients of a group: ``unseen_fraction * clients`` rounded half up."""
    return int(math.floor(spec.unseen_fraction * group.clients + 0.5))


def builtin_partitions() -> list[str]:
    """Names of the partition files shipped in ``worker/partitions``."""
    folder = resources.files("worker.partitions")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_partition(name_or_path: str | Path) -> PartitionSpec:
    """A partition spec from a built-in name (``worker/partitions/<name>.json``) or a file path.

    Raises:
        ValueError: unknown name (not a built-in and not an existing file; the message lists the
            built-ins), invalid JSON, or a spec that fails validation (the message says which
            field and why).
    """
    text_name = str(name_or_path)
    builtins = builtin_partitions()
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
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not valid JSON: {exc}") from exc
    return parse_partition(raw, source)


def parse_partition(raw: object, source: str = "partition") -> PartitionSpec:
    """Validate a partition document (already parsed JSON); ValueError with the reasons."""
    try:
        return PartitionSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors())
        raise ValueError(f"{source} is invalid: {problems}") from exc


def partition_clients(spec: PartitionSpec) -> list[ClientInfo]:
    """All clients of a partition, group by group; the last ones of each group are unseen."""
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


@lru_cache(maxsize=1)
def digit_pools() -> dict[str, np.ndarray]:
    """The fixed split of the digits' indices into disjoint ``pretrain``, ``test`` and ``train``
    pools (sorted index arrays), stratified by class."""
    from sklearn.model_selection import train_test_split

    _, labels = _digits()
    indices = np.arange(labels.shape[0])
    pretrain, rest = train_test_split(indices, train_size=PRETRAIN_POOL_SIZE, stratify=labels,
                                      random_state=DIGITS_SPLIT_SEED)
    test, train = train_test_split(rest, train_size=TEST_POOL_SIZE, stratify=labels[rest],
                                   random_state=DIGITS_SPLIT_SEED + 1)
    pools = {"pretrain": np.sort(pretrain), "test": np.sort(test), "train": np.sort(train)}
    for pool in pools.values():
        pool.setflags(write=False)
    return pools


def pretrain_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The backbone's pretraining data: upright images (600, 1, 16, 16) and labels (600,)."""
    images, labels = _digits()
    index = digit_pools()["pretrain"]
    return images[index].copy(), labels[index].copy()


def pool_arrays(pool: Literal["pretrain", "test", "train"]) -> tuple[np.ndarray, np.ndarray]:
    """All upright images and labels of one pool (e.g. ``test`` to validate the backbone)."""
    images, labels = _digits()
    index = digit_pools()[pool]
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


def client_class_proportions(spec: PartitionSpec, client_name: str) -> np.ndarray:
    """The client's class proportions: Dirichlet(alpha) draws, or uniform when alpha is null."""
    if spec.dirichlet_alpha is None:
        return np.full(NUM_CLASSES, 1.0 / NUM_CLASSES)
    rng = np.random.default_rng(_stable_seed("proportions", spec.seed, client_name))
    return rng.dirichlet(np.full(NUM_CLASSES, spec.dirichlet_alpha))


def client_arrays(spec: PartitionSpec, client_name: str) -> ClientData:
    """One client's train and test arrays, with its group's transforms applied.

    Raises:
        ValueError: the partition has no client of that name (the message lists a few).
    """
    clients = {c.name: c for c in partition_clients(spec)}
    if client_name not in clients:
        known = sorted(clients)
        shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
        raise ValueError(f"partition {spec.name!r} has no client {client_name!r} (clients: {shown})")
    group = next(g for g in spec.groups if g.name == clients[client_name].group)
    images, labels = _digits()
    pools = digit_pools()
    proportions = client_class_proportions(spec, client_name)
    rng = np.random.default_rng(_stable_seed("samples", spec.seed, client_name))
    train_index = _draw(rng, pools["train"], labels[pools["train"]], _allocate(proportions, spec.train_per_client))
    test_index = _draw(rng, pools["test"], labels[pools["test"]], _allocate(proportions, spec.test_per_client))
    x_train, y_train = apply_transforms(images[train_index], labels[train_index], group.transforms)
    x_test, y_test = apply_transforms(images[test_index], labels[test_index], group.transforms)
    return ClientData(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                      train_indices=train_index.astype(np.int64), test_indices=test_index.astype(np.int64))

