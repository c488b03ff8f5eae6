"""Partition files and client arrays (worker/data.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from worker.data import (
    NUM_CLASSES,
    apply_transforms,
    builtin_partitions,
    client_arrays,
    client_class_proportions,
    digit_pools,
    load_partition,
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
    assert {"demo", "tiny"} <= set(builtin_partitions())
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
