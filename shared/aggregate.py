"""Server-side aggregation of LoRA factors (method.md section 2).

Everything here is a pure function of its arguments, computed in float64: the same inputs, in the
same order, always give the same bytes. Callers pass uploads sorted by client id.

- ``aggregate_product_space``: FlexLoRA-style aggregation. The weighted sum of the clients'
  products ``dW = sum_i w_i B_i A_i`` is reset to rank ``rank`` by a truncated SVD,
  ``B := U_r`` (orthonormal columns) and ``A := S_r V_r^T``.
- ``average_factors``: FedIT-style plain weighted averaging (also used for classifier heads).
- ``relative_change``: the stopping statistic ``rho_t`` of the root stage, from factors only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from shared.config import TierPolicy
    from shared.manifest import AdapterManifest

AggregationMethod = Literal["auto", "qr", "dense"]

# Singular values below this fraction of sum_i w_i ||B_i||_F ||A_i||_F (an upper bound of
# ||dW||_2, hence of the floating-point noise scale of any way of computing dW) count as zero:
# their singular vectors are noise, so they are replaced by a deterministic padding.
_ZERO_SINGULAR_VALUE_RTOL = 1e-12
# The dense path multiplies stacked factors in chunks of at most this many columns, so memory
# stays O(d_out * d_in + d * chunk) whatever the number of clients.
_DENSE_ACCUMULATION_CHUNK_COLUMNS = 512


def _as_finite_float64_matrix(value: object, what: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-D matrix, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} contains non-finite values")
    return array


def _normalized_weights(weights: object, count: int) -> np.ndarray:
    weight_array = np.asarray(weights, dtype=np.float64)
    if weight_array.ndim != 1 or weight_array.shape[0] != count:
        raise ValueError(f"expected {count} weights, got shape {weight_array.shape}")
    if not np.all(np.isfinite(weight_array)):
        raise ValueError("weights contain non-finite values")
    if np.any(weight_array < 0):
        raise ValueError("weights must be non-negative")
    total = float(weight_array.sum())
    if total <= 0.0:
        raise ValueError("weights sum to zero")
    return weight_array / total


def _canonical_signs(U: np.ndarray, V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip each pair (U[:, j], V[:, j]) so the largest-magnitude entry of U[:, j] is positive."""
    if U.shape[1] == 0:
        return U, V
    rows_of_largest = np.argmax(np.abs(U), axis=0)
    signs = np.sign(U[rows_of_largest, np.arange(U.shape[1])])
    signs[signs == 0] = 1.0
    return U * signs, V * signs


def _orthonormal_complement_columns(U: np.ndarray, count: int) -> np.ndarray:
    """``count`` orthonormal columns orthogonal to the orthonormal columns of ``U``.

    Deterministic and continuous in ``U`` for generic inputs: the trailing columns of the
    complete Householder QR of ``U`` (the first columns of the identity when ``U`` is empty).
    """
    d, k = U.shape
    if k == 0:
        complement = np.eye(d, count)
    else:
        complete_q = np.linalg.qr(U, mode="complete")[0]
        complement = complete_q[:, k : k + count]
    signs = np.sign(complement[np.argmax(np.abs(complement), axis=0), np.arange(count)])
    signs[signs == 0] = 1.0
    return complement * signs


def _factors_from_svd(
    U: np.ndarray, singular_values: np.ndarray, V: np.ndarray, rank: int, noise_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``rank`` factors ``B = U_r``, ``A = S_r V_r^T`` with the sign and padding conventions.

    ``U`` (d_out x k), ``V`` (d_in x k) and ``singular_values`` (k, descending) come from any exact
    SVD of dW. Singular values at the noise level are dropped and their columns replaced by a
    deterministic orthonormal completion of U with zero rows in A.
    """
    kept = min(rank, singular_values.shape[0])
    threshold = _ZERO_SINGULAR_VALUE_RTOL * noise_scale
    kept = int(np.count_nonzero(singular_values[:kept] > threshold))
    U_kept, V_kept = _canonical_signs(U[:, :kept], V[:, :kept])
    d_out, d_in = U.shape[0], V.shape[0]
    B = np.empty((d_out, rank), dtype=np.float64)
    A = np.zeros((rank, d_in), dtype=np.float64)
    B[:, :kept] = U_kept
    A[:kept] = singular_values[:kept, None] * V_kept.T
    if kept < rank:
        B[:, kept:] = _orthonormal_complement_columns(U_kept, rank - kept)
    return B, A


def _svd_by_qr_of_stacked_factors(
    stacked_B: np.ndarray, stacked_A: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SVD of ``stacked_B @ stacked_A`` via QR of both factors and an SVD of the small core."""
    Q_B, R_B = np.linalg.qr(stacked_B)
    Q_A, R_A = np.linalg.qr(stacked_A.T)
    core_U, singular_values, core_Vt = np.linalg.svd(R_B @ R_A.T, full_matrices=False)
    kept = min(rank, singular_values.shape[0])
    return Q_B @ core_U[:, :kept], singular_values[:kept], Q_A @ core_Vt[:kept].T


def _svd_of_accumulated_sum(
    weighted_Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact SVD of the dense sum ``sum_i weighted_B_i @ A_i``, accumulated chunk by chunk."""
    d_out, d_in = weighted_Bs[0].shape[0], As[0].shape[1]
    dense_sum = np.zeros((d_out, d_in), dtype=np.float64)
    start = 0
    while start < len(As):
        stop, columns = start, 0
        while stop < len(As) and (stop == start or columns + As[stop].shape[0]
                                  <= _DENSE_ACCUMULATION_CHUNK_COLUMNS):
            columns += As[stop].shape[0]
            stop += 1
        dense_sum += np.hstack(weighted_Bs[start:stop]) @ np.vstack(As[start:stop])
        start = stop
    U, singular_values, Vt = np.linalg.svd(dense_sum, full_matrices=False)
    return U[:, :rank], singular_values[:rank], Vt[:rank].T


def aggregate_product_space(
    Bs: Sequence[np.ndarray],
    As: Sequence[np.ndarray],
    weights: Sequence[float] | np.ndarray,
    rank: int,
    method: AggregationMethod = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate LoRA factors in product space and reset them to rank ``rank``.

    Computes the rank-``rank`` truncated SVD ``U_r S_r V_r^T`` of ``dW = sum_i w_i B_i A_i`` in
    float64 and returns ``(B, A) = (U_r, S_r V_r^T)``: B is (d_out x rank) with orthonormal
    columns, A is (rank x d_in).

    Args:
        Bs: ``Bs[i]`` is client i's B, shape (d_out, r_i).
        As: ``As[i]`` is client i's A, shape (r_i, d_in). Ranks r_i may differ between clients.
        weights: non-negative, not all zero; normalised to sum 1 here.
        rank: output rank, 1 <= rank <= min(d_out, d_in).
        method: ``"qr"`` (QR of the stacked ``[w_i B_i]`` and ``[A_i^T]`` and an SVD of the small
            core), ``"dense"`` (accumulate the d_out x d_in sum once, then an exact SVD) or
            ``"auto"`` (qr when ``sum_i r_i < min(d_out, d_in)``, else dense). Both are exact.

    Conventions (so both methods give the same numbers up to round-off and the same inputs always
    give the same bytes): each singular pair is sign-flipped so that the largest-magnitude entry of
    its B column is positive; singular values at the floating-point noise level of dW (below 1e-12
    times ``sum_i w_i ||B_i||_F ||A_i||_F``) count as zero, and when dW has fewer than ``rank``
    non-zero singular values the remaining A rows are zero and the remaining B columns are a
    deterministic orthonormal completion. Inputs are used in the order given.

    Raises:
        ValueError: empty input, length or shape mismatch, non-finite values, negative or all-zero
            weights, a bad rank or an unknown method.
    """
    if method not in ("auto", "qr", "dense"):
        raise ValueError(f"unknown aggregation method {method!r}")
    if len(Bs) == 0:
        raise ValueError("nothing to aggregate: no factors given")
    if len(Bs) != len(As):
        raise ValueError(f"{len(Bs)} B factors but {len(As)} A factors")
    normalized = _normalized_weights(weights, len(Bs))
    B_list = [_as_finite_float64_matrix(B, f"Bs[{i}]") for i, B in enumerate(Bs)]
    A_list = [_as_finite_float64_matrix(A, f"As[{i}]") for i, A in enumerate(As)]
    d_out, d_in = B_list[0].shape[0], A_list[0].shape[1]
    for i, (B, A) in enumerate(zip(B_list, A_list)):
        if B.shape[0] != d_out or A.shape[1] != d_in:
            raise ValueError(f"client {i}: B {B.shape} x A {A.shape} is not {d_out} x {d_in}")
        if B.shape[1] != A.shape[0] or B.shape[1] == 0:
            raise ValueError(f"client {i}: B {B.shape} and A {A.shape} need a common rank >= 1")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise ValueError(f"rank must be an integer, got {rank!r}")
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank must be in [1, {min(d_out, d_in)}], got {rank}")

    weighted_Bs = [w * B for w, B in zip(normalized, B_list)]
    total_rank = sum(A.shape[0] for A in A_list)
    if method == "auto":
        method = "qr" if total_rank < min(d_out, d_in) else "dense"
    if method == "qr":
        U, singular_values, V = _svd_by_qr_of_stacked_factors(
            np.hstack(weighted_Bs), np.vstack(A_list), rank
        )
    else:
        U, singular_values, V = _svd_of_accumulated_sum(weighted_Bs, A_list, rank)
    noise_scale = float(sum(
        w * np.linalg.norm(B) * np.linalg.norm(A)
        for w, B, A in zip(normalized, B_list, A_list)
    ))
    return _factors_from_svd(U, singular_values, V, rank, noise_scale)


def average_factors(
    arrays: Sequence[np.ndarray], weights: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Weighted mean ``sum_i w_i x_i / sum_i w_i`` of equally shaped arrays, in float64.

    FedIT-style plain factor averaging; also used for classifier heads.

    Raises:
        ValueError: empty input, shape mismatch, non-finite values, negative or all-zero weights.
    """
    if len(arrays) == 0:
        raise ValueError("nothing to average: no arrays given")
    normalized = _normalized_weights(weights, len(arrays))
    stacked = [np.asarray(array, dtype=np.float64) for array in arrays]
    shape = stacked[0].shape
    for i, array in enumerate(stacked):
        if array.shape != shape:
            raise ValueError(f"arrays[{i}] has shape {array.shape}, expected {shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"arrays[{i}] contains non-finite values")
    mean = np.zeros(shape, dtype=np.float64)
    for w, array in zip(normalized, stacked):
        mean += w * array
    return mean


def _frobenius_norm_of_product(X: np.ndarray, Y: np.ndarray) -> float:
    """``||X @ Y||_F`` without forming X @ Y: ``||R_X R_Y^T||_F`` from QRs of X and Y^T."""
    if X.shape[1] == 0:
        return 0.0
    R_X = np.linalg.qr(X, mode="r")
    R_Y = np.linalg.qr(Y.T, mode="r")
    return float(np.linalg.norm(R_X @ R_Y.T))


def _difference_factors(
    new: tuple[np.ndarray, np.ndarray], old: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Factors (X, Y) with ``X @ Y = B' A' - B A`` and no d_out x d_in intermediate.

    With equal shapes, ``[B' - B, B] [A'; A' - A]`` (small when the change is small, so no
    cancellation); otherwise ``[B', -B] [A'; A]``.
    """
    B_new, A_new = new
    B_old, A_old = old
    if B_new.shape == B_old.shape and A_new.shape == A_old.shape:
        return np.hstack([B_new - B_old, B_old]), np.vstack([A_new, A_new - A_old])
    return np.hstack([B_new, -B_old]), np.vstack([A_new, A_old])


def relative_change(
    new: Mapping[str, tuple[np.ndarray, np.ndarray]],
    old: Mapping[str, tuple[np.ndarray, np.ndarray]],
    eps: float = 1e-12,
) -> float:
    """Relative change ``||dW' - dW||_F / (||dW||_F + eps)`` over all named targets together.

    ``new`` and ``old`` map target name -> (B, A) with the same names. The norms are of all
    targets concatenated (squared norms summed over names). Computed from the factors only: each
    norm is ``||R_X R_Y^T||_F`` for the QRs of the stacked difference factors ``X = [B'-B, B]`` and
    ``Y^T = [A'; A'-A]^T`` (exact, and free of the cancellation of a trace expansion), so no
    d_out x d_in matrix is ever formed.

    Raises:
        ValueError: different name sets, shape mismatch or non-finite values.
    """
    if set(new) != set(old):
        raise ValueError(f"targets differ: new has {sorted(new)}, old has {sorted(old)}")
    change_squared = 0.0
    reference_squared = 0.0
    for name in sorted(old):
        B_new = _as_finite_float64_matrix(new[name][0], f"new[{name!r}] B")
        A_new = _as_finite_float64_matrix(new[name][1], f"new[{name!r}] A")
        B_old = _as_finite_float64_matrix(old[name][0], f"old[{name!r}] B")
        A_old = _as_finite_float64_matrix(old[name][1], f"old[{name!r}] A")
        if B_new.shape[1] != A_new.shape[0] or B_old.shape[1] != A_old.shape[0]:
            raise ValueError(f"{name!r}: B and A ranks differ")
        if B_new.shape[0] != B_old.shape[0] or A_new.shape[1] != A_old.shape[1]:
            raise ValueError(f"{name!r}: new product {B_new.shape[0]} x {A_new.shape[1]} "
                             f"differs from old {B_old.shape[0]} x {A_old.shape[1]}")
        X, Y = _difference_factors((B_new, A_new), (B_old, A_old))
        change_squared += _frobenius_norm_of_product(X, Y) ** 2
        reference_squared += _frobenius_norm_of_product(B_old, A_old) ** 2
    return float(np.sqrt(change_squared) / (np.sqrt(reference_squared) + eps))


def combine_tier_uploads(manifest: "AdapterManifest", tier: str, policy: "TierPolicy",
                         previous: Mapping[str, np.ndarray], uploads: Sequence[Mapping[str, np.ndarray]],
                         weights: Sequence[float]) -> dict[str, np.ndarray]:
    """The next version of a tier from the previous one and the uploads (already in client order).

    Aggregated factors are combined (product space + rank-r SVD, or plain averaging); frozen and
    local factors keep the previous version's values."""
    rank = manifest.tiers[tier].rank
    out: dict[str, np.ndarray] = {k: v.astype(np.float64) for k, v in previous.items()}
    if policy.A == "aggregate" and policy.B == "aggregate" and policy.aggregation == "product_svd":
        for t in manifest.targets:
            a_name, b_name = f"{t.name}.lora_A", f"{t.name}.lora_B"
            b, a = aggregate_product_space([u[b_name] for u in uploads], [u[a_name] for u in uploads],
                                           weights, rank)
            out[a_name], out[b_name] = a, b
    else:
        for factor in ("A", "B"):
            if getattr(policy, factor) == "aggregate":
                for name in manifest.factor_shapes(tier, factor):
                    out[name] = average_factors([u[name] for u in uploads], weights)
    if policy.head == "aggregate":
        for name in manifest.factor_shapes(tier, "head"):
            out[name] = average_factors([u[name] for u in uploads], weights)
    return {k: v.astype(np.float32) for k, v in out.items()}
