"""Robust aggregation: norm clipping of each client's update (docs/security.md, "Norm clipping").

A client's *update* is what its upload changes relative to the round's input version of the tier
(``previous``). With ``TierPolicy.clip_norm = c`` every update longer than ``c`` is scaled down to
length ``c`` before aggregation; shorter ones are used unchanged (bit for bit). The length is one
L2 norm over the client's whole update, so clipping keeps its direction:

- product_svd tiers: in product space, ``sum_targets ||B_i A_i - B_0 A_0||_F^2``, because that is
  the space the tier is aggregated in (the aggregate is the rank-r SVD of ``sum_i w_i B_i A_i``);
  clipping there bounds each client's pull on the aggregate before the rank reset by ``w_i * c``.
  The clipped product ``B_0 A_0 + s (B_i A_i - B_0 A_0)`` is carried as the exact rank-2r factors
  ``[s B_i, (1 - s) B_0] [A_i; A_0]`` (``shared.aggregate.aggregate_product_space`` accepts
  per-client ranks), so no d_out x d_in matrix is ever formed;
- factor_avg tiers: on the aggregated factors themselves, ``||X_i - X_0||^2`` summed (the factors
  are what is averaged there);
- in both, the squared distance of the head (``head.weight``, ``head.bias``) is added when the head
  is aggregated, and scaled by the same ``s = c / norm``.

Everything is float64 and a pure function of its inputs (uploads in client order), so the
aggregate stays deterministic. The slow dense reference lives in tests/unit/test_robust.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from shared.config import TierPolicy
    from shared.manifest import AdapterManifest

Tensors = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class ClipReport:
    """What clipping did to one round's uploads (in the order given)."""

    clip_norm: float
    norms: tuple[float, ...]
    scales: tuple[float, ...]  # 1.0: used unchanged

    @property
    def clipped(self) -> int:
        return sum(1 for s in self.scales if s < 1.0)


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def product_difference_norm(B_new: np.ndarray, A_new: np.ndarray, B_old: np.ndarray, A_old: np.ndarray) -> float:
    """``||B_new A_new - B_old A_old||_F`` without forming either product.

    Written as ``X Y`` with ``X = [B_new - B_old, B_old]`` and ``Y = [A_new; A_new - A_old]`` (no
    cancellation when the change is small); the norm is ``||R_X R_Y^T||_F`` from the QRs of X and
    Y^T (both tall and thin)."""
    B_new, A_new, B_old, A_old = _f64(B_new), _f64(A_new), _f64(B_old), _f64(A_old)
    if B_new.shape == B_old.shape and A_new.shape == A_old.shape:
        X, Y = np.hstack([B_new - B_old, B_old]), np.vstack([A_new, A_new - A_old])
    else:
        X, Y = np.hstack([B_new, -B_old]), np.vstack([A_new, A_old])
    R_X = np.linalg.qr(X, mode="r")
    R_Y = np.linalg.qr(Y.T, mode="r")
    return float(np.linalg.norm(R_X @ R_Y.T))


def _product_space(policy: TierPolicy) -> bool:
    return policy.A == "aggregate" and policy.B == "aggregate" and policy.aggregation == "product_svd"


def update_norm(manifest: AdapterManifest, tier: str, policy: TierPolicy, previous: Tensors,
                upload: Tensors) -> float:
    """The L2 length of one client's update of this tier (see the module docstring)."""
    squared = 0.0
    if _product_space(policy):
        for t in manifest.targets:
            a, b = f"{t.name}.lora_A", f"{t.name}.lora_B"
            squared += product_difference_norm(upload[b], upload[a], previous[b], previous[a]) ** 2
    else:
        for factor in ("A", "B"):
            if getattr(policy, factor) == "aggregate":
                for name in manifest.factor_shapes(tier, factor):
                    squared += float(np.sum((_f64(upload[name]) - _f64(previous[name])) ** 2))
    if policy.head == "aggregate":
        for name in manifest.factor_shapes(tier, "head"):
            squared += float(np.sum((_f64(upload[name]) - _f64(previous[name])) ** 2))
    return float(np.sqrt(squared))


def scale_update(manifest: AdapterManifest, tier: str, policy: TierPolicy, previous: Tensors,
                 upload: Tensors, scale: float) -> dict[str, np.ndarray]:
    """The upload whose update is ``scale`` times the original one (0 <= scale <= 1).

    ``scale == 1`` returns the upload's own arrays. Product-space tiers get rank-2r factors
    ``[s B_i, (1 - s) B_0]`` and ``[A_i; A_0]``; everything else ``X_0 + s (X_i - X_0)``."""
    if not 0.0 <= scale <= 1.0:
        raise ValueError(f"scale must be in [0, 1], got {scale}")
    if scale == 1.0:
        return dict(upload)
    out = dict(upload)
    linear: list[str] = []
    if _product_space(policy):
        for t in manifest.targets:
            a, b = f"{t.name}.lora_A", f"{t.name}.lora_B"
            out[b] = np.hstack([scale * _f64(upload[b]), (1.0 - scale) * _f64(previous[b])])
            out[a] = np.vstack([_f64(upload[a]), _f64(previous[a])])
    else:
        for factor in ("A", "B"):
            if getattr(policy, factor) == "aggregate":
                linear += list(manifest.factor_shapes(tier, factor))
    if policy.head == "aggregate":
        linear += list(manifest.factor_shapes(tier, "head"))
    for name in linear:
        old = _f64(previous[name])
        out[name] = old + scale * (_f64(upload[name]) - old)
    return out


def clip_bound(norms: Sequence[float], clip_norm: float | None, clip_relative: float | None) -> float:
    """The length updates are clipped to: ``clip_norm``, ``clip_relative`` times the median of the
    round's update norms, or the smaller of the two (inf when neither is set)."""
    bounds = [math.inf]
    if clip_norm is not None:
        bounds.append(float(clip_norm))
    if clip_relative is not None and len(norms):
        bounds.append(float(clip_relative) * float(np.median(np.asarray(norms, dtype=np.float64))))
    return min(bounds)


def clip_uploads(manifest: AdapterManifest, tier: str, policy: TierPolicy, previous: Tensors,
                 uploads: Sequence[Tensors]) -> tuple[list[dict[str, np.ndarray]], ClipReport | None]:
    """Clip every upload's update to ``policy.clip_norm`` and/or ``policy.clip_relative`` times the
    round's median update norm (``clip_bound``). Returns the uploads to aggregate (in the same order)
    and the report; with neither set, the uploads unchanged and None."""
    if policy.clip_norm is None and policy.clip_relative is None:
        return [dict(u) for u in uploads], None
    norms = [update_norm(manifest, tier, policy, previous, u) for u in uploads]
    c = clip_bound(norms, policy.clip_norm, policy.clip_relative)
    scales = [c / n if n > c else 1.0 for n in norms]  # c = 0 (a zero median) scales every update to 0
    clipped = [scale_update(manifest, tier, policy, previous, u, s) for u, s in zip(uploads, scales)]
    return clipped, ClipReport(clip_norm=c, norms=tuple(norms), scales=tuple(scales))


def cap_weights(weights: Sequence[float], max_ratio: float | None) -> tuple[list[float], int]:
    """Cap every aggregation weight at ``max_ratio`` times the median weight (``TierPolicy.
    max_weight_ratio``). Returns the weights to aggregate with (same order) and how many were capped;
    with ``max_ratio`` None, the weights unchanged and 0.

    The median is of the weights as reported, so a minority of clients that inflate theirs moves
    neither the cap nor anyone else's weight: each of them counts at most ``max_ratio`` honest
    medians. Weights at or below the cap are returned bit for bit."""
    values = [float(w) for w in weights]
    if max_ratio is None or not values:
        return values, 0
    cap = float(max_ratio) * float(np.median(np.asarray(values, dtype=np.float64)))
    capped = [min(w, cap) for w in values]
    return capped, sum(1 for w, c in zip(values, capped) if c < w)
