"""The class-wise head distance (shared.probes.classwise_head_distance) against a slow reference,
its invariances, and how probe_distance mixes it into the update distance."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from shared.manifest import AdapterManifest, qv_targets
from shared.probes import classwise_head_distance, probe_distance
from shared.subspace import lsac

pytestmark = pytest.mark.unit


def reference(root, probes):
    """Pair by pair, class by class, as docs/method.md writes it."""
    n = len(probes)
    D = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            cosines = []
            for c in range(root["head.weight"].shape[0]):
                ri = probes[i]["head.weight"][c] - root["head.weight"][c]
                rj = probes[j]["head.weight"][c] - root["head.weight"][c]
                hi = probes[i]["head.bias"][c] - root["head.bias"][c] > 0
                hj = probes[j]["head.bias"][c] - root["head.bias"][c] > 0
                if hi != hj:
                    continue
                ni, nj = np.linalg.norm(ri), np.linalg.norm(rj)
                cosines.append(0.0 if ni == 0 or nj == 0 else float(ri @ rj) / (ni * nj))
            D[i, j] = min(max(1.0 - (np.mean(cosines) if cosines else 0.0), 0.0), 2.0)
    return D


def heads(rng, n, classes=5, dim=7):
    root = {"head.weight": rng.normal(size=(classes, dim)), "head.bias": rng.normal(size=classes)}
    probes = [{"head.weight": root["head.weight"] + rng.normal(size=(classes, dim)),
               "head.bias": root["head.bias"] + rng.normal(size=classes)} for _ in range(n)]
    return root, probes


@pytest.mark.parametrize("seed", range(4))
def test_matches_the_reference(seed):
    rng = np.random.default_rng(seed)
    root, probes = heads(rng, 9)
    probes[3]["head.weight"][2] = root["head.weight"][2]          # an unchanged row: cosine 0 with everyone
    probes[4]["head.bias"] = root["head.bias"] + np.where(np.arange(5) % 2 == 0, 1.0, -1.0)
    probes[5]["head.bias"] = root["head.bias"] - np.where(np.arange(5) % 2 == 0, 1.0, -1.0)  # no class agrees
    D = classwise_head_distance(root, probes)
    np.testing.assert_allclose(D, reference(root, probes), atol=1e-12)
    assert D[4, 5] == pytest.approx(1.0)                           # nothing to compare: distance 1
    assert np.all(np.diag(D) == 0.0) and np.allclose(D, D.T)


def test_invariant_to_how_often_a_class_occurs():
    """Scaling a client's rows (how much each class moved, i.e. how often it occurs) changes
    nothing; flipping a row's direction (the class recognised differently) does."""
    rng = np.random.default_rng(1)
    root, probes = heads(rng, 4)
    scaled = [dict(p) for p in probes]
    scaled[0] = {"head.weight": root["head.weight"] + (probes[0]["head.weight"] - root["head.weight"])
                 * rng.uniform(0.01, 50.0, size=(5, 1)), "head.bias": probes[0]["head.bias"]}
    np.testing.assert_allclose(classwise_head_distance(root, scaled), classwise_head_distance(root, probes),
                               atol=1e-12)
    flipped = [dict(p) for p in probes]
    flipped[0] = {"head.weight": 2 * root["head.weight"] - probes[0]["head.weight"], "head.bias": probes[0]["head.bias"]}
    assert not np.allclose(classwise_head_distance(root, flipped)[0, 1:], classwise_head_distance(root, probes)[0, 1:])


def test_bad_heads_are_refused():
    rng = np.random.default_rng(2)
    root, probes = heads(rng, 3)
    probes[1]["head.weight"][0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        classwise_head_distance(root, probes)
    root, probes = heads(rng, 3)
    probes[1]["head.bias"] = probes[1]["head.bias"][:3]
    with pytest.raises(ValueError):
        classwise_head_distance(root, probes)


def _manifest(classes, dim):
    targets = qv_targets(1, dim)
    return targets, AdapterManifest.model_validate({
        "targets": [t.model_dump() for t in targets],
        "tiers": {t: {"rank": 2, "alpha": 2} for t in ("root", "cluster", "leaf")},
        "head": {"in_features": dim, "num_classes": classes}})


def test_probe_distance_mixes_the_two_distances():
    targets, manifest = _manifest(3, 6)
    rng = np.random.default_rng(3)

    def adapter():
        out = {}
        for t in targets:
            out[f"{t.name}.lora_A"], out[f"{t.name}.lora_B"] = rng.normal(size=(2, 6)), rng.normal(size=(6, 2))
        out["head.weight"], out["head.bias"] = rng.normal(size=(3, 6)), rng.normal(size=3)
        return out

    root, probes = adapter(), [adapter() for _ in range(5)]
    update = probe_distance(manifest, "update", root, probes)
    classwise = classwise_head_distance(root, probes)
    np.testing.assert_allclose(probe_distance(manifest, "update", root, probes, classwise_weight=0.0), update)
    np.testing.assert_allclose(probe_distance(manifest, "update", root, probes, classwise_weight=1.0), classwise)
    np.testing.assert_allclose(probe_distance(manifest, "update", root, probes, classwise_weight=0.25),
                               0.75 * update + 0.25 * classwise)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="classwise_weight"):
            probe_distance(manifest, "update", root, probes, classwise_weight=bad)


def test_label_skew_hides_an_input_shift_that_the_classwise_distance_finds():
    """Two groups that recognise every class differently (an input shift: upright and inverted)
    and a strong label skew inside each group: the flattened update clusters by which classes a
    client holds, the class-wise mix finds the groups."""
    classes, dim, n = 6, 16, 16
    targets, manifest = _manifest(classes, dim)
    rng = np.random.default_rng(4)
    directions = rng.normal(size=(2, classes, dim))             # each group's way of recognising class c
    zero = {f"{t.name}.lora_{m}": np.zeros((2, dim) if m == "A" else (dim, 2)) for t in targets for m in "AB"}
    root = {**zero, "head.weight": np.zeros((classes, dim)), "head.bias": np.zeros(classes)}
    probes, groups = [], []
    for i in range(n):
        group = i % 2
        held = rng.choice(classes, size=2, replace=False) if i < n // 2 else np.array([i % classes, (i + 1) % classes])
        counts = np.full(classes, 0.02)
        counts[held] = rng.uniform(5.0, 20.0, size=2)               # strong label skew: two classes dominate
        rows = counts[:, None] * (directions[group] + 0.3 * rng.normal(size=(classes, dim)))
        bias = np.where(counts > 1, 1.0, -0.1) * counts
        probes.append({**zero, "head.weight": rows, "head.bias": bias})
        groups.append(group)
    update = probe_distance(manifest, "update", root, probes, classwise_weight=0.0)
    mixed = probe_distance(manifest, "update", root, probes, classwise_weight=0.5)
    plain = lsac(update, k_rule="silhouette", seed=0)
    found = lsac(mixed, k_rule="silhouette", seed=0)
    assert adjusted_rand_score(groups, plain.labels) < 0.5
    assert found.k == 2 and adjusted_rand_score(groups, found.labels) == 1.0
