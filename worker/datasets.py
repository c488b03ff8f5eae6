"""Data on local disk as ``ClientData``: your own ImageFolder-per-client data, CIFAR-100 and DomainNet.

Nothing here downloads anything: every loader reads a local folder and fails with a message that
names the file or folder and what is wrong with it. Partition files name these sources with
``"dataset": "imagefolder" | "cifar100" | "domainnet"`` (the specs live in ``worker.partition_spec``,
re-exported by ``worker.data``, whose ``partition_clients`` and ``client_arrays`` dispatch here).

**Images** are preprocessed the way prediction does it (``worker.export.load_image``): converted to
grey (``channels`` 1, PIL's "L") or RGB (3), resized to ``image_size`` x ``image_size`` with
nearest-neighbour sampling where their size differs, scaled to [0, 1], as (C, H, W) float32; no
mean/std normalisation. Without ``image_size`` every image of a client must already have the same
size (an error names the first file that differs).

**ImageFolder per client** (``load_imagefolder_client``)::

    <root>/<client>/train/<class>/<any name>.png|.jpg|.jpeg
    <root>/<client>/test/<class>/<any name>.png|.jpg|.jpeg

Clients are the sub-folders of ``root`` (sorted; names of letters, digits, ``.``, ``_``, ``-``).
Class names are the union of the class folders over every client and both splits, sorted, and a
class's label is its position in that list, so labels agree across the clients of one root even
when a client lacks some classes; across machines the federation's ``classes`` fix them
(``worker.labels`` maps these labels to the federation's by name). Hidden entries (names starting with ``.``) are skipped; any other file that is
not a PNG/JPEG inside a class folder, or any file directly in ``train/``/``test/``, is an error.
A client without ``train/`` or ``test/``, or without any image in one of them, is an error.
``train_indices``/``test_indices`` index the client's train/test files sorted by (label, name).

**CIFAR-100** (``load_cifar100``, ``cifar100_split``): safetensors converted from torchvision's files,
``<root>/cifar-100-safetensors/{train,test}``: safetensors files with ``data`` (N x 3072 uint8,
RGB planes), ``fine_labels`` and ``coarse_labels``, converted once from torchvision's pickles
(docs/partitions.md; nothing here unpickles). Every training image goes to at most one client (the whole training set is
used by ``gldir`` and ``scdir``); each class's test images are cut among the clients in the same
shares as that class's training images, so a client's test set follows its training label mix and
no test image is seen by two clients. See ``cifar100_split`` for the three schemes.

**DomainNet** (``scan_domainnet``, ``domainnet_split``): one ImageFolder per domain,
``<root>/<domain>/<class>/*.jpg`` (the layout of the extracted DomainNet zips). The ``top_classes``
classes with the most images summed over the chosen domains are kept (ties broken by name), and
labelled by their sorted names. Inside each domain, each class's images are shuffled (seeded) and
the first ``round(test_fraction * n)`` become test images; the rest are training images, split over
the domain's clients by Dirichlet shares as in ``gldir``. Each domain is one latent group.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import safetensors.numpy

from worker.stream import LazyImages

# Only the lower module: worker.data imports this one (never the other way round).
from worker.partition_spec import (
    _NAME_PATTERN,
    Cifar100PartitionSpec,
    ClientData,
    ClientInfo,
    DiskPartitionSpec,
    DomainNetPartitionSpec,
    FolderClientSpec,
    ImageFolderPartitionSpec,
    _allocate,
    _stable_seed,
    _unseen,
    parse_partition,
)

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from shared.preprocess import Preprocessing

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")
CIFAR_FOLDER = "cifar-100-safetensors"
CIFAR_IMAGE_SIZE = 32
CIFAR_FINE_CLASSES = 100
CIFAR_COARSE_CLASSES = 20
MAX_DIRICHLET_DRAWS = 1000
UNGROUPED = "all"


# --------------------------------------------------------------------------- images

def image_to_array(image: PILImage.Image, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """A PIL image as model input (channels, height, width) float32 in [0, 1]: converted to "L"
    (1 channel) or "RGB" (3), resized to ``size`` = (height, width) with nearest-neighbour sampling
    when it differs (``None`` keeps the image's size). The same steps as
    ``worker.export.load_image``, so training data and prediction inputs agree."""
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"images with {channels} channels are not supported (1 or 3)")
    image = image.convert("L" if channels == 1 else "RGB")
    if size is not None:
        height, width = size
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.NEAREST)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array[None] if channels == 1 else np.ascontiguousarray(array.transpose(2, 0, 1))


class _SameSize:
    """Without an ``image_size`` a client's images must share one size: called with each file and
    its size, it raises on the first that differs from the first one's (naming both files)."""

    def __init__(self) -> None:
        self.first: tuple[Path, tuple[int, int]] | None = None

    def __call__(self, path: Path, size: tuple[int, int]) -> None:
        if self.first is None:
            self.first = (path, size)
        elif size != self.first[1]:
            raise ValueError(f"image {path} is {size[0]}x{size[1]} but {self.first[0]} is "
                             f"{self.first[1][0]}x{self.first[1][1]}: a client's images must share one size, or "
                             f"set image_size in the partition file to resize them all")


class _Decoder:
    """Decodes one image file as ``read_images`` would (a picklable callable, for decoding in
    DataLoader worker processes)."""

    def __init__(self, channels: int, size: tuple[int, int] | None, pipeline: Preprocessing | None) -> None:
        self.channels, self.size, self.pipeline = channels, size, pipeline

    def __call__(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                if self.pipeline is not None:
                    return prepare_image(image, self.pipeline)
                return image_to_array(image, self.channels, self.size)
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"cannot read image {path}: {exc}") from None


def _lazy_images(files: Sequence[Path], channels: int, image_size: int | None, pipeline: Preprocessing | None,
                 workers: int) -> LazyImages:
    from PIL import Image, UnidentifiedImageError

    same_size = _SameSize()
    for path in files:   # every file a readable image, before any training (headers only)
        try:
            with Image.open(path) as image:
                if pipeline is None and image_size is None:
                    same_size(path, image.size)
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"cannot read image {path}: {exc}") from None
    if pipeline is not None:
        shape = tuple(pipeline.input_size)
    elif image_size is not None:
        shape = (channels, image_size, image_size)
    else:
        width, height = same_size.first[1] if same_size.first is not None else (0, 0)
        shape = (channels, height, width)
    size = None if image_size is None else (image_size, image_size)
    return LazyImages(files, _Decoder(channels, size, pipeline), shape, workers)


def prepare_image(image: PILImage.Image, pipeline: Preprocessing) -> np.ndarray:
    """A PIL image as the federation's backbone takes it (``shared.preprocess``), before the
    per-channel normalisation the model does: converted to its channels, the shorter side resized
    to ``floor(size / crop_pct)`` (the longer in proportion, truncated) with its interpolation, the
    center ``size`` cropped, scaled to [0, 1]; (C, H, W) float32. timm's evaluation transform does
    the same (checked in tests/unit/test_preprocess.py). A non-square input size resizes both
    sides to ``pipeline.resize_to()`` instead."""
    from PIL import Image

    channels, height, width = pipeline.input_size
    resample = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                "bicubic": Image.Resampling.BICUBIC}[pipeline.interpolation]
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    if height == width:
        short = pipeline.resize_to()[0]
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    else:
        size = pipeline.resize_to()[::-1]
    if size != (w, h):
        image = image.resize(size, resample)
    w, h = image.size
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array[None] if channels == 1 else np.ascontiguousarray(array.transpose(2, 0, 1))


def read_images(files: Sequence[Path], channels: int, image_size: int | None,
                pipeline: Preprocessing | None = None, lazy: bool = False, workers: int = 0) -> np.ndarray:
    """The images of ``files`` stacked as (N, channels, H, W) float32 in [0, 1] (see the module doc);
    with ``pipeline`` (the federation's preprocessing) prepared by ``prepare_image`` instead, which
    sets channels and size. ``lazy``: a ``worker.stream.LazyImages`` that decodes them when training
    asks (in ``workers`` processes), after checking that every file is a readable image (headers
    only) of an acceptable size.

    Raises:
        ValueError: a file is not a readable image (the message names it), or ``image_size`` is
            None and an image's size differs from the first one's (the message names both files).
    """
    from PIL import Image, UnidentifiedImageError

    if lazy:
        return _lazy_images(files, channels, image_size, pipeline, workers)
    if pipeline is not None:
        channels, image_size = pipeline.input_size[0], None
    size = None if image_size is None else (image_size, image_size)
    arrays: list[np.ndarray] = []
    same_size = _SameSize()
    for path in files:
        try:
            with Image.open(path) as image:
                if pipeline is not None:
                    arrays.append(prepare_image(image, pipeline))
                    continue
                if image_size is None:
                    same_size(path, image.size)
                arrays.append(image_to_array(image, channels, size))
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"cannot read image {path}: {exc}") from None
    if not arrays:
        shape = (0, *pipeline.input_size) if pipeline is not None else (0, channels, image_size or 0, image_size or 0)
        return np.zeros(shape, dtype=np.float32)
    return np.stack(arrays).astype(np.float32, copy=False)


def _visible(entries: Iterable[Path]) -> list[Path]:
    return sorted(p for p in entries if not p.name.startswith("."))


def class_folder_images(folder: Path) -> list[Path]:
    """The image files of one class folder, sorted by name (hidden files skipped).

    Raises:
        ValueError: the folder holds a sub-folder or a file that is not .png/.jpg/.jpeg (named).
    """
    files = []
    for entry in _visible(folder.iterdir()):
        if entry.is_dir():
            raise ValueError(f"{entry} is a folder inside the class folder {folder}; "
                             f"class folders hold only images ({', '.join(IMAGE_SUFFIXES)})")
        if entry.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"unknown image file {entry}: expected {', '.join(IMAGE_SUFFIXES)}")
        files.append(entry)
    return files


# --------------------------------------------------------------------------- ImageFolder per client

_IMAGEFOLDER_LAYOUT = "<root>/<client>/{train,test}/<class>/*.png"


@dataclass(frozen=True)
class FolderSplit:
    """One split of one client: image files sorted by (label, name) and their labels (int64)."""

    files: tuple[Path, ...]
    labels: np.ndarray


def _check_name(name: str, what: str, where: Path) -> None:
    if not re.match(_NAME_PATTERN, name):
        raise ValueError(f"{what} folder name {name!r} in {where} must match {_NAME_PATTERN} "
                         f"(letters, digits, '.', '_', '-')")


def imagefolder_clients(root: str | os.PathLike) -> list[str]:
    """The client names of an ImageFolder-per-client root: its visible sub-folders, sorted.

    Raises:
        ValueError: ``root`` is not a folder, holds no client folder, or a folder name is not a
            valid client name.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"ImageFolder root {root} is not a folder (expected {_IMAGEFOLDER_LAYOUT})")
    clients = [p.name for p in _visible(root.iterdir()) if p.is_dir()]
    if not clients:
        raise ValueError(f"ImageFolder root {root} has no client folders (expected {_IMAGEFOLDER_LAYOUT})")
    for name in clients:
        _check_name(name, "client", root)
    return clients


def _split_folder(root: Path, client: str, split: str) -> Path:
    folder = root / client / split
    if not folder.is_dir():
        raise ValueError(f"client {client!r} has no {split}/ folder: expected {folder}/<class>/*.png "
                         f"(layout {_IMAGEFOLDER_LAYOUT})")
    return folder


def _class_folders(split_folder: Path) -> list[Path]:
    folders = []
    for entry in _visible(split_folder.iterdir()):
        if not entry.is_dir():
            raise ValueError(f"{entry} is not inside a class folder: put images in "
                             f"{split_folder}/<class>/ (layout {_IMAGEFOLDER_LAYOUT})")
        folders.append(entry)
    return folders


def imagefolder_classes(root: str | os.PathLike) -> list[str]:
    """The class names of an ImageFolder-per-client root: the union of the class folders of every
    client's ``train/`` and ``test/``, sorted; a class's label is its index in this list.

    Raises:
        ValueError: as ``imagefolder_clients``, or a client lacks ``train/`` or ``test/``.
    """
    root = Path(root).expanduser()
    names: set[str] = set()
    for client in imagefolder_clients(root):
        for split in SPLITS:
            names.update(p.name for p in _class_folders(_split_folder(root, client, split)))
    return sorted(names)


def imagefolder_split(root: str | os.PathLike, client: str, split: Literal["train", "test"],
                      classes: Sequence[str]) -> FolderSplit:
    """One client's ``split``: its image files sorted by (label, name) and their labels, where a
    class's label is its index in ``classes``.

    Raises:
        ValueError: the split folder is missing, holds no image, holds a stray file or a file that
            is not an image, or a class folder is not in ``classes``.
    """
    root = Path(root).expanduser()
    folder = _split_folder(root, client, split)
    label_of = {name: i for i, name in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    for class_folder in sorted(_class_folders(folder), key=lambda p: label_of.get(p.name, -1)):
        if class_folder.name not in label_of:
            raise ValueError(f"class folder {class_folder} is not among the classes {list(classes)}")
        images = class_folder_images(class_folder)
        files.extend(images)
        labels.extend([label_of[class_folder.name]] * len(images))
    if not files:
        raise ValueError(f"client {client!r} has no {split} images: {folder} holds no <class>/*.png "
                         f"(layout {_IMAGEFOLDER_LAYOUT})")
    return FolderSplit(files=tuple(files), labels=np.asarray(labels, dtype=np.int64))


def folder_classes(folder: str | os.PathLike) -> list[str]:
    """The class names of a one-client folder (``DIR/train`` and ``DIR/test``), sorted."""
    folder = Path(folder).expanduser()
    return sorted({p.name for split in SPLITS for p in _class_folders(_split_folder(folder.parent, folder.name, split))})


def load_folder_client(spec: FolderClientSpec, pipeline: Preprocessing | None = None, lazy: bool = False,
                       workers: int = 0) -> ClientData:
    """A one-client folder's images (every image of ``train/`` and ``test/``), labels by
    ``folder_classes``.

    Raises:
        ValueError: the folder does not exist or breaks the layout (the message names the path).
    """
    folder = Path(spec.folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"data folder {folder} does not exist (expected {folder}/train/<class>/*.png and "
                         f"{folder}/test/<class>/*.png)")
    classes = folder_classes(folder)
    train = imagefolder_split(folder.parent, folder.name, "train", classes)
    test = imagefolder_split(folder.parent, folder.name, "test", classes)
    images = read_images(train.files + test.files, spec.channels, spec.image_size, pipeline, lazy, workers)
    n = len(train.files)
    return ClientData(x_train=images[:n], y_train=train.labels, x_test=images[n:], y_test=test.labels,
                      train_indices=np.arange(n, dtype=np.int64),
                      test_indices=np.arange(len(test.files), dtype=np.int64))


def load_imagefolder_client(root: str | os.PathLike, client: str, image_size: int | None = None,
                            channels: int = 3, classes: Sequence[str] | None = None,
                            pipeline: Preprocessing | None = None, lazy: bool = False,
                            workers: int = 0) -> ClientData:
    """One client of an ImageFolder-per-client root as ``ClientData`` (every image of its
    ``train/`` and ``test/``), labels from ``classes`` (default: ``imagefolder_classes(root)``).

    Raises:
        ValueError: the layout is broken (see the module doc), ``client`` is not a client folder,
            an image is unreadable, or sizes differ without ``image_size``.
    """
    root = Path(root).expanduser()
    clients = imagefolder_clients(root)
    if client not in clients:
        raise ValueError(f"ImageFolder root {root} has no client {client!r} (clients: {_shown(clients)})")
    classes = list(classes) if classes is not None else imagefolder_classes(root)
    train = imagefolder_split(root, client, "train", classes)
    test = imagefolder_split(root, client, "test", classes)
    images = read_images(train.files + test.files, channels, image_size, pipeline, lazy, workers)
    n = len(train.files)
    return ClientData(x_train=images[:n], y_train=train.labels, x_test=images[n:], y_test=test.labels,
                      train_indices=np.arange(n, dtype=np.int64),
                      test_indices=np.arange(len(test.files), dtype=np.int64))


# --------------------------------------------------------------------------- CIFAR-100

@dataclass(frozen=True)
class CifarSplit:
    """One CIFAR-100 split: images (N, 3, 32, 32) uint8 RGB, fine labels (N,) in 0..99 and coarse
    (superclass) labels (N,) in 0..19, both int64, in file order."""

    images: np.ndarray
    fine_labels: np.ndarray
    coarse_labels: np.ndarray


def _labels(value: Any, n: int, limit: int, key: str, path: Path) -> np.ndarray:
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise ValueError(f"{path}: {key} is a {type(value).__name__}, expected a list of ints")
    try:
        labels = np.asarray(value, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {key} is not a list of ints ({exc})") from None
    if labels.shape != (n,):
        raise ValueError(f"{path}: {key} has {labels.size} entries for {n} images")
    if n and (labels.min() < 0 or labels.max() >= limit):
        raise ValueError(f"{path}: {key} must lie in 0..{limit - 1}, found {labels.min()}..{labels.max()}")
    return labels


def read_cifar100_split(path: str | os.PathLike) -> CifarSplit:
    """One CIFAR-100 split file (``train`` or ``test``, safetensors) as a ``CifarSplit``, validated.

    Raises:
        ValueError: the file is missing or not safetensors, lacks ``data`` (N x 3072 uint8),
            ``fine_labels`` or ``coarse_labels`` (N ints in range), or a fine class appears under
            two superclasses.
    """
    path = Path(path)
    try:
        entries = safetensors.numpy.load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure of a malformed file is the file's fault
        raise ValueError(f"{path}: not a valid safetensors file ({type(exc).__name__}: {exc})") from None
    missing = [k for k in ("data", "fine_labels", "coarse_labels") if k not in entries]
    if missing:
        raise ValueError(f"{path}: missing keys {missing} (found {sorted(map(str, entries))})")
    data = entries["data"]
    side = CIFAR_IMAGE_SIZE
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * side * side:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise ValueError(f"{path}: data must be an N x {3 * side * side} uint8 array, found {dtype} {shape}")
    n = data.shape[0]
    fine = _labels(entries["fine_labels"], n, CIFAR_FINE_CLASSES, "fine_labels", path)
    coarse = _labels(entries["coarse_labels"], n, CIFAR_COARSE_CLASSES, "coarse_labels", path)
    pairs = np.unique(np.stack([fine, coarse], axis=1), axis=0) if n else np.zeros((0, 2), np.int64)
    split_fine = pairs[:, 0][np.r_[False, pairs[1:, 0] == pairs[:-1, 0]]] if len(pairs) else []
    if len(split_fine):
        raise ValueError(f"{path}: fine classes {sorted({int(c) for c in split_fine})} appear under "
                         f"two superclasses")
    images = np.ascontiguousarray(data.reshape(n, 3, side, side))
    for array in (images, fine, coarse):
        array.setflags(write=False)
    return CifarSplit(images=images, fine_labels=fine, coarse_labels=coarse)


def cifar100_folder(root: str | os.PathLike) -> Path:
    """``<root>/cifar-100-safetensors``, CIFAR-100 converted to safetensors (docs/partitions.md).

    Raises:
        ValueError: the folder or its ``train``/``test`` files are missing (never downloads).
    """
    folder = Path(root).expanduser() / CIFAR_FOLDER
    if not folder.is_dir():
        raise ValueError(f"no CIFAR-100 at {folder}: expected <root>/{CIFAR_FOLDER}/{{train,test}} as "
                         f"safetensors, converted once from torchvision's files (docs/partitions.md; "
                         f"nothing is downloaded)")
    for split in SPLITS:
        if not (folder / split).is_file():
            raise ValueError(f"CIFAR-100 folder {folder} has no {split} file")
    return folder


@lru_cache(maxsize=1)
def _load_cifar100_cached(folder: str, stamps: tuple[int, ...]) -> dict[str, CifarSplit]:
    splits = {split: read_cifar100_split(Path(folder) / split) for split in SPLITS}
    train, test = splits["train"], splits["test"]
    mapping = dict(zip(train.fine_labels.tolist(), train.coarse_labels.tolist()))
    clash = sorted({f for f, c in zip(test.fine_labels.tolist(), test.coarse_labels.tolist())
                    if mapping.get(f, c) != c})
    if clash:
        raise ValueError(f"{folder}: fine classes {clash} have different superclasses in train and test")
    return splits


def load_cifar100(root: str | os.PathLike) -> dict[str, CifarSplit]:
    """CIFAR-100's ``train`` and ``test`` splits from ``<root>/cifar-100-safetensors`` (cached per
    process while the files are unchanged).

    Raises:
        ValueError: see ``cifar100_folder`` and ``read_cifar100_split``.
    """
    folder = cifar100_folder(root)
    stamps = tuple(int((folder / s).stat().st_mtime_ns) for s in SPLITS)
    return _load_cifar100_cached(str(folder.resolve()), stamps)


@dataclass(frozen=True)
class FederatedSplit:
    """Clients (group -> client names, in order) with their training and test indices (sorted
    int64 arrays into the dataset's train and test sets). No index appears twice within a client
    split or in two clients' splits."""

    groups: dict[str, list[str]]
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]


def _shuffled_by_class(labels: np.ndarray, classes: Iterable[int], rng: np.random.Generator) -> dict[int, np.ndarray]:
    return {int(c): rng.permutation(np.flatnonzero(labels == c)) for c in classes}


def _split_by_shares(train_by_class: Mapping[int, np.ndarray], test_by_class: Mapping[int, np.ndarray],
                     shares: Mapping[int, np.ndarray], clients: Sequence[str], rng: np.random.Generator
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Cut each class's (already shuffled) train and test indices into consecutive runs, one per
    client with a positive share, of sizes ``round(share x count)`` (largest remainder; the
    clients are taken in a random order per class, so ties do not always favour the same ones)."""
    parts: dict[str, dict[str, list[np.ndarray]]] = {"train": {k: [] for k in clients},
                                                     "test": {k: [] for k in clients}}
    for label, share in shares.items():
        members = rng.permutation(np.flatnonzero(share > 0))
        weights = share[members] / share[members].sum()
        for name, by_class in (("train", train_by_class), ("test", test_by_class)):
            indices = by_class.get(label, np.zeros(0, dtype=np.int64))
            counts = _allocate(weights, indices.shape[0])
            for member, run in zip(members.tolist(), np.split(indices, np.cumsum(counts)[:-1])):
                parts[name][clients[member]].append(run)
    out = []
    for name in ("train", "test"):
        out.append({k: np.sort(np.concatenate(v)).astype(np.int64) if v else np.zeros(0, dtype=np.int64)
                    for k, v in parts[name].items()})
    return out[0], out[1]


def _dirichlet_split(rng: np.random.Generator, train_by_class: Mapping[int, np.ndarray],
                     test_by_class: Mapping[int, np.ndarray], clients: Sequence[str], alpha: float,
                     min_train: int, what: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per class, shares over ``clients`` ~ Dirichlet(alpha); redrawn (all classes at once, up to
    ``MAX_DIRICHLET_DRAWS`` times) until every client has >= ``min_train`` training and >= 1 test
    samples."""
    for _ in range(MAX_DIRICHLET_DRAWS):
        shares = {c: rng.dirichlet(np.full(len(clients), alpha)) for c in train_by_class}
        train, test = _split_by_shares(train_by_class, test_by_class, shares, clients, rng)
        if min(v.shape[0] for v in train.values()) >= min_train and min(v.shape[0] for v in test.values()) >= 1:
            return train, test
    total = sum(v.shape[0] for v in train_by_class.values())
    raise ValueError(f"{what}: no Dirichlet({alpha}) draw in {MAX_DIRICHLET_DRAWS} gave each of the "
                     f"{len(clients)} clients >= {min_train} of the {total} training samples and >= 1 test "
                     f"sample; lower min_train_per_client, raise dirichlet_alpha or use fewer clients")


def cifar100_split(train: CifarSplit, test: CifarSplit, scheme: Literal["scdir", "gldir", "patho"],
                   clients: int, seed: int = 0, dirichlet_alpha: float = 0.3, superclass_groups: int = 3,
                   classes_per_client: int = 10, min_train_per_client: int = 10) -> FederatedSplit:
    """The paper's CIFAR-100 partitions over ``clients`` clients; a deterministic function of the
    arguments. Each class's training images are shuffled (seeded) and cut into consecutive runs,
    one per client holding the class, by that class's shares; its test images are cut by the same
    shares (see the module doc). The schemes:

    - ``gldir`` (GL-Dir(alpha), paper: 0.3): one group ``all``; for every class independently,
      shares over all clients ~ Dirichlet(alpha); all classes are redrawn together until every
      client has >= ``min_train_per_client`` training and >= 1 test samples (at most 1,000 draws).
    - ``scdir`` (SC-Dir(G), paper: G = 3): the superclasses are shuffled (seeded) and dealt
      round-robin into G groups (20 -> 7, 7, 6); clients are split into G groups of near-equal
      size (the first ``clients mod G`` get one more), named ``sc<g>-<i>``; a group's clients get
      only the fine classes of its superclasses, with Dirichlet(``dirichlet_alpha``) shares over
      the group's clients per class, redrawn as in ``gldir``. Every training image is used.
    - ``patho`` (Patho(k), paper: k = 10): one group ``all``; the classes are shuffled (seeded)
      into a cycle and client i holds the k consecutive classes starting at position ``i * k``
      (mod the number of classes), so every client holds exactly k distinct classes and the
      classes are held as evenly as possible; each class's images are split equally (largest
      remainder) among its holders. Classes no client holds are left out.

    Raises:
        ValueError: the data cannot give every client what the scheme promises (e.g. fewer
            classes than ``classes_per_client``, a class with fewer training images than holders,
            more superclass groups than superclasses, no acceptable Dirichlet draw).
    """
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    rng = np.random.default_rng(_stable_seed("cifar100", scheme, seed))
    classes = sorted(set(train.fine_labels.tolist()))
    train_by_class = _shuffled_by_class(train.fine_labels, classes, rng)
    test_by_class = _shuffled_by_class(test.fine_labels, classes, rng)
    if scheme == "gldir":
        names = [f"{UNGROUPED}-{i:02d}" for i in range(clients)]
        tr, te = _dirichlet_split(rng, train_by_class, test_by_class, names, dirichlet_alpha,
                                  min_train_per_client, f"CIFAR-100 gldir over {clients} clients")
        return FederatedSplit(groups={UNGROUPED: names}, train=tr, test=te)
    if scheme == "patho":
        k = classes_per_client
        if k > len(classes):
            raise ValueError(f"patho: each client needs {k} classes but the training set has {len(classes)}")
        cycle = rng.permutation(classes).tolist()
        names = [f"{UNGROUPED}-{i:02d}" for i in range(clients)]
        holders: dict[int, list[int]] = {c: [] for c in classes}
        for i in range(clients):
            for j in range(k):
                holders[cycle[(i * k + j) % len(cycle)]].append(i)
        shares = {}
        for c, members in holders.items():
            if not members:
                continue
            if train_by_class[c].shape[0] < len(members):
                raise ValueError(f"patho: class {c} has {train_by_class[c].shape[0]} training images but "
                                 f"{len(members)} clients hold it")
            share = np.zeros(clients)
            share[members] = 1.0 / len(members)
            shares[c] = share
        tr, te = _split_by_shares(train_by_class, test_by_class, shares, names, rng)
        return FederatedSplit(groups={UNGROUPED: names}, train=tr, test=te)
    if scheme == "scdir":
        fine_to_coarse = dict(zip(train.fine_labels.tolist(), train.coarse_labels.tolist()))
        superclasses = sorted(set(fine_to_coarse.values()))
        g_count = superclass_groups
        if g_count > len(superclasses):
            raise ValueError(f"scdir: {g_count} superclass groups but only {len(superclasses)} superclasses")
        if clients < g_count:
            raise ValueError(f"scdir: {clients} clients cannot fill {g_count} superclass groups")
        dealt = rng.permutation(superclasses).tolist()
        groups: dict[str, list[str]] = {}
        tr_all: dict[str, np.ndarray] = {}
        te_all: dict[str, np.ndarray] = {}
        for g, members in enumerate(np.array_split(np.arange(clients), g_count)):
            own = set(dealt[g::g_count])
            group_classes = [c for c in classes if fine_to_coarse[c] in own]
            names = [f"sc{g}-{i:02d}" for i in range(len(members))]
            tr, te = _dirichlet_split(rng, {c: train_by_class[c] for c in group_classes},
                                      {c: test_by_class[c] for c in group_classes}, names, dirichlet_alpha,
                                      min_train_per_client, f"CIFAR-100 scdir group sc{g} ({len(names)} clients)")
            groups[f"sc{g}"] = names
            tr_all.update(tr)
            te_all.update(te)
        return FederatedSplit(groups=groups, train=tr_all, test=te_all)
    raise ValueError(f"unknown CIFAR-100 scheme {scheme!r} (known: scdir, gldir, patho)")


def cifar_inputs(images: np.ndarray, channels: int, image_size: int | None,
                 pipeline: Preprocessing | None = None) -> np.ndarray:
    """CIFAR images (N, 3, 32, 32) uint8 as model input (N, channels, S, S) float32 in [0, 1],
    S = ``image_size`` or 32, by the same steps as every other image (``image_to_array``; with
    ``pipeline``, ``prepare_image``)."""
    if pipeline is not None:
        from PIL import Image

        out = [prepare_image(Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)), "RGB"), pipeline)
               for img in images]
        return np.stack(out) if out else np.zeros((0, *pipeline.input_size), dtype=np.float32)
    if channels == 3 and image_size in (None, CIFAR_IMAGE_SIZE):
        return images.astype(np.float32) / 255.0
    from PIL import Image

    size = (image_size, image_size) if image_size is not None else None
    out = [image_to_array(Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)), "RGB"), channels, size)
           for img in images]
    if not out:
        side = image_size or CIFAR_IMAGE_SIZE
        return np.zeros((0, channels, side, side), dtype=np.float32)
    return np.stack(out)


# --------------------------------------------------------------------------- DomainNet

_DOMAINNET_LAYOUT = "<root>/<domain>/<class>/*.jpg"


@dataclass(frozen=True)
class DomainNetIndex:
    """The kept classes (sorted names; label = index) and, per domain, its image files of those
    classes sorted by (label, name) with their labels."""

    root: Path
    classes: tuple[str, ...]
    files: dict[str, tuple[Path, ...]]
    labels: dict[str, np.ndarray]


@lru_cache(maxsize=2)
def _scan_domainnet_cached(root: str, domains: tuple[str, ...] | None, top_classes: int) -> DomainNetIndex:
    base = Path(root)
    if not base.is_dir():
        raise ValueError(f"DomainNet root {base} is not a folder (expected {_DOMAINNET_LAYOUT})")
    if domains is None:
        domains = tuple(p.name for p in _visible(base.iterdir()) if p.is_dir())
        if not domains:
            raise ValueError(f"DomainNet root {base} has no domain folders (expected {_DOMAINNET_LAYOUT})")
    per_domain: dict[str, dict[str, list[Path]]] = {}
    for domain in domains:
        _check_name(domain, "domain", base)
        folder = base / domain
        if not folder.is_dir():
            raise ValueError(f"DomainNet domain folder {folder} does not exist (expected {_DOMAINNET_LAYOUT})")
        per_domain[domain] = {p.name: class_folder_images(p) for p in _visible(folder.iterdir()) if p.is_dir()}
    counts: dict[str, int] = {}
    for by_class in per_domain.values():
        for name, files in by_class.items():
            counts[name] = counts.get(name, 0) + len(files)
    available = [name for name, count in counts.items() if count > 0]
    if len(available) < top_classes:
        raise ValueError(f"DomainNet root {base}: top_classes={top_classes} but only {len(available)} classes "
                         f"have images in the domains {list(domains)}")
    kept = sorted(sorted(available, key=lambda name: (-counts[name], name))[:top_classes])
    files: dict[str, tuple[Path, ...]] = {}
    labels: dict[str, np.ndarray] = {}
    for domain, by_class in per_domain.items():
        domain_files: list[Path] = []
        domain_labels: list[int] = []
        for label, name in enumerate(kept):
            images = by_class.get(name, [])
            domain_files.extend(images)
            domain_labels.extend([label] * len(images))
        if not domain_files:
            raise ValueError(f"DomainNet domain {base / domain} has no image of the kept classes {kept}")
        files[domain] = tuple(domain_files)
        labels[domain] = np.asarray(domain_labels, dtype=np.int64)
    return DomainNetIndex(root=base, classes=tuple(kept), files=files, labels=labels)


def scan_domainnet(root: str | os.PathLike, domains: Sequence[str] | None = None,
                   top_classes: int = 10) -> DomainNetIndex:
    """Index a DomainNet root: ``domains`` (default: every visible sub-folder, sorted) and the
    ``top_classes`` classes with the most images over those domains (cached per process).

    Raises:
        ValueError: the root or a domain folder is missing, a class folder holds a non-image file,
            fewer than ``top_classes`` classes have images, or a domain has none of the kept classes.
    """
    key = tuple(domains) if domains is not None else None
    return _scan_domainnet_cached(str(Path(root).expanduser().resolve()), key, top_classes)


def domainnet_split(index: DomainNetIndex, clients_per_domain: int = 15, dirichlet_alpha: float = 0.6,
                    test_fraction: float = 0.2, seed: int = 0, min_train_per_client: int = 10) -> FederatedSplit:
    """The paper's DomainNet partition: one group per domain with ``clients_per_domain`` clients
    named ``<domain>-<i>``; inside a domain, each class's images are shuffled (seeded by the seed
    and the domain), the first ``round(test_fraction x n)`` are test images, and the rest and the
    test images are cut among the domain's clients by Dirichlet(alpha) shares per class as in
    ``gldir``. Indices (in ``train`` and ``test`` alike) point into ``index.files[domain]``.

    Raises:
        ValueError: no acceptable Dirichlet draw for a domain (the message names it).
    """
    groups: dict[str, list[str]] = {}
    train: dict[str, np.ndarray] = {}
    test: dict[str, np.ndarray] = {}
    for domain, labels in index.labels.items():
        rng = np.random.default_rng(_stable_seed("domainnet", seed, domain))
        by_class = _shuffled_by_class(labels, sorted(set(labels.tolist())), rng)
        train_by_class: dict[int, np.ndarray] = {}
        test_by_class: dict[int, np.ndarray] = {}
        for label, indices in by_class.items():
            n_test = int(np.floor(test_fraction * indices.shape[0] + 0.5))
            test_by_class[label], train_by_class[label] = indices[:n_test], indices[n_test:]
        names = [f"{domain}-{i:02d}" for i in range(clients_per_domain)]
        tr, te = _dirichlet_split(rng, train_by_class, test_by_class, names, dirichlet_alpha, min_train_per_client,
                                  f"DomainNet domain {index.root / domain} ({clients_per_domain} clients)")
        groups[domain] = names
        train.update(tr)
        test.update(te)
    return FederatedSplit(groups=groups, train=train, test=test)


# --------------------------------------------------------------------------- partition-file dispatch

def _shown(names: Sequence[str]) -> str:
    return ", ".join(list(names)[:8]) + (", ..." if len(names) > 8 else "")


@lru_cache(maxsize=4)
def _disk_split_cached(spec_json: str) -> FederatedSplit:
    spec = parse_partition(json.loads(spec_json))
    if isinstance(spec, Cifar100PartitionSpec):
        splits = load_cifar100(spec.root)
        return cifar100_split(splits["train"], splits["test"], spec.scheme, spec.clients, seed=spec.seed,
                              dirichlet_alpha=spec.dirichlet_alpha, superclass_groups=spec.superclass_groups,
                              classes_per_client=spec.classes_per_client,
                              min_train_per_client=spec.min_train_per_client)
    if isinstance(spec, DomainNetPartitionSpec):
        index = scan_domainnet(spec.root, spec.domains, spec.top_classes)
        return domainnet_split(index, spec.clients_per_domain, spec.dirichlet_alpha, spec.test_fraction,
                               spec.seed, spec.min_train_per_client)
    raise ValueError(f"partition {spec.name!r}: dataset {spec.dataset!r} has no federated split")


def disk_split(spec: Cifar100PartitionSpec | DomainNetPartitionSpec) -> FederatedSplit:
    """The spec's clients and their sample indices (cached per process and spec)."""
    return _disk_split_cached(spec.model_dump_json())


def disk_partition_clients(spec: DiskPartitionSpec) -> list[ClientInfo]:
    """The clients of a partition over data on disk, group by group.

    ``imagefolder``: the named groups in file order (their clients as listed), then the group
    ``all`` of every other client folder (sorted); unseen = listed in ``unseen_clients``.
    ``cifar100``/``domainnet``: the groups of ``disk_split``; the last
    ``round(unseen_fraction x n)`` clients of each group are unseen.

    Raises:
        ValueError: the data is missing or malformed, or ``groups``/``unseen_clients`` name a
            client that has no folder, or every client is unseen.
    """
    if isinstance(spec, ImageFolderPartitionSpec):
        root = Path(spec.root).expanduser()
        found = imagefolder_clients(root)
        named = [c for members in spec.groups.values() for c in members]
        unknown = sorted((set(named) | set(spec.unseen_clients)) - set(found))
        if unknown:
            raise ValueError(f"partition {spec.name!r} names clients {unknown} that have no folder in {root} "
                             f"(clients: {_shown(found)})")
        unseen = set(spec.unseen_clients)
        if unseen >= set(found):
            raise ValueError(f"partition {spec.name!r}: every client is in unseen_clients; none would train")
        clients = [ClientInfo(name=c, group=g, unseen=c in unseen) for g, members in spec.groups.items()
                   for c in members]
        clients += [ClientInfo(name=c, group=UNGROUPED, unseen=c in unseen) for c in found if c not in set(named)]
        return clients
    split = disk_split(spec)
    clients = []
    for group, names in split.groups.items():
        held_out = _unseen(spec.unseen_fraction, len(names))
        clients += [ClientInfo(name=name, group=group, unseen=i >= len(names) - held_out)
                    for i, name in enumerate(names)]
    return clients


def _check_client(spec: DiskPartitionSpec, names: Sequence[str], client: str) -> None:
    if client not in names:
        raise ValueError(f"partition {spec.name!r} has no client {client!r} (clients: {_shown(sorted(names))})")


def disk_client_arrays(spec: DiskPartitionSpec, client: str, pipeline: Preprocessing | None = None,
                       lazy: bool = False, workers: int = 0) -> ClientData:
    """One client's arrays for a partition over data on disk (see the module doc for each kind).

    Raises:
        ValueError: no such client, or the data is missing or malformed (the message names the
            file or folder).
    """
    if isinstance(spec, ImageFolderPartitionSpec):
        _check_client(spec, imagefolder_clients(spec.root), client)
        return load_imagefolder_client(spec.root, client, spec.image_size, spec.channels, pipeline=pipeline,
                                       lazy=lazy, workers=workers)
    split = disk_split(spec)
    _check_client(spec, list(split.train), client)
    train_index, test_index = split.train[client], split.test[client]
    if isinstance(spec, Cifar100PartitionSpec):
        data = load_cifar100(spec.root)
        train, test = data["train"], data["test"]
        return ClientData(x_train=cifar_inputs(train.images[train_index], spec.channels, spec.image_size, pipeline),
                          y_train=train.fine_labels[train_index].copy(),
                          x_test=cifar_inputs(test.images[test_index], spec.channels, spec.image_size, pipeline),
                          y_test=test.fine_labels[test_index].copy(),
                          train_indices=train_index.copy(), test_indices=test_index.copy())
    index = scan_domainnet(spec.root, spec.domains, spec.top_classes)
    domain = next(d for d, names in split.groups.items() if client in names)
    files, labels = index.files[domain], index.labels[domain]
    images = read_images([files[i] for i in train_index] + [files[i] for i in test_index], spec.channels,
                         spec.image_size, pipeline, lazy, workers)
    n = train_index.shape[0]
    return ClientData(x_train=images[:n], y_train=labels[train_index].copy(), x_test=images[n:],
                      y_test=labels[test_index].copy(), train_indices=train_index.copy(),
                      test_indices=test_index.copy())
