"""LSAC for many clients (method.md section 4): exact pairwise features as batched GEMMs, and an
approximate sparse path for populations too large for an n x n dense computation.

Exact path (``update_gram``, ``subspace_overlap``, ``exact_distance``)
------------------------------------------------------------------------
Same quantities as ``shared.subspace.update_distance`` / ``subspace_distance``, computed in the
precision asked for (float32 by default: probes arrive as float32 and cosines to ~1e-6 are
plenty for clustering), as a few large matrix products per target over all clients, only the
upper triangle of each symmetric product, and never a d_out x d_in matrix per client:

- ``update``: with ``dB_i = B_i - B_0``, ``dA_i = A_i - A_0`` the update is
  ``dW_i = B_i A_i - B_0 A_0 = dB_i A_i + B_0 dA_i`` and

      <dW_i, dW_j> = sum_ab (dB_i^T dB_j)_ab (A_i A_j^T)_ab      (two Gram products of n r rows)
                   + <E_i, dA_j> + <dA_i, E_j>                    (E_i = (B_0^T dB_i) A_i)
                   + <R dA_i, R dA_j>                             (B_0 = Q R)

  i.e. ``n^2 r (r (d_out + d_in) + 3 d_in)`` multiply-adds per target instead of the
  ``4 n^2 r^2 (d_out + d_in)`` of the symmetric rank-2r factor form, exact and free of
  cancellation (every term is already a difference from the root). The head deltas add
  ``H H^T``. Cosines follow from the Gram matrix.
- ``subspace``: ``||U_i^T U_j||_F^2`` from one Gram product of the stacked bases per target.

Approximate path (``approximate_lsac``), used above ``exact_max_clients`` (``lsac_auto``)
-----------------------------------------------------------------------------------------
1. **Sketch.** Each client's feature, a set of per-target d_out x d_in matrices given as factors
   (``dW_i`` for ``update``, the projector ``U_i U_i^T`` for ``subspace``), is mapped to
   ``Omega_L^T X Omega_R / sqrt(p q)`` per target with fixed Gaussian test matrices (p = q, chosen
   so that all targets together give about ``sketch_dim`` numbers), computed from the factors in
   O((d_out + d_in) r p) per client and target. Inner products of sketches are unbiased estimates
   of the exact ones; the two-sided (Kronecker) sketch is cheap but noisier than a dense
   Johnson-Lindenstrauss map of the same width: its relative variance is about ``2/p + 2/q`` per
   target for a rank-one update, less by the update's stable rank, and independent targets average
   (ViT-B, 24 targets, p = q = 13: a few percent of the norms). Head deltas are appended exactly
   when short, else through a CountSketch of ``head_sketch_dim`` buckets (variance ~2 /
   buckets). Memory O(n sketch_dim); clients can be sketched chunk by chunk (``FeatureSketch``).
   The sketch only has to rank neighbours correctly: groups whose distances differ by much less
   than that noise are not resolved (use the exact path, or a larger ``sketch_dim``).
2. **kNN graph.** Exact ``graph_neighbours`` nearest neighbours of every client under the sketched
   distance (``1 - cos`` for ``update``, ``1 - <s_i, s_j> / (r T)`` for ``subspace``), by blocked
   matrix products (O(n^2 sketch_dim) flops, O(n block) memory).
3. **Sparse self-tuning affinity** on that graph: ``S_ij = exp(-d_ij^2 / (sigma_i sigma_j))`` with
   ``sigma_i`` the distance to the ``knn``-th neighbour (as ``lsac``), kept for kNN pairs and
   symmetrised by union.
4. **Spectrum.** The ``k_max + 1`` smallest eigenvalues of the normalised Laplacian by Lanczos
   (``scipy.sparse.linalg.eigsh``) on each connected component (so that exactly separated groups,
   a repeated eigenvalue 0, are never missed), merged.
5. **K and labels** exactly as ``lsac``: eigengap over [max(2, k_min), k_max], k-means on the
   row-normalised eigenvectors, and the contrast test, whose mean within- and between-cluster
   distances are computed from per-cluster sums of the sketches in O(n sketch_dim) (the means of
   the sketched distances over all pairs, not only the kNN pairs).

Everything is deterministic for given seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from shared.gram import (  # noqa: F401  (re-exported: callers import them from here)
    _BLOCK_ENTRIES,
    _mirror_upper,
    _row_blocks,
    _syrk,
    pairwise_contracted_gram,
    update_gram_target,
)
from shared.subspace import LsacResult, canonical_labels, lsac

Factors = tuple[np.ndarray, np.ndarray]

# Head deltas up to this length are appended to the sketch exactly.
_EXACT_HEAD_MAX = 4096


# ------------------------------------------------------------------------- exact, batched GEMMs
# The per-target kernels (``pairwise_contracted_gram``, ``update_gram_target``) live in the lower
# module shared.gram, which shared.subspace also uses; they are re-exported here.

def _stack_target(clients: Sequence[Mapping[str, Factors]], name: str) -> tuple[np.ndarray, np.ndarray]:
    return (np.stack([np.asarray(c[name][0]) for c in clients]),
            np.stack([np.asarray(c[name][1]) for c in clients]))


def update_gram(clients: Sequence[Mapping[str, Factors]], root: Mapping[str, Factors],
                head_deltas: Sequence[np.ndarray] | np.ndarray | None = None,
                dtype: type = np.float32) -> np.ndarray:
    """Gram matrix (n x n, float64) of the flattened updates over all targets plus head deltas.

    Clients must have the root's factor shapes (``shared.subspace.update_similarity`` handles
    any ranks, in float64).
    """
    if len(clients) == 0:
        raise ValueError("no clients given")
    names = sorted(root)
    gram = np.zeros((len(clients), len(clients)), dtype=np.float64)
    for name in names:
        Bs, As = _stack_target(clients, name)
        if not (np.isfinite(Bs).all() and np.isfinite(As).all()):
            raise ValueError(f"target {name!r}: non-finite factors")
        gram += update_gram_target(root[name][0], root[name][1], Bs, As, dtype)
    if head_deltas is not None:
        heads = np.asarray(head_deltas, dtype=dtype).reshape(len(clients), -1)
        gram += _syrk(heads)
    return gram


def cosine_distance_from_gram(gram: np.ndarray) -> np.ndarray:
    """``clip(1 - cos, 0, 2)`` with a zero diagonal; a zero vector has cosine 0 with every other."""
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    safe = np.where(norms > 0, norms, 1.0)
    similarity = gram / safe[:, None] / safe[None, :]
    similarity[norms == 0, :] = 0.0
    similarity[:, norms == 0] = 0.0
    distance = np.clip(1.0 - similarity, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    return distance


def subspace_bases_target(B_root: np.ndarray, Bs: np.ndarray, rank: int,
                          dtype: type = np.float32) -> np.ndarray:
    """(n, d, rank): top-``rank`` left singular vectors of every ``B_i - B_root``.

    From the small Gram matrices: ``dB^T dB = V diag(lam) V^T`` (batched r x r eigh in float64),
    ``U = dB V_top lam_top^(-1/2)``, two thin batched products instead of n LAPACK SVDs (about 3x
    faster). Columns whose eigenvalue is below 1e-12 of the client's largest are zero (the SVD's
    basis for a zero singular value is arbitrary anyway); a zero update gives U = 0.
    """
    dB = np.asarray(Bs, dtype=np.float64) - np.asarray(B_root, dtype=np.float64)      # (n, d, r)
    r = dB.shape[2]
    if not 1 <= rank <= r:
        raise ValueError(f"rank must be in [1, {r}], got {rank}")
    gram = np.matmul(dB.transpose(0, 2, 1), dB)                                       # (n, r, r)
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    eigenvalues, eigenvectors = eigenvalues[:, ::-1][:, :rank], eigenvectors[:, :, ::-1][:, :, :rank]
    largest = eigenvalues[:, :1]
    kept = eigenvalues > 1e-12 * np.where(largest > 0, largest, np.inf)
    inverse_sqrt = np.where(kept, 1.0 / np.sqrt(np.where(kept, eigenvalues, 1.0)), 0.0)
    return np.matmul(dB, eigenvectors * inverse_sqrt[:, None, :]).astype(dtype)


def subspace_overlap_target(bases: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """``O[i, j] = ||U_i^T U_j||_F^2`` (n x n, float64) for bases (n, d, r)."""
    n, d, r = bases.shape
    rows = np.ascontiguousarray(bases.transpose(0, 2, 1), dtype=dtype).reshape(n * r, d)
    return pairwise_contracted_gram(rows, None, r)


def subspace_overlap(clients: Sequence[Mapping[str, Factors]], root: Mapping[str, Factors], rank: int,
                     dtype: type = np.float32) -> np.ndarray:
    """Sum over targets of ``||U_i^T U_j||_F^2`` for the bases of the B updates (n x n)."""
    total = np.zeros((len(clients), len(clients)), dtype=np.float64)
    for name in sorted(root):
        Bs = np.stack([np.asarray(c[name][0]) for c in clients])
        total += subspace_overlap_target(subspace_bases_target(root[name][0], Bs, rank, dtype), dtype)
    return total


def subspace_distance_from_overlap(overlap: np.ndarray, rank: int, targets: int) -> np.ndarray:
    """``clip(1 - overlap / (rank targets), 0, 1)`` with a zero diagonal."""
    distance = np.clip(1.0 - overlap / (rank * targets), 0.0, 1.0)
    distance = (distance + distance.T) / 2.0
    np.fill_diagonal(distance, 0.0)
    return distance


def exact_distance(features: str, clients: Sequence[Mapping[str, Factors]], root: Mapping[str, Factors],
                   head_deltas: Sequence[np.ndarray] | None, rank: int, dtype: type = np.float32) -> np.ndarray:
    """The dense LSAC distance matrix of ``features`` (``update`` or ``subspace``)."""
    if features == "update":
        return cosine_distance_from_gram(update_gram(clients, root, head_deltas, dtype))
    if features == "subspace":
        return subspace_distance_from_overlap(subspace_overlap(clients, root, rank, dtype), rank, len(root))
    raise ValueError(f"unknown LSAC features {features!r}: use 'update' or 'subspace'")


# ---------------------------------------------------------------------------------- sketches

class FeatureSketch:
    """Fixed random test matrices for every target; sketches any chunk of clients.

    ``shapes`` maps target name -> (d_out, d_in); targets are used in sorted name order. Every
    target gets ``p = q = max(2, round(sqrt(sketch_dim / targets)))``.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]], sketch_dim: int = 4096,
                 head_dim: int | None = None, head_sketch_dim: int = 1024, seed: int = 0) -> None:
        self.names = sorted(shapes)
        if not self.names:
            raise ValueError("no targets to sketch")
        side = max(2, round(math.sqrt(sketch_dim / len(self.names))))
        self.side = side
        rng = np.random.default_rng(seed)
        self.omegas: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for name in self.names:
            d_out, d_in = shapes[name]
            # Omega_L (d_out x p), Omega_R (d_in x q) for dW; Omega_R' (d_out x q) for projectors.
            self.omegas[name] = (rng.standard_normal((d_out, side)).astype(np.float32),
                                 rng.standard_normal((d_in, side)).astype(np.float32),
                                 rng.standard_normal((d_out, side)).astype(np.float32))
        self.scale = 1.0 / side                      # 1 / sqrt(p q)
        self.head_dim = head_dim
        self.head_sketch = None
        if head_dim is not None and head_dim > _EXACT_HEAD_MAX:
            from scipy import sparse

            buckets = rng.integers(0, head_sketch_dim, size=head_dim)
            signs = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=head_dim)
            self.head_sketch = sparse.csr_matrix((signs, (np.arange(head_dim), buckets)),
                                                 shape=(head_dim, head_sketch_dim))
            self.head_width = head_sketch_dim
        else:
            self.head_width = head_dim or 0
        self.width = len(self.names) * side * side + self.head_width

    def columns(self, name: str) -> slice:
        t = self.names.index(name)
        block = self.side * self.side
        return slice(t * block, (t + 1) * block)

    def update_target(self, name: str, B_root: np.ndarray, A_root: np.ndarray, Bs: np.ndarray,
                      As: np.ndarray) -> np.ndarray:
        """(m, p q) sketches of ``dW_i = dB_i A_i + B_0 dA_i`` for m clients of one target."""
        omega_l, omega_r, _ = self.omegas[name]
        B_root32 = np.asarray(B_root, dtype=np.float32)
        A_root32 = np.asarray(A_root, dtype=np.float32)
        m = Bs.shape[0]
        dB = np.asarray(Bs, dtype=np.float32) - B_root32
        A = np.asarray(As, dtype=np.float32)
        dA = A - A_root32
        left = np.matmul(omega_l.T, dB)                         # (m, p, r) = Omega_L^T dB_i
        right = np.matmul(A, omega_r)                           # (m, r, q) = A_i Omega_R
        out = np.matmul(left, right)
        out += np.matmul(omega_l.T @ B_root32, np.matmul(dA, omega_r))
        return out.reshape(m, -1) * self.scale

    def subspace_target(self, name: str, bases: np.ndarray) -> np.ndarray:
        """(m, p q) sketches of the projectors ``U_i U_i^T`` for bases (m, d_out, r)."""
        omega_l, _, omega_r = self.omegas[name]
        U = np.asarray(bases, dtype=np.float32)
        out = np.matmul(np.matmul(omega_l.T, U), np.matmul(U.transpose(0, 2, 1), omega_r))
        return out.reshape(U.shape[0], -1) * self.scale

    def heads(self, deltas: np.ndarray) -> np.ndarray:
        """(m, head width): the head deltas, exact or CountSketched."""
        deltas = np.asarray(deltas, dtype=np.float32).reshape(len(deltas), -1)
        if self.head_sketch is None:
            return deltas
        return np.asarray(self.head_sketch.T @ deltas.T).T.astype(np.float32)   # CountSketch

    def sketch_updates(self, clients: Sequence[Mapping[str, Factors]], root: Mapping[str, Factors],
                       head_deltas: Sequence[np.ndarray] | None = None) -> np.ndarray:
        out = np.zeros((len(clients), self.width), dtype=np.float32)
        for name in self.names:
            Bs, As = _stack_target(clients, name)
            out[:, self.columns(name)] = self.update_target(name, root[name][0], root[name][1], Bs, As)
        if head_deltas is not None and self.head_width:
            out[:, self.width - self.head_width:] = self.heads(np.asarray(head_deltas))
        return out

    def sketch_subspaces(self, clients: Sequence[Mapping[str, Factors]], root: Mapping[str, Factors],
                         rank: int) -> np.ndarray:
        out = np.zeros((len(clients), self.width - self.head_width), dtype=np.float32)
        for name in self.names:
            Bs = np.stack([np.asarray(c[name][0]) for c in clients])
            out[:, self.columns(name)] = self.subspace_target(name, subspace_bases_target(root[name][0], Bs, rank))
        return out


# ------------------------------------------------------------------------- approximate LSAC

def knn_from_sketch(Z: np.ndarray, neighbours: int, metric: str, scale: float = 1.0,
                    block_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``neighbours`` nearest other points under the sketched distance, by blocked products.

    ``metric``: ``"cosine"`` (distance ``1 - cos``, clipped to [0, 2]) or ``"inner"`` (distance
    ``clip(1 - <z_i, z_j> / scale, 0, 1)``). Returns (indices, distances), each (n, neighbours),
    nearest first (ties by index).
    """
    Z = np.asarray(Z, dtype=np.float32)
    n = Z.shape[0]
    k = min(neighbours, n - 1)
    if metric == "cosine":
        norms = np.linalg.norm(Z, axis=1)
        Zn = Z / np.where(norms > 0, norms, 1.0)[:, None]
    elif metric == "inner":
        Zn = Z
    else:
        raise ValueError(f"unknown metric {metric!r}")
    rows = block_rows or max(1, _BLOCK_ENTRIES // max(1, n))
    indices = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float64)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        sims = Zn[start:stop] @ Zn.T
        sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        part_sims = np.take_along_axis(sims, part, axis=1)
        order = np.lexsort((part, -part_sims), axis=1)
        part = np.take_along_axis(part, order, axis=1)
        part_sims = np.take_along_axis(part_sims, order, axis=1).astype(np.float64)
        indices[start:stop] = part
        if metric == "cosine":
            distances[start:stop] = np.clip(1.0 - part_sims, 0.0, 2.0)
        else:
            distances[start:stop] = np.clip(1.0 - part_sims / scale, 0.0, 1.0)
    return indices, distances


def sparse_self_tuning_affinity(indices: np.ndarray, distances: np.ndarray, knn: int):  # noqa: ANN201
    """Symmetric sparse ``S_ij = exp(-d_ij^2 / (sigma_i sigma_j))`` on the kNN pairs (union)."""
    from scipy import sparse

    n, k = indices.shape
    neighbour = min(knn, k)
    sigma = np.maximum(distances[:, neighbour - 1], 1e-12)
    rows = np.repeat(np.arange(n), k)
    cols = indices.ravel()
    values = np.exp(-(distances.ravel() ** 2) / (sigma[rows] * sigma[cols]))
    S = sparse.csr_matrix((values, (rows, cols)), shape=(n, n))
    return S.maximum(S.T).tocsr()


def _smallest_laplacian_eigen(S, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """The ``count`` smallest eigenvalues (ascending) of ``L = I - D^-1/2 S D^-1/2`` and their
    eigenvectors, per connected component (each component's own Lanczos run), merged."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components
    from scipy.sparse.linalg import eigsh

    n = S.shape[0]
    degree = np.asarray(S.sum(axis=1)).ravel()
    inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)), 0.0)
    N = sparse.diags(inv_sqrt) @ S @ sparse.diags(inv_sqrt)
    components, labels = connected_components(S, directed=False)
    values: list[np.ndarray] = []
    vectors: list[np.ndarray] = []
    rng = np.random.default_rng(seed)
    for component in range(components):
        members = np.flatnonzero(labels == component)
        size = members.size
        want = min(count, size)
        if size <= max(2 * count + 1, 64):
            block = N[members][:, members].toarray()
            w, v = np.linalg.eigh(np.eye(size) - block)
            w, v = w[:want], v[:, :want]
        else:
            block = N[members][:, members]
            w, v = eigsh(block, k=want, which="LA", v0=rng.standard_normal(size), tol=1e-10,
                         ncv=min(size, max(2 * want + 1, 40)))
            order = np.argsort(-w)
            w, v = 1.0 - w[order], v[:, order]
        full = np.zeros((n, want))
        full[members] = v
        values.append(w)
        vectors.append(full)
    all_values = np.concatenate(values)
    all_vectors = np.concatenate(vectors, axis=1)
    order = np.argsort(all_values, kind="stable")[:count]
    return all_values[order], all_vectors[:, order]


def _contrast_from_sketch(Z: np.ndarray, labels: np.ndarray, metric: str, scale: float) -> float:
    """Mean sketched distance between clusters over mean within (pairs i != j), from cluster sums."""
    Z = np.asarray(Z, dtype=np.float64)
    if metric == "cosine":
        norms = np.linalg.norm(Z, axis=1)
        Z = Z / np.where(norms > 0, norms, 1.0)[:, None]
        self_sims = (norms > 0).astype(np.float64)
        to_distance = 1.0
    else:
        self_sims = np.einsum("ij,ij->i", Z, Z)
        to_distance = 1.0 / scale
    n = Z.shape[0]
    total = Z.sum(axis=0)
    all_pairs_sim = float(total @ total - self_sims.sum())
    within_sim = 0.0
    within_pairs = 0
    for label in np.unique(labels):
        members = labels == label
        s = Z[members].sum(axis=0)
        within_sim += float(s @ s - self_sims[members].sum())
        size = int(members.sum())
        within_pairs += size * (size - 1)
    between_pairs = n * (n - 1) - within_pairs
    if between_pairs == 0:
        return 0.0
    between_mean = 1.0 - (all_pairs_sim - within_sim) / between_pairs * to_distance
    if within_pairs == 0:
        return float("inf") if between_mean > 0 else 1.0
    within_mean = 1.0 - within_sim / within_pairs * to_distance
    if within_mean > 0:
        return between_mean / within_mean
    return float("inf") if between_mean > 0 else 1.0


def _silhouette_from_sketch(Z: np.ndarray, labels: np.ndarray, metric: str, scale: float) -> float:
    """Mean silhouette (Rousseeuw 1987, a singleton scores 0) of a partition under the sketched
    distance ``1 - <z_i, z_j> / s`` (``cosine``: rows normalised, s = 1), exactly, from cluster sums:
    the mean distance of i to cluster C is ``1 - <z_i, sum_C z> / (|C| s)`` (i itself left out of its own)."""
    Z = np.asarray(Z, dtype=np.float64)
    if metric == "cosine":
        norms = np.linalg.norm(Z, axis=1)
        Z = Z / np.where(norms > 0, norms, 1.0)[:, None]
        scale = 1.0
    clusters = np.unique(labels)
    index = np.searchsorted(clusters, labels)
    sizes = np.bincount(index, minlength=clusters.size).astype(np.float64)
    sums = np.zeros((clusters.size, Z.shape[1]))
    np.add.at(sums, index, Z)
    sims = Z @ sums.T / scale                                   # (n, K): <z_i, sum_C z> / s
    self_sims = np.einsum("ij,ij->i", Z, Z) / scale
    n = Z.shape[0]
    own = sizes[index]
    a = 1.0 - (sims[np.arange(n), index] - self_sims) / np.maximum(own - 1.0, 1.0)
    mean_to = 1.0 - sims / sizes[None, :]
    mean_to[np.arange(n), index] = np.inf
    b = mean_to.min(axis=1)
    denominator = np.maximum(a, b)
    s = np.where(denominator > 0, (b - a) / np.where(denominator > 0, denominator, 1.0), 0.0)
    return float(np.where(own > 1, s, 0.0).mean())


@dataclass(frozen=True, eq=False)
class ApproximateLsacResult:
    """Outcome of ``approximate_lsac`` (fields as ``LsacResult``; ``affinity`` is sparse CSR and
    ``eigenvalues`` holds only the smallest ``k_max + 1``)."""

    k: int
    labels: np.ndarray
    eigenvalues: np.ndarray
    eigengaps: np.ndarray
    contrast_ratio: float | None
    affinity: object
    neighbours: np.ndarray


def approximate_lsac(Z: np.ndarray, metric: str, scale: float = 1.0, k_min: int = 1, k_max: int = 10,
                     knn: int = 5, contrast: float = 1.25, force_k: int | None = None, seed: int = 0,
                     graph_neighbours: int | None = None, k_rule: str = "eigengap", min_silhouette: float = 0.15,
                     silhouette_tolerance: float = 0.0) -> ApproximateLsacResult:
    """LSAC on sketches ``Z`` (n x m) with a sparse kNN affinity (module docstring, steps 2-5).

    ``metric``/``scale`` as ``knn_from_sketch`` (``update``: cosine; ``subspace``: inner with
    ``scale = rank * targets``). Same K rules (``eigengap`` with the contrast test, or
    ``silhouette``: the mean silhouette under the sketched distance, exact from cluster sums), and
    canonical labels as ``lsac``.
    """
    Z = np.asarray(Z, dtype=np.float32)
    n = Z.shape[0]
    if n == 0:
        raise ValueError("no points to cluster")
    if n < 3 or (k_max < 2 and force_k is None):
        return ApproximateLsacResult(1, np.zeros(n, dtype=np.int64), np.zeros(0), np.zeros(0), None, None,
                                     np.zeros((n, 0), dtype=np.int64))
    neighbours = min(n - 1, graph_neighbours or max(15, 3 * knn))
    indices, distances = knn_from_sketch(Z, neighbours, metric, scale)
    S = sparse_self_tuning_affinity(indices, distances, knn)
    wanted = min(n, max(k_max, force_k or 0) + 1)
    eigenvalues, eigenvectors = _smallest_laplacian_eigen(S, wanted, seed)
    gap_count = max(0, min(k_max, n - 1))
    eigengaps = np.diff(eigenvalues)[:gap_count]
    contrast_ratio: float | None = None

    def labels_for(k: int) -> np.ndarray:
        from sklearn.cluster import KMeans

        if k == 1:
            return np.zeros(n, dtype=np.int64)
        embedding = eigenvectors[:, :k]
        row_norms = np.linalg.norm(embedding, axis=1, keepdims=True)
        embedding = embedding / np.where(row_norms > 0, row_norms, 1.0)
        return canonical_labels(KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(embedding))

    if force_k is not None:
        labels = labels_for(int(min(max(force_k, 1), n)))
        if labels.max() >= 1:
            contrast_ratio = _contrast_from_sketch(Z, labels, metric, scale)
    elif k_rule == "silhouette":
        highest = min(k_max, n - 1, len(eigenvalues) - 1)
        scored = []
        for k in range(min(max(2, k_min), highest), highest + 1):
            candidate = labels_for(k)
            if 2 <= candidate.max() + 1 <= n - 1:
                scored.append((_silhouette_from_sketch(Z, candidate, metric, scale), k, candidate))
        best = max((score for score, _, _ in scored), default=-np.inf)
        good = [(k, candidate) for score, k, candidate in scored
                if score >= min_silhouette and score >= best - silhouette_tolerance * abs(best)]
        labels = min(good, key=lambda kc: kc[0])[1] if good else np.zeros(n, dtype=np.int64)
        if not good and k_min >= 2 and scored:
            labels = max(scored, key=lambda t: t[0])[2]
        if labels.max() >= 1:
            contrast_ratio = _contrast_from_sketch(Z, labels, metric, scale)
    else:
        highest = min(k_max, n - 1, len(eigenvalues) - 1)
        lowest = min(max(2, k_min), highest)
        candidate_k = lowest + int(np.argmax(eigengaps[lowest - 1: highest]))
        labels = labels_for(candidate_k)
        contrast_ratio = _contrast_from_sketch(Z, labels, metric, scale)
        if contrast_ratio < contrast and k_min < 2:
            labels = np.zeros(n, dtype=np.int64)
    return ApproximateLsacResult(k=int(labels.max()) + 1, labels=labels, eigenvalues=eigenvalues,
                                 eigengaps=eigengaps, contrast_ratio=contrast_ratio, affinity=S,
                                 neighbours=indices)


def lsac_auto(features: str, clients: Sequence[Mapping[str, Factors]], root: Mapping[str, Factors],
              head_deltas: Sequence[np.ndarray] | None, rank: int, exact_max_clients: int = 1000,
              sketch_dim: int = 4096, sketch_seed: int = 0, **lsac_kwargs: object
              ) -> LsacResult | ApproximateLsacResult:
    """LSAC with the exact dense path up to ``exact_max_clients`` clients, the approximate sparse
    path above. ``lsac_kwargs`` go to ``lsac`` / ``approximate_lsac`` (k_min, k_max, knn, contrast,
    force_k, seed)."""
    n = len(clients)
    if n <= exact_max_clients:
        return lsac(exact_distance(features, clients, root, head_deltas, rank), **lsac_kwargs)  # type: ignore[arg-type]
    shapes = {name: (np.shape(root[name][0])[0], np.shape(root[name][1])[1]) for name in root}
    head_dim = None if head_deltas is None else int(np.asarray(head_deltas[0]).size)
    sketch = FeatureSketch(shapes, sketch_dim, head_dim if features == "update" else None, seed=sketch_seed)
    if features == "update":
        Z = sketch.sketch_updates(clients, root, head_deltas)
        return approximate_lsac(Z, "cosine", **lsac_kwargs)  # type: ignore[arg-type]
    if features == "subspace":
        Z = sketch.sketch_subspaces(clients, root, rank)
        return approximate_lsac(Z, "inner", scale=float(rank * len(root)), **lsac_kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown LSAC features {features!r}: use 'update' or 'subspace'")
