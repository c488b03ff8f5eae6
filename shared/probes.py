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


def probe_distance(manifest: AdapterManifest, features: str, root: Tensors, probes: Sequence[Tensors],
                   head_weight: float = 1.0) -> np.ndarray:
    """Pairwise distances of probe uploads taken from the same ``root``: ``update`` (cosine of the
    flattened dW plus the head delta scaled by ``head_weight``) or ``subspace`` (principal angles of
    the B updates)."""
    clients = [factor_pairs(manifest, p) for p in probes]
    root_pairs = factor_pairs(manifest, root)
    if features == "update":
        if head_weight == 0.0:
            return update_distance(clients, root_pairs, None)
        return update_distance(clients, root_pairs, [head_weight * head_delta(p, root) for p in probes])
    if features == "subspace":
        return subspace_distance(subspace_bases(clients, root_pairs, manifest.tiers["root"].rank))
    raise ValueError(f"unknown LSAC features {features!r}: use 'update' or 'subspace'")
