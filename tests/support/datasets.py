"""Fake data folders in the layouts the disk loaders read (``worker/datasets.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors.numpy
from PIL import Image


def save_split(path: Path, doc: dict) -> None:
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in doc.items()}, str(path))


def write_fake_cifar(root: Path, train_per_class: int = 6, test_per_class: int = 3, seed: int = 0) -> Path:
    """A fake ``<root>/cifar-100-safetensors/{train,test}``: 100 fine classes (superclass = fine // 5),
    ``train_per_class`` / ``test_per_class`` images per class of random pixels; the keys of the real
    files. Returns ``root``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-safetensors"
    folder.mkdir(parents=True)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = np.repeat(np.arange(100), per_class)
        rng.shuffle(fine)
        save_split(folder / split, {"fine_labels": fine, "coarse_labels": fine // 5,
                                    "data": rng.integers(0, 256, size=(fine.size, 3072), dtype=np.uint8)})
    return root


# imagefolder_site's images: the red value of each says its class
RED = {"cat": 50, "dog": 100, "eel": 150, "fox": 200}


def imagefolder_site(root: Path, client: str, layout: dict[str, dict[str, int]]) -> Path:
    """An ImageFolder root on one machine holding one client; every image's red value names its class."""
    for split, classes in layout.items():
        for name, count in classes.items():
            for i in range(count):
                path = root / client / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (4, 4), (RED[name], 0, 0)).save(path)
    spec = root.parent / f"{root.name}.json"
    spec.write_text(json.dumps({"name": root.name, "dataset": "imagefolder", "root": str(root)}))
    return spec
