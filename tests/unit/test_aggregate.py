"""Aggregation math against slow, obviously-correct references (dense sums, full SVDs)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shared.aggregate import aggregate_product_space, average_factors, relative_change

pytestmark = pytest.mark.unit


def random_factors(rng, n, d_out, d_in, ranks=None):
    ranks = ranks if ranks is not None else rng.integers(1, 5, size=n)
    Bs = [rng.standard_normal((d_out, r)) for r in ranks]
    As = [rng.standard_normal((r, d_in)) for r in ranks]
    return Bs, As


def reference_truncated_svd(Bs, As, weights, rank):
    """Form dW explicitly and take a full SVD: the rank-r reconstruction and singular values."""
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    dense = sum(wi * (B @ A) for wi, B, A in zip(w, Bs, As))
    U, s, Vt = np.linalg.svd(dense, full_matrices=False)
    reconstruction = (U[:, :rank] * s[:rank]) @ Vt[:rank]
    return dense, reconstruction, s[:rank]


def assert_is_truncated_svd(B, A, reconstruction, singular_values, scale, rtol=1e-8):
    rank = B.shape[1]
    np.testing.assert_allclose(B.T @ B, np.eye(rank), atol=1e-10)
    np.testing.assert_allclose(B @ A, reconstruction, rtol=0, atol=rtol * scale)
    # A = S V^T, so its row norms are the singular values, in descending order.
    np.testing.assert_allclose(np.linalg.norm(A, axis=1), singular_values, rtol=0,
                               atol=rtol * scale)
    # Sign convention: the largest-magnitude entry of every B column is positive.
    largest = B[np.argmax(np.abs(B), axis=0), np.arange(rank)]
    assert np.all(largest > 0)


@pytest.mark.parametrize("n", [1, 3, 20])
@pytest.mark.parametrize("method", ["qr", "dense", "auto"])
def test_product_space_aggregation_equals_truncated_svd_of_the_sum(n, method):
    rng = np.random.default_rng(100 + n)
    d_out, d_in, rank = 40, 30, 3
    Bs, As = random_factors(rng, n, d_out, d_in)
    weights = rng.uniform(0.1, 5.0, size=n)
    dense, reconstruction, singular_values = reference_truncated_svd(Bs, As, weights, rank)
    expected_nonzero_rows = min(rank, np.linalg.matrix_rank(dense))

    B, A = aggregate_product_space(Bs, As, weights, rank, method=method)

    assert B.shape == (d_out, rank) and A.shape == (rank, d_in)
    assert B.dtype == np.float64 and A.dtype == np.float64
    scale = np.linalg.norm(dense, 2)
    assert_is_truncated_svd(B, A, reconstruction, singular_values, scale)
    assert np.count_nonzero(np.linalg.norm(A, axis=1)) == expected_nonzero_rows


@pytest.mark.parametrize("d_out,d_in,ranks", [
    (50, 60, [2, 3, 4]),      # sum r_i = 9 < 50: auto takes qr
    (12, 10, [4, 4, 4]),      # sum r_i = 12 >= 10: auto takes dense
    (10, 12, [2, 8]),         # sum r_i = 10 = min(d): dense
    (9, 30, [1, 2, 3, 2]),    # sum r_i = 8 < 9: qr
])
def test_both_paths_and_auto_agree_with_reference_on_both_sides_of_threshold(d_out, d_in, ranks):
    rng = np.random.default_rng(sum(ranks) + d_out)
    Bs, As = random_factors(rng, len(ranks), d_out, d_in, ranks)
    weights = rng.uniform(0.5, 2.0, size=len(ranks))
    rank = 4
    dense, reconstruction, singular_values = reference_truncated_svd(Bs, As, weights, rank)
    scale = np.linalg.norm(dense, 2)

    results = {m: aggregate_product_space(Bs, As, weights, rank, method=m)
               for m in ("qr", "dense", "auto")}

    for B, A in results.values():
        assert_is_truncated_svd(B, A, reconstruction, singular_values, scale)
    # Same numbers from both paths, factor by factor (the sign convention makes them unique).
    np.testing.assert_allclose(results["qr"][0], results["dense"][0], atol=1e-8)
    np.testing.assert_allclose(results["qr"][1], results["dense"][1], atol=1e-8 * scale)
    expected_auto = "qr" if sum(ranks) < min(d_out, d_in) else "dense"
    assert results["auto"][0].tobytes() == results[expected_auto][0].tobytes()
    assert results["auto"][1].tobytes() == results[expected_auto][1].tobytes()


@pytest.mark.parametrize("method", ["qr", "dense"])
def test_rank_deficient_sum_is_padded_with_zero_singular_values(method):
    rng = np.random.default_rng(7)
    d_out, d_in, rank = 20, 16, 5
    # Every B lies in one 2-D column space, so dW has rank 2 although sum r_i = 9.
    basis = rng.standard_normal((d_out, 2))
    Bs = [basis @ rng.standard_normal((2, r)) for r in (3, 3, 3)]
    As = [rng.standard_normal((3, d_in)) for _ in range(3)]
    weights = [1.0, 2.0, 3.0]
    dense, reconstruction, singular_values = reference_truncated_svd(Bs, As, weights, rank)

    B, A = aggregate_product_space(Bs, As, weights, rank, method=method)

    np.testing.assert_allclose(B.T @ B, np.eye(rank), atol=1e-10)
    np.testing.assert_allclose(B @ A, dense, atol=1e-10 * np.linalg.norm(dense))
    assert np.all(np.linalg.norm(A[:2], axis=1) > 1e-3)
    assert np.all(A[2:] == 0.0)
    np.testing.assert_allclose(np.linalg.norm(A, axis=1)[:2], singular_values[:2], rtol=1e-10)


def test_single_client_with_rank_below_output_rank_pads_and_paths_agree():
    rng = np.random.default_rng(8)
    Bs, As = random_factors(rng, 1, 15, 11, [2])

    qr_B, qr_A = aggregate_product_space(Bs, As, [3.0], 6, method="qr")
    dense_B, dense_A = aggregate_product_space(Bs, As, [3.0], 6, method="dense")

    np.testing.assert_allclose(qr_B @ qr_A, Bs[0] @ As[0], atol=1e-12)
    assert np.all(qr_A[2:] == 0.0) and np.all(dense_A[2:] == 0.0)
    np.testing.assert_allclose(qr_B.T @ qr_B, np.eye(6), atol=1e-12)
    # Even the padding columns agree: both complete the same span deterministically.
    np.testing.assert_allclose(qr_B, dense_B, atol=1e-9)
    np.testing.assert_allclose(qr_A, dense_A, atol=1e-9)


def test_all_zero_sum_gives_orthonormal_B_and_zero_A():
    Bs = [np.zeros((6, 2)), np.zeros((6, 2))]
    As = [np.ones((2, 5)), np.ones((2, 5))]

    B, A = aggregate_product_space(Bs, As, [1.0, 1.0], 3)

    np.testing.assert_array_equal(B, np.eye(6, 3))
    np.testing.assert_array_equal(A, np.zeros((3, 5)))


@pytest.mark.parametrize("method", ["qr", "dense"])
def test_permuting_clients_with_their_weights_changes_only_round_off(method):
    rng = np.random.default_rng(11)
    Bs, As = random_factors(rng, 7, 25, 35)
    weights = rng.uniform(0.1, 1.0, size=7)
    order = rng.permutation(7)

    B, A = aggregate_product_space(Bs, As, weights, 4, method=method)
    B_perm, A_perm = aggregate_product_space([Bs[i] for i in order], [As[i] for i in order],
                                             weights[order], 4, method=method)

    np.testing.assert_allclose(B_perm, B, atol=1e-10)
    np.testing.assert_allclose(A_perm, A, atol=1e-10 * np.abs(A).max())


def test_same_inputs_give_same_bytes_and_weights_are_normalised():
    rng = np.random.default_rng(12)
    Bs, As = random_factors(rng, 5, 30, 20)
    weights = rng.uniform(1, 10, size=5)

    first = aggregate_product_space(Bs, As, weights, 3)
    second = aggregate_product_space([B.copy() for B in Bs], [A.copy() for A in As],
                                     list(weights), 3)
    scaled = aggregate_product_space(Bs, As, weights * 1000.0, 3)

    assert first[0].tobytes() == second[0].tobytes()
    assert first[1].tobytes() == second[1].tobytes()
    # Scaling the weights changes only the round-off of their normalisation and of the SVD, whose
    # errors scale with the largest entry of A (not with each entry): an absolute tolerance of
    # 1e-12 x max|A| (~4,500 eps; ~6 eps measured). Unnormalised weights would differ by 1000x.
    np.testing.assert_allclose(scaled[1], first[1], rtol=0, atol=1e-12 * np.abs(first[1]).max())


def test_zero_weight_client_is_ignored():
    rng = np.random.default_rng(13)
    Bs, As = random_factors(rng, 3, 20, 20)

    with_zero = aggregate_product_space(Bs, As, [1.0, 0.0, 2.0], 3, method="dense")
    without = aggregate_product_space([Bs[0], Bs[2]], [As[0], As[2]], [1.0, 2.0], 3,
                                      method="dense")

    np.testing.assert_allclose(with_zero[0] @ with_zero[1], without[0] @ without[1], atol=1e-12)


def test_float32_inputs_are_computed_in_float64():
    rng = np.random.default_rng(14)
    Bs, As = random_factors(rng, 3, 20, 20)
    Bs32 = [B.astype(np.float32) for B in Bs]
    As32 = [A.astype(np.float32) for A in As]

    B, A = aggregate_product_space(Bs32, As32, [1, 1, 1], 2)
    B64, A64 = aggregate_product_space([b.astype(np.float64) for b in Bs32],
                                       [a.astype(np.float64) for a in As32], [1, 1, 1], 2)

    assert B.dtype == np.float64 and A.dtype == np.float64
    assert B.tobytes() == B64.tobytes() and A.tobytes() == A64.tobytes()


def _valid():
    rng = np.random.default_rng(0)
    Bs, As = random_factors(rng, 2, 8, 6, [2, 2])
    return Bs, As, [1.0, 1.0]


@pytest.mark.parametrize("mutate,match", [
    (lambda Bs, As, w: ([], [], []), "no factors"),
    (lambda Bs, As, w: (Bs, As[:1], w), "B factors"),
    (lambda Bs, As, w: (Bs, As, [1.0]), "weights"),
    (lambda Bs, As, w: (Bs, As, [1.0, -0.5]), "non-negative"),
    (lambda Bs, As, w: (Bs, As, [0.0, 0.0]), "sum to zero"),
    (lambda Bs, As, w: (Bs, As, [np.nan, 1.0]), "non-finite"),
    (lambda Bs, As, w: (Bs, As, [np.inf, 1.0]), "non-finite"),
    (lambda Bs, As, w: ([Bs[0], np.ones((9, 2))], As, w), "is not"),
    (lambda Bs, As, w: (Bs, [As[0], np.ones((2, 7))], w), "is not"),
    (lambda Bs, As, w: ([Bs[0], np.ones((8, 3))], As, w), "common rank"),
    (lambda Bs, As, w: ([Bs[0], np.full((8, 2), np.nan)], As, w), "non-finite"),
    (lambda Bs, As, w: (Bs, [As[0], np.full((2, 6), np.inf)], w), "non-finite"),
    (lambda Bs, As, w: ([Bs[0], np.ones(8)], As, w), "2-D"),
])
def test_bad_input_raises_value_error(mutate, match):
    Bs, As, weights = mutate(*_valid())

    with pytest.raises(ValueError, match=match):
        aggregate_product_space(Bs, As, weights, 2)


@pytest.mark.parametrize("rank,method,match", [
    (0, "auto", "rank"), (7, "auto", "rank"), (2.0, "auto", "integer"), (2, "svd", "method"),
])
def test_bad_rank_or_method_raises_value_error(rank, method, match):
    Bs, As, weights = _valid()

    with pytest.raises(ValueError, match=match):
        aggregate_product_space(Bs, As, weights, rank, method=method)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 6),
    d_out=st.integers(2, 24),
    d_in=st.integers(2, 24),
    rank=st.integers(1, 6),
    method=st.sampled_from(["qr", "dense", "auto"]),
    weights=st.lists(st.floats(0.01, 100.0), min_size=6, max_size=6),
)
def test_property_aggregation_equals_reference(seed, n, d_out, d_in, rank, method, weights):
    rng = np.random.default_rng(seed)
    rank = min(rank, d_out, d_in)
    Bs, As = random_factors(rng, n, d_out, d_in)
    w = weights[:n]
    dense, reconstruction, singular_values = reference_truncated_svd(Bs, As, w, rank)
    all_singular_values = np.linalg.svd(dense, compute_uv=False)
    scale = all_singular_values[0]
    # The truncation is only well defined when the cut does not split (nearly) equal values.
    if rank < all_singular_values.size:
        assume(all_singular_values[rank - 1] - all_singular_values[rank] > 1e-6 * scale)

    B, A = aggregate_product_space(Bs, As, w, rank, method=method)

    np.testing.assert_allclose(B.T @ B, np.eye(rank), atol=1e-10)
    np.testing.assert_allclose(B @ A, reconstruction, rtol=0, atol=1e-8 * scale)
    np.testing.assert_allclose(np.linalg.norm(A, axis=1), singular_values, rtol=0,
                               atol=1e-8 * scale)


def test_average_factors_equals_numpy_average():
    rng = np.random.default_rng(20)
    arrays = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(5)]
    weights = rng.uniform(0.1, 3.0, size=5)

    mean = average_factors(arrays, weights)

    assert mean.dtype == np.float64
    expected = np.average(np.stack(arrays).astype(np.float64), axis=0, weights=weights)
    # A weighted sum in another order: the round-off is a few eps of the largest terms, so a mean
    # near zero (cancellation) needs an absolute part; rtol alone would not follow the numerics.
    np.testing.assert_allclose(mean, expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())


def test_average_factors_of_1d_heads_and_single_array():
    heads = [np.array([1.0, 2.0]), np.array([3.0, 6.0])]

    assert average_factors(heads, [1, 3]).tolist() == [2.5, 5.0]
    assert average_factors([np.array([[7.0]])], [0.5]).tolist() == [[7.0]]


@pytest.mark.parametrize("arrays,weights,match", [
    ([], [], "no arrays"),
    ([np.ones(2), np.ones(3)], [1, 1], "shape"),
    ([np.ones(2), np.ones(2)], [1, -1], "non-negative"),
    ([np.ones(2), np.ones(2)], [0, 0], "sum to zero"),
    ([np.ones(2), np.array([1.0, np.nan])], [1, 1], "non-finite"),
    ([np.ones(2)], [1, 1], "weights"),
])
def test_average_factors_bad_input_raises(arrays, weights, match):
    with pytest.raises(ValueError, match=match):
        average_factors(arrays, weights)


def dense_relative_change(new, old, eps=1e-12):
    diff = np.concatenate([(new[k][0] @ new[k][1] - old[k][0] @ old[k][1]).ravel()
                           for k in sorted(old)])
    ref = np.concatenate([(old[k][0] @ old[k][1]).ravel() for k in sorted(old)])
    return np.linalg.norm(diff) / (np.linalg.norm(ref) + eps)


def test_relative_change_equals_dense_reference():
    rng = np.random.default_rng(30)
    old = {"q": (rng.standard_normal((12, 3)), rng.standard_normal((3, 9))),
           "v": (rng.standard_normal((7, 3)), rng.standard_normal((3, 5)))}
    new = {"q": (rng.standard_normal((12, 3)), rng.standard_normal((3, 9))),
           "v": (rng.standard_normal((7, 2)), rng.standard_normal((2, 5)))}

    rho = relative_change(new, old)

    assert rho == pytest.approx(dense_relative_change(new, old), rel=1e-10)
    assert rho > 0.5


def test_relative_change_of_small_perturbation_is_accurate():
    rng = np.random.default_rng(31)
    old = {"q": (rng.standard_normal((30, 4)), rng.standard_normal((4, 20)))}
    new = {"q": (old["q"][0] + 1e-7 * rng.standard_normal((30, 4)),
                 old["q"][1] + 1e-7 * rng.standard_normal((4, 20)))}

    rho = relative_change(new, old)

    assert rho == pytest.approx(dense_relative_change(new, old), rel=1e-5)
    assert 1e-9 < rho < 1e-5


def test_relative_change_identical_is_zero_and_zero_old_uses_eps():
    rng = np.random.default_rng(32)
    factors = {"q": (rng.standard_normal((5, 2)), rng.standard_normal((2, 4)))}
    zero = {"q": (np.zeros((5, 2)), np.zeros((2, 4)))}

    assert relative_change(factors, factors) == 0.0
    expected = np.linalg.norm(factors["q"][0] @ factors["q"][1]) / 1e-3
    assert relative_change(factors, zero, eps=1e-3) == pytest.approx(expected, rel=1e-12)


def test_relative_change_rejects_different_targets_and_shapes():
    f = (np.ones((3, 2)), np.ones((2, 4)))

    with pytest.raises(ValueError, match="targets differ"):
        relative_change({"q": f}, {"v": f})
    with pytest.raises(ValueError, match="differs"):
        relative_change({"q": (np.ones((4, 2)), np.ones((2, 4)))}, {"q": f})
    with pytest.raises(ValueError, match="ranks differ"):
        relative_change({"q": (np.ones((3, 2)), np.ones((3, 4)))}, {"q": f})


def _merge_manifest(rank=2, depth=2, dim=6, classes=3):
    from shared.manifest import AdapterManifest, qv_targets

    return AdapterManifest(targets=qv_targets(depth, dim),
                           tiers={t: {"rank": rank, "alpha": rank} for t in ("root", "cluster", "leaf")},
                           head={"in_features": dim, "num_classes": classes})


def _adapter(rng, manifest, rank):
    out = {}
    for t in manifest.targets:
        out[f"{t.name}.lora_A"] = rng.standard_normal((rank, t.in_features)).astype(np.float32)
        out[f"{t.name}.lora_B"] = rng.standard_normal((t.out_features, rank)).astype(np.float32)
    out["head.weight"] = rng.standard_normal((manifest.head.num_classes, manifest.head.in_features)).astype(np.float32)
    out["head.bias"] = rng.standard_normal(manifest.head.num_classes).astype(np.float32)
    return out


def test_merge_adapters_combines_updates_in_product_space_and_averages_heads():
    from shared.aggregate import merge_adapters

    rng = np.random.default_rng(3)
    manifest = _merge_manifest()
    parents = [_adapter(rng, manifest, 2) for _ in range(3)]
    weights = [3.0, 1.0, 2.0]
    merged = merge_adapters(manifest, "cluster", parents, weights)
    assert set(merged) == set(parents[0]) and all(v.dtype == np.float32 for v in merged.values())
    for t in manifest.targets:
        a, b = f"{t.name}.lora_A", f"{t.name}.lora_B"
        dense, reconstruction, s = reference_truncated_svd([p[b].astype(np.float64) for p in parents],
                                                           [p[a].astype(np.float64) for p in parents], weights, 2)
        scale = np.linalg.norm(dense)
        B, A = merged[b].astype(np.float64), merged[a].astype(np.float64)
        # the rank-2 truncated SVD of the weighted sum, to float32 round-off (the output's dtype)
        np.testing.assert_allclose(B.T @ B, np.eye(2), atol=1e-6)
        np.testing.assert_allclose(B @ A, reconstruction, rtol=0, atol=1e-6 * scale)
        np.testing.assert_allclose(np.linalg.norm(A, axis=1), s, rtol=0, atol=1e-6 * scale)
        # not the factor mean: that would mix bases the parents never shared
        mean_product = np.mean([p[b] @ p[a] for p in parents], axis=0)
        assert np.linalg.norm(merged[b] @ merged[a] - mean_product) > 0.1 * scale
    w = np.array(weights) / sum(weights)
    for name in ("head.weight", "head.bias"):
        np.testing.assert_allclose(merged[name], sum(wi * p[name].astype(np.float64) for wi, p in zip(w, parents)),
                                   rtol=1e-6, atol=1e-6)
    # one parent: its own update, refactored (same product to round-off)
    alone = merge_adapters(manifest, "cluster", parents[:1], [5.0])
    t = manifest.targets[0]
    np.testing.assert_allclose(alone[f"{t.name}.lora_B"] @ alone[f"{t.name}.lora_A"],
                               parents[0][f"{t.name}.lora_B"] @ parents[0][f"{t.name}.lora_A"], atol=1e-4)


def test_merge_adapters_refuses_bad_input():
    from shared.aggregate import merge_adapters

    rng = np.random.default_rng(4)
    manifest = _merge_manifest()
    a, b = _adapter(rng, manifest, 2), _adapter(rng, manifest, 2)
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_adapters(manifest, "cluster", [], [])
    with pytest.raises(ValueError, match="does not share"):
        merge_adapters(manifest, "cluster", [a, {k: v for k, v in b.items() if k != "head.bias"}], [1, 1])
    with pytest.raises(ValueError, match="weights|negative"):
        merge_adapters(manifest, "cluster", [a, b], [1, -1])
    no_target = {k: v for k, v in a.items() if not k.startswith(manifest.targets[0].name)}
    with pytest.raises(ValueError, match="carry no"):
        merge_adapters(manifest, "cluster", [no_target, no_target], [1, 1])
