"""The fast routes inside ``aggregate_product_space`` against a full SVD of the materialised sum.

Shapes are large enough (min(d) >= 128, block width <= d / 4) that the certified subspace
iteration on the implicit sum, the Gram-eigenvector direct method and the QR core's truncated SVD
are actually taken; each test checks which route ran."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import shared.aggregate as aggregate
from shared.aggregate import aggregate_product_space

pytestmark = pytest.mark.unit


def round_uploads(rng, n, d_out, d_in, rank, step=0.05):
    """Clients that moved a little from one shared root (what every aggregation round sees)."""
    B_root = np.linalg.qr(rng.standard_normal((d_out, rank)))[0]
    A_root = np.diag(np.linspace(2.0, 1.0, rank)) @ rng.standard_normal((rank, d_in)) / np.sqrt(d_in)
    Bs = [(B_root + step * rng.standard_normal((d_out, rank)) / np.sqrt(d_out)).astype(np.float32)
          for _ in range(n)]
    As = [(A_root + step * rng.standard_normal((rank, d_in)) / np.sqrt(d_in)).astype(np.float32)
          for _ in range(n)]
    return Bs, As


def reference(Bs, As, weights, rank):
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    dense = sum(wi * (B.astype(np.float64) @ A.astype(np.float64)) for wi, B, A in zip(w, Bs, As))
    U, s, Vt = np.linalg.svd(dense, full_matrices=False)
    return dense, U[:, :rank], s[:rank], Vt[:rank]


def assert_matches_reference(B, A, U, s, Vt, atol):
    """Factor by factor: the sign convention makes U_r and S_r V_r^T unique for distinct values."""
    signs = np.sign(U[np.argmax(np.abs(U), axis=0), np.arange(U.shape[1])])
    np.testing.assert_allclose(B, U * signs, atol=atol)
    np.testing.assert_allclose(A, (s[:, None] * Vt) * signs[:, None], atol=atol * s[0])
    np.testing.assert_allclose(B.T @ B, np.eye(B.shape[1]), atol=1e-12)


@pytest.fixture
def route(monkeypatch):
    """Records whether the subspace iteration certified its result (True), gave up (False)."""
    taken: list[bool] = []
    original = aggregate._subspace_iteration

    def spy(*args):
        result = original(*args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(aggregate, "_subspace_iteration", spy)
    return taken


@pytest.mark.parametrize("d_out,d_in", [(160, 160), (200, 144), (144, 200)])
def test_certified_subspace_iteration_equals_full_svd_on_round_uploads(route, d_out, d_in):
    rng = np.random.default_rng(d_out + d_in)
    rank, n = 4, 70                                     # K = 280 >= min(d): the sum path
    Bs, As = round_uploads(rng, n, d_out, d_in, rank)
    weights = rng.uniform(1, 50, size=n)
    _, U, s, Vt = reference(Bs, As, weights, rank)

    B, A = aggregate_product_space(Bs, As, weights, rank)

    assert route == [True]
    assert_matches_reference(B, A, U, s, Vt, atol=1e-10)


def test_flat_spectrum_falls_back_to_the_direct_method_and_is_exact(route):
    rng = np.random.default_rng(1)
    rank, n, d = 4, 60, 160                             # independent random factors: no gap
    Bs = [rng.standard_normal((d, rank)) for _ in range(n)]
    As = [rng.standard_normal((rank, d)) for _ in range(n)]
    dense, U, s, Vt = reference(Bs, As, np.ones(n), rank)
    full = np.linalg.svd(dense, compute_uv=False)
    assert full[rank - 1] - full[rank] > 1e-4 * full[0]   # the truncation itself is well posed

    B, A = aggregate_product_space(Bs, As, np.ones(n), rank)

    assert route == [False]
    assert_matches_reference(B, A, U, s, Vt, atol=1e-9)


def test_iteration_and_forced_direct_method_give_the_same_factors(monkeypatch):
    rng = np.random.default_rng(2)
    Bs, As = round_uploads(rng, 50, 192, 192, 6)
    weights = rng.uniform(1, 3, size=50)

    iterated = aggregate_product_space(Bs, As, weights, 6)
    monkeypatch.setattr(aggregate, "_subspace_iteration", lambda *args: None)
    direct = aggregate_product_space(Bs, As, weights, 6)

    np.testing.assert_allclose(iterated[0], direct[0], atol=1e-10)
    np.testing.assert_allclose(iterated[1], direct[1], atol=1e-10 * np.abs(direct[1]).max())


def test_rank_deficient_sum_on_the_iteration_route_is_padded_exactly(route):
    rng = np.random.default_rng(3)
    d, rank, n = 160, 4, 50
    basis = np.linalg.qr(rng.standard_normal((d, 2)))[0]   # every B in one 2-D column space
    Bs = [basis @ rng.standard_normal((2, rank)) for _ in range(n)]
    As = [rng.standard_normal((rank, d)) for _ in range(n)]
    dense, U, s, Vt = reference(Bs, As, np.ones(n), rank)

    B, A = aggregate_product_space(Bs, As, np.ones(n), rank)

    assert route == [True]
    np.testing.assert_allclose(B.T @ B, np.eye(rank), atol=1e-12)
    np.testing.assert_allclose(B @ A, dense, atol=1e-12 * np.abs(dense).max())
    assert np.all(A[2:] == 0.0) and np.all(np.linalg.norm(A[:2], axis=1) > 1e-3)
    np.testing.assert_allclose(np.linalg.norm(A, axis=1)[:2], s[:2], rtol=1e-12)


@pytest.mark.parametrize("shape", [(130, 300), (300, 130), (256, 256)])
def test_gram_eigenvector_direct_method_equals_full_svd(shape):
    rng = np.random.default_rng(sum(shape))
    k = min(shape)
    M = (rng.standard_normal((shape[0], k)) * np.linspace(3, 1, k)) @ rng.standard_normal((k, shape[1]))
    rank = 7

    U, s, V = aggregate._exact_truncated_svd(M, rank)

    U_ref, s_ref, Vt_ref = np.linalg.svd(M, full_matrices=False)
    np.testing.assert_allclose(s, s_ref[:rank], rtol=1e-12)
    np.testing.assert_allclose(np.abs(np.sum(U * U_ref[:, :rank], axis=0)), 1.0, atol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(V * Vt_ref[:rank].T, axis=0)), 1.0, atol=1e-10)
    np.testing.assert_allclose(U.T @ M, s[:, None] * V.T, atol=1e-11 * s[0])


def test_gram_eigenvector_direct_method_keeps_zero_singular_values_at_noise_level():
    rng = np.random.default_rng(4)
    M = rng.standard_normal((200, 3)) @ rng.standard_normal((3, 180))   # rank 3

    _, s, _ = aggregate._exact_truncated_svd(M, 6)

    assert np.all(s[3:] < 1e-12 * s[0])


def test_qr_route_with_a_large_core_equals_full_svd():
    rng = np.random.default_rng(5)
    d, rank, n = 256, 8, 20                              # K = 160 < 256: QR, core 160 x 160
    Bs = [rng.standard_normal((d, rank)) for _ in range(n)]
    As = [rng.standard_normal((rank, d)) for _ in range(n)]
    weights = rng.uniform(1, 2, size=n)
    _, U, s, Vt = reference(Bs, As, weights, rank)

    B, A = aggregate_product_space(Bs, As, weights, rank, method="qr")

    assert_matches_reference(B, A, U, s, Vt, atol=1e-9)


def test_same_uploads_give_same_bytes_on_the_iteration_route(route):
    rng = np.random.default_rng(6)
    Bs, As = round_uploads(rng, 40, 160, 160, 4)

    first = aggregate_product_space(Bs, As, np.arange(1, 41), 4)
    second = aggregate_product_space([b.astype(np.float64) for b in Bs],
                                     [a.astype(np.float64) for a in As], list(range(1, 41)), 4)

    assert route == [True, True]
    assert first[0].tobytes() == second[0].tobytes() and first[1].tobytes() == second[1].tobytes()


def test_memory_is_linear_in_clients_never_a_matrix_per_client():
    rng = np.random.default_rng(7)
    d, rank, n = 160, 4, 1000
    Bs, As = round_uploads(rng, n, d, d, rank)          # float32, as on the wire
    one_dense = d * d * 8

    tracemalloc.start()
    try:
        aggregate_product_space(Bs, As, np.ones(n), rank)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    stacks = 2 * n * rank * d * 8                        # the float64 stacks of all B^T and A
    assert peak < 1.5 * stacks + 8 * one_dense           # (+ a float32 copy of the B's on the way)
    assert peak < n * one_dense / 10


def test_huge_finite_factors_are_not_mistaken_for_non_finite():
    # Squares of 1e160 overflow float64 (the fast finiteness check); the values themselves are fine.
    rng = np.random.default_rng(8)
    Bs = [1e160 * rng.standard_normal((30, 2)) for _ in range(3)]
    As = [rng.standard_normal((2, 20)) for _ in range(3)]

    B, A = aggregate_product_space(Bs, As, [1.0, 1.0, 1.0], 2)

    dense = sum(B_i @ A_i for B_i, A_i in zip(Bs, As)) / 3
    U, s, Vt = np.linalg.svd(dense, full_matrices=False)
    np.testing.assert_allclose(B @ A, (U[:, :2] * s[:2]) @ Vt[:2], rtol=0, atol=1e-10 * s[0])
    with pytest.raises(ValueError, match=r"Bs\[1\] contains non-finite"):
        aggregate_product_space([Bs[0], np.full((30, 2), np.inf)], As[:2], [1.0, 1.0], 2)
