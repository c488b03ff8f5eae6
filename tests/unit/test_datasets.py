"""Data on local disk (worker/datasets.py): ImageFolder per client, CIFAR-100, DomainNet, and the
partition files that name them. Every dataset here is a tiny synthetic folder built in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from PIL import Image
from support.datasets import save_split, write_fake_cifar

from worker import datasets
from worker.data import (
    ClientInfo,
    client_arrays,
    load_partition,
    parse_partition,
    partition_clients,
)

pytestmark = pytest.mark.unit

TRAIN_PER_CLASS = 6
TEST_PER_CLASS = 3


# --------------------------------------------------------------------------- builders

def _image(path: Path, size: tuple[int, int] = (8, 8), colour: tuple[int, int, int] = (10, 20, 30)) -> Path:
    """A solid RGB image of ``size`` = (width, height); the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture()
def folder_root(tmp_path: Path) -> Path:
    """Two clients: site-a has cat/dog, site-b has dog/eel; every image's red value says which."""
    root = tmp_path / "clients"
    layout = {
        ("site-a", "train"): {"cat": 2, "dog": 1},
        ("site-a", "test"): {"cat": 1, "dog": 1},
        ("site-b", "train"): {"dog": 2, "eel": 1},
        ("site-b", "test"): {"eel": 1},
    }
    red = {"cat": 50, "dog": 100, "eel": 150}
    for (client, split), classes in layout.items():
        for name, count in classes.items():
            for i in range(count):
                _image(root / client / split / name / f"{i}.png", colour=(red[name], i, 0))
    return root


def _write_cifar(root: Path, seed: int = 0) -> Path:
    return write_fake_cifar(root, TRAIN_PER_CLASS, TEST_PER_CLASS, seed)


def _read_split(path: Path) -> dict:
    return {k: v.copy() for k, v in safetensors.numpy.load_file(str(path)).items()}


@pytest.fixture()
def cifar_root(tmp_path: Path) -> Path:
    return _write_cifar(tmp_path / "cifar")


@pytest.fixture()
def cifar(cifar_root: Path) -> dict[str, datasets.CifarSplit]:
    return datasets.load_cifar100(cifar_root)


DOMAIN_CLASS_COUNTS = {"apple": 6, "bee": 5, "cat": 4, "dog": 1}


@pytest.fixture()
def domainnet_root(tmp_path: Path) -> Path:
    """Two domains x four classes (dog has the fewest images and drops out of the top 3); JPEGs in
    one domain, PNGs in the other, of varying sizes."""
    root = tmp_path / "domainnet"
    for d, (domain, suffix) in enumerate((("clipart", ".jpg"), ("real", ".png"))):
        for c, (name, count) in enumerate(DOMAIN_CLASS_COUNTS.items()):
            for i in range(count):
                _image(root / domain / name / f"{domain}_{name}_{i}{suffix}", size=(10 + i, 9 + d),
                       colour=(40 * c, 100 * d, 10 * i))
    return root


# --------------------------------------------------------------------------- images

def test_image_preprocessing_is_the_prediction_path(tmp_path):
    from worker.export import load_image

    path = tmp_path / "x.png"
    pixels = np.random.default_rng(0).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    for channels, size in ((1, 12), (3, 4), (3, None)):
        ours = datasets.read_images([path], channels, size)[0]
        theirs = load_image(path, channels, (size, size) if size else (6, 5))
        np.testing.assert_array_equal(ours, theirs)
    assert datasets.read_images([path], 3, None).shape == (1, 3, 6, 5)
    # float32 pixels / 255 against the float64 quotient: a correctly rounded float32 division is
    # within half an ulp (relative 2**-24); allow one float32 ulp, not numpy's default rtol=1e-7
    # (which only passed because 2**-24 = 6e-8 happens to be below it).
    np.testing.assert_allclose(datasets.read_images([path], 3, None)[0], pixels.transpose(2, 0, 1) / 255.0,
                               rtol=np.finfo(np.float32).eps, atol=0)


# --------------------------------------------------------------------------- ImageFolder per client

def test_imagefolder_classes_are_the_sorted_union_and_labels_agree_across_clients(folder_root):
    assert datasets.imagefolder_clients(folder_root) == ["site-a", "site-b"]
    assert datasets.imagefolder_classes(folder_root) == ["cat", "dog", "eel"]
    a = datasets.load_imagefolder_client(folder_root, "site-a")
    b = datasets.load_imagefolder_client(folder_root, "site-b")
    assert a.x_train.shape == (3, 3, 8, 8) and a.x_train.dtype == np.float32
    assert a.y_train.tolist() == [0, 0, 1] and a.y_test.tolist() == [0, 1]
    assert b.y_train.tolist() == [1, 1, 2] and b.y_test.tolist() == [2]
    # "dog" is label 1 at both clients: its images are red 100
    red = {0: 50, 1: 100, 2: 150}
    for data in (a, b):
        for x, y in zip(np.concatenate([data.x_train, data.x_test]), np.concatenate([data.y_train, data.y_test])):
            assert x[0].max() == pytest.approx(red[int(y)] / 255.0)
    assert a.train_indices.tolist() == [0, 1, 2] and b.test_indices.tolist() == [0]


def test_imagefolder_partition_file_needs_no_code(folder_root, tmp_path):
    path = folder_root.parent / "mine.json"
    path.write_text(json.dumps({"name": "mine", "dataset": "imagefolder", "root": folder_root.name,
                                "image_size": 4, "channels": 1, "groups": {"east": ["site-b"]},
                                "unseen_clients": ["site-a"]}))
    spec = load_partition(path)
    assert Path(spec.root) == folder_root                     # relative to the partition file's folder
    assert partition_clients(spec) == [ClientInfo("site-b", "east", False), ClientInfo("site-a", "all", True)]
    data = client_arrays(spec, "site-b")
    assert data.x_train.shape == (3, 1, 4, 4) and data.x_test.shape == (1, 1, 4, 4)
    assert data.y_train.tolist() == [1, 1, 2]
    with pytest.raises(ValueError, match="has no client 'site-c'"):
        client_arrays(spec, "site-c")


def _break(root: Path, how: str) -> None:
    if how == "missing split":
        for f in (root / "site-b" / "test" / "eel").iterdir():
            f.unlink()
        (root / "site-b" / "test" / "eel").rmdir()
        (root / "site-b" / "test").rmdir()
    elif how == "empty client":
        for f in (root / "site-a" / "train" / "cat").iterdir():
            f.unlink()
        for f in (root / "site-a" / "train" / "dog").iterdir():
            f.unlink()
    elif how == "unknown file":
        (root / "site-a" / "train" / "cat" / "notes.txt").write_text("hello")
    elif how == "corrupt image":
        (root / "site-a" / "test" / "dog" / "9.png").write_bytes(b"not a png at all")
    elif how == "mixed sizes":
        _image(root / "site-a" / "test" / "dog" / "big.png", size=(9, 8))
    elif how == "stray file":
        (root / "site-a" / "train" / "loose.png").write_bytes(b"")
    elif how == "no root":
        import shutil

        shutil.rmtree(root)


@pytest.mark.parametrize("how, message", [
    ("missing split", r"client 'site-b' has no test/ folder: expected .*site-b/test/<class>"),
    ("empty client", r"client 'site-a' has no train images: .*site-a/train holds no"),
    ("unknown file", r"unknown image file .*site-a/train/cat/notes\.txt"),
    ("corrupt image", r"cannot read image .*site-a/test/dog/9\.png"),
    ("mixed sizes", r"image .*big\.png is 9x8 but .*0\.png is 8x8.*set image_size"),
    ("stray file", r"loose\.png is not inside a class folder"),
    ("no root", r"ImageFolder root .*clients is not a folder"),
])
def test_imagefolder_errors_name_the_file_and_the_problem(folder_root, how, message):
    _break(folder_root, how)
    client = "site-b" if how == "missing split" else "site-a"
    with pytest.raises(ValueError, match=message):
        datasets.load_imagefolder_client(folder_root, client)


def test_imagefolder_resizes_mixed_sizes_when_image_size_is_set(folder_root):
    _image(folder_root / "site-a" / "test" / "dog" / "big.png", size=(9, 8), colour=(100, 0, 0))
    data = datasets.load_imagefolder_client(folder_root, "site-a", image_size=5, channels=3)
    assert data.x_train.shape == (3, 3, 5, 5) and data.x_test.shape == (3, 3, 5, 5)
    assert data.y_test.tolist() == [0, 1, 1]


def test_imagefolder_partition_naming_missing_clients_is_an_error(folder_root):
    spec = parse_partition({"name": "p", "dataset": "imagefolder", "root": str(folder_root),
                            "groups": {"g": ["site-a", "site-z"]}})
    with pytest.raises(ValueError, match=r"names clients \['site-z'\] that have no folder"):
        partition_clients(spec)
    spec = parse_partition({"name": "p", "dataset": "imagefolder", "root": str(folder_root),
                            "unseen_clients": ["site-a", "site-b"]})
    with pytest.raises(ValueError, match="every client is in unseen_clients"):
        partition_clients(spec)
    with pytest.raises(ValueError, match="is in two groups"):
        parse_partition({"name": "p", "dataset": "imagefolder", "root": "x",
                         "groups": {"g": ["site-a"], "h": ["site-a"]}})


# --------------------------------------------------------------------------- CIFAR-100 files

def test_load_cifar100_reads_torchvisions_layout(cifar_root):
    splits = datasets.load_cifar100(cifar_root)
    train, test = splits["train"], splits["test"]
    assert train.images.shape == (600, 3, 32, 32) and train.images.dtype == np.uint8
    assert test.images.shape == (300, 3, 32, 32)
    assert np.bincount(train.fine_labels).tolist() == [TRAIN_PER_CLASS] * 100
    np.testing.assert_array_equal(train.coarse_labels, train.fine_labels // 5)
    raw = _read_split(cifar_root / "cifar-100-safetensors" / "train")
    np.testing.assert_array_equal(train.images.reshape(600, -1), raw["data"])
    assert not train.images.flags.writeable
    assert datasets.load_cifar100(cifar_root) is splits               # cached while unchanged


@pytest.mark.parametrize("damage, message", [
    ("no folder", r"no CIFAR-100 at .*cifar-100-safetensors: expected"),
    ("no test", r"cifar-100-safetensors has no test file"),
    ("truncated", r"cifar-100-safetensors/train: not a valid safetensors file"),
    ("missing key", r"cifar-100-safetensors/train: missing keys \['coarse_labels'\]"),
    ("bad labels", r"cifar-100-safetensors/train: fine_labels must lie in 0\.\.99"),
    ("bad data", r"cifar-100-safetensors/train: data must be an N x 3072 uint8 array"),
    ("split superclass", r"cifar-100-safetensors/train: fine classes \[0\] appear under two superclasses"),
])
def test_cifar_files_with_problems_are_clear_errors(tmp_path, damage, message):
    root = _write_cifar(tmp_path / "c")
    folder = root / "cifar-100-safetensors"
    train = _read_split(folder / "train")
    if damage == "no folder":
        root = tmp_path / "elsewhere"
    elif damage == "no test":
        (folder / "test").unlink()
    elif damage == "truncated":
        (folder / "train").write_bytes((folder / "train").read_bytes()[:1000])
    else:
        if damage == "missing key":
            del train["coarse_labels"]
        elif damage == "bad labels":
            train["fine_labels"][0] = 100
        elif damage == "bad data":
            train["data"] = train["data"].astype(np.float32)
        elif damage == "split superclass":
            first = int(np.flatnonzero(train["fine_labels"] == 0)[0])
            train["coarse_labels"][first] = 7
        save_split(folder / "train", train)
    with pytest.raises(ValueError, match=message):
        datasets.load_cifar100(root)


# --------------------------------------------------------------------------- CIFAR-100 partitions

def _check_disjoint_and_complete(split: datasets.FederatedSplit, n_train: int | None, n_test: int | None) -> None:
    for part, total in ((split.train, n_train), (split.test, n_test)):
        joined = np.concatenate(list(part.values()))
        assert len(set(joined.tolist())) == joined.size                  # no sample twice, anywhere
        for indices in part.values():
            assert np.array_equal(indices, np.sort(indices)) and indices.dtype == np.int64
        if total is not None:
            assert sorted(joined.tolist()) == list(range(total))         # every sample used


def test_gldir_is_a_global_dirichlet_split_of_every_sample(cifar):
    train, test = cifar["train"], cifar["test"]
    split = datasets.cifar100_split(train, test, "gldir", 4, seed=0, dirichlet_alpha=0.3, min_train_per_client=10)
    assert split.groups == {"all": ["all-00", "all-01", "all-02", "all-03"]}
    _check_disjoint_and_complete(split, 600, 300)
    per_class = np.stack([np.bincount(train.fine_labels[split.train[k]], minlength=100) for k in split.groups["all"]])
    test_per_class = np.stack([np.bincount(test.fine_labels[split.test[k]], minlength=100)
                               for k in split.groups["all"]])
    assert per_class.sum(axis=1).tolist() == [split.train[k].size for k in split.groups["all"]]
    assert (per_class.sum(axis=1) >= 10).all() and (test_per_class.sum(axis=1) >= 1).all()
    assert per_class.sum(axis=0).tolist() == [TRAIN_PER_CLASS] * 100
    # a client's test images of a class follow its training share of that class (3 test vs 6 train)
    assert np.abs(test_per_class - per_class / 2).max() <= 1.0
    # Dirichlet(0.3) skew: many (client, class) cells are empty, some hold a whole class
    assert (per_class == 0).mean() > 0.2 and (per_class == TRAIN_PER_CLASS).any()
    again = datasets.cifar100_split(train, test, "gldir", 4, seed=0, dirichlet_alpha=0.3, min_train_per_client=10)
    assert all(np.array_equal(split.train[k], again.train[k]) for k in split.train)
    reseeded = datasets.cifar100_split(train, test, "gldir", 4, seed=1, dirichlet_alpha=0.3, min_train_per_client=10)
    assert any(not np.array_equal(split.train[k], reseeded.train[k]) for k in split.train)


def test_patho_gives_every_client_exactly_k_classes(cifar):
    train, test = cifar["train"], cifar["test"]
    split = datasets.cifar100_split(train, test, "patho", 20, seed=0, classes_per_client=10)
    _check_disjoint_and_complete(split, 600, 300)                     # 20 x 10 slots cover all 100 classes twice
    holders = np.zeros(100, dtype=int)
    for client in split.groups["all"]:
        classes = set(train.fine_labels[split.train[client]].tolist())
        assert len(classes) == 10
        assert set(test.fine_labels[split.test[client]].tolist()) == classes
        assert split.train[client].size == 10 * TRAIN_PER_CLASS // 2
        holders[list(classes)] += 1
    assert holders.tolist() == [2] * 100
    few = datasets.cifar100_split(train, test, "patho", 3, seed=0, classes_per_client=10)
    assert [len(set(train.fine_labels[few.train[k]].tolist())) for k in few.groups["all"]] == [10, 10, 10]
    _check_disjoint_and_complete(few, None, None)
    with pytest.raises(ValueError, match="each client needs 101 classes but the training set has 100"):
        datasets.cifar100_split(train, test, "patho", 3, classes_per_client=101)
    with pytest.raises(ValueError, match=r"class \d+ has 6 training images but 10 clients hold it"):
        datasets.cifar100_split(train, test, "patho", 100, classes_per_client=10)


def test_scdir_gives_each_group_its_own_superclasses(cifar):
    train, test = cifar["train"], cifar["test"]
    split = datasets.cifar100_split(train, test, "scdir", 7, seed=0, superclass_groups=3, dirichlet_alpha=0.3,
                                    min_train_per_client=5)
    assert split.groups == {"sc0": ["sc0-00", "sc0-01", "sc0-02"], "sc1": ["sc1-00", "sc1-01"],
                            "sc2": ["sc2-00", "sc2-01"]}
    _check_disjoint_and_complete(split, 600, 300)
    group_superclasses = {}
    for group, clients in split.groups.items():
        group_train = np.concatenate([split.train[c] for c in clients])
        superclasses = set(train.coarse_labels[group_train].tolist())
        # the group holds every image of its superclasses' fine classes, train and test
        own_fine = np.flatnonzero(np.isin(np.arange(100) // 5, sorted(superclasses)))
        assert sorted(group_train.tolist()) == np.flatnonzero(np.isin(train.fine_labels, own_fine)).tolist()
        for client in clients:
            counts = np.bincount(train.fine_labels[split.train[client]], minlength=100)
            assert counts.sum() == split.train[client].size >= 5
            assert set(train.coarse_labels[split.train[client]].tolist()) <= superclasses
            assert set(test.coarse_labels[split.test[client]].tolist()) <= superclasses
        group_superclasses[group] = superclasses
    sizes = sorted(len(s) for s in group_superclasses.values())
    assert sizes == [6, 7, 7]
    assert set.union(*group_superclasses.values()) == set(range(20))
    assert sum(sizes) == 20                                             # disjoint
    with pytest.raises(ValueError, match="4 superclass groups but only"):
        small = datasets.CifarSplit(images=train.images[:30], fine_labels=train.fine_labels[:30] % 10,
                                    coarse_labels=(train.fine_labels[:30] % 10) // 5)
        datasets.cifar100_split(small, small, "scdir", 8, superclass_groups=4)


def test_cifar_partition_file_dispatches_and_converts_images(cifar_root, cifar):
    doc = {"name": "c", "dataset": "cifar100", "root": str(cifar_root), "scheme": "gldir", "clients": 4,
           "unseen_fraction": 0.25, "min_train_per_client": 10}
    spec = parse_partition(doc)
    clients = partition_clients(spec)
    assert [c.name for c in clients] == ["all-00", "all-01", "all-02", "all-03"]
    assert [c.unseen for c in clients] == [False, False, False, True] and {c.group for c in clients} == {"all"}
    data = client_arrays(spec, "all-01")
    train = cifar["train"]
    assert data.x_train.shape == (data.train_indices.size, 3, 32, 32) and data.x_train.dtype == np.float32
    np.testing.assert_array_equal(data.x_train, train.images[data.train_indices] / np.float32(255.0))
    np.testing.assert_array_equal(data.y_train, train.fine_labels[data.train_indices])
    np.testing.assert_array_equal(data.y_test, cifar["test"].fine_labels[data.test_indices])
    grey = client_arrays(parse_partition({**doc, "channels": 1, "image_size": 64}), "all-01")
    assert grey.x_train.shape == (data.train_indices.size, 1, 64, 64)
    first = Image.fromarray(train.images[data.train_indices[0]].transpose(1, 2, 0), "RGB").convert("L")
    np.testing.assert_allclose(grey.x_train[0, 0, ::2, ::2], np.asarray(first) / 255.0, atol=1e-7)
    np.testing.assert_array_equal(grey.x_train[0, 0, ::2, ::2], grey.x_train[0, 0, 1::2, 1::2])
    with pytest.raises(ValueError, match="has no client 'all-07'"):
        client_arrays(spec, "all-07")


# --------------------------------------------------------------------------- DomainNet

def test_scan_domainnet_keeps_the_top_classes(domainnet_root):
    index = datasets.scan_domainnet(domainnet_root, top_classes=3)
    assert index.classes == ("apple", "bee", "cat")
    assert sorted(index.files) == ["clipart", "real"]
    for domain in ("clipart", "real"):
        assert len(index.files[domain]) == 15
        assert np.bincount(index.labels[domain]).tolist() == [6, 5, 4]
        assert all(f.parent.parent.name == domain for f in index.files[domain])
        assert [index.classes[label] for label in index.labels[domain]] == [f.parent.name for f in index.files[domain]]
    only_real = datasets.scan_domainnet(domainnet_root, domains=["real"], top_classes=4)
    assert only_real.classes == ("apple", "bee", "cat", "dog") and list(only_real.files) == ["real"]


def test_domainnet_split_groups_clients_by_domain(domainnet_root):
    index = datasets.scan_domainnet(domainnet_root, top_classes=3)
    split = datasets.domainnet_split(index, clients_per_domain=2, dirichlet_alpha=0.6, test_fraction=0.25,
                                     seed=0, min_train_per_client=1)
    assert split.groups == {"clipart": ["clipart-00", "clipart-01"], "real": ["real-00", "real-01"]}
    for domain, clients in split.groups.items():
        train = np.concatenate([split.train[c] for c in clients])
        test = np.concatenate([split.test[c] for c in clients])
        # round half up of 0.25 x (6, 5, 4) test images per class = 2 + 1 + 1
        assert test.size == 4 and train.size == 11
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(15))   # disjoint and complete
        assert np.bincount(index.labels[domain][test], minlength=3).tolist() == [2, 1, 1]
        assert all(split.train[c].size >= 1 and split.test[c].size >= 1 for c in clients)
    again = datasets.domainnet_split(index, 2, 0.6, 0.25, 0, 1)
    assert all(np.array_equal(split.train[c], again.train[c]) for c in split.train)


def test_domainnet_partition_file_loads_resized_client_arrays(domainnet_root):
    spec = parse_partition({"name": "dn", "dataset": "domainnet", "root": str(domainnet_root), "clients_per_domain": 2,
                            "top_classes": 3, "test_fraction": 0.25, "image_size": 8, "min_train_per_client": 1,
                            "unseen_fraction": 0.5})
    assert [(c.name, c.group, c.unseen) for c in partition_clients(spec)] == [
        ("clipart-00", "clipart", False), ("clipart-01", "clipart", True),
        ("real-00", "real", False), ("real-01", "real", True)]
    index = datasets.scan_domainnet(domainnet_root, top_classes=3)
    data = client_arrays(spec, "real-01")
    assert data.x_train.shape == (data.train_indices.size, 3, 8, 8) and data.x_test.shape[1:] == (3, 8, 8)
    np.testing.assert_array_equal(data.y_train, index.labels["real"][data.train_indices])
    # the real domain's images are green 100 (the clipart ones green 0)
    assert np.allclose(data.x_train[:, 1], 100 / 255.0) and np.allclose(data.x_test[:, 1], 100 / 255.0)
    assert set(data.y_train.tolist()) | set(data.y_test.tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("kwargs, damage, message", [
    ({"top_classes": 5}, None, r"top_classes=5 but only 4 classes have images"),
    ({"domains": ["clipart", "sketch"]}, None, r"domain folder .*domainnet/sketch does not exist"),
    ({}, "text file", r"unknown image file .*real/bee/readme\.txt"),
    ({}, "no root", r"DomainNet root .*missing is not a folder"),
])
def test_domainnet_problems_are_clear_errors(domainnet_root, kwargs, damage, message):
    root = domainnet_root
    if damage == "text file":
        (root / "real" / "bee" / "readme.txt").write_text("x")
    elif damage == "no root":
        root = root.parent / "missing"
    with pytest.raises(ValueError, match=message):
        datasets.scan_domainnet(root, **{"top_classes": 3, **kwargs})


def test_domainnet_split_that_cannot_feed_every_client_says_so(domainnet_root):
    index = datasets.scan_domainnet(domainnet_root, top_classes=3)
    with pytest.raises(ValueError, match=r"DomainNet domain .*clipart \(2 clients\): no Dirichlet\(0.6\) draw"):
        datasets.domainnet_split(index, clients_per_domain=2, min_train_per_client=10)


# --------------------------------------------------------------------------- partition-file validation

@pytest.mark.parametrize("doc, message", [
    ({"name": "x", "dataset": "cifar10", "root": "/data"},
     r"dataset: unknown dataset 'cifar10' \(known: digits, mnist5k, imagefolder, cifar100, domainnet\)"),
    ({"name": "x", "dataset": "cifar100", "root": "/data", "scheme": "iid"},
     r"scheme: Input should be 'scdir', 'gldir' or 'patho'"),
    ({"name": "x", "dataset": "cifar100", "root": "/data"}, r"scheme: Field required"),
    ({"name": "x", "dataset": "cifar100", "scheme": "gldir"}, r"root: Field required"),
    ({"name": "x", "dataset": "cifar100", "root": "/d", "scheme": "scdir", "clients": 2}, "at least one client per"),
    ({"name": "x", "dataset": "domainnet", "root": "/d", "channels": 2}, r"channels: Input should be 1 or 3"),
    ({"name": "x", "dataset": "domainnet", "root": "/d", "domains": ["a b"]}, "domain names must match"),
    ({"name": "x", "dataset": "domainnet", "root": "/d", "test_fraction": 1.0}, "test_fraction"),
    ({"name": "x", "dataset": "imagefolder", "root": "/d", "train_per_client": 5}, "train_per_client: Extra inputs"),
])
def test_disk_partition_validation_errors(doc, message):
    with pytest.raises(ValueError, match=message):
        parse_partition(doc, "test partition")


def test_disk_partitions_with_a_missing_folder_fail_clearly(tmp_path):
    missing = str(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"no CIFAR-100 at .*nothing/cifar-100-safetensors"):
        partition_clients(parse_partition({"name": "x", "dataset": "cifar100", "root": missing, "scheme": "gldir"}))
    with pytest.raises(ValueError, match=r"ImageFolder root .*nothing is not a folder"):
        client_arrays(parse_partition({"name": "x", "dataset": "imagefolder", "root": missing}), "a")
    with pytest.raises(ValueError, match=r"DomainNet root .*nothing is not a folder"):
        partition_clients(parse_partition({"name": "x", "dataset": "domainnet", "root": missing}))


# --------------------------------------------------------------------------- module layering

def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions (``from a import b`` gives
    both ``a`` and ``a.b``: b may be a submodule)."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_partition_spec_and_datasets_never_import_worker_data():
    """One-way dependency: worker.partition_spec <- worker.datasets <- worker.data (no cycle)."""
    import worker.data
    import worker.partition_spec

    folder = Path(worker.data.__file__).parent
    assert "worker.data" not in _imported_modules(folder / "datasets.py")
    assert not {"worker.data", "worker.datasets"} & _imported_modules(folder / "partition_spec.py")
    # worker.data keeps re-exporting the schemas and records its callers import from it
    assert worker.data.parse_partition is worker.partition_spec.parse_partition
    assert worker.data.ClientData is datasets.ClientData is worker.partition_spec.ClientData
