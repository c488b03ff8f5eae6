"""LoRA-Subspace Adaptive Clustering, LSAC (method.md sections 4 and 5).

Two feature sets feed the same self-tuning spectral clustering:

- ``update``: the flattened update ``dW_i = B_i A_i - B_root A_root`` over all targets (plus an
  optional head delta), compared by cosine similarity (``update_similarity``,
  ``update_distance``). Inner products come from the factors; no d_out x d_in matrix per client.
- ``subspace`` (the paper's): per target, the top-r left singular vectors of the B update
  ``B_i - B_root`` (``subspace_bases``), compared by ``d_ij = 1 - ||U_i^T U_j||_F^2 / r``
  (``subspace_distance``).

``lsac`` turns a distance matrix into clusters: self-tuning affinity, eigengap of the normalised
Laplacian over K in [max(2, k_min), k_max], spectral clustering, then a contrast test that falls
back to one cluster when the partition is not clearly better than none. Everything is pure and
deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from shared.gram import update_gram_target

Factors = tuple[np.ndarray, np.ndarray]

# Pairwise Gram blocks are computed for chunks of clients so that one chunk's block holds at most
# this many float64 entries (32 MiB), whatever the number of clients.
_MAX_GRAM_BLOCK_ENTRIES = 1 << 22
# sigma_i of the self-tuning kernel is at least this, so duplicate points do not divide by zero.
_SIGMA_FLOOR = 1e-12


def _finite_matrix(value: object, what: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-D matrix, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} contains non-finite values")
    return array


def _square_matrix(value: object, what: str) -> np.ndarray:
    matrix = _finite_matrix(value, what)
    if matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{what} must be square, got shape {matrix.shape}")
    return matrix


def _client_target_names(
    clients: Sequence[Mapping[str, Factors]], root: Mapping[str, object]
) -> list[str]:
    names = sorted(root)
    for i, client in enumerate(clients):
        if sorted(client) != names:
            raise ValueError(f"client {i} has targets {sorted(client)}, root has {names}")
    return names


def _chunk_size(count: int, block_width: int) -> int:
    per_row = max(1, block_width * count * block_width)
    return max(1, _MAX_GRAM_BLOCK_ENTRIES // per_row)


def _pairwise_product_inner(lefts: np.ndarray, rights: np.ndarray) -> np.ndarray:
    """``G[i, j] = <X_i Y_i, X_j Y_j>_F`` for ``lefts[i] = X_i`` (d x k), ``rights[i] = Y_i``.

    Uses ``<X Y, X' Y'>_F = sum_ab (X^T X')_ab (Y Y'^T)_ab``, as two big matrix products over all
    clients (chunked over rows), never forming a d x e product.
    """
    n, d, k = lefts.shape
    e = rights.shape[2]
    left_columns = lefts.transpose(1, 0, 2).reshape(d, n * k)   # column (i, a) = X_i[:, a]
    right_rows = rights.reshape(n * k, e)                       # row (i, a) = Y_i[a, :]
    gram = np.empty((n, n), dtype=np.float64)
    chunk = _chunk_size(n, k)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        cols = slice(start * k, stop * k)
        left_block = (left_columns[:, cols].T @ left_columns).reshape(stop - start, k, n, k)
        right_block = (right_rows[cols] @ right_rows.T).reshape(stop - start, k, n, k)
        gram[start:stop] = np.einsum("iajb,iajb->ij", left_block, right_block)
    return (gram + gram.T) / 2.0


def _update_factors(
    client: Factors, root: Factors, name: str, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rank-(r_i + r_root) factors (X, Y) of ``B_i A_i - B_root A_root``.

    Equal shapes give ``[B_i - B_root, B_root] [A_i; A_i - A_root]`` (exactly zero for an unchanged
    client and free of cancellation for small updates); otherwise ``[B_i, -B_root] [A_i; A_root]``.
    """
    B_root, A_root = root
    B = _finite_matrix(client[0], f"client {index} {name!r} B")
    A = _finite_matrix(client[1], f"client {index} {name!r} A")
    if B.shape[1] != A.shape[0] or B.shape[0] != B_root.shape[0] or A.shape[1] != A_root.shape[1]:
        raise ValueError(f"client {index} {name!r}: B {B.shape} x A {A.shape} does not match "
                         f"root B {B_root.shape} x A {A_root.shape}")
    if B.shape == B_root.shape and A.shape == A_root.shape:
        return np.hstack([B - B_root, B_root]), np.vstack([A, A - A_root])
    return np.hstack([B, -B_root]), np.vstack([A, A_root])


def _update_gram(
    clients: Sequence[Mapping[str, Factors]],
    root: Mapping[str, Factors],
    head_deltas: Sequence[np.ndarray] | None,
) -> np.ndarray:
    """Gram matrix of the flattened updates (all targets in sorted order, then head deltas)."""
    n = len(clients)
    if n == 0:
        raise ValueError("no clients given")
    names = _client_target_names(clients, root)
    gram = np.zeros((n, n), dtype=np.float64)
    for name in names:
        B_root = _finite_matrix(root[name][0], f"root {name!r} B")
        A_root = _finite_matrix(root[name][1], f"root {name!r} A")
        if B_root.shape[1] != A_root.shape[0]:
            raise ValueError(f"root {name!r}: B {B_root.shape} and A {A_root.shape} ranks differ")
        same_shapes = all(np.shape(client[name][0]) == B_root.shape
                          and np.shape(client[name][1]) == A_root.shape for client in clients)
        if same_shapes:
            # Every client has the root's shapes (every probe round): the cheaper exact
            # decomposition of shared.gram, in float64 (same values to round-off).
            Bs = np.stack([_finite_matrix(client[name][0], f"client {i} {name!r} B")
                           for i, client in enumerate(clients)])
            As = np.stack([_finite_matrix(client[name][1], f"client {i} {name!r} A")
                           for i, client in enumerate(clients)])
            gram += update_gram_target(B_root, A_root, Bs, As, dtype=np.float64)
            continue
        factors = [_update_factors(client[name], (B_root, A_root), name, i)
                   for i, client in enumerate(clients)]
        width = max(X.shape[1] for X, _ in factors)
        # Zero columns of X / rows of Y change nothing; padding lets unequal ranks share one batch.
        lefts = np.zeros((n, B_root.shape[0], width))
        rights = np.zeros((n, width, A_root.shape[1]))
        for i, (X, Y) in enumerate(factors):
            lefts[i, :, : X.shape[1]] = X
            rights[i, : Y.shape[0]] = Y
        gram += _pairwise_product_inner(lefts, rights)
    if head_deltas is not None:
        if len(head_deltas) != n:
            raise ValueError(f"{len(head_deltas)} head deltas for {n} clients")
        heads = np.asarray([np.asarray(h, dtype=np.float64).reshape(-1) for h in head_deltas])
        if heads.ndim != 2:
            raise ValueError("head deltas must all have the same length")
        if not np.all(np.isfinite(heads)):
            raise ValueError("head deltas contain non-finite values")
        gram += heads @ heads.T
    return gram


def update_similarity(
    clients: Sequence[Mapping[str, Factors]],
    root: Mapping[str, Factors],
    head_deltas: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Cosine similarity (n x n) of the clients' flattened updates.

    The update of client i is ``dW_i = B_i A_i - B_root A_root`` per target, flattened over all
    targets in sorted name order and concatenated with ``head_deltas[i]`` (1-D) when given.
    ``clients[i]`` and ``root`` map target name -> (B, A) with the same names. Inner products are
    computed from factors of the updates, batched over clients: from ``dB_i A_i + B_root dA_i``
    (``shared.gram.update_gram_target``, float64) for targets where every client has the
    root's shapes, else from rank-(r_i + r_root) factors.

    A zero update has similarity 0 with every other client and 1 with itself; the diagonal is 1.
    """
    gram = _update_gram(clients, root, head_deltas)
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    nonzero = norms > 0
    safe_norms = np.where(nonzero, norms, 1.0)
    similarity = gram / safe_norms[:, None] / safe_norms[None, :]
    similarity[~nonzero, :] = 0.0
    similarity[:, ~nonzero] = 0.0
    similarity = np.clip(similarity, -1.0, 1.0)
    np.fill_diagonal(similarity, 1.0)
    return similarity


def update_distance(
    clients: Sequence[Mapping[str, Factors]],
    root: Mapping[str, Factors],
    head_deltas: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Cosine distance ``1 - update_similarity(...)``, clipped to [0, 2], zero diagonal."""
    distance = np.clip(1.0 - update_similarity(clients, root, head_deltas), 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    return distance


def top_left_singular_vectors(M: np.ndarray, r: int) -> np.ndarray:
    """The top-``r`` left singular vectors of ``M`` (d x r, orthonormal columns).

    Raises:
        ValueError: non-finite M or r outside [1, min(M.shape)].
    """
    matrix = _finite_matrix(M, "M")
    if not 1 <= r <= min(matrix.shape):
        raise ValueError(f"r must be in [1, {min(matrix.shape)}], got {r}")
    U = np.linalg.svd(matrix, full_matrices=False)[0]
    return np.ascontiguousarray(U[:, :r])


def subspace_bases(
    clients: Sequence[Mapping[str, Factors]], root: Mapping[str, Factors], rank: int
) -> list[dict[str, np.ndarray]]:
    """Per client and target, the top-``rank`` left singular vectors of ``B_i - B_root``.

    This is the ``subspace`` feature set; feed the result to ``subspace_distance``.
    """
    names = _client_target_names(clients, root)
    bases: list[dict[str, np.ndarray]] = []
    for i, client in enumerate(clients):
        client_bases = {}
        for name in names:
            B = _finite_matrix(client[name][0], f"client {i} {name!r} B")
            B_root = _finite_matrix(root[name][0], f"root {name!r} B")
            if B.shape != B_root.shape:
                raise ValueError(f"client {i} {name!r}: B {B.shape} vs root B {B_root.shape}")
            client_bases[name] = top_left_singular_vectors(B - B_root, rank)
        bases.append(client_bases)
    return bases


def subspace_distance(bases: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
    """Subspace distance ``d_ij = 1 - ||U_i^T U_j||_F^2 / r``, averaged over targets (n x n).

    ``bases[i]`` maps target name -> U_i (d x r, orthonormal columns); every client has the same
    names and, per target, the same shape. The result is symmetric, in [0, 1], zero diagonal.
    """
    n = len(bases)
    if n == 0:
        raise ValueError("no bases given")
    names = sorted(bases[0])
    if not names:
        raise ValueError("bases have no targets")
    total = np.zeros((n, n), dtype=np.float64)
    for name in names:
        stack = []
        for i, client_bases in enumerate(bases):
            if sorted(client_bases) != names:
                raise ValueError(f"bases[{i}] has targets {sorted(client_bases)}, "
                                 f"bases[0] has {names}")
            stack.append(_finite_matrix(client_bases[name], f"bases[{i}][{name!r}]"))
        shapes = {U.shape for U in stack}
        if len(shapes) != 1:
            raise ValueError(f"target {name!r}: bases have different shapes {sorted(shapes)}")
        lefts = np.stack(stack)                                  # (n, d, r)
        d, r = lefts.shape[1:]
        columns = lefts.transpose(1, 0, 2).reshape(d, n * r)
        overlap = np.empty((n, n), dtype=np.float64)
        chunk = _chunk_size(n, r)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            block = (columns[:, start * r : stop * r].T @ columns).reshape(stop - start, r, n, r)
            overlap[start:stop] = np.einsum("iajb,iajb->ij", block, block)
        total += 1.0 - overlap / r
    distance = np.clip((total + total.T) / (2.0 * len(names)), 0.0, 1.0)
    np.fill_diagonal(distance, 0.0)
    return distance


def self_tuning_affinity(D: np.ndarray, knn: int) -> np.ndarray:
    """Self-tuning affinity ``S_ij = exp(-D_ij^2 / (sigma_i sigma_j))`` with zero diagonal.

    ``sigma_i`` is the distance from point i to its ``knn``-th nearest other point (Zelnik-Manor
    and Perona, 2004), with ``knn`` clamped to [1, n - 1] and sigma floored at 1e-12.
    """
    distance = _square_matrix(D, "D")
    if knn < 1:
        raise ValueError(f"knn must be >= 1, got {knn}")
    n = distance.shape[0]
    if n < 2:
        return np.zeros((n, n), dtype=np.float64)
    neighbour = min(knn, n - 1)
    off_diagonal = distance[~np.eye(n, dtype=bool)].reshape(n, n - 1)
    sigma = np.partition(off_diagonal, neighbour - 1, axis=1)[:, neighbour - 1]
    sigma = np.maximum(sigma, _SIGMA_FLOOR)
    affinity = np.exp(-(distance**2) / (sigma[:, None] * sigma[None, :]))
    np.fill_diagonal(affinity, 0.0)
    return affinity


def _normalized_affinity(S: np.ndarray) -> np.ndarray:
    """``D^{-1/2} S D^{-1/2}`` of the symmetrised S; rows and columns of zero degree stay zero."""
    affinity = _square_matrix(S, "S")
    affinity = (affinity + affinity.T) / 2.0
    degree = affinity.sum(axis=1)
    inverse_sqrt_degree = np.where(degree > 0, 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)),
                                   0.0)
    return inverse_sqrt_degree[:, None] * affinity * inverse_sqrt_degree[None, :]


def normalized_laplacian_eigenvalues(S: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of ``L = I - D^{-1/2} S D^{-1/2}`` for a symmetric affinity S.

    A point of zero degree contributes a zero row and column to the normalised affinity (so an
    eigenvalue 1 to L) instead of a division by zero.
    """
    normalized = _normalized_affinity(S)
    laplacian = np.eye(normalized.shape[0]) - normalized
    return np.linalg.eigvalsh(laplacian)


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Relabel clusters 0, 1, ... in order of first appearance (point 0's cluster becomes 0)."""
    labels = np.asarray(labels)
    mapping: dict[int, int] = {}
    canonical = np.empty(labels.shape[0], dtype=np.int64)
    for position, label in enumerate(labels.tolist()):
        canonical[position] = mapping.setdefault(label, len(mapping))
    return canonical


def spectral_labels(S: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Spectral clustering of affinity S into ``k`` clusters (Ng, Jordan and Weiss).

    Rows of the top-``k`` eigenvectors of ``D^{-1/2} S D^{-1/2}``, normalised to unit length, are
    clustered by ``KMeans(n_init=10, random_state=seed)``. Labels are canonical: numbered in order
    of first appearance, so the same inputs always give the same labels. ``k`` is clamped to
    [1, n]; KMeans may return fewer than ``k`` distinct labels on duplicate points.
    """
    normalized = _normalized_affinity(S)
    n = normalized.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = int(min(max(k, 1), n))
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    embedding = np.linalg.eigh(normalized)[1][:, -k:]
    row_norms = np.linalg.norm(embedding, axis=1, keepdims=True)
    embedding = embedding / np.where(row_norms > 0, row_norms, 1.0)
    from sklearn.cluster import KMeans  # imported here: sklearn costs ~1.5 s at coordinator start

    kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed)
    return canonical_labels(kmeans.fit_predict(embedding))


def average_linkage_labels(D: np.ndarray, k: int) -> np.ndarray:
    """Average-linkage agglomerative clustering of the distances D cut into ``k`` clusters (UPGMA:
    start from singletons, repeatedly merge the two clusters of smallest mean pairwise distance;
    ``scipy.cluster.hierarchy``). Canonical labels; ``k`` clamped to [1, n]; on tied merge heights
    the cut may give fewer than ``k`` clusters.

    Why beside spectral clustering: a group smaller than the affinity's ``knn`` + 1 points has its
    kernel widths set by points outside it, so the spectral embedding blurs it into a neighbour,
    while its mean distances still set it apart (docs/method.md, "Partitions tried")."""
    distance = _clustering_distances(D)
    return _cut_average_linkage(_average_linkage_tree(distance), distance.shape[0], k)


def _average_linkage_tree(distance: np.ndarray) -> np.ndarray | None:
    """scipy's UPGMA merge tree of checked distances (None below 2 points): built once, cut at every K."""
    if distance.shape[0] < 2:
        return None
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    return linkage(squareform(distance, checks=False), method="average")


def _cut_average_linkage(tree: np.ndarray | None, n: int, k: int) -> np.ndarray:
    k = int(min(max(k, 1), n))
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    if k == n:
        return np.arange(n, dtype=np.int64)
    from scipy.cluster.hierarchy import fcluster

    return canonical_labels(fcluster(tree, k, criterion="maxclust"))


PARTITIONS = ("spectral", "spectral+linkage")


def between_within_distance_ratio(D: np.ndarray, labels: np.ndarray) -> float:
    """Mean distance between points of different clusters over mean distance between distinct
    points of the same cluster (the LSAC contrast test statistic).

    Returns 0.0 when there is only one cluster (nothing between), inf when every cluster is a
    single point or duplicates (nothing within) while some between-cluster distance is positive.
    """
    distance = _square_matrix(D, "D")
    labels = np.asarray(labels)
    n = distance.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels have shape {labels.shape}, expected ({n},)")
    same = labels[:, None] == labels[None, :]
    distinct = ~np.eye(n, dtype=bool)
    within = distance[same & distinct]
    between = distance[~same]
    if between.size == 0:
        return 0.0
    between_mean = float(between.mean())
    within_mean = float(within.mean()) if within.size else 0.0
    if within_mean > 0:
        return between_mean / within_mean
    return float("inf") if between_mean > 0 else 1.0


def silhouette(D: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of a partition from its distance matrix (Rousseeuw 1987): for each point,
    ``(b - a) / max(a, b)`` with ``a`` its mean distance to the other points of its cluster and
    ``b`` the smallest mean distance to the points of another cluster; 0 for a point alone in its
    cluster (and where ``a = b = 0``). ValueError unless there are 2 to n - 1 clusters."""
    distance = _square_matrix(D, "D")
    labels = np.asarray(labels)
    n = distance.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels have shape {labels.shape}, expected ({n},)")
    clusters = np.unique(labels)
    if not 2 <= clusters.size <= n - 1:
        raise ValueError(f"a silhouette needs 2 to n - 1 clusters, got {clusters.size} for n = {n}")
    member = labels[None, :] == clusters[:, None]                 # (k, n)
    sizes = member.sum(axis=1)
    sums = distance @ member.T.astype(np.float64)                 # (n, k): distance to each cluster
    own = np.searchsorted(clusters, labels)
    own_size = sizes[own]
    a = np.where(own_size > 1, sums[np.arange(n), own] / np.maximum(own_size - 1, 1), 0.0)
    means = sums / sizes[None, :]
    means[np.arange(n), own] = np.inf
    b = means.min(axis=1)
    top = np.maximum(a, b)
    score = np.where((own_size > 1) & (top > 0), (b - a) / np.where(top > 0, top, 1.0), 0.0)
    return float(score.mean())


@dataclass(frozen=True, eq=False)
class LsacResult:
    """Outcome of one LSAC run.

    Attributes:
        k: the number of clusters chosen.
        labels: (n,) int cluster of each point, canonical (numbered by first appearance).
        eigenvalues: ascending eigenvalues of the normalised Laplacian of ``affinity``.
        eigengaps: ``eigengaps[k - 1] = lambda_{k+1} - lambda_k`` for k = 1..min(k_max, n - 1).
        contrast_ratio: between/within mean distance of the candidate partition (also when it
            was rejected), None when no partition into K >= 2 was tried.
        affinity: the self-tuning affinity matrix used.
        silhouettes: with the silhouette K rule, ``silhouettes[i]`` is the mean silhouette of the
            partition tried for ``k_lo + i`` clusters (the better of spectral and average linkage
            with ``partitions="spectral+linkage"``), for every K tried; else None.
    """

    k: int
    labels: np.ndarray
    eigenvalues: np.ndarray
    eigengaps: np.ndarray
    contrast_ratio: float | None
    affinity: np.ndarray
    silhouettes: np.ndarray | None = None



def _clustering_distances(D: np.ndarray) -> np.ndarray:
    """D checked (square, finite, non-negative, at least one point), symmetrised, zero diagonal."""
    distance = _square_matrix(D, "D")
    if distance.shape[0] == 0:
        raise ValueError("no points to cluster")
    if np.any(distance < 0):
        raise ValueError("distances must be non-negative")
    distance = (distance + distance.T) / 2.0
    np.fill_diagonal(distance, 0.0)
    return distance

def lsac(
    D: np.ndarray,
    k_min: int = 1,
    k_max: int = 10,
    knn: int = 5,
    contrast: float = 1.25,
    force_k: int | None = None,
    seed: int = 0,
    k_rule: str = "eigengap",
    min_silhouette: float = 0.15,
    silhouette_tolerance: float = 0.0,
    partitions: str = "spectral",
) -> LsacResult:
    """Cluster n points from their distance matrix D (n x n) with the measured LSAC rule.

    1. ``S = self_tuning_affinity(D, knn)``; eigenvalues of its normalised Laplacian.
    2. With ``force_k``: K = force_k clamped to [1, n]. Otherwise, with n < 3 or k_max < 2: K = 1.
       Otherwise K* maximises the eigengap ``lambda_{k+1} - lambda_k`` over
       k in [max(2, k_min), min(k_max, n - 1)] (smallest k on ties; a k_min above n - 1 is
       clamped to n - 1), the points are clustered by ``spectral_labels(S, K*, seed)``, and K* is
       accepted only if the between/within mean distance ratio is >= ``contrast``; else K = 1
       (all labels 0) unless ``k_min >= 2``, in which case K* is kept.
       With ``k_rule="silhouette"`` the eigengap and the contrast test are not used: every K in
       that range is tried (``spectral_labels(S, K, seed)``), K* is the one whose partition has
       the highest mean ``silhouette`` on D (smallest K on ties), and it is accepted only if that
       silhouette is >= ``min_silhouette``; else K = 1 unless ``k_min >= 2``. With
       ``silhouette_tolerance`` t > 0 the smallest K whose silhouette is at least (1 - t) times the
       highest (and >= ``min_silhouette``) is taken instead: splitting a group in two often scores
       about as well as keeping it. Relative, because silhouettes of probe updates range from
       about 0.15 (20-image clients) to 0.5 (160-image clients). With
       ``partitions="spectral+linkage"`` each K also tries ``average_linkage_labels(D, K)`` and
       keeps whichever of the two partitions has the higher silhouette (spectral on ties), so that
       a small group the affinity blurs is still found where its mean distances set it apart.
    3. K in the result is the number of distinct labels actually produced.

    D must be square, finite and non-negative; it is symmetrised and its diagonal set to zero.
    Groups smaller than ``knn + 1`` points tend to merge with a neighbour: lower ``knn`` for them.
    """
    distance = _clustering_distances(D)
    n = distance.shape[0]
    affinity = self_tuning_affinity(distance, knn)
    eigenvalues = normalized_laplacian_eigenvalues(affinity)
    gap_count = max(0, min(k_max, n - 1))
    eigengaps = np.diff(eigenvalues)[:gap_count]
    contrast_ratio: float | None = None
    silhouettes: np.ndarray | None = None
    if k_rule not in ("eigengap", "silhouette"):
        raise ValueError(f"unknown K rule {k_rule!r}: use 'eigengap' or 'silhouette'")
    if partitions not in PARTITIONS:
        raise ValueError(f"unknown partitions {partitions!r}: use {' or '.join(map(repr, PARTITIONS))}")
    if force_k is not None:
        labels = spectral_labels(affinity, int(min(max(force_k, 1), n)), seed)
        if labels.max() >= 1:
            contrast_ratio = between_within_distance_ratio(distance, labels)
    elif n < 3 or k_max < 2:
        labels = np.zeros(n, dtype=np.int64)
    elif k_rule == "silhouette":
        highest = min(k_max, n - 1)
        lowest = min(max(2, k_min), highest)
        candidates, scores = [], []
        tree = _average_linkage_tree(distance) if partitions == "spectral+linkage" else None
        for k in range(lowest, highest + 1):
            tried = [spectral_labels(affinity, k, seed)]
            if tree is not None:
                tried.append(_cut_average_linkage(tree, n, k))
            scored = [silhouette(distance, c) if 2 <= c.max() + 1 <= n - 1 else -1.0 for c in tried]
            best_here = int(np.argmax(scored))   # the first (spectral) on ties
            candidates.append(tried[best_here])
            scores.append(scored[best_here])
        silhouettes = np.array(scores)
        best = float(silhouettes.max())
        good_enough = max(best * (1.0 - silhouette_tolerance), min_silhouette) if best >= min_silhouette else best
        labels = candidates[int(np.flatnonzero(silhouettes >= good_enough)[0])]
        contrast_ratio = between_within_distance_ratio(distance, labels)
        if best < min_silhouette and k_min < 2:
            labels = np.zeros(n, dtype=np.int64)
    else:
        highest = min(k_max, n - 1)
        lowest = min(max(2, k_min), highest)
        candidate_k = lowest + int(np.argmax(eigengaps[lowest - 1 : highest]))
        labels = spectral_labels(affinity, candidate_k, seed)
        contrast_ratio = between_within_distance_ratio(distance, labels)
        if contrast_ratio < contrast and k_min < 2:
            labels = np.zeros(n, dtype=np.int64)
    return LsacResult(
        k=int(labels.max()) + 1,
        labels=labels,
        eigenvalues=eigenvalues,
        eigengaps=eigengaps,
        contrast_ratio=contrast_ratio,
        affinity=affinity,
        silhouettes=silhouettes,
    )


def assign_to_clusters(similarity: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """For each new point, the cluster whose members it is most similar to on average.

    ``similarity`` is (m x n) between m new points and n clustered points with ``labels`` (n,);
    points labelled < 0 (no cluster) are ignored. Ties go to the smallest label.
    """
    scores = _finite_matrix(similarity, "similarity")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (scores.shape[1],):
        raise ValueError(f"labels have shape {labels.shape}, expected ({scores.shape[1]},)")
    cluster_ids = np.unique(labels[labels >= 0])
    if cluster_ids.size == 0:
        raise ValueError("no clustered points to assign to")
    mean_similarity = np.stack(
        [scores[:, labels == cluster].mean(axis=1) for cluster in cluster_ids], axis=1
    )
    return cluster_ids[np.argmax(mean_similarity, axis=1)]


def manual_labels(names: Sequence[str], assignment: Mapping[str, int], similarity: np.ndarray) -> np.ndarray:
    """Cluster labels given by hand (``clustering.algorithm`` 'manual'): each client of ``names``
    that ``assignment`` names gets its label; every other one joins the named clients' cluster it
    is most similar to on average (``similarity``, n x n over ``names``, as ``assign_to_clusters``).
    When none of ``names`` is named, all of them get the smallest label of the assignment."""
    labels = np.array([int(assignment.get(name, -1)) for name in names], dtype=np.int64)
    if len(assignment) == 0:
        raise ValueError("manual clustering needs a non-empty assignment")
    unnamed = np.flatnonzero(labels < 0)
    if unnamed.size == labels.size:
        return np.full(labels.size, min(int(v) for v in assignment.values()), dtype=np.int64)
    if unnamed.size:
        scores = np.asarray(similarity, dtype=np.float64)
        labels[unnamed] = assign_to_clusters(scores[unnamed], labels)
    return labels


def match_cluster_ids(
    old_labels: np.ndarray, new_labels: np.ndarray
) -> dict[int, int | None]:
    """Match new clusters to old ones by maximum total membership overlap.

    ``old_labels`` and ``new_labels`` label the same clients; old labels < 0 mean "had no
    cluster". Solved as an assignment problem (``scipy.optimize.linear_sum_assignment``). Returns
    new label -> matched old label, or None for a new cluster left unmatched or matched only to an
    old cluster it shares no member with.
    """
    old = np.asarray(old_labels, dtype=np.int64)
    new = np.asarray(new_labels, dtype=np.int64)
    if old.shape != new.shape or old.ndim != 1:
        raise ValueError(f"label arrays differ in shape: {old.shape} vs {new.shape}")
    if np.any(new < 0):
        raise ValueError("new labels must be non-negative")
    new_ids = np.unique(new)
    old_ids = np.unique(old[old >= 0])
    matches: dict[int, int | None] = {int(label): None for label in new_ids}
    if old_ids.size == 0:
        return matches
    overlap = np.array([[np.count_nonzero((new == n_id) & (old == o_id)) for o_id in old_ids]
                        for n_id in new_ids])
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    for row, col in zip(rows, cols):
        if overlap[row, col] > 0:
            matches[int(new_ids[row])] = int(old_ids[col])
    return matches


def update_gram(
    clients: Sequence[Mapping[str, Factors]],
    root: Mapping[str, Factors],
    head_deltas: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Gram matrix (n x n) of the clients' flattened updates ``dW_i = B_i A_i - B_root A_root``
    (all targets in sorted name order, then ``head_deltas[i]`` when given), from the factors: the
    un-normalised inner products behind ``update_similarity``."""
    return _update_gram(clients, root, head_deltas)


def gram_kmeans_labels(gram: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means on the points whose inner products are ``gram`` (n x n, symmetric PSD), canonical labels.

    The points are embedded exactly (up to a rotation) as the rows of ``V sqrt(L)`` for the
    eigendecomposition ``gram = V L V^T`` (negative round-off eigenvalues clipped to 0), so this
    is k-means on the original vectors (e.g. flattened updates, ``update_gram``) without forming
    them. ``KMeans(n_init=10, random_state=seed)``; ``k`` is clamped to [1, n].
    """
    matrix = _square_matrix(gram, "gram")
    n = matrix.shape[0]
    if n == 0:
        raise ValueError("no points to cluster")
    k = int(min(max(k, 1), n))
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    embedding = vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))[None, :]
    from sklearn.cluster import KMeans  # imported here, as in spectral_labels

    kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed)
    return canonical_labels(kmeans.fit_predict(embedding))


def median_sigma_affinity(D: np.ndarray) -> np.ndarray:
    """The paper's affinity ``S_ij = exp(-D_ij^2 / (2 sigma^2))``, sigma = the median off-diagonal
    distance (floored at 1e-12), zero diagonal."""
    distance = _square_matrix(D, "D")
    n = distance.shape[0]
    if n < 2:
        return np.zeros((n, n), dtype=np.float64)
    sigma = max(float(np.median(distance[np.triu_indices(n, k=1)])), _SIGMA_FLOOR)
    affinity = np.exp(-(distance**2) / (2.0 * sigma**2))
    np.fill_diagonal(affinity, 0.0)
    return affinity


def lsac_paper(D: np.ndarray, k_min: int = 1, k_max: int = 10, seed: int = 0) -> LsacResult:
    """LSAC as the paper writes it (method.md section 4), for comparison with ``lsac``.

    ``median_sigma_affinity`` (no self-tuning kernel), K = argmax of the eigengap
    ``lambda_{k+1} - lambda_k`` of the normalised Laplacian over k in [k_min, min(k_max, n - 1)]
    (so K = 1 is possible with k_min = 1; smallest k on ties), spectral clustering with that K and
    no contrast test (``contrast_ratio`` is still computed for K >= 2, for reporting).
    """
    if k_min < 1 or k_max < k_min:
        raise ValueError(f"need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    distance = _clustering_distances(D)
    n = distance.shape[0]
    affinity = median_sigma_affinity(distance)
    eigenvalues = normalized_laplacian_eigenvalues(affinity)
    eigengaps = np.diff(eigenvalues)[: max(0, min(k_max, n - 1))]
    highest = min(k_max, n - 1)
    if highest < 1:
        labels = np.zeros(n, dtype=np.int64)
    else:
        lowest = min(k_min, highest)
        chosen = lowest + int(np.argmax(eigengaps[lowest - 1 : highest]))
        labels = spectral_labels(affinity, chosen, seed)
    contrast_ratio = between_within_distance_ratio(distance, labels) if labels.max() >= 1 else None
    return LsacResult(k=int(labels.max()) + 1, labels=labels, eigenvalues=eigenvalues, eigengaps=eigengaps,
                      contrast_ratio=contrast_ratio, affinity=affinity)
