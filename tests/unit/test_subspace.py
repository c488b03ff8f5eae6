"""LSAC math against slow references and on synthetic populations with planted groups."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

import shared.subspace as subspace
from shared.subspace import (
    LsacResult,
    assign_to_clusters,
    between_within_distance_ratio,
    canonical_labels,
    lsac,
    match_cluster_ids,
    normalized_laplacian_eigenvalues,
    self_tuning_affinity,
    spectral_labels,
    subspace_bases,
    subspace_distance,
    top_left_singular_vectors,
    update_distance,
    update_similarity,
)

pytestmark = pytest.mark.unit

TARGETS = ("blocks.1.attn.qkv.v", "blocks.0.attn.qkv.q")  # deliberately not sorted


def random_root(rng, d_out=24, d_in=20, rank=4):
    return {t: (rng.standard_normal((d_out, rank)), rng.standard_normal((rank, d_in)))
            for t in TARGETS}


def planted_population(rng, group_sizes, noise=0.6, step=0.1, head_dim=10, root=None,
                       directions=None):
    """Clients whose updates share their group's random direction (B and A and head) plus noise.

    Returns clients, root, head deltas, true group of each client (in shuffled order), and the
    group directions (so more members of the same groups can be drawn later).
    """
    root = root if root is not None else random_root(rng)
    if directions is None:
        directions = [
            ({t: (rng.standard_normal(root[t][0].shape), rng.standard_normal(root[t][1].shape))
              for t in TARGETS}, rng.standard_normal(head_dim))
            for _ in group_sizes
        ]
    truth = rng.permutation(np.repeat(np.arange(len(group_sizes)), group_sizes))
    clients, heads = [], []
    for group in truth:
        factor_directions, head_direction = directions[group]
        client = {}
        for t in TARGETS:
            dB, dA = factor_directions[t]
            B_root, A_root = root[t]
            client[t] = (B_root + step * (dB + noise * rng.standard_normal(dB.shape)),
                         A_root + step * (dA + noise * rng.standard_normal(dA.shape)))
        clients.append(client)
        heads.append(step * (head_direction + noise * rng.standard_normal(head_dim)))
    return clients, root, heads, truth, directions


def unstructured_population(rng, n=18, step=0.1, head_dim=10):
    root = random_root(rng)
    clients = [{t: (root[t][0] + step * rng.standard_normal(root[t][0].shape),
                    root[t][1] + step * rng.standard_normal(root[t][1].shape)) for t in TARGETS}
               for _ in range(n)]
    heads = [step * rng.standard_normal(head_dim) for _ in range(n)]
    return clients, root, heads


def reference_update_similarity(clients, root, heads=None):
    """Materialise every flattened update and take cosines in a double loop."""
    vectors = []
    for i, client in enumerate(clients):
        parts = [(client[t][0] @ client[t][1] - root[t][0] @ root[t][1]).ravel()
                 for t in sorted(root)]
        if heads is not None:
            parts.append(np.asarray(heads[i], dtype=np.float64).ravel())
        vectors.append(np.concatenate(parts))
    n = len(vectors)
    similarity = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            norm_i, norm_j = np.linalg.norm(vectors[i]), np.linalg.norm(vectors[j])
            if i == j:
                similarity[i, j] = 1.0
            elif norm_i > 0 and norm_j > 0:
                similarity[i, j] = vectors[i] @ vectors[j] / (norm_i * norm_j)
    return similarity


def reference_subspace_distance(bases):
    n = len(bases)
    distance = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                distance[i, j] = np.mean([
                    1.0 - np.linalg.norm(bases[i][t].T @ bases[j][t]) ** 2 / bases[i][t].shape[1]
                    for t in sorted(bases[i])])
    return distance


def reference_self_tuning_affinity(D, knn):
    n = D.shape[0]
    sigma = []
    for i in range(n):
        others = sorted(D[i, j] for j in range(n) if j != i)
        sigma.append(max(others[min(knn, n - 1) - 1], 1e-12))
    S = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                S[i, j] = np.exp(-D[i, j] ** 2 / (sigma[i] * sigma[j]))
    return S


def reference_normalized_laplacian(S):
    n = S.shape[0]
    degree = [sum(S[i]) for i in range(n)]
    L = np.eye(n)
    for i in range(n):
        for j in range(n):
            if degree[i] > 0 and degree[j] > 0:
                L[i, j] -= S[i, j] / np.sqrt(degree[i] * degree[j])
    return L


# --- update features --------------------------------------------------------------------------

def test_update_similarity_equals_materialised_reference():
    rng = np.random.default_rng(1)
    clients, root, heads, _, _ = planted_population(rng, [3, 2])
    # One client with a different rank than the root, one whose factors equal the root.
    clients[1] = {t: (rng.standard_normal((24, 6)), rng.standard_normal((6, 20)))
                  for t in TARGETS}
    clients[2] = {t: (root[t][0].copy(), root[t][1].copy()) for t in TARGETS}
    heads[2] = np.zeros(10)

    similarity = update_similarity(clients, root, heads)

    expected = reference_update_similarity(clients, root, heads)
    np.testing.assert_allclose(similarity, expected, atol=1e-12)
    assert similarity[2].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert np.abs(similarity[0, 3]) > 0.05


def test_update_similarity_without_heads_and_distance():
    rng = np.random.default_rng(2)
    clients, root, _, _, _ = planted_population(rng, [4, 3])

    similarity = update_similarity(clients, root)
    distance = update_distance(clients, root)

    expected = reference_update_similarity(clients, root)
    np.testing.assert_allclose(similarity, expected, atol=1e-12)
    np.testing.assert_allclose(distance, np.clip(1.0 - expected, 0.0, 2.0) * (1 - np.eye(7)),
                               atol=1e-12)
    assert np.all(np.diag(distance) == 0.0) and np.all(distance >= 0) and np.all(distance <= 2)


def test_update_similarity_head_delta_alone_and_opposite_updates():
    root = {"t": (np.zeros((3, 1)), np.zeros((1, 2)))}
    up = {"t": (np.array([[1.0], [0.0], [0.0]]), np.array([[1.0, 0.0]]))}
    down = {"t": (np.array([[-1.0], [0.0], [0.0]]), np.array([[1.0, 0.0]]))}

    similarity = update_similarity([up, down, up], root)
    with_heads = update_similarity([root, root], root, [np.array([1.0, 0.0]),
                                                        np.array([1.0, 1.0])])

    np.testing.assert_allclose(similarity, [[1, -1, 1], [-1, 1, -1], [1, -1, 1]], atol=1e-15)
    np.testing.assert_allclose(with_heads, [[1, 2**-0.5], [2**-0.5, 1]], atol=1e-15)
    assert update_distance([up, down], root)[0, 1] == pytest.approx(2.0)


def test_update_similarity_chunked_gram_matches(monkeypatch):
    rng = np.random.default_rng(3)
    clients, root, heads, _, _ = planted_population(rng, [4, 4, 3])
    whole = update_similarity(clients, root, heads)

    monkeypatch.setattr(subspace, "_MAX_GRAM_BLOCK_ENTRIES", 100)
    chunked = update_similarity(clients, root, heads)

    np.testing.assert_allclose(chunked, whole, atol=1e-14)


def test_update_similarity_rejects_mismatched_inputs():
    rng = np.random.default_rng(4)
    clients, root, heads, _, _ = planted_population(rng, [2])

    with pytest.raises(ValueError, match="targets"):
        update_similarity([{TARGETS[0]: clients[0][TARGETS[0]]}, clients[1]], root)
    with pytest.raises(ValueError, match="head deltas"):
        update_similarity(clients, root, heads[:1])
    with pytest.raises(ValueError, match="does not match"):
        bad = dict(clients[0])
        bad[TARGETS[0]] = (np.ones((5, 4)), np.ones((4, 20)))
        update_similarity([bad, clients[1]], root)
    with pytest.raises(ValueError, match="non-finite"):
        bad = dict(clients[0])
        bad[TARGETS[1]] = (np.full((24, 4), np.nan), clients[0][TARGETS[1]][1])
        update_similarity([bad, clients[1]], root)
    with pytest.raises(ValueError, match="no clients"):
        update_similarity([], root)


# --- subspace features ------------------------------------------------------------------------

def test_top_left_singular_vectors_span_the_top_singular_subspace():
    rng = np.random.default_rng(5)
    M = rng.standard_normal((15, 6)) @ np.diag([9, 7, 5, 0.3, 0.2, 0.1]) @ rng.standard_normal(
        (6, 6))

    U = top_left_singular_vectors(M, 3)

    U_full = np.linalg.svd(M)[0]
    assert U.shape == (15, 3)
    np.testing.assert_allclose(U.T @ U, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(U @ U.T, U_full[:, :3] @ U_full[:, :3].T, atol=1e-10)
    with pytest.raises(ValueError, match="r must be"):
        top_left_singular_vectors(M, 7)
    with pytest.raises(ValueError, match="r must be"):
        top_left_singular_vectors(M, 0)


def test_subspace_bases_are_top_singular_vectors_of_the_B_update():
    rng = np.random.default_rng(6)
    clients, root, _, _, _ = planted_population(rng, [2, 1])

    bases = subspace_bases(clients, root, 2)

    assert len(bases) == 3
    for client, client_bases in zip(clients, bases):
        assert sorted(client_bases) == sorted(TARGETS)
        for t in TARGETS:
            U_ref = np.linalg.svd(client[t][0] - root[t][0])[0][:, :2]
            np.testing.assert_allclose(client_bases[t] @ client_bases[t].T, U_ref @ U_ref.T,
                                       atol=1e-10)


def test_subspace_distance_equals_double_loop_reference():
    rng = np.random.default_rng(7)
    bases = [{t: np.linalg.qr(rng.standard_normal((16, 3)))[0] for t in ("a", "b")}
             for _ in range(6)]
    bases[4] = dict(bases[1])  # identical subspaces: distance 0

    distance = subspace_distance(bases)

    np.testing.assert_allclose(distance, reference_subspace_distance(bases), atol=1e-12)
    assert distance[1, 4] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.diag(distance) == 0.0)
    np.testing.assert_array_equal(distance, distance.T)


def test_subspace_distance_of_orthogonal_subspaces_is_one_and_chunking_agrees(monkeypatch):
    eye = np.eye(6)
    bases = [{"t": eye[:, :2]}, {"t": eye[:, 2:4]}, {"t": eye[:, [0, 3]]}]

    distance = subspace_distance(bases)
    monkeypatch.setattr(subspace, "_MAX_GRAM_BLOCK_ENTRIES", 5)
    chunked = subspace_distance(bases)

    np.testing.assert_allclose(distance, [[0, 1, 0.5], [1, 0, 0.5], [0.5, 0.5, 0]], atol=1e-15)
    np.testing.assert_allclose(chunked, distance, atol=1e-15)


def test_subspace_distance_rejects_mismatched_bases():
    with pytest.raises(ValueError, match="targets"):
        subspace_distance([{"a": np.eye(3, 1)}, {"b": np.eye(3, 1)}])
    with pytest.raises(ValueError, match="different shapes"):
        subspace_distance([{"a": np.eye(3, 1)}, {"a": np.eye(3, 2)}])
    with pytest.raises(ValueError, match="no bases"):
        subspace_distance([])


# --- affinity, Laplacian, spectral labels -----------------------------------------------------

@pytest.mark.parametrize("knn", [1, 3, 5, 50])
def test_self_tuning_affinity_equals_loop_reference(knn):
    rng = np.random.default_rng(8)
    points = rng.standard_normal((9, 3))
    D = np.linalg.norm(points[:, None] - points[None, :], axis=2)

    S = self_tuning_affinity(D, knn)

    np.testing.assert_allclose(S, reference_self_tuning_affinity(D, knn), rtol=1e-12,
                               atol=1e-300)
    assert np.all(np.diag(S) == 0.0)


def test_self_tuning_affinity_guards_duplicate_points():
    D = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])

    S = self_tuning_affinity(D, 1)

    assert np.all(np.isfinite(S))
    assert S[0, 1] == 1.0 and S[0, 2] == 0.0
    assert self_tuning_affinity(np.zeros((1, 1)), 5).tolist() == [[0.0]]


def test_normalized_laplacian_eigenvalues_equal_reference():
    rng = np.random.default_rng(9)
    S = rng.uniform(0, 1, (7, 7))
    S = (S + S.T) / 2
    np.fill_diagonal(S, 0)
    S[6, :] = S[:, 6] = 0.0  # an isolated point: guarded, contributes eigenvalue 1

    eigenvalues = normalized_laplacian_eigenvalues(S)

    expected = np.linalg.eigvalsh(reference_normalized_laplacian(S))
    np.testing.assert_allclose(eigenvalues, expected, atol=1e-12)
    assert np.all(np.diff(eigenvalues) >= 0)
    assert eigenvalues[0] == pytest.approx(0.0, abs=1e-12)


def test_normalized_laplacian_of_k_disconnected_blocks_has_k_zero_eigenvalues():
    S = np.kron(np.eye(3), np.ones((4, 4))) - np.eye(12)

    eigenvalues = normalized_laplacian_eigenvalues(S)

    np.testing.assert_allclose(eigenvalues[:3], 0.0, atol=1e-12)
    assert eigenvalues[3] > 0.5


def test_spectral_labels_are_canonical_and_deterministic():
    order = np.array([2, 0, 1, 2, 1, 0, 0, 2, 1, 1, 0, 2])
    same = order[:, None] == order[None, :]
    S = np.where(same, 0.9, 0.05)
    np.fill_diagonal(S, 0)

    labels = spectral_labels(S, 3, seed=0)
    again = spectral_labels(S, 3, seed=0)

    # Point 0's cluster is 0, the next new cluster (point 1's) is 1, then point 2's is 2.
    np.testing.assert_array_equal(labels, canonical_labels(order))
    assert labels.tolist()[:3] == [0, 1, 2]
    np.testing.assert_array_equal(labels, again)
    assert spectral_labels(S, 1, seed=0).tolist() == [0] * 12


def test_canonical_labels_numbers_by_first_appearance():
    assert canonical_labels(np.array([5, 5, 2, 9, 2, 5])).tolist() == [0, 0, 1, 2, 1, 0]


def test_between_within_distance_ratio_by_hand():
    D = np.array([[0, 1, 4, 4], [1, 0, 4, 4], [4, 4, 0, 2], [4, 4, 2, 0]], dtype=float)

    assert between_within_distance_ratio(D, np.array([0, 0, 1, 1])) == pytest.approx(4 / 1.5)
    assert between_within_distance_ratio(D, np.array([0, 0, 0, 0])) == 0.0


# --- LSAC on planted populations --------------------------------------------------------------

def test_lsac_on_update_distance_finds_three_planted_groups():
    rng = np.random.default_rng(10)
    clients, root, heads, truth, _ = planted_population(rng, [6, 6, 6])

    result = lsac(update_distance(clients, root, heads))

    assert isinstance(result, LsacResult)
    assert result.k == 3
    assert adjusted_rand_score(truth, result.labels) == 1.0
    assert result.labels[0] == 0
    assert result.contrast_ratio >= 1.25
    assert result.eigengaps.shape == (10,)
    assert int(np.argmax(result.eigengaps[1:])) + 2 == 3
    assert result.eigenvalues.shape == (18,) and result.affinity.shape == (18, 18)


@pytest.mark.parametrize("group_sizes,knn", [
    ([6, 7, 9, 12], 5),
    # Groups smaller than knn + 1 need a smaller knn: with knn = 5 the groups of 3 and 4 merge.
    ([3, 4, 6, 8], 2),
])
def test_lsac_on_update_distance_finds_four_unequal_groups(group_sizes, knn):
    rng = np.random.default_rng(11)
    clients, root, heads, truth, _ = planted_population(rng, group_sizes)

    result = lsac(update_distance(clients, root, heads), knn=knn)

    assert result.k == 4
    assert adjusted_rand_score(truth, result.labels) == 1.0


def test_lsac_on_subspace_distance_finds_three_planted_groups():
    rng = np.random.default_rng(12)
    clients, root, _, truth, _ = planted_population(rng, [6, 6, 6])

    result = lsac(subspace_distance(subspace_bases(clients, root, 4)))

    assert result.k == 3
    assert adjusted_rand_score(truth, result.labels) == 1.0


@pytest.mark.parametrize("seed", [20, 21, 22])
def test_lsac_on_population_without_structure_gives_one_cluster(seed):
    rng = np.random.default_rng(seed)
    clients, root, heads = unstructured_population(rng)

    result = lsac(update_distance(clients, root, heads))

    assert result.k == 1
    assert result.labels.tolist() == [0] * 18
    assert result.contrast_ratio is not None and result.contrast_ratio < 1.25


def test_lsac_k_min_two_keeps_the_eigengap_choice_without_structure():
    rng = np.random.default_rng(20)
    clients, root, heads = unstructured_population(rng)

    result = lsac(update_distance(clients, root, heads), k_min=2)

    assert result.k >= 2
    assert result.contrast_ratio < 1.25


def test_lsac_force_k():
    rng = np.random.default_rng(13)
    clients, root, heads, truth, _ = planted_population(rng, [6, 6, 6])
    D = update_distance(clients, root, heads)

    forced_two = lsac(D, force_k=2)
    forced_one = lsac(D, force_k=1)
    forced_many = lsac(D, force_k=99)

    assert forced_two.k == 2 and sorted(set(forced_two.labels.tolist())) == [0, 1]
    # Merging two planted groups: each planted group stays whole.
    assert adjusted_rand_score(truth, forced_two.labels) > 0.4
    assert forced_two.contrast_ratio is not None
    assert forced_one.k == 1 and forced_one.contrast_ratio is None
    assert forced_many.k == 18 and sorted(forced_many.labels.tolist()) == list(range(18))


def test_lsac_small_populations_and_k_max_below_two_give_one_cluster():
    rng = np.random.default_rng(14)
    clients, root, heads, _, _ = planted_population(rng, [6, 6, 6])
    D = update_distance(clients, root, heads)

    assert lsac(D[:2, :2]).k == 1
    assert lsac(D[:1, :1]).labels.tolist() == [0]
    capped = lsac(D, k_max=1)
    assert capped.k == 1 and capped.contrast_ratio is None and capped.eigengaps.shape == (1,)
    assert lsac(D[:4, :4], k_max=10).eigengaps.shape == (3,)


def test_lsac_rejects_bad_distance_matrix():
    with pytest.raises(ValueError, match="square"):
        lsac(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="non-negative"):
        lsac(-np.ones((3, 3)))
    with pytest.raises(ValueError, match="no points"):
        lsac(np.zeros((0, 0)))


# --- unseen clients and rerun stability -------------------------------------------------------

def test_assign_to_clusters_puts_new_members_into_their_planted_group():
    rng = np.random.default_rng(15)
    clients, root, heads, truth, directions = planted_population(rng, [6, 6, 6])
    new_clients, _, new_heads, new_truth, _ = planted_population(
        rng, [2, 2, 2], root=root, directions=directions)
    result = lsac(update_distance(clients, root, heads))
    assert result.k == 3
    group_to_label = {int(g): int(result.labels[np.flatnonzero(truth == g)[0]]) for g in range(3)}
    n = len(clients)

    joint = update_similarity(clients + new_clients, root, heads + new_heads)
    by_update = assign_to_clusters(joint[n:, :n], result.labels)
    joint_subspace = 1.0 - subspace_distance(subspace_bases(clients + new_clients, root, 4))
    by_subspace = assign_to_clusters(joint_subspace[n:, :n], result.labels)

    expected = [group_to_label[int(g)] for g in new_truth]
    assert by_update.tolist() == expected
    assert by_subspace.tolist() == expected


def test_assign_to_clusters_ties_go_to_smallest_label_and_unclustered_are_ignored():
    labels = np.array([1, 1, 0, 0, -1])
    similarity = np.array([[0.5, 0.5, 0.5, 0.5, 0.9],
                           [0.9, 0.7, 0.1, 0.3, 0.0],
                           [0.0, 0.2, 0.1, 0.2, 1.0]])

    assert assign_to_clusters(similarity, labels).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="labels"):
        assign_to_clusters(similarity, labels[:4])
    with pytest.raises(ValueError, match="no clustered"):
        assign_to_clusters(similarity, -np.ones(5, dtype=int))


def test_match_cluster_ids_keeps_ids_under_relabelling():
    old = np.array([0, 0, 1, 1, 2, 2, 2])
    new = np.array([2, 2, 0, 0, 1, 1, 1])

    assert match_cluster_ids(old, new) == {2: 0, 0: 1, 1: 2}


def test_match_cluster_ids_with_new_clients_split_and_no_overlap():
    # Old: clusters 0 and 1; the last two clients were unseen (-1).
    old = np.array([0, 0, 0, 1, 1, 1, -1, -1])
    # New: cluster 0 (mostly old 1), cluster 1 (mostly old 0), cluster 2 only new clients,
    # cluster 3 split off old 0 but smaller than cluster 1.
    new = np.array([1, 1, 3, 0, 0, 0, 2, 2])

    matches = match_cluster_ids(old, new)

    assert matches == {0: 1, 1: 0, 2: None, 3: None}
    assert match_cluster_ids(-np.ones(3, dtype=int), np.array([0, 1, 1])) == {0: None, 1: None}
    with pytest.raises(ValueError, match="shape"):
        match_cluster_ids(old, new[:3])


def test_probe_distance_weights_the_head_delta():
    from shared.manifest import AdapterManifest, qv_targets
    from shared.probes import probe_distance

    targets = qv_targets(1, 6)
    manifest = AdapterManifest.model_validate({
        "targets": [t.model_dump() for t in targets],
        "tiers": {t: {"rank": 2, "alpha": 2} for t in ("root", "cluster", "leaf")},
        "head": {"in_features": 6, "num_classes": 3}})
    rng = np.random.default_rng(0)

    def adapter():
        out = {}
        for t in targets:
            out[f"{t.name}.lora_A"] = rng.normal(size=(2, 6))
            out[f"{t.name}.lora_B"] = rng.normal(size=(6, 2))
        out["head.weight"], out["head.bias"] = rng.normal(size=(3, 6)), rng.normal(size=3)
        return out

    root, probes = adapter(), [adapter() for _ in range(4)]
    lora_only = probe_distance(manifest, "update", root, [{**p, "head.weight": root["head.weight"],
                                                           "head.bias": root["head.bias"]} for p in probes])
    np.testing.assert_allclose(probe_distance(manifest, "update", root, probes, head_weight=0.0), lora_only)
    both = probe_distance(manifest, "update", root, probes)
    assert not np.allclose(both, lora_only)
    heads = np.array([np.concatenate([(p["head.weight"] - root["head.weight"]).ravel(),
                                      p["head.bias"] - root["head.bias"]]) for p in probes])
    unit = heads / np.linalg.norm(heads, axis=1, keepdims=True)
    head_only = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    heavy = probe_distance(manifest, "update", root, probes, head_weight=1e3)
    np.testing.assert_allclose(heavy, head_only, atol=1e-4)   # the head dominates as its weight grows


@pytest.mark.parametrize("seed", range(5))
def test_silhouette_matches_sklearn(seed):
    from sklearn.metrics import silhouette_score

    from shared.subspace import silhouette

    rng = np.random.default_rng(seed)
    points = rng.normal(size=(23, 4))
    D = np.linalg.norm(points[:, None] - points[None, :], axis=2)
    for k in (2, 3, 7):
        labels = rng.integers(0, k, 23)
        labels[0] = k + 5                      # a singleton cluster: its silhouette is 0
        if len(set(labels)) < 2:
            continue
        assert silhouette(D, labels) == pytest.approx(silhouette_score(D, labels, metric="precomputed"), abs=1e-12)
    with pytest.raises(ValueError, match="2 to n - 1 clusters"):
        silhouette(D, np.zeros(23, dtype=int))
    with pytest.raises(ValueError, match="2 to n - 1 clusters"):
        silhouette(D, np.arange(23))


def test_lsac_silhouette_rule_finds_blobs_and_keeps_noise_whole():
    from shared.subspace import lsac

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 6)) * 4
    points = np.concatenate([c + rng.normal(size=(n, 6)) for c, n in zip(centers, (4, 7, 12))])
    truth = np.repeat([0, 1, 2], (4, 7, 12))
    D = np.linalg.norm(points[:, None] - points[None, :], axis=2)
    result = lsac(D, knn=3, k_rule="silhouette")
    assert result.k == 3 and adjusted_rand_score(truth, result.labels) == 1.0
    assert result.silhouettes.shape == (9,) and int(np.argmax(result.silhouettes)) == 1   # K = 2..10
    noise = rng.normal(size=(23, 500))   # high-dimensional, as probe updates are: no structure at any K
    Dn = np.linalg.norm(noise[:, None] - noise[None, :], axis=2)
    flat = lsac(Dn, knn=3, k_rule="silhouette")
    assert flat.k == 1 and float(flat.silhouettes.max()) < 0.15
    assert lsac(Dn, knn=3, k_rule="silhouette", k_min=2).k >= 2     # k_min >= 2 keeps the best K
    assert lsac(Dn, knn=3, k_rule="silhouette", min_silhouette=-1.0).k >= 2
    with pytest.raises(ValueError, match="unknown K rule"):
        lsac(D, k_rule="gap")


def test_silhouette_tolerance_takes_the_smallest_k_near_the_best():
    """Two groups, one of them made of two close sub-blobs: the best silhouette may split it; a
    (relative) tolerance takes the smallest K whose silhouette is at least (1 - tol) times the best
    (and never one under min_silhouette)."""
    from shared.subspace import lsac, silhouette

    rng = np.random.default_rng(3)
    a = np.concatenate([rng.normal(size=(8, 6)) * 0.3 + [0, 0, 0, 0, 0, 0],
                        rng.normal(size=(8, 6)) * 0.3 + [2.2, 0, 0, 0, 0, 0]])
    b = rng.normal(size=(10, 6)) * 0.3 + [0, 12, 0, 0, 0, 0]
    points = np.concatenate([a, b])
    D = np.linalg.norm(points[:, None] - points[None, :], axis=2)
    best = lsac(D, knn=3, k_rule="silhouette")
    s = best.silhouettes  # K = 2, 3, ...
    assert best.k == 2 + int(np.argmax(s))
    for tol in (0.0, 0.01, 0.05, 0.2, 1.0):
        got = lsac(D, knn=3, k_rule="silhouette", silhouette_tolerance=tol)
        want = 2 + int(np.flatnonzero(s >= max(s.max() * (1 - tol), 0.15))[0])
        assert got.k == want, (tol, got.k, want, s)
        assert silhouette(D, got.labels) >= max(s.max() * (1 - tol), 0.15) - 1e-12
    assert lsac(D, knn=3, k_rule="silhouette", silhouette_tolerance=1.0).k == 2
    # below min_silhouette nothing is accepted, whatever the tolerance
    noise = rng.normal(size=(20, 400))
    Dn = np.linalg.norm(noise[:, None] - noise[None, :], axis=2)
    assert lsac(Dn, knn=3, k_rule="silhouette", silhouette_tolerance=0.5).k == 1


def _naive_average_linkage(D, k):
    """UPGMA written out: merge the two clusters of smallest mean pairwise distance until k remain."""
    clusters = [[i] for i in range(len(D))]
    while len(clusters) > k:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                mean = sum(D[i][j] for i in clusters[a] for j in clusters[b]) / (len(clusters[a]) * len(clusters[b]))
                if best is None or mean < best[0]:
                    best = (mean, a, b)
        _, a, b = best
        clusters[a] = clusters[a] + clusters[b]
        del clusters[b]
    labels = [0] * len(D)
    for label, members in enumerate(clusters):
        for i in members:
            labels[i] = label
    return labels


@pytest.mark.parametrize("seed", range(6))
def test_average_linkage_labels_match_a_naive_upgma(seed):
    from shared.subspace import average_linkage_labels

    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 16))
    points = rng.normal(size=(n, 3)) + rng.integers(0, 3, n)[:, None] * 2.5   # some structure, no ties
    D = np.linalg.norm(points[:, None] - points[None, :], axis=2)
    for k in range(1, n + 1):
        got = average_linkage_labels(D, k)
        want = _naive_average_linkage(D.tolist(), k)
        assert adjusted_rand_score(want, got) == pytest.approx(1.0), (n, k)
        assert got.max() + 1 == k and got[0] == 0                       # canonical, exactly k clusters
    assert (average_linkage_labels(D, 0) == 0).all() and average_linkage_labels(D, n + 3).max() == n - 1
    with pytest.raises(ValueError, match="non-negative"):
        average_linkage_labels(-D, 2)


@pytest.mark.parametrize("seed", [0, 14])
def test_linkage_partitions_find_a_pair_the_affinity_blurs(seed):
    """Two points far from a group of twelve, and a third group: with knn 5 the pair's kernel widths
    come from outside it and spectral clustering merges it; average linkage keeps it apart, at a
    higher silhouette, and 'spectral+linkage' takes that partition. Without structure both stay K = 1."""
    from shared.subspace import lsac, silhouette

    rng = np.random.default_rng(seed)
    pair = rng.normal(size=(2, 4)) * 0.2 + [4.0, 0, 0, 0]
    big = rng.normal(size=(12, 4)) * 0.6
    other = rng.normal(size=(8, 4)) * 0.6 + [0, 6.0, 0, 0]
    points = np.concatenate([pair, big, other])
    truth = np.repeat([0, 1, 2], (2, 12, 8))
    D = np.linalg.norm(points[:, None] - points[None, :], axis=2)
    spectral = lsac(D, k_rule="silhouette")
    both = lsac(D, k_rule="silhouette", partitions="spectral+linkage")
    assert adjusted_rand_score(truth, both.labels) == 1.0 and both.k == 3
    assert adjusted_rand_score(truth, spectral.labels) < 1.0
    assert silhouette(D, both.labels) > silhouette(D, spectral.labels)
    assert both.silhouettes.max() == pytest.approx(silhouette(D, both.labels))
    assert np.all(both.silhouettes >= spectral.silhouettes - 1e-12)     # each K keeps the better partition
    noise = rng.normal(size=(20, 400))
    Dn = np.linalg.norm(noise[:, None] - noise[None, :], axis=2)
    assert lsac(Dn, k_rule="silhouette", partitions="spectral+linkage").k == 1
    assert lsac(D, k_rule="eigengap", partitions="spectral+linkage").k == lsac(D, k_rule="eigengap").k
    with pytest.raises(ValueError, match="unknown partitions 'kmeans'"):
        lsac(D, k_rule="silhouette", partitions="kmeans")
