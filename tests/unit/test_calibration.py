"""The leaf's label-prior fit (shared/calibration.py) against a slow reference, and its worker hook."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize

from shared.calibration import UNIFORM_TEST_DRAWS, fit_logit_shift, uniform_labels_p_value

pytestmark = pytest.mark.unit


def reference_objective(z: np.ndarray, y: np.ndarray, delta: np.ndarray, prior_std: float) -> float:
    """The MAP objective written sample by sample and class by class, as the docstring states it."""
    n, c = z.shape
    total = 0.0
    for i in range(n):
        shifted = [float(z[i, k] + delta[k]) for k in range(c)]
        top = max(shifted)
        lse = top + math.log(sum(math.exp(s - top) for s in shifted))
        total += lse - shifted[int(y[i])]
    penalty = sum(float(d) ** 2 for d in delta) / (2 * prior_std ** 2)
    return (total + penalty) / n


def reference_fit(z: np.ndarray, y: np.ndarray, prior_std: float) -> np.ndarray:
    return minimize(lambda d: reference_objective(z, y, d, prior_std), np.zeros(z.shape[1]), method="Nelder-Mead"
                    if z.shape[1] <= 2 else "BFGS", options={"gtol": 1e-9, "maxiter": 10_000}).x


@pytest.mark.parametrize(("n", "c", "prior_std", "seed"), [(20, 10, 2.0, 0), (60, 10, 0.5, 1), (12, 4, 10.0, 2),
                                                           (40, 25, 1.0, 3)])
def test_matches_a_slow_reference_minimiser(n, c, prior_std, seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, c))
    y = rng.choice(min(c, 3), size=n)   # a client holding three classes
    delta = fit_logit_shift(z, y, prior_std)
    expected = reference_fit(z, y, prior_std)
    # BFGS on a smooth strictly convex objective stops within ~1e-5 of the minimum
    assert np.abs(delta - expected).max() < 1e-4
    assert reference_objective(z, y, delta, prior_std) <= reference_objective(z, y, expected, prior_std) + 1e-12


def test_the_optimum_meets_its_first_order_condition_exactly():
    rng = np.random.default_rng(4)
    n, c, prior_std = 50, 10, 2.0
    z = rng.normal(size=(n, c))
    y = rng.choice([2, 7], size=n, p=[0.8, 0.2])
    delta = fit_logit_shift(z, y, prior_std)
    p = np.exp(z + delta)
    p /= p.sum(axis=1, keepdims=True)
    counts = np.bincount(y, minlength=c) / n
    grad = p.mean(axis=0) - counts + delta / (prior_std ** 2 * n)
    assert np.abs(grad).max() < 1e-9
    # a class the client never saw is pushed down by exactly prior_std^2 * n * its mean probability
    absent = [k for k in range(c) if counts[k] == 0]
    np.testing.assert_allclose(-delta[absent], prior_std ** 2 * n * p.mean(axis=0)[absent], rtol=1e-6)
    assert (delta[absent] < 0).all() and (delta[[2, 7]] > 0).all()


def test_recovers_a_planted_label_shift():
    """Labels drawn from softmax(z + shift): with many samples and a weak prior the fit finds the
    shift (up to the constant that softmax ignores)."""
    rng = np.random.default_rng(5)
    n, c = 20_000, 5
    shift = np.array([1.5, -1.0, 0.0, 0.7, -0.4])
    z = rng.normal(size=(n, c))
    p = np.exp(z + shift)
    p /= p.sum(axis=1, keepdims=True)
    y = (rng.random((n, 1)) < p.cumsum(axis=1)).argmax(axis=1)
    delta = fit_logit_shift(z, y, prior_std=100.0)
    # the standard error of each centred entry is ~0.02 at n = 20,000: 0.1 is five of them
    np.testing.assert_allclose(delta - delta.mean(), shift - shift.mean(), atol=0.1)


def test_the_prior_weighs_less_as_the_client_holds_more_samples():
    rng = np.random.default_rng(6)
    z = rng.normal(size=(20, 10))
    y = rng.choice([0, 1], size=20)
    small = fit_logit_shift(z, y, 1.0)
    large = fit_logit_shift(np.tile(z, (8, 1)), np.tile(y, 8), 1.0)   # the same data, eight times over
    assert np.linalg.norm(large) > np.linalg.norm(small) > 0
    # and a stronger prior (smaller std) keeps the shift smaller
    assert np.linalg.norm(fit_logit_shift(z, y, 0.25)) < np.linalg.norm(small)


def test_logits_already_fitting_the_labels_need_no_shift_and_per_sample_offsets_change_nothing():
    rng = np.random.default_rng(7)
    z = rng.normal(size=(30, 6))
    y = rng.integers(0, 6, 30)
    base = fit_logit_shift(z, y, 2.0)
    offset = fit_logit_shift(z + rng.normal(size=(30, 1)) * 5, y, 2.0)   # softmax ignores a row's constant
    np.testing.assert_allclose(offset, base, atol=1e-8)
    # fitted logits: shifting them by the fit again moves (almost) nothing more than the prior allows
    again = fit_logit_shift(z + base, y, 1e6)
    assert np.abs(again - again.mean()).max() < np.abs(base - base.mean()).max()


@pytest.mark.parametrize(("logits", "labels", "prior_std", "message"), [
    (np.zeros((0, 3)), np.zeros(0, dtype=np.int64), 1.0, "non-empty"),
    (np.zeros(3), np.zeros(3, dtype=np.int64), 1.0, "non-empty"),
    (np.array([[0.0, np.nan]]), np.array([0]), 1.0, "finite"),
    (np.zeros((2, 3)), np.array([0]), 1.0, "2 integers"),
    (np.zeros((2, 3)), np.array([0.0, 1.0]), 1.0, "2 integers"),
    (np.zeros((2, 3)), np.array([0, 3]), 1.0, r"\[0, 3\)"),
    (np.zeros((2, 3)), np.array([-1, 0]), 1.0, r"\[0, 3\)"),
    (np.zeros((2, 3)), np.array([0, 1]), 0.0, "prior_std"),
    (np.zeros((2, 3)), np.array([0, 1]), float("inf"), "prior_std"),
])
def test_bad_input_is_refused_with_a_clear_message(logits, labels, prior_std, message):
    with pytest.raises(ValueError, match=message):
        fit_logit_shift(logits, labels, prior_std)


def test_the_worker_hook_shifts_only_the_leaf_heads_bias_and_lowers_the_training_loss():
    torch = pytest.importorskip("torch")
    from tests.unit.test_train import small_data, small_model
    from worker.train import fit_leaf_bias, logits_of, mean_loss

    torch.set_num_threads(2)
    model = small_model()
    data = small_data(n=40)
    data.y_train[:] = np.where(np.arange(40) % 4 == 0, 3, 8)   # a client holding two classes, 3:1
    model.init_tier("leaf", seed=9, head_from="cluster")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loss_before = mean_loss(model, data.x_train, data.y_train, ("root", "cluster", "leaf"))
    expected = fit_logit_shift(logits_of(model, data.x_train, ("root", "cluster")), data.y_train, 2.0)
    delta = fit_leaf_bias(model, data, ("root", "cluster"), 2.0)
    np.testing.assert_allclose(delta, expected, rtol=1e-12)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["heads.leaf.bias"]
    np.testing.assert_allclose((after["heads.leaf.bias"] - before["heads.leaf.bias"]).numpy(), delta, rtol=1e-5,
                               atol=1e-6)
    assert mean_loss(model, data.x_train, data.y_train, ("root", "cluster", "leaf")) < loss_before - 0.1
    assert delta[3] > 0 and delta[8] > 0 and (np.delete(delta, [3, 8]) < 0).all()


def _exact_uniform_p_value(counts: list[int], classes: int) -> float:
    """Slow reference: P(sum of squared counts >= the observed one) under the uniform multinomial,
    by enumerating every count vector (small n and classes only)."""
    n = sum(counts)
    observed = sum(k * k for k in counts)

    def vectors(left: int, slots: int):
        if slots == 1:
            yield (left,)
            return
        for k in range(left + 1):
            for rest in vectors(left - k, slots - 1):
                yield (k, *rest)

    total = 0.0
    for vector in vectors(n, classes):
        if sum(k * k for k in vector) >= observed:
            total += math.factorial(n) / math.prod(math.factorial(k) for k in vector) / classes ** n
    return total


@pytest.mark.parametrize(("counts", "classes"), [
    ([3, 3, 2, 2], 4), ([5, 2, 1, 0], 4), ([8, 0, 0, 0], 4), ([4, 4, 4], 3), ([7, 4, 1], 3),
    ([2, 1, 1, 1, 1, 0], 6), ([6, 3, 1, 0, 0, 0], 6),
])
def test_the_uniform_label_test_matches_the_exact_p_value(counts, classes):
    """The Monte Carlo p-value against the exact one from every count vector: within five standard
    errors of its draws (binomial, at the exact p), plus the 1 / (draws + 1) of its estimator."""
    labels = np.repeat(np.arange(len(counts)), counts)
    exact = _exact_uniform_p_value(counts, classes)
    got = uniform_labels_p_value(labels, classes)
    tolerance = 5 * math.sqrt(max(exact * (1 - exact), 0.0) / UNIFORM_TEST_DRAWS) + 1 / (UNIFORM_TEST_DRAWS + 1)
    assert abs(got - exact) <= tolerance, (counts, got, exact)


def test_the_uniform_label_test_separates_uniform_from_skewed_clients_and_is_deterministic():
    rng = np.random.default_rng(3)
    balanced = np.arange(20) % 10                      # two of each class
    assert uniform_labels_p_value(balanced, 10) == 1.0
    assert uniform_labels_p_value(np.array([0] * 12 + [1] * 8), 10) < 0.001   # two classes of ten
    labels = rng.integers(0, 10, size=50)
    assert uniform_labels_p_value(labels, 10) == uniform_labels_p_value(labels.copy(), 10)
    # the order of the labels, and which classes carry which counts, do not matter
    assert uniform_labels_p_value(labels[::-1], 10) == uniform_labels_p_value((labels + 3) % 10, 10)
    # the p-value never reaches 0: at least 1 / (draws + 1)
    assert uniform_labels_p_value(np.zeros(160, dtype=np.int64), 10) == pytest.approx(1 / (UNIFORM_TEST_DRAWS + 1))


@pytest.mark.parametrize(("labels", "classes", "draws", "message"), [
    (np.array([0, 1]), 1, 100, "classes"),
    (np.array([0, 1]), 2, 0, "draws"),
    (np.zeros(0, dtype=np.int64), 3, 100, "non-empty"),
    (np.array([[0, 1]]), 3, 100, "1-D"),
    (np.array([0.0, 1.0]), 3, 100, "integer"),
    (np.array([0, 3]), 3, 100, r"\[0, 3\)"),
    (np.array([-1, 0]), 3, 100, r"\[0, 3\)"),
])
def test_the_uniform_label_test_refuses_bad_input(labels, classes, draws, message):
    with pytest.raises(ValueError, match=message):
        uniform_labels_p_value(labels, classes, draws)


def test_a_client_whose_labels_are_not_uniform_fits_with_the_wider_prior():
    from shared.calibration import leaf_prior_width

    uniform = np.arange(20) % 10
    skewed = np.array([0] * 12 + [1] * 8)
    assert leaf_prior_width(uniform, 10, 1.0, 4.0) == 1.0
    assert leaf_prior_width(skewed, 10, 1.0, 4.0) == 4.0
    assert leaf_prior_width(skewed, 10, 1.0, 0.0) == 1.0   # off: one width for everyone
    # the level decides: p = 1 for the uniform client passes any alpha below 1; the skewed one
    # (p = 1 / 4001) is rejected even at a tiny alpha, and not at one below its p-value
    assert leaf_prior_width(uniform, 10, 1.0, 4.0, alpha=0.99) == 1.0
    assert leaf_prior_width(skewed, 10, 1.0, 4.0, alpha=0.001) == 4.0
    assert leaf_prior_width(skewed, 10, 1.0, 4.0, alpha=1e-4) == 1.0


def test_the_wider_prior_follows_a_skewed_clients_labels_more_closely():
    """What the option is for: on logits that know nothing of the client's mix, the fitted shift
    of a two-class client moves its classes further apart from the absent ones with the wider prior."""
    from shared.calibration import leaf_prior_width

    labels = np.array([0] * 12 + [1] * 8)
    logits = np.zeros((20, 10))
    narrow = fit_logit_shift(logits, labels, leaf_prior_width(labels, 10, 1.0, 0.0))
    wide = fit_logit_shift(logits, labels, leaf_prior_width(labels, 10, 1.0, 4.0))
    gap = lambda d: float(d[:2].mean() - d[2:].mean())  # noqa: E731
    assert gap(wide) > gap(narrow) > 0


@pytest.mark.parametrize(("width", "skewed", "message"), [
    (-0.1, 4.0, "width"), (1.0, -1.0, "skewed_width"), (float("nan"), 4.0, "width"), (1.0, float("inf"), "skewed_width"),
])
def test_the_prior_width_refuses_bad_input(width, skewed, message):
    from shared.calibration import leaf_prior_width

    with pytest.raises(ValueError, match=message):
        leaf_prior_width(np.arange(10), 10, width, skewed)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        leaf_prior_width(np.array([0, 10]), 10, 1.0, 4.0)


def test_only_a_client_whose_labels_look_uniform_takes_part_of_its_leaf():
    """training.leaf_mix: the share of its leaf's change a client's model takes is the option's for
    labels the chi-square test does not reject as uniform, 1 for a client with a mix of its own."""
    from shared.calibration import leaf_mix_for

    uniform = np.arange(20) % 10
    skewed = np.array([0] * 12 + [1] * 8)
    assert leaf_mix_for(uniform, 10, 0.5) == 0.5
    assert leaf_mix_for(skewed, 10, 0.5) == 1.0
    assert leaf_mix_for(uniform, 10, 1.0) == 1.0
    # the level decides, as for the prior's width
    assert leaf_mix_for(uniform, 10, 0.5, alpha=0.99) == 0.5
    assert leaf_mix_for(skewed, 10, 0.5, alpha=1e-4) == 0.5
    for bad in (0.0, -0.5, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"mix must be in \(0, 1\]"):
            leaf_mix_for(uniform, 10, bad)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        leaf_mix_for(np.array([0, 10]), 10, 0.5)
