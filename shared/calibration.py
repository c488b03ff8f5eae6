"""A client's label prior, fitted as a shift of a model's logits (``training.leaf_bias_fit``).

Under label shift (the same images per class, other class proportions) the Bayes-optimal change of
a classifier is a per-class shift of its logits, ``log(pi_client(c) / pi_model(c))``. A client
knows its labels but not the proportions the federation's model learned from, so it fits the
shift directly: the ``delta`` (one value per class) minimising the mean cross entropy of
``logits + delta`` on its own training data, with a Gaussian prior ``delta ~ N(0, prior_std^2)``
on each class (MAP). The objective

    f(delta) = mean_i [logsumexp(z_i + delta) - (z_i + delta)_{y_i}] + |delta|^2 / (2 prior_std^2 N)

is strictly convex, so Newton's method with a backtracking line search finds its one minimum in a
few iterations, deterministically and without a learning rate. The prior's weight falls with the
client's sample count N: a client of 20 images moves its logits less than one of 160, and a class
it never saw is pushed down by a bounded amount (``|delta_c| = prior_std^2 N mean_i p_ic`` at the
optimum) instead of to minus infinity.

Pure numpy (the coordinator never imports torch); the worker passes the logits of its root +
cluster model and adds ``delta`` to its new leaf head's bias (docs/method.md, "The leaf tier").
"""

from __future__ import annotations

import functools

import numpy as np

MAX_NEWTON_STEPS = 50


def _value_and_probs(z: np.ndarray, onehot: np.ndarray, delta: np.ndarray,
                     ridge: float) -> tuple[float, np.ndarray]:
    """The objective at ``delta`` and the softmax probabilities (N, C) of ``z + delta``, from one exp."""
    centred = z + delta
    centred = centred - centred.max(axis=1, keepdims=True)
    e = np.exp(centred)
    total = e.sum(axis=1, keepdims=True)
    log_p = centred - np.log(total)
    value = float(-np.mean((log_p * onehot).sum(axis=1)) + 0.5 * ridge * float(delta @ delta))
    return value, e / total


def fit_logit_shift(logits: np.ndarray, labels: np.ndarray, prior_std: float,
                    max_steps: int = MAX_NEWTON_STEPS, tol: float = 1e-9) -> np.ndarray:
    """The per-class shift ``delta`` (C,) of ``logits`` (N, C) that fits ``labels`` (N,) best under
    a N(0, ``prior_std``^2) prior per class (module docstring). float64; at most ``max_steps``
    Newton steps, stopping once the gradient's largest entry is below ``tol``.

    Raises:
        ValueError: ``logits`` is not a non-empty finite 2-D array, ``labels`` do not match it or
            lie outside ``[0, C)``, or ``prior_std`` is not a positive finite number.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"logits must be a non-empty (samples, classes) array, got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    n, c = z.shape
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be {n} integers, got shape {y.shape} of {y.dtype}")
    if y.min() < 0 or y.max() >= c:
        raise ValueError(f"labels must lie in [0, {c}), got {int(y.min())}..{int(y.max())}")
    if not (np.isfinite(prior_std) and prior_std > 0):
        raise ValueError(f"prior_std must be a positive finite number, got {prior_std}")
    ridge = 1.0 / (float(prior_std) ** 2 * n)
    onehot = np.zeros((n, c))
    onehot[np.arange(n), y] = 1.0
    target = onehot.mean(axis=0)
    delta = np.zeros(c)
    value, p = _value_and_probs(z, onehot, delta, ridge)
    for _ in range(max_steps):
        grad = p.mean(axis=0) - target + ridge * delta
        if np.abs(grad).max() < tol:
            break
        hessian = np.diag(p.mean(axis=0)) - p.T @ p / n + ridge * np.eye(c)
        step = np.linalg.solve(hessian, grad)
        t = 1.0
        while True:   # backtracking (Armijo); the objective is convex and smooth, so it ends
            candidate = delta - t * step
            new_value, new_p = _value_and_probs(z, onehot, candidate, ridge)
            if new_value <= value - 1e-4 * t * float(grad @ step) or t < 1e-8:
                break
            t *= 0.5
        if new_value > value:   # no descent left at float64 precision
            break
        delta, value, p = candidate, new_value, new_p
    return delta


UNIFORM_TEST_DRAWS = 4000
UNIFORM_TEST_SEED = 12345
_UNIFORM_TEST_CHUNK = 500


def uniform_labels_p_value(labels: np.ndarray, classes: int, draws: int = UNIFORM_TEST_DRAWS) -> float:
    """The p-value of Pearson's chi-square test that ``labels`` (N,) were drawn uniformly over
    ``classes`` classes (``training.leaf_bias_fit_skewed``), by Monte Carlo: ``draws`` label counts drawn
    from that uniform multinomial with a fixed seed (the same counts always give the same p), and
    ``p = (1 + #{draws at least as far from uniform}) / (draws + 1)``. A client of 20 images
    expects two per class, too few for the chi-square distribution's tail, hence the draws. The
    statistic is compared through the sum of squared counts (Pearson's statistic is
    ``classes / N * sum(counts^2) - N``), in integers, so that ties are exact.

    Raises:
        ValueError: ``labels`` is not a non-empty 1-D integer array within ``[0, classes)``,
            ``classes`` < 2 or ``draws`` < 1.
    """
    y = np.asarray(labels)
    if classes < 2:
        raise ValueError(f"classes must be at least 2, got {classes}")
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    if y.ndim != 1 or y.shape[0] == 0 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D integer array, got shape {y.shape} of {y.dtype}")
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"labels must lie in [0, {classes}), got {int(y.min())}..{int(y.max())}")
    observed = int((np.bincount(y, minlength=classes).astype(np.int64) ** 2).sum())
    return _uniform_p_value(int(y.shape[0]), int(classes), observed, int(draws))


@functools.lru_cache(maxsize=1024)
def _uniform_p_value(n: int, classes: int, observed: int, draws: int) -> float:
    """``uniform_labels_p_value`` of ``n`` labels whose counts' squares sum to ``observed``: all the
    Monte Carlo p-value depends on, so a client's leaf task that asks twice (its bias fit's width,
    its leaf's mix) and its later leaf rounds draw once (6 ms at 10 classes, 0.3 s at 1,000)."""
    rng = np.random.default_rng(UNIFORM_TEST_SEED)
    uniform = np.full(classes, 1.0 / classes)
    as_far = 0
    for start in range(0, draws, _UNIFORM_TEST_CHUNK):
        counts = rng.multinomial(n, uniform, size=min(_UNIFORM_TEST_CHUNK, draws - start)).astype(np.int64)
        as_far += int(((counts ** 2).sum(axis=1) >= observed).sum())
    return (1 + as_far) / (draws + 1)


UNIFORM_LABELS_ALPHA = 0.05


def labels_look_uniform(labels: np.ndarray, classes: int, alpha: float = UNIFORM_LABELS_ALPHA) -> bool:
    """Whether the chi-square test (``uniform_labels_p_value``) does not reject ``labels`` as uniform
    over the ``classes`` at level ``alpha``: the one decision both ``leaf_prior_width`` and
    ``leaf_mix_for`` take.

    Raises:
        ValueError: ``labels`` refused by ``uniform_labels_p_value``.
    """
    return uniform_labels_p_value(labels, classes) >= alpha


def leaf_prior_width(labels: np.ndarray, classes: int, width: float, skewed_width: float,
                     alpha: float = UNIFORM_LABELS_ALPHA) -> float:
    """The prior's standard deviation of a client's bias fit (``fit_logit_shift``):
    ``skewed_width`` (``training.leaf_bias_fit_skewed``) when it is > 0 and the chi-square test
    rejects the client's ``labels`` as uniform over the ``classes`` at level ``alpha``
    (``uniform_labels_p_value``), else ``width`` (``training.leaf_bias_fit``). A client with a label
    mix of its own (Dir(0.3): one to three classes) gains from following it closely, and the model
    it fits under was trained on those very images, so its predictions already lean towards them
    and a narrow prior under-corrects; on a client whose labels look uniform a wide prior only
    fits their sampling noise.

    Raises:
        ValueError: a width is negative or not finite, or ``labels`` are refused by
            ``uniform_labels_p_value``.
    """
    for name, value in (("width", width), ("skewed_width", skewed_width)):
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a non-negative finite number, got {value}")
    if skewed_width == 0:
        return float(width)
    return float(width) if labels_look_uniform(labels, classes, alpha) else float(skewed_width)


def leaf_mix_for(labels: np.ndarray, classes: int, mix: float, alpha: float = UNIFORM_LABELS_ALPHA) -> float:
    """The share of its leaf's change a client's model takes (``training.leaf_mix``;
    ``shared.merge.served_leaf``): ``mix`` for a client whose ``labels`` the chi-square test does
    not reject as uniform over the ``classes`` at level ``alpha`` (``uniform_labels_p_value``), 1
    (the leaf as trained) for one with a label mix of its own. A client whose labels look uniform
    has nothing of its own for the leaf to learn beyond what its cluster pooled, and its leaf's
    head fits the noise of its few images; a skewed client's leaf learns its label mix, which the
    shared tiers cannot know.

    Raises:
        ValueError: ``mix`` outside (0, 1], or ``labels`` refused by ``uniform_labels_p_value``.
    """
    if not (np.isfinite(mix) and 0 < mix <= 1):
        raise ValueError(f"mix must be in (0, 1], got {mix}")
    if mix == 1:
        return 1.0
    return float(mix) if labels_look_uniform(labels, classes, alpha) else 1.0
