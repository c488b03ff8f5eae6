"""Wire tensors -> LSAC features: the factor pairs of an adapter, head deltas, probe distances.

Used by the coordinator's clustering service and by the library-level cascade benchmark, so both
cluster exactly the same way."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from shared.manifest import AdapterManifest
from shared.subspace import subspace_bases, subspace_distance, update_distance

Tensors = Mapping[str, np.ndarray]


def factor_pairs(manifest: AdapterManifest, tensors: Tensors) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """target name -> (B, A) in float64, from one tier's wire tensors."""
    return {t.name: (np.asarray(tensors[f"{t.name}.lora_B"], dtype=np.float64),
                     np.asarray(tensors[f"{t.name}.lora_A"], dtype=np.float64))
            for t in manifest.targets}


def head_delta(tensors: Tensors, root: Tensors) -> np.ndarray:
    """Flattened (head.weight, head.bias) difference of an upload from the root it started at."""
    return np.concatenate([(np.asarray(tensors[k], dtype=np.float64) - np.asarray(root[k], dtype=np.float64)).ravel()
                           for k in ("head.weight", "head.bias")])


def classwise_head_distance(root: Tensors, probes: Sequence[Tensors]) -> np.ndarray:
    """Pairwise distances (n x n, in [0, 2], zero diagonal) of the probes' head deltas class by class.

    For clients i and j, the cosine of their head-row deltas (``head.weight[c] - root[c]``) is
    averaged over the classes c that both hold or both lack, a client holding c when its bias
    delta for c is positive (cross entropy raises the bias of a class its data has more of than
    the model predicts); the distance is 1 minus that mean (1 where no class qualifies).

    Why: with label skew, the flattened update of a client is dominated by which classes it holds
    (the rows of its frequent classes move most), which drowns how it maps inputs to each class:
    two upright clients holding different digits look less alike than an upright and an inverted
    client holding the same ones. Each row scaled to unit norm, and compared only where the two
    clients' label sets agree, says how each class is recognised regardless of how often it occurs
    (docs/method.md, "Class-wise head distance")."""
    weights = np.asarray([np.asarray(p["head.weight"], dtype=np.float64) - np.asarray(root["head.weight"],
                                                                                     dtype=np.float64)
                          for p in probes])
    biases = np.asarray([np.asarray(p["head.bias"], dtype=np.float64) - np.asarray(root["head.bias"],
                                                                                  dtype=np.float64)
                         for p in probes])
    if weights.ndim != 3 or biases.shape != weights.shape[:2]:
        raise ValueError(f"head deltas of shape {weights.shape} and biases {biases.shape}: expected (n, classes, "
                         "dim) and (n, classes)")
    if not (np.all(np.isfinite(weights)) and np.all(np.isfinite(biases))):
        raise ValueError("head deltas contain non-finite values")
    n, classes, _ = weights.shape
    norms = np.linalg.norm(weights, axis=2, keepdims=True)
    unit = np.divide(weights, norms, out=np.zeros_like(weights), where=norms > 0)
    held = (biases > 0).astype(np.float64)
    lacked = 1.0 - held
    total = np.zeros((n, n))
    count = np.zeros((n, n))
    for c in range(classes):
        agree = np.outer(held[:, c], held[:, c]) + np.outer(lacked[:, c], lacked[:, c])
        total += agree * (unit[:, c, :] @ unit[:, c, :].T)
        count += agree
    similarity = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    distance = np.clip(1.0 - similarity, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    return distance


def probe_distance(manifest: AdapterManifest, features: str, root: Tensors, probes: Sequence[Tensors],
                   head_weight: float = 1.0, classwise_weight: float = 0.0) -> np.ndarray:
    """Pairwise distances of probe uploads taken from the same ``root``: ``update`` (cosine of the
    flattened dW plus the head delta scaled by ``head_weight``, mixed with ``classwise_weight`` of
    ``classwise_head_distance``: ``(1 - w) D_update + w D_classwise``) or ``subspace`` (principal
    angles of the B updates)."""
    clients = [factor_pairs(manifest, p) for p in probes]
    root_pairs = factor_pairs(manifest, root)
    if features == "update":
        if not 0.0 <= classwise_weight <= 1.0:
            raise ValueError(f"classwise_weight must be in [0, 1], got {classwise_weight}")
        heads = None if head_weight == 0.0 else [head_weight * head_delta(p, root) for p in probes]
        distance = update_distance(clients, root_pairs, heads) if classwise_weight < 1.0 else 0.0
        if classwise_weight > 0.0:
            distance = (1.0 - classwise_weight) * distance + classwise_weight * classwise_head_distance(root, probes)
        return distance
    if features == "subspace":
        return subspace_distance(subspace_bases(clients, root_pairs, manifest.tiers["root"].rank))
    raise ValueError(f"unknown LSAC features {features!r}: use 'update' or 'subspace'")
