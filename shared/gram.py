"""Exact Gram matrices of low-rank LoRA updates as batched GEMMs (method.md section 4).

The lowest layer of the clustering features: numpy only, imported by both ``shared.subspace``
(``update_similarity`` uses ``update_gram_target`` for targets where every client has the root's
shapes) and ``shared.lsac_scale`` (which re-exports everything here). Nothing here imports either.

``update_gram_target``: with ``dB_i = B_i - B_0``, ``dA_i = A_i - A_0`` the update is
``dW_i = B_i A_i - B_0 A_0 = dB_i A_i + B_0 dA_i`` and

    <dW_i, dW_j> = sum_ab (dB_i^T dB_j)_ab (A_i A_j^T)_ab      (two Gram products of n r rows)
                 + <E_i, dA_j> + <dA_i, E_j>                    (E_i = (B_0^T dB_i) A_i)
                 + <R dA_i, R dA_j>                             (B_0 = Q R)

i.e. ``n^2 r (r (d_out + d_in) + 3 d_in)`` multiply-adds per target instead of the
``4 n^2 r^2 (d_out + d_in)`` of the symmetric rank-2r factor form, exact and free of cancellation
(every term is already a difference from the root). ``pairwise_contracted_gram`` computes the
first kind of term (and the subspace overlaps ``||U_i^T U_j||_F^2``) from the upper triangle only.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# Rows of one block of a pairwise product: about this many float entries per block, whatever n.
_BLOCK_ENTRIES = 1 << 23


def _row_blocks(count: int, row_width: int, columns: int) -> Iterable[tuple[int, int]]:
    rows = max(1, _BLOCK_ENTRIES // max(1, row_width * columns))
    for start in range(0, count, rows):
        yield start, min(count, start + rows)


def _mirror_upper(G: np.ndarray) -> np.ndarray:
    """Symmetric matrix from the upper triangle (diagonal included) of G."""
    upper = np.triu(G)
    return upper + np.triu(upper, 1).T


def pairwise_contracted_gram(X: np.ndarray, Y: np.ndarray | None, k: int) -> np.ndarray:
    """``G[i, j] = sum_ab (X_i X_j^T)_ab (Y_i Y_j^T)_ab`` for row blocks ``X_i = X[i k:(i+1) k]``.

    ``X`` is (n k, d1), ``Y`` is (n k, d2) or None (then ``Y = X``: ``G[i, j] = ||X_i X_j^T||_F^2``).
    Only blocks on or above the diagonal are multiplied (row block of clients [s, e) against
    columns [s, n)); the result (float64, symmetric) is mirrored. Computed in X's dtype.
    """
    n = X.shape[0] // k
    G = np.zeros((n, n), dtype=np.float64)
    for start, stop in _row_blocks(n, k * k, n):
        rows = slice(start * k, stop * k)
        shape = (stop - start, k, n - start, k)
        left = (X[rows] @ X[start * k:].T).reshape(shape)
        right = left if Y is None else (Y[rows] @ Y[start * k:].T).reshape(shape)
        G[start:stop, start:] = np.einsum("iajb,iajb->ij", left, right)
    return _mirror_upper(G)


def _syrk(F: np.ndarray) -> np.ndarray:
    """``F F^T`` (numpy calls BLAS syrk for a product with its own transpose)."""
    return F @ F.T


def update_gram_target(B_root: np.ndarray, A_root: np.ndarray, Bs: np.ndarray, As: np.ndarray,
                       dtype: type = np.float32) -> np.ndarray:
    """``G[i, j] = <dW_i, dW_j>_F`` for one target, ``dW_i = B_i A_i - B_root A_root``.

    ``Bs`` is (n, d_out, r) and ``As`` (n, r, d_in) with the root's shapes; products in ``dtype``,
    result float64 (n x n). See the module docstring for the decomposition.
    """
    B_root = np.asarray(B_root, dtype=np.float64)
    A_root = np.asarray(A_root, dtype=np.float64)
    n, d_out, r = Bs.shape
    d_in = As.shape[2]
    if B_root.shape != (d_out, r) or A_root.shape != (r, d_in) or As.shape[:2] != (n, r):
        raise ValueError(f"stacked factors {Bs.shape} x {As.shape} do not match the root "
                         f"{B_root.shape} x {A_root.shape}")
    # Differences from the root in float64 (exact for float32 wire values), then ``dtype``: every
    # term below is a product of small differences or of a difference with a root factor, so
    # nothing cancels afterwards.
    dB = (np.asarray(Bs, dtype=np.float64) - B_root).astype(dtype)      # (n, d_out, r)
    dA = (np.asarray(As, dtype=np.float64) - A_root).astype(dtype)      # (n, r, d_in)
    A = np.asarray(As, dtype=dtype)
    gram = pairwise_contracted_gram(
        np.ascontiguousarray(dB.transpose(0, 2, 1)).reshape(n * r, d_out), A.reshape(n * r, d_in), r)
    E = np.matmul(np.matmul(B_root.T.astype(dtype), dB), A)             # (B_0^T dB_i) A_i
    del dB
    cross = E.reshape(n, -1) @ dA.reshape(n, -1).T                      # <E_i, dA_j>
    del E
    gram += cross
    gram += cross.T
    R = np.linalg.qr(B_root, mode="r").astype(dtype)                     # R^T R = B_0^T B_0
    gram += _syrk(np.matmul(R, dA).reshape(n, -1))                      # <R dA_i, R dA_j>
    return (gram + gram.T) / 2.0                                        # exactly symmetric
