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
# Below this min(d_out, d_in) an exact truncated SVD is a full LAPACK SVD (cheap at that size);
# from it on, the top-rank eigenvectors of the smaller Gram matrix (LAPACK's MRRR on a subset)
# followed by one Rayleigh-Ritz step on dW itself, several times cheaper than a full SVD.
_GRAM_EIGH_MIN_DIM = 128
# Subspace iteration on the implicit sum (the "sum" path, see _truncated_svd_of_sum): block width
# rank + max(rank, 8), at most this many iterations, and only when the block is at most this
# fraction of min(d_out, d_in) (otherwise the direct method is as cheap).
_SUBSPACE_MAX_ITERATIONS = 8
_SUBSPACE_MAX_WIDTH_FRACTION = 0.25
# A Ritz triplet (u, s, v) is accepted when ||dW v - s u|| <= this times the largest Ritz value.
_SUBSPACE_RESIDUAL_RTOL = 1e-13
# Seed of the (deterministic) Gaussian start block of the subspace iteration.
_SUBSPACE_SEED = 20260302


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
    core = R_B @ R_A.T
    core_U, singular_values, core_V = _exact_truncated_svd(core, min(rank, min(core.shape)))
    return Q_B @ core_U, singular_values, Q_A @ core_V


def _svd_of_accumulated_sum(
    stacked_Bt: np.ndarray, stacked_A: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact truncated SVD of the dense sum ``stacked_Bt^T @ stacked_A``, accumulated in one product
    (memory O(d_out d_in) for the sum, never one d_out x d_in matrix per client)."""
    return _exact_truncated_svd(stacked_Bt.T @ stacked_A, rank)


def _exact_truncated_svd(M: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top-``rank`` singular triplets ``(U, s, V)`` of a dense matrix by a direct method.

    Small matrices take a full LAPACK SVD. From ``_GRAM_EIGH_MIN_DIM`` on: the top-``rank``
    eigenvectors V of the smaller Gram matrix (``M^T M`` or ``M M^T``, LAPACK ``syevr`` on an index
    subset, no iteration) and then one Rayleigh-Ritz step on M itself, an SVD of the thin
    ``M V``: its singular values are norms of ``M v`` (accurate to round-off of M, so zero
    singular values stay at the noise level instead of the square root of it), its left vectors
    are U and V is rotated to match.
    """
    d_out, d_in = M.shape
    if min(d_out, d_in) < _GRAM_EIGH_MIN_DIM or rank > min(d_out, d_in) // 2:
        U, singular_values, Vt = np.linalg.svd(M, full_matrices=False)
        return U[:, :rank], singular_values[:rank], Vt[:rank].T
    import scipy.linalg  # imported here, like sklearn in shared.subspace: only aggregation needs it

    if d_in <= d_out:
        gram = M.T @ M
        small = d_in
    else:
        gram = M @ M.T
        small = d_out
    _, vectors = scipy.linalg.eigh(gram, subset_by_index=[small - rank, small - 1], driver="evr",
                                   check_finite=False)
    vectors = vectors[:, ::-1]
    if d_in <= d_out:
        U, singular_values, Wt = np.linalg.svd(M @ vectors, full_matrices=False)
        return U, singular_values, vectors @ Wt.T
    V, singular_values, Wt = np.linalg.svd(M.T @ vectors, full_matrices=False)
    return vectors @ Wt.T, singular_values, V


def _subspace_iteration(
    stacked_Bt: np.ndarray, stacked_A: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Top-``rank`` singular triplets of ``dW = stacked_Bt^T @ stacked_A`` without forming dW, or None.

    Block subspace iteration with Rayleigh-Ritz (Halko, Martinsson and Tropp 2011, alg. 4.4 with
    an SVD of the projected matrix) on the implicit product: every application of dW or dW^T is
    two thin products through the stacked factors, O((d_out + d_in) K w) for K = sum r_i and block
    width w = rank + max(rank, 8), instead of the O(d_out d_in K) of accumulating dW. The start
    block is a fixed-seed Gaussian, so the same inputs give the same bytes.

    Returns the triplets only once every one of them is *certified*: ``||dW v - s u||`` (computed,
    not estimated) is at most ``_SUBSPACE_RESIDUAL_RTOL`` times the largest Ritz value, so each is
    exact to round-off over its gap, as a direct SVD is. The residual shrinks per iteration by
    about ``(s_{w+1} / s_rank)^2``: fast when dW has a dominant rank-``rank`` part (every round:
    clients move a little from a shared root, so the rest of the spectrum is much smaller), slow on
    a flat spectrum. Returns None (the caller falls back to the direct method) when the residuals
    are not certified within ``_SUBSPACE_MAX_ITERATIONS`` or the observed rate predicts they
    would not be.
    """
    d_out, d_in = stacked_Bt.shape[1], stacked_A.shape[1]
    width = rank + max(rank, 8)
    if width > _SUBSPACE_MAX_WIDTH_FRACTION * min(d_out, d_in):
        return None

    def times(X: np.ndarray) -> np.ndarray:      # dW @ X = W^T (S X)
        # (T^T W)^T rather than W^T T: the same product, but OpenBLAS runs the long reduction
        # over K about twice as fast with the thin operand on the left (measured, K = 8000).
        return (stacked_A @ X).T.dot(stacked_Bt).T

    def times_transposed(Y: np.ndarray) -> np.ndarray:      # dW^T @ Y = S^T (W Y)
        return (stacked_Bt @ Y).T.dot(stacked_A).T

    start = np.random.default_rng(_SUBSPACE_SEED).standard_normal((d_in, width))
    image = times(start)                                        # dW @ block
    previous_worst = None
    for iteration in range(_SUBSPACE_MAX_ITERATIONS):
        Q = np.linalg.qr(image)[0]                              # d_out x width, orthonormal
        projected_T = times_transposed(Q)                       # (Q^T dW)^T, d_in x width
        V, singular_values, Wt = np.linalg.svd(projected_T, full_matrices=False)
        U = Q @ Wt.T                                            # dW^T U = V S exactly (to round-off)
        image = times(V)                                        # dW V: residual and next block
        top = singular_values[0]
        if not np.isfinite(top) or top <= 0.0:
            return None
        residuals = np.linalg.norm(image[:, :rank] - U[:, :rank] * singular_values[:rank], axis=0)
        worst = float(residuals.max())
        tolerance = _SUBSPACE_RESIDUAL_RTOL * top
        if worst <= tolerance:
            return U[:, :rank], singular_values[:rank], V[:, :rank]
        remaining = _SUBSPACE_MAX_ITERATIONS - iteration - 1
        if previous_worst is None:
            # First look: the Ritz values predict the rate (s_width / s_rank)^2 per iteration.
            cut = singular_values[rank - 1]
            rate = (singular_values[-1] / cut) ** 2 if cut > 0 else 1.0
        else:
            rate = worst / previous_worst
        if rate >= 1.0 or worst * rate**remaining > tolerance:
            return None
        previous_worst = worst
    return None


def _truncated_svd_of_sum(
    stacked_Bt: np.ndarray, stacked_A: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact top-``rank`` SVD of ``stacked_Bt^T @ stacked_A`` (the "dense" method).

    First a certified subspace iteration on the implicit sum (``_subspace_iteration``: memory
    O((d_out + d_in) K), no d_out x d_in matrix); when it cannot certify its result, the sum is
    accumulated once (memory O(d_out d_in), never O(n d_out d_in)) and decomposed directly
    (``_exact_truncated_svd``).
    """
    found = _subspace_iteration(stacked_Bt, stacked_A, rank)
    if found is not None:
        return found
    return _svd_of_accumulated_sum(stacked_Bt, stacked_A, rank)


def _scaled_norm(x: np.ndarray) -> float:
    """Frobenius norm that does not overflow for finite values near the float64 limit (numpy's
    ``norm`` squares them first)."""
    scale = float(np.abs(x).max()) if x.size else 0.0
    if scale == 0.0:
        return 0.0
    return scale * float(np.sqrt(np.sum((x / scale) ** 2)))


def _stacked_factors(
    Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], normalized: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Validated float64 stacks ``(W, S, noise_scale)``: rows of W are the weighted ``w_i B_i^T``
    and rows of S the ``A_i``, client after client, so ``sum_i w_i B_i A_i = W^T S``.

    One pass writes each stack (float32 wire tensors are widened exactly, B weighted on the way)
    and one more gives the row norms, which also detect non-finite values; per-client Python work
    is only shape checks and the two small copies. ``noise_scale`` is
    ``sum_i w_i ||B_i||_F ||A_i||_F``.
    """
    B_arrays = [np.asarray(B) for B in Bs]
    A_arrays = [np.asarray(A) for A in As]
    for what, arrays in (("Bs", B_arrays), ("As", A_arrays)):
        for i, array in enumerate(arrays):
            if array.ndim != 2:
                raise ValueError(f"{what}[{i}] must be a 2-D matrix, got shape {array.shape}")
    d_out, d_in = B_arrays[0].shape[0], A_arrays[0].shape[1]
    for i, (B, A) in enumerate(zip(B_arrays, A_arrays)):
        if B.shape[0] != d_out or A.shape[1] != d_in:
            raise ValueError(f"client {i}: B {B.shape} x A {A.shape} is not {d_out} x {d_in}")
        if B.shape[1] != A.shape[0] or B.shape[1] == 0:
            raise ValueError(f"client {i}: B {B.shape} and A {A.shape} need a common rank >= 1")
    ranks = np.array([A.shape[0] for A in A_arrays])
    offsets = np.concatenate([[0], np.cumsum(ranks)])
    total = int(offsets[-1])
    stacked_Bt = np.empty((total, d_out), dtype=np.float64)
    stacked_A = np.empty((total, d_in), dtype=np.float64)
    if np.all(ranks == ranks[0]):
        # Equal ranks (every round): whole-array operations instead of 2 n small ones.
        count, rank_i = len(ranks), int(ranks[0])
        np.multiply(np.stack(B_arrays).transpose(0, 2, 1), normalized[:, None, None],
                    out=stacked_Bt.reshape(count, rank_i, d_out), casting="unsafe")   # w_i B_i^T
        np.concatenate([A[None] for A in A_arrays], axis=0, out=stacked_A.reshape(count, rank_i, d_in),
                       casting="unsafe")
    else:
        for i, (B, A) in enumerate(zip(B_arrays, A_arrays)):
            rows = slice(offsets[i], offsets[i + 1])
            np.multiply(B.T, normalized[i], out=stacked_Bt[rows], casting="unsafe")
            np.copyto(stacked_A[rows], A, casting="unsafe")
    # Row sums of squares give the norms and, being non-finite exactly when a row holds a
    # non-finite value (or overflows), double as the finiteness check.
    B_squares = np.einsum("ij,ij->i", stacked_Bt, stacked_Bt)
    A_squares = np.einsum("ij,ij->i", stacked_A, stacked_A)
    if not (np.isfinite(B_squares).all() and np.isfinite(A_squares).all()):
        for what, arrays in (("Bs", B_arrays), ("As", A_arrays)):
            for i, array in enumerate(arrays):
                if not np.isfinite(np.asarray(array, dtype=np.float64)).all():
                    raise ValueError(f"{what}[{i}] contains non-finite values")
        # Finite but huge values overflowed the squares: take overflow-safe norms instead.
        B_norms = np.array([_scaled_norm(stacked_Bt[a:b]) for a, b in zip(offsets[:-1], offsets[1:])])
        A_norms = np.array([_scaled_norm(stacked_A[a:b]) for a, b in zip(offsets[:-1], offsets[1:])])
    else:
        B_norms = np.sqrt(np.add.reduceat(B_squares, offsets[:-1]))
        A_norms = np.sqrt(np.add.reduceat(A_squares, offsets[:-1]))
    noise_scale = float(np.sum(B_norms * A_norms))   # sum_i ||w_i B_i|| ||A_i||, w_i >= 0
    return stacked_Bt, stacked_A, noise_scale


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
            core), ``"dense"`` (the sum path: a subspace iteration on the implicit sum whose
            result is accepted only when its residuals certify it to round-off, else accumulate
            the d_out x d_in sum once and take a direct truncated SVD) or ``"auto"`` (qr when
            ``sum_i r_i < min(d_out, d_in)``, else dense). Both are exact to round-off.

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
    stacked_Bt, stacked_A, noise_scale = _stacked_factors(Bs, As, normalized)
    d_out, d_in = stacked_Bt.shape[1], stacked_A.shape[1]
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise ValueError(f"rank must be an integer, got {rank!r}")
    if not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank must be in [1, {min(d_out, d_in)}], got {rank}")

    total_rank = stacked_A.shape[0]
    if method == "auto":
        method = "qr" if total_rank < min(d_out, d_in) else "dense"
    if method == "qr":
        U, singular_values, V = _svd_by_qr_of_stacked_factors(stacked_Bt.T, stacked_A, rank)
    else:
        U, singular_values, V = _truncated_svd_of_sum(stacked_Bt, stacked_A, rank)
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
    # float32 wire arrays are not copied to float64 first: each product below is computed in
    # float64 anyway (a float64 weight times a float32 value), so the result is bit for bit what
    # widening first gives, with one pass less over every array.
    values = []
    for array in arrays:
        value = np.asarray(array)
        if value.dtype not in (np.float32, np.float64):
            value = value.astype(np.float64)
        values.append(value)
    shape = values[0].shape
    for i, value in enumerate(values):
        if value.shape != shape:
            raise ValueError(f"arrays[{i}] has shape {value.shape}, expected {shape}")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"arrays[{i}] contains non-finite values")
    mean = np.zeros(shape, dtype=np.float64)
    term = np.empty(shape, dtype=np.float64)
    for w, value in zip(normalized, values):
        np.multiply(value, w, out=term)
        mean += term
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
    local factors keep the previous version's values.

    Uploads are read target by target (each tensor once, and only while its target is combined),
    so they may be lazy mappings, e.g. memory-mapped safetensors files: then only one target of
    every upload is in memory at a time instead of every upload whole."""
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


def merge_adapters(manifest: "AdapterManifest", tier: str, adapters: Sequence[Mapping[str, np.ndarray]],
                   weights: Sequence[float]) -> dict[str, np.ndarray]:
    """One adapter of ``tier`` from several: the weighted combination of their updates in product
    space, ``B A = rank-r SVD of sum_i w_i B_i A_i`` per target (``aggregate_product_space``), and the
    weighted mean of every other tensor (the classifier head). A cycle warm-starts a cluster that
    merges old clusters from it, weighted by how many members each brings (docs/method.md, "Cycles").

    Unlike a round's aggregation this ignores the tier's factor policy: the parents were trained apart,
    so their factors share no basis and averaging A and B separately (or keeping one parent's frozen
    A) would not combine their updates.

    Raises:
        ValueError: no adapter, a missing or misshapen tensor, or bad weights.
    """
    if not adapters:
        raise ValueError("nothing to merge: no adapters given")
    rank = manifest.tiers[tier].rank
    names = set(adapters[0])
    for i, adapter in enumerate(adapters[1:], start=1):
        if set(adapter) != names:
            raise ValueError(f"adapters[{i}] has tensors {sorted(set(adapter) ^ names)} the first does not share")
    out: dict[str, np.ndarray] = {}
    for t in manifest.targets:
        a_name, b_name = f"{t.name}.lora_A", f"{t.name}.lora_B"
        if a_name not in names or b_name not in names:
            raise ValueError(f"target {t.name!r}: the adapters carry no {a_name} / {b_name}")
        out[b_name], out[a_name] = aggregate_product_space([a[b_name] for a in adapters], [a[a_name] for a in adapters],
                                                           weights, rank)
    for name in sorted(names - set(out)):
        out[name] = average_factors([a[name] for a in adapters], weights)
    return {k: v.astype(np.float32) for k, v in out.items()}

