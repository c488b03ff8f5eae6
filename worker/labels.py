"""The federation's label space (``FederationConfig.classes``) on the worker.

Every data source names its classes (``partition_class_names``): label i of a client's arrays is
``names[i]``. A federation that lists its ``classes`` fixes label i to ``classes[i]`` for every site;
``to_federation_labels`` maps a client's arrays onto it by name, so two sites whose ImageFolders hold
different class folders still agree on what each label means. Checked when a worker starts hosting a
client, before it asks for any task:

- a class the client holds that the federation does not list is an error (naming the classes);
- a client none of whose classes the federation lists is an error ("no class in common");
- ImageFolder data in a federation without ``classes`` is an error: its labels would be the order
  of whatever class folders this machine has.

Classes the federation lists and the client does not hold are fine (a site sees some of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from worker.partition_spec import (
    AnyPartitionSpec,
    Cifar100PartitionSpec,
    ClientData,
    DomainNetPartitionSpec,
    FolderClientSpec,
    ImageFolderPartitionSpec,
)

# CIFAR-100's fine labels, in the order of its label indices (alphabetical, as torchvision and the
# dataset's own meta file list them).
CIFAR100_FINE_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
DIGIT_NAMES = tuple(str(d) for d in range(10))


def partition_class_names(spec: AnyPartitionSpec) -> list[str]:
    """The names of a partition's labels, in label order: the digits for ``digits``/``mnist5k``,
    CIFAR-100's fine labels, DomainNet's kept classes, and for ImageFolder the class folders this
    machine's root holds (the union over its clients, sorted)."""
    from worker import datasets

    if isinstance(spec, FolderClientSpec):
        return datasets.folder_classes(spec.folder)
    if isinstance(spec, ImageFolderPartitionSpec):
        return datasets.imagefolder_classes(spec.root)
    if isinstance(spec, Cifar100PartitionSpec):
        return list(CIFAR100_FINE_NAMES)
    if isinstance(spec, DomainNetPartitionSpec):
        return list(datasets.scan_domainnet(spec.root, spec.domains, spec.top_classes).classes)
    return list(DIGIT_NAMES)


def label_map(local: Sequence[str], held: Sequence[int], federation: Sequence[str], client: str) -> np.ndarray:
    """``out[i]`` = the federation's label of local label i (-1 for local labels the client does not
    hold). ``held``: the local labels the client's data uses.

    Raises:
        ValueError: the client holds a class the federation does not list, or none it lists.
    """
    index = {name: i for i, name in enumerate(federation)}
    held_names = [local[i] for i in sorted(set(int(h) for h in held))]
    unknown = [name for name in held_names if name not in index]
    if unknown and len(unknown) == len(held_names):
        raise ValueError(f"client {client}: none of its classes ({_names(held_names)}) is among the federation's "
                         f"classes ({_names(federation)}): no class in common; check the data folder or the "
                         f"federation's classes")
    if unknown:
        raise ValueError(f"client {client} holds classes the federation does not list: {_names(unknown)} "
                         f"(the federation's classes: {_names(federation)}); rename or remove those class "
                         f"folders, or create the federation with them")
    return np.array([index.get(name, -1) for name in local], dtype=np.int64)


def to_federation_labels(data: ClientData, local: Sequence[str], federation: Sequence[str] | None,
                         spec: AnyPartitionSpec, client: str) -> ClientData:
    """``data`` with its labels in the federation's label space (see the module doc).

    Raises:
        ValueError: ImageFolder data without federation classes, a class the federation does not
            list, or no class in common.
    """
    if federation is None:
        if isinstance(spec, (ImageFolderPartitionSpec, FolderClientSpec)):
            raise ValueError(f"client {client} holds ImageFolder data but the federation lists no classes: "
                             f"labels would follow the class folders of this machine ({_names(local)}), "
                             f"which need not match other sites'. Create the federation with \"classes\": "
                             f"[names in label order] in its federation file")
        return data
    held = np.concatenate([data.y_train, data.y_test])
    if held.size and (held.min() < 0 or held.max() >= len(local)):
        raise ValueError(f"client {client}: labels outside its {len(local)} class names")
    mapping = label_map(local, held, federation, client)
    if list(local) == list(federation):
        return data
    return replace(data, y_train=mapping[data.y_train], y_test=mapping[data.y_test])


def _names(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
