"""The federation's label space (FederationConfig.classes, worker/labels.py): two sites whose
ImageFolders hold different class folders agree on every label once mapped by name; a class the
federation does not list, data with no class in common and ImageFolder data without classes are
clear errors; stored configs without classes still load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from support.datasets import RED, imagefolder_site as site

from shared.config import FederationConfig
from worker.data import client_arrays, load_partition, parse_partition
from worker.labels import CIFAR100_FINE_NAMES, label_map, partition_class_names, to_federation_labels

pytestmark = pytest.mark.unit

def mapped(spec_path: Path, client: str, federation: list[str] | None):
    spec = load_partition(spec_path)
    return to_federation_labels(client_arrays(spec, client), partition_class_names(spec), federation, spec, client)


def test_two_sites_with_different_class_folders_agree_on_every_label(tmp_path):
    federation = ["eel", "dog", "cat", "fox"]
    a = site(tmp_path / "machine-a", "site-a", {"train": {"cat": 2, "dog": 1}, "test": {"cat": 1, "dog": 1}})
    b = site(tmp_path / "machine-b", "site-b", {"train": {"dog": 2, "eel": 1}, "test": {"eel": 1}})
    # on its own machine each site numbers its folders from 0: dog is 1 at a and 0 at b
    assert partition_class_names(load_partition(a)) == ["cat", "dog"]
    assert partition_class_names(load_partition(b)) == ["dog", "eel"]
    data_a, data_b = mapped(a, "site-a", federation), mapped(b, "site-b", federation)
    assert data_a.y_train.tolist() == [2, 2, 1] and data_a.y_test.tolist() == [2, 1]
    assert data_b.y_train.tolist() == [1, 1, 0] and data_b.y_test.tolist() == [0]
    for data in (data_a, data_b):  # label i is federation[i] everywhere: the images say so
        for x, y in zip(np.concatenate([data.x_train, data.x_test]), np.concatenate([data.y_train, data.y_test])):
            assert x[0].max() == pytest.approx(RED[federation[int(y)]] / 255.0)


def test_a_class_the_federation_does_not_list_is_an_error_naming_it(tmp_path):
    a = site(tmp_path / "m", "site-a", {"train": {"cat": 1, "fox": 1}, "test": {"cat": 1}})
    with pytest.raises(ValueError, match=r"client site-a holds classes the federation does not list: 'fox'"):
        mapped(a, "site-a", ["cat", "dog"])


def test_no_class_in_common_is_an_error(tmp_path):
    a = site(tmp_path / "m", "site-a", {"train": {"fox": 1}, "test": {"eel": 1}})
    with pytest.raises(ValueError, match="no class in common"):
        mapped(a, "site-a", ["cat", "dog"])


def test_imagefolder_data_needs_the_federations_classes(tmp_path):
    a = site(tmp_path / "m", "site-a", {"train": {"cat": 1}, "test": {"cat": 1}})
    with pytest.raises(ValueError, match=r"ImageFolder data but the federation lists no classes.*\"classes\""):
        mapped(a, "site-a", None)


def test_builtin_datasets_keep_their_labels_and_name_them():
    spec = load_partition("tiny")
    assert partition_class_names(spec) == [str(d) for d in range(10)]
    data = client_arrays(spec, "upright-00")
    assert to_federation_labels(data, partition_class_names(spec), None, spec, "upright-00") is data
    same = to_federation_labels(data, partition_class_names(spec), [str(d) for d in range(10)], spec, "upright-00")
    assert same is data
    # a federation that orders the digits otherwise gets its own labels
    reverse = [str(d) for d in range(9, -1, -1)]
    flipped = to_federation_labels(data, partition_class_names(spec), reverse, spec, "upright-00")
    assert (flipped.y_train == 9 - data.y_train).all() and (flipped.y_test == 9 - data.y_test).all()
    cifar = parse_partition({"name": "c", "dataset": "cifar100", "root": "/nowhere", "scheme": "gldir", "clients": 2})
    assert partition_class_names(cifar) == list(CIFAR100_FINE_NAMES)
    assert len(CIFAR100_FINE_NAMES) == 100 and list(CIFAR100_FINE_NAMES) == sorted(CIFAR100_FINE_NAMES)


def test_label_map_reference():
    """Against the obvious loop: every held local label goes to the federation's index of its name."""
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(30)]
    for _ in range(50):
        federation = list(rng.permutation(names))
        local = sorted(rng.choice(names, size=int(rng.integers(1, 30)), replace=False).tolist())
        held = rng.integers(0, len(local), size=20)
        out = label_map(local, held, federation, "x")
        for i, name in enumerate(local):
            assert out[i] == federation.index(name)


def _config(**extra) -> dict:
    from shared.manifest import qv_targets

    return {"name": "f", "backbone": {"model": "m", "sha256": hashlib.sha256(b"x").hexdigest()},
            "manifest": {"targets": [t.model_dump() for t in qv_targets(1, 4)],
                         "tiers": {t: {"rank": 2, "alpha": 2} for t in ("root", "cluster", "leaf")},
                         "head": {"in_features": 4, "num_classes": 3}}, **extra}


@pytest.mark.parametrize(("classes", "message"), [
    (["a", "b"], "names 2 classes but the model's head has 3 outputs"),
    (["a", "b", "a"], r"classes\[2\] 'a' repeats classes\[0\]"),
    ([], "at least one class"),
    (["a", " b", "c"], r"classes\[1\]"),
    (["a", "b", "c\n"], r"classes\[2\]"),
    (["a", "b", "x" * 201], r"classes\[2\]"),
])
def test_bad_classes_are_refused(classes, message):
    with pytest.raises(ValueError, match=message):
        FederationConfig.model_validate(_config(classes=classes))


def test_a_config_stored_without_classes_still_loads_and_classes_round_trip():
    assert FederationConfig.model_validate(_config()).classes is None
    cfg = FederationConfig.model_validate(_config(classes=["cat", "dog", "eel"]))
    assert FederationConfig.model_validate_json(cfg.model_dump_json()).classes == ["cat", "dog", "eel"]


def test_the_federation_file_carries_classes(tmp_path):
    from hilora.federation_file import FederationFile, build_federation_config

    checkpoint = tmp_path / "b.safetensors"
    checkpoint.write_bytes(b"not read here")
    doc = _config()
    file = FederationFile.model_validate({"name": "f", "backbone": {"model": "m", "checkpoint": str(checkpoint)},
                                          "manifest": doc["manifest"], "classes": ["cat", "dog", "eel"],
                                          "preprocessing": "none"})
    config, _ = build_federation_config(file)
    assert config.classes == ["cat", "dog", "eel"]
    file = FederationFile.model_validate({"name": "f", "backbone": {"model": "m", "checkpoint": str(checkpoint)},
                                          "manifest": doc["manifest"], "classes": ["cat"], "preprocessing": "none"})
    with pytest.raises(ValueError, match="head has 3 outputs"):
        build_federation_config(file)
