"""shared/lsac_scale.py: exact batched-GEMM features against the float64 references of
shared/subspace.py, and the approximate sparse path against the exact clustering."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

import shared.gram as gram_module
import shared.lsac_scale as ls
from shared.subspace import (
    LsacResult,
    between_within_distance_ratio,
    lsac,
    subspace_bases,
    subspace_distance,
    update_distance,
)
from test_subspace import (
    TARGETS,
    planted_population,
    reference_subspace_distance,
    reference_update_similarity,
    unstructured_population,
)

pytestmark = pytest.mark.unit


def materialised_gram(clients, root, heads=None):
    vectors = []
    for i, client in enumerate(clients):
        parts = [(client[t][0] @ client[t][1] - root[t][0] @ root[t][1]).ravel() for t in sorted(root)]
        if heads is not None:
            parts.append(np.asarray(heads[i], dtype=np.float64))
        vectors.append(np.concatenate(parts))
    V = np.asarray(vectors)
    return V @ V.T


# --- exact path ------------------------------------------------------------------------------

def test_update_gram_equals_materialised_reference_in_float64_and_float32():
    rng = np.random.default_rng(0)
    clients, root, heads, _, _ = planted_population(rng, [4, 3, 5])
    clients[2] = {t: (root[t][0].copy(), root[t][1].copy()) for t in TARGETS}   # a zero update
    heads[2] = np.zeros(10)
    expected = materialised_gram(clients, root, heads)

    gram64 = ls.update_gram(clients, root, heads, dtype=np.float64)
    gram32 = ls.update_gram(clients, root, heads)

    scale = np.abs(expected).max()
    np.testing.assert_allclose(gram64, expected, atol=1e-12 * scale)
    np.testing.assert_allclose(gram32, expected, atol=1e-5 * scale)
    np.testing.assert_array_equal(gram64, gram64.T)
    distance = ls.cosine_distance_from_gram(gram64)
    np.testing.assert_allclose(distance, update_distance(clients, root, heads), atol=1e-12)
    similarity = reference_update_similarity(clients, root, heads)
    np.testing.assert_allclose(distance, np.clip(1.0 - similarity, 0.0, 2.0), atol=1e-12)
    assert distance[2].tolist() == [1.0, 1.0, 0.0] + [1.0] * 9


def test_update_gram_blocks_agree_with_one_block(monkeypatch):
    rng = np.random.default_rng(1)
    clients, root, heads, _, _ = planted_population(rng, [5, 6])
    whole = ls.update_gram(clients, root, heads, dtype=np.float64)

    monkeypatch.setattr(gram_module, "_BLOCK_ENTRIES", 50)   # one or two clients per block (shared.gram's blocks)
    blocked = ls.update_gram(clients, root, heads, dtype=np.float64)

    np.testing.assert_allclose(blocked, whole, atol=1e-12 * np.abs(whole).max())


def test_update_gram_rejects_shapes_other_than_the_root():
    rng = np.random.default_rng(2)
    clients, root, _, _, _ = planted_population(rng, [2])
    name = TARGETS[0]
    with pytest.raises(ValueError, match="do not match"):
        ls.update_gram_target(root[name][0], root[name][1], np.ones((2, 24, 3)), np.ones((2, 3, 20)))
    bad = dict(clients[0])
    bad[name] = (np.full((24, 4), np.nan), clients[0][name][1])
    with pytest.raises(ValueError, match="non-finite"):
        ls.update_gram([bad, clients[1]], root)


@pytest.mark.parametrize("rank", [4, 2])
def test_subspace_overlap_equals_reference_distance(rank):
    rng = np.random.default_rng(3)
    clients, root, _, _, _ = planted_population(rng, [4, 4])

    distance64 = ls.exact_distance("subspace", clients, root, None, rank, dtype=np.float64)
    distance32 = ls.exact_distance("subspace", clients, root, None, rank)

    expected = reference_subspace_distance(subspace_bases(clients, root, rank))
    np.testing.assert_allclose(distance64, expected, atol=1e-12)
    np.testing.assert_allclose(distance32, expected, atol=1e-5)
    np.testing.assert_allclose(distance64, subspace_distance(subspace_bases(clients, root, rank)), atol=1e-12)


def test_subspace_bases_from_small_grams_span_the_top_singular_subspace_and_zero_update_is_zero():
    rng = np.random.default_rng(4)
    B_root = rng.standard_normal((30, 4))
    Bs = B_root + rng.standard_normal((3, 30, 4)) * np.array([3.0, 2.0, 1.0, 0.1])
    Bs[1] = B_root

    bases = ls.subspace_bases_target(B_root, Bs, 2, dtype=np.float64)

    for i in (0, 2):
        U = np.linalg.svd(Bs[i] - B_root)[0][:, :2]
        np.testing.assert_allclose(bases[i] @ bases[i].T, U @ U.T, atol=1e-10)
        np.testing.assert_allclose(bases[i].T @ bases[i], np.eye(2), atol=1e-12)
    assert np.all(bases[1] == 0.0)


# --- sketches ----------------------------------------------------------------------------------

def test_update_sketch_inner_products_are_unbiased_estimates():
    rng = np.random.default_rng(5)
    clients, root, heads, _, _ = planted_population(rng, [6, 6], noise=0.3)
    exact = ls.update_gram(clients, root, heads, dtype=np.float64)
    shapes = {t: (24, 20) for t in TARGETS}

    estimates = []
    for seed in range(200):
        Z = ls.FeatureSketch(shapes, sketch_dim=128, head_dim=10, seed=seed).sketch_updates(
            clients, root, heads).astype(np.float64)
        estimates.append(Z @ Z.T)

    sketch = ls.FeatureSketch(shapes, sketch_dim=128, head_dim=10)
    assert sketch.side == 8 and sketch.head_width == 10 and sketch.width == 2 * 64 + 10
    norms = np.sqrt(np.diag(exact))
    assert np.abs(np.mean(estimates, axis=0) - exact).max() < 0.05 * np.outer(norms, norms).max()
    np.testing.assert_allclose(Z[:, -10:], np.asarray(heads, dtype=np.float32), rtol=1e-6)   # heads exact


def test_long_heads_are_count_sketched_unbiasedly():
    rng = np.random.default_rng(6)
    sketch = ls.FeatureSketch({"t": (4, 4)}, sketch_dim=16, head_dim=20000, head_sketch_dim=4096, seed=1)
    x = rng.standard_normal(20000)
    y = x + 0.5 * rng.standard_normal(20000)

    Zx, Zy = sketch.heads(np.stack([x, y]))

    assert sketch.head_width == 4096 and Zx.shape == (4096,)
    assert abs(Zx @ Zy - x @ y) < 0.05 * np.linalg.norm(x) * np.linalg.norm(y)


def test_subspace_sketch_estimates_the_projector_overlap_unbiasedly():
    rng = np.random.default_rng(7)
    clients, root, _, _, _ = planted_population(rng, [5, 5], noise=0.3)
    exact = ls.subspace_overlap(clients, root, 4, dtype=np.float64)

    estimates = []
    for seed in range(200):
        Z = ls.FeatureSketch({t: (24, 20) for t in TARGETS}, sketch_dim=128, seed=seed).sketch_subspaces(
            clients, root, 4).astype(np.float64)
        estimates.append(Z @ Z.T)

    assert np.abs(np.mean(estimates, axis=0) - exact).max() < 0.05 * 4 * len(TARGETS)


# --- kNN, affinity, approximate LSAC ------------------------------------------------------------

@pytest.mark.parametrize("metric", ["cosine", "inner"])
def test_knn_from_sketch_equals_brute_force(metric):
    rng = np.random.default_rng(8)
    Z = rng.standard_normal((40, 6)).astype(np.float32)
    scale = 7.0

    indices, distances = ls.knn_from_sketch(Z, 5, metric, scale)
    blocked, _ = ls.knn_from_sketch(Z, 5, metric, scale, block_rows=3)

    Zn = Z / np.linalg.norm(Z, axis=1, keepdims=True) if metric == "cosine" else Z
    sims = (Zn @ Zn.T).astype(np.float64)
    full = np.clip(1 - sims, 0, 2) if metric == "cosine" else np.clip(1 - sims / scale, 0, 1)
    for i in range(40):
        order = [j for j in np.argsort(-sims[i], kind="stable") if j != i][:5]
        assert indices[i].tolist() == order
        np.testing.assert_allclose(distances[i], full[i, order], atol=1e-6)
    np.testing.assert_array_equal(blocked, indices)


def test_sparse_affinity_is_the_dense_self_tuning_kernel_on_knn_pairs():
    rng = np.random.default_rng(9)
    Z = rng.standard_normal((25, 4)).astype(np.float32)
    indices, distances = ls.knn_from_sketch(Z, 24, "cosine")   # all pairs: equals the dense kernel

    S = ls.sparse_self_tuning_affinity(indices, distances, knn=5).toarray()

    Zn = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    D = np.clip(1 - (Zn @ Zn.T).astype(np.float64), 0, 2)
    np.fill_diagonal(D, 0)
    from shared.subspace import self_tuning_affinity

    np.testing.assert_allclose(S, self_tuning_affinity(D, 5), atol=1e-6)


def test_contrast_from_sketch_equals_the_dense_ratio_of_sketched_distances():
    rng = np.random.default_rng(10)
    Z = rng.standard_normal((30, 5))
    labels = rng.integers(0, 3, size=30)
    Zn = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    D_cos = 1 - Zn @ Zn.T
    np.fill_diagonal(D_cos, 0)
    D_inner = 1 - Z @ Z.T / 9.0
    np.fill_diagonal(D_inner, 0)

    assert ls._contrast_from_sketch(Z, labels, "cosine", 1.0) == pytest.approx(
        between_within_distance_ratio(D_cos, labels), rel=1e-10)
    assert ls._contrast_from_sketch(Z, labels, "inner", 9.0) == pytest.approx(
        between_within_distance_ratio(D_inner, labels), rel=1e-10)


def sketch_for(clients, root, heads, features, dim=4096, seed=0):
    sketch = ls.FeatureSketch({t: root[t][0].shape[:1] + root[t][1].shape[1:] for t in root}, dim,
                              len(heads[0]) if heads is not None else None, seed=seed)
    if features == "update":
        return sketch.sketch_updates(clients, root, heads)
    return sketch.sketch_subspaces(clients, root, 4)


@pytest.mark.parametrize("features", ["update", "subspace"])
def test_approximate_lsac_matches_exact_clustering_on_planted_groups(features):
    rng = np.random.default_rng(11)
    clients, root, heads, truth, _ = planted_population(rng, [40, 25, 15, 10], noise=0.4)
    exact = lsac(ls.exact_distance(features, clients, root, heads, 4, dtype=np.float64))

    Z = sketch_for(clients, root, heads if features == "update" else None, features)
    metric, scale = ("cosine", 1.0) if features == "update" else ("inner", 4.0 * len(TARGETS))
    approx = ls.approximate_lsac(Z, metric, scale=scale)

    assert exact.k == 4 and approx.k == 4
    assert adjusted_rand_score(exact.labels, approx.labels) == 1.0
    assert adjusted_rand_score(truth, approx.labels) == 1.0
    assert approx.labels[0] == 0                       # canonical
    assert approx.affinity.shape == (90, 90) and (approx.affinity != approx.affinity.T).nnz == 0
    assert len(approx.eigenvalues) == 11 and approx.eigenvalues[0] == pytest.approx(0.0, abs=1e-8)


def test_approximate_lsac_finds_groups_that_are_separate_graph_components():
    # Far-apart groups: the kNN graph has one component per group (eigenvalue 0 repeated).
    rng = np.random.default_rng(12)
    centres = rng.standard_normal((3, 50)) * 10
    Z = np.concatenate([c + rng.standard_normal((30, 50)) for c in centres]).astype(np.float32)
    truth = np.repeat(np.arange(3), 30)

    result = ls.approximate_lsac(Z, "cosine")

    assert result.k == 3 and adjusted_rand_score(truth, result.labels) == 1.0
    np.testing.assert_allclose(result.eigenvalues[:3], 0.0, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_approximate_lsac_gives_one_cluster_without_structure(seed):
    rng = np.random.default_rng(100 + seed)
    clients, root, heads = unstructured_population(rng, n=80)

    result = ls.approximate_lsac(sketch_for(clients, root, heads, "update"), "cosine")

    assert result.k == 1 and np.all(result.labels == 0)
    assert result.contrast_ratio is not None and result.contrast_ratio < 1.25


def test_approximate_lsac_force_k_and_tiny_populations():
    rng = np.random.default_rng(13)
    clients, root, heads, _, _ = planted_population(rng, [20, 20], noise=0.4)
    Z = sketch_for(clients, root, heads, "update")

    forced = ls.approximate_lsac(Z, "cosine", force_k=3)
    tiny = ls.approximate_lsac(Z[:2], "cosine")

    assert forced.k == 3 and forced.contrast_ratio is not None
    assert tiny.k == 1 and tiny.labels.tolist() == [0, 0]


def test_lsac_auto_switches_to_the_approximate_path_above_the_threshold():
    rng = np.random.default_rng(14)
    clients, root, heads, truth, _ = planted_population(rng, [30, 20, 20], noise=0.4)

    exact = ls.lsac_auto("update", clients, root, heads, 4, exact_max_clients=100)
    approx = ls.lsac_auto("update", clients, root, heads, 4, exact_max_clients=50)
    approx_subspace = ls.lsac_auto("subspace", clients, root, None, 4, exact_max_clients=50)

    assert isinstance(exact, LsacResult) and isinstance(approx, ls.ApproximateLsacResult)
    assert adjusted_rand_score(exact.labels, approx.labels) == 1.0
    assert adjusted_rand_score(truth, approx_subspace.labels) == 1.0
    with pytest.raises(ValueError, match="unknown LSAC features"):
        ls.lsac_auto("other", clients, root, heads, 4, exact_max_clients=50)


def test_gram_and_subspace_never_import_lsac_scale():
    """One-way dependency: shared.gram <- shared.subspace <- shared.lsac_scale (no cycle), and the
    kernels stay importable from shared.lsac_scale."""
    import ast
    from pathlib import Path

    def imported(path: Path) -> set[str]:
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):      # top level and inside functions
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        return found

    folder = Path(gram_module.__file__).parent
    assert "shared.lsac_scale" not in imported(folder / "subspace.py")
    assert not {"shared.lsac_scale", "shared.subspace"} & imported(folder / "gram.py")
    assert ls.update_gram_target is gram_module.update_gram_target
    assert ls.pairwise_contracted_gram is gram_module.pairwise_contracted_gram


def test_silhouette_from_sketch_equals_the_silhouette_of_the_dense_sketched_distances():
    from shared.subspace import silhouette

    rng = np.random.default_rng(15)
    Z = rng.standard_normal((40, 6))
    labels = np.repeat(np.arange(4), 10)
    labels[-1] = 3
    labels[:1] = 4  # a singleton scores 0
    Zn = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    D_cos = 1 - Zn @ Zn.T
    np.fill_diagonal(D_cos, 0)
    D_inner = np.clip(1 - Z @ Z.T / 50.0, 0, None)  # scale keeps every distance >= 0 here
    np.fill_diagonal(D_inner, 0)
    assert (1 - Z @ Z.T / 50.0)[~np.eye(40, dtype=bool)].min() >= 0

    assert ls._silhouette_from_sketch(Z, labels, "cosine", 1.0) == pytest.approx(silhouette(D_cos, labels), abs=1e-12)
    assert ls._silhouette_from_sketch(Z, labels, "inner", 50.0) == pytest.approx(silhouette(D_inner, labels),
                                                                                 abs=1e-12)


@pytest.mark.parametrize("features", ["update", "subspace"])
def test_approximate_lsac_with_the_silhouette_rule_matches_exact_clustering(features):
    rng = np.random.default_rng(16)
    clients, root, heads, truth, _ = planted_population(rng, [40, 25, 15, 10], noise=0.4)
    exact = lsac(ls.exact_distance(features, clients, root, heads, 4, dtype=np.float64), k_rule="silhouette")
    Z = sketch_for(clients, root, heads if features == "update" else None, features)
    metric, scale = ("cosine", 1.0) if features == "update" else ("inner", 4.0 * len(TARGETS))

    approx = ls.approximate_lsac(Z, metric, scale=scale, k_rule="silhouette")

    assert exact.k == 4 and approx.k == 4
    assert adjusted_rand_score(truth, approx.labels) == 1.0 and adjusted_rand_score(exact.labels, approx.labels) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_approximate_silhouette_rule_gives_one_cluster_without_structure(seed):
    rng = np.random.default_rng(200 + seed)
    clients, root, heads = unstructured_population(rng, n=80)

    result = ls.approximate_lsac(sketch_for(clients, root, heads, "update"), "cosine", k_rule="silhouette")

    assert result.k == 1 and np.all(result.labels == 0)
