"""Norm clipping (shared.robust) against a slow dense reference: the d_out x d_in products are
formed, the update norms taken with np.linalg.norm, the clipped products averaged and reset to
rank r by a full SVD."""

from __future__ import annotations

import numpy as np
import pytest

from shared.aggregate import combine_tier_uploads
from shared.config import TierPolicy
from shared.manifest import AdapterManifest, qv_targets
from shared.robust import (
    clip_uploads,
    product_difference_norm,
    scale_update,
    update_norm,
)

pytestmark = pytest.mark.unit

DIM, DEPTH, RANK, CLASSES = 12, 2, 3, 4
MANIFEST = AdapterManifest(targets=qv_targets(DEPTH, DIM),
                           tiers={t: {"rank": RANK, "alpha": RANK} for t in ("root", "cluster", "leaf")},
                           head={"in_features": DIM, "num_classes": CLASSES})
HEAD = ("head.weight", "head.bias")


def _tensors(seed: int, scale: float = 1.0, zero_b: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for t in MANIFEST.targets:
        out[f"{t.name}.lora_A"] = rng.normal(size=(RANK, DIM)).astype(np.float32)
        out[f"{t.name}.lora_B"] = (np.zeros((DIM, RANK)) if zero_b else scale * rng.normal(size=(DIM, RANK))
                                   ).astype(np.float32)
    out["head.weight"] = (scale * rng.normal(size=(CLASSES, DIM))).astype(np.float32)
    out["head.bias"] = (scale * rng.normal(size=(CLASSES,))).astype(np.float32)
    return out


def _dense_reference(policy: TierPolicy, previous, uploads, weights, c):
    """Products, norms, clipping and aggregation done the slow, obvious way."""
    w = np.asarray(weights, float) / np.sum(weights)
    names = [t.name for t in MANIFEST.targets]
    P0 = {n: previous[f"{n}.lora_B"].astype(float) @ previous[f"{n}.lora_A"].astype(float) for n in names}
    norms, scales, products, heads = [], [], [], []
    for u in uploads:
        P = {n: u[f"{n}.lora_B"].astype(float) @ u[f"{n}.lora_A"].astype(float) for n in names}
        sq = sum(np.linalg.norm(P[n] - P0[n]) ** 2 for n in names)
        sq += sum(np.linalg.norm(u[h].astype(float) - previous[h].astype(float)) ** 2 for h in HEAD)
        norm = np.sqrt(sq)
        s = min(1.0, c / norm) if c is not None and norm > 0 else 1.0
        norms.append(norm)
        scales.append(s)
        products.append({n: P0[n] + s * (P[n] - P0[n]) for n in names})
        heads.append({h: previous[h].astype(float) + s * (u[h].astype(float) - previous[h].astype(float))
                      for h in HEAD})
    merged = {}
    for n in names:
        M = sum(wi * p[n] for wi, p in zip(w, products))
        U, S, Vt = np.linalg.svd(M)
        merged[n] = (U[:, :RANK] * S[:RANK]) @ Vt[:RANK]
    for h in HEAD:
        merged[h] = sum(wi * hd[h] for wi, hd in zip(w, heads))
    return merged, norms, scales


@pytest.mark.parametrize("zero_previous", [True, False])
@pytest.mark.parametrize("clip", [None, 0.5, 2.0, 1e6])
def test_product_space_clipping_matches_the_dense_reference(zero_previous, clip):
    policy = TierPolicy(clip_norm=clip, clip_relative=None)
    previous = _tensors(0, scale=0.3, zero_b=zero_previous)
    uploads = [_tensors(s, scale=sc) for s, sc in zip((1, 2, 3, 4), (0.1, 0.2, 5.0, 0.05))]
    weights = [10.0, 20.0, 30.0, 5.0]
    clipped, report = clip_uploads(MANIFEST, "root", policy, previous, uploads)
    new = combine_tier_uploads(MANIFEST, "root", policy, previous, clipped, weights)
    reference, norms, scales = _dense_reference(policy, previous, uploads, weights, clip)
    for t in MANIFEST.targets:
        got = new[f"{t.name}.lora_B"].astype(float) @ new[f"{t.name}.lora_A"].astype(float)
        np.testing.assert_allclose(got, reference[t.name], rtol=1e-4, atol=1e-4)
    for h in HEAD:
        np.testing.assert_allclose(new[h], reference[h], rtol=1e-5, atol=1e-5)
    if clip is None:
        assert report is None
    else:
        np.testing.assert_allclose(report.norms, norms, rtol=1e-9)
        np.testing.assert_allclose(report.scales, scales, rtol=1e-9)
        assert report.clipped == sum(s < 1 for s in scales)


def test_factor_avg_clipping_matches_the_dense_reference():
    policy = TierPolicy(aggregation="factor_avg", A="frozen", clip_norm=1.0, clip_relative=None)
    previous = _tensors(0)
    uploads = [_tensors(s, scale=sc) for s, sc in zip((1, 2, 3), (0.1, 3.0, 0.3))]
    clipped, report = clip_uploads(MANIFEST, "root", policy, previous, uploads)
    names = [f"{t.name}.lora_B" for t in MANIFEST.targets] + list(HEAD)
    for u, c, norm, s in zip(uploads, clipped, report.norms, report.scales):
        delta = np.concatenate([(u[n].astype(float) - previous[n].astype(float)).ravel() for n in names])
        assert norm == pytest.approx(np.linalg.norm(delta), rel=1e-12)
        assert s == pytest.approx(min(1.0, 1.0 / np.linalg.norm(delta)))
        clipped_delta = np.concatenate([(c[n] - previous[n].astype(float)).ravel() for n in names])
        assert np.linalg.norm(clipped_delta) == pytest.approx(min(norm, 1.0), rel=1e-9)
        for t in MANIFEST.targets:  # A is frozen: not part of the update, not touched
            assert c[f"{t.name}.lora_A"] is u[f"{t.name}.lora_A"]


def test_unclipped_uploads_are_used_bit_for_bit():
    policy = TierPolicy(clip_norm=1e9, clip_relative=None)
    previous, uploads = _tensors(0), [_tensors(1), _tensors(2)]
    clipped, report = clip_uploads(MANIFEST, "root", policy, previous, uploads)
    assert report.clipped == 0
    plain = combine_tier_uploads(MANIFEST, "root", TierPolicy(), previous, uploads, [1.0, 2.0])
    with_clip = combine_tier_uploads(MANIFEST, "root", policy, previous, clipped, [1.0, 2.0])
    assert all(np.array_equal(plain[k], with_clip[k]) for k in plain)


def test_one_huge_update_moves_the_aggregate_by_at_most_its_weight_times_c():
    """The point of clipping: a client sending a 1e6-times longer update pulls the (pre-rank-reset)
    aggregate by at most w_i * c, instead of dominating it."""
    c = 1.0
    previous = _tensors(0, zero_b=True)
    honest = [_tensors(s, scale=0.01) for s in (1, 2, 3)]
    attacker = _tensors(9, scale=1e6)
    policy = TierPolicy(clip_norm=c, clip_relative=None)
    clipped, report = clip_uploads(MANIFEST, "root", policy, previous, honest + [attacker])
    assert report.scales[3] < 1e-5 and report.norms[3] > 1e5
    assert update_norm(MANIFEST, "root", policy, previous, clipped[3]) == pytest.approx(c, rel=1e-6)
    # weighted sums of products before the rank reset, with the attacker and with it sending nothing
    w = 0.25

    def weighted_sum(uploads):
        return np.concatenate([sum(w * (u[f"{t.name}.lora_B"].astype(float) @ u[f"{t.name}.lora_A"].astype(float))
                                   for u in uploads).ravel() for t in MANIFEST.targets]
                              + [sum(w * u[h].astype(float) for u in uploads).ravel() for h in HEAD])

    pull = np.linalg.norm(weighted_sum(clipped) - weighted_sum(clipped[:3] + [previous]))
    assert pull <= w * c * (1 + 1e-6)


def test_product_difference_norm_is_exact_without_the_product():
    rng = np.random.default_rng(5)
    for shape in ((30, 4, 20), (7, 2, 40)):
        d_out, r, d_in = shape
        B1, A1 = rng.normal(size=(d_out, r)), rng.normal(size=(r, d_in))
        B0, A0 = B1 + 1e-7 * rng.normal(size=(d_out, r)), A1 + 1e-7 * rng.normal(size=(r, d_in))
        dense = np.linalg.norm(B1 @ A1 - B0 @ A0)
        assert product_difference_norm(B1, A1, B0, A0) == pytest.approx(dense, rel=1e-6)
        B2 = rng.normal(size=(d_out, 2 * r))
        A2 = rng.normal(size=(2 * r, d_in))
        assert product_difference_norm(B2, A2, B0, A0) == pytest.approx(np.linalg.norm(B2 @ A2 - B0 @ A0), rel=1e-9)


def test_scale_update_refuses_scales_outside_zero_one():
    with pytest.raises(ValueError):
        scale_update(MANIFEST, "root", TierPolicy(), _tensors(0), _tensors(1), 1.5)


def test_clip_norm_is_off_by_default_and_positive():
    assert TierPolicy().clip_norm is None
    with pytest.raises(ValueError):
        TierPolicy(clip_norm=0)
    with pytest.raises(ValueError):
        TierPolicy(clip_norm=float("inf"))


# ------------------------------------------------------------------------------- weight capping

def _cap_reference(weights, ratio):
    """Slow and obvious: sort to find the median, then cap one by one."""
    ordered = sorted(float(w) for w in weights)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    out, capped = [], 0
    for w in weights:
        if w > ratio * median:
            out.append(ratio * median)
            capped += 1
        else:
            out.append(float(w))
    return out, capped


@pytest.mark.parametrize("weights, ratio", [
    ([50, 60, 70, 1e9], 2.0),          # one client claims a billion samples
    ([50, 60, 70, 80], 2.0),           # honest round: nothing changes
    ([5, 5, 1e9, 1e9, 5], 3.0),        # a minority of two liars
    ([1, 100], 1.0),                   # even count: the median is the mean of the middle two
    ([7], 1.0),
])
def test_cap_weights_matches_the_reference(weights, ratio):
    from shared.robust import cap_weights

    got, capped = cap_weights(weights, ratio)
    expected, expected_capped = _cap_reference(weights, ratio)

    assert got == pytest.approx(expected, rel=0, abs=0)
    assert capped == expected_capped


def test_cap_weights_off_or_empty_returns_weights_unchanged():
    from shared.robust import cap_weights

    assert cap_weights([3, 1e9], None) == ([3.0, 1e9], 0)
    assert cap_weights([], 2.0) == ([], 0)


def test_a_capped_liar_gets_at_most_ratio_medians_of_share():
    from shared.robust import cap_weights

    honest = [100.0] * 9
    weights, capped = cap_weights(honest + [1e9], 2.0)

    assert capped == 1 and weights[-1] == 200.0 and weights[:9] == honest
    assert weights[-1] / sum(weights) == pytest.approx(200 / 1100)


@pytest.mark.parametrize("relative, absolute", [(3.0, None), (3.0, 0.5), (1.0, None), (1e6, None)])
def test_relative_clipping_bounds_updates_by_a_multiple_of_the_rounds_median(relative, absolute):
    """clip_relative: the bound is relative x the median of the round's update norms (with clip_norm
    too, the smaller bound); against the dense reference with that bound."""
    previous = _tensors(0)
    uploads = [_tensors(s, scale=0.1) for s in (1, 2, 3, 4)] + [_tensors(9, scale=50.0)]
    policy = TierPolicy(clip_relative=relative, clip_norm=absolute)
    _, norms, _ = _dense_reference(TierPolicy(), previous, uploads, [1.0] * 5, None)
    bound = min([relative * float(np.median(norms))] + ([absolute] if absolute is not None else []))
    clipped, report = clip_uploads(MANIFEST, "root", policy, previous, uploads)
    assert report.clip_norm == pytest.approx(bound, rel=1e-9)
    merged, _norms, scales = _dense_reference(TierPolicy(), previous, uploads, [1.0] * 5, bound)
    assert list(report.scales) == pytest.approx(scales, rel=1e-6)
    ours = combine_tier_uploads(MANIFEST, "root", policy, previous, clipped, [1.0] * 5)
    for t in MANIFEST.targets:
        product = ours[f"{t.name}.lora_B"].astype(float) @ ours[f"{t.name}.lora_A"].astype(float)
        np.testing.assert_allclose(product, merged[t.name], rtol=1e-4, atol=1e-5)
    for name in HEAD:
        np.testing.assert_allclose(ours[name], merged[name], rtol=1e-5, atol=1e-6)
    assert (report.scales[4] < 1.0) == (bound < norms[4])
    if relative == 1e6 and absolute is None:
        assert report.clipped == 0


def test_a_minority_cannot_move_the_relative_bound():
    previous = _tensors(0)
    honest = [_tensors(s, scale=0.1) for s in (1, 2, 3)]
    policy = TierPolicy(clip_relative=2.0)
    _, alone = clip_uploads(MANIFEST, "root", policy, previous, honest + [_tensors(8, scale=0.1)])
    _, attacked = clip_uploads(MANIFEST, "root", policy, previous, honest + [_tensors(9, scale=1e4)])
    median_honest = float(np.median(alone.norms[:3]))
    assert median_honest <= attacked.clip_norm / 2.0 <= max(alone.norms[:3]) * 1.5
    assert attacked.scales[3] < 1e-2 and all(s == 1.0 for s in attacked.scales[:3])


def test_clip_relative_is_three_by_default_and_at_least_one():
    assert TierPolicy().clip_relative == 3.0 and TierPolicy().max_weight_ratio == 10.0
    for bad in (0.5, 0, -1):
        with pytest.raises(ValueError):
            TierPolicy(clip_relative=bad)
