"""Refinement's reassignment rule (shared.refine.reassign) against a slow reference written from the
rule's wording, on planted cases and on random loss matrices with ties."""

from __future__ import annotations

import numpy as np
import pytest

from shared.refine import UNASSIGNED, reassign

pytestmark = pytest.mark.unit


def reference(losses, root_loss, current, margin) -> list[int]:
    """The rule in words, one client at a time, with plain Python lists."""
    out = []
    for row, root, cur in zip(losses.tolist(), root_loss.tolist(), current.tolist()):
        if not row:
            out.append(-1)
            continue
        lowest = min(row)
        # ties: the current cluster first, then the lower index
        best = cur if cur >= 0 and row[cur] == lowest else row.index(lowest)
        clearly = lambda new, old: new < (1 - margin) * old  # noqa: E731
        if cur < 0:                                   # unassigned: join only a clearly better cluster
            out.append(best if clearly(lowest, root) else -1)
            continue
        where = best if clearly(lowest, row[cur]) else cur
        out.append(-1 if clearly(root, row[where]) else where)   # the root clearly better: fits none
    return out


def test_planted_cases():
    losses = np.array([
        [1.0, 0.5],    # in 0, clearly better in 1: moves
        [1.0, 0.97],   # in 0, 3 % better in 1: stays (margin 5 %)
        [0.9, 0.8],    # root 0.85: moves to 1 (clearly better than 0); the root is not clearly better than 1
        [2.0, 2.5],    # in 1, root 1.0: moves to 0, and the root is clearly better than 0: unassigned
        [0.5, 0.9],    # unassigned, 0 clearly beats the root 1.0: joins 0
        [0.97, 0.99],  # unassigned, within the margin of the root 1.0: stays unassigned
        [0.7, 0.7],    # in 1, tie: stays in 1
        [1.02, 1.5],   # in 0, the root 1.0 is better but within the margin: stays in 0
    ])
    root = np.array([2.0, 2.0, 0.85, 1.0, 1.0, 1.0, 2.0, 1.0])
    current = np.array([0, 0, 0, 1, -1, -1, 1, 0])
    got = reassign(losses, root, current, margin=0.05)
    assert got.tolist() == [1, 0, 1, UNASSIGNED, 0, UNASSIGNED, 1, 0]
    assert got.tolist() == reference(losses, root, current, 0.05)


def test_margin_zero_takes_the_strictly_best_cluster():
    losses = np.array([[1.0, 0.999, 1.2]])
    assert reassign(losses, np.array([5.0]), np.array([0]), margin=0.0).tolist() == [1]


@pytest.mark.parametrize("seed", range(20))
def test_matches_the_reference_on_random_losses_with_ties(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 30)), int(rng.integers(1, 6))
    losses = rng.choice([0.2, 0.5, 0.51, 0.9, 1.0, 1.5], size=(n, k))  # a few values: many ties
    root = rng.choice([0.3, 0.5, 0.95, 1.0, 2.0], size=n)
    current = rng.integers(-1, k, size=n)
    margin = float(rng.choice([0.0, 0.05, 0.5]))
    got = reassign(losses, root, current, margin)
    assert got.tolist() == reference(losses, root, current, margin)
    assert ((got >= -1) & (got < k)).all()
    chosen = got >= 0   # no client is kept in a cluster the root clearly beats
    assert (root[chosen] >= (1 - margin) * losses[np.arange(n)[chosen], got[chosen]]).all()


def test_no_candidate_leaves_everyone_unassigned():
    assert reassign(np.zeros((3, 0)), np.ones(3), np.full(3, -1), 0.05).tolist() == [-1, -1, -1]


@pytest.mark.parametrize("losses, root, current, margin, message", [
    (np.ones((2, 2)), np.ones(3), np.zeros(2), 0.05, "same clients"),
    (np.ones((2, 2)), np.ones(2), np.zeros(2), 1.0, "margin"),
    (np.array([[np.nan, 1.0]]), np.ones(1), np.zeros(1), 0.05, "finite"),
    (np.array([[-1.0, 1.0]]), np.ones(1), np.zeros(1), 0.05, "non-negative"),
    (np.ones((1, 2)), np.ones(1), np.array([2]), 0.05, "current indices"),
])
def test_bad_input_is_refused(losses, root, current, margin, message):
    with pytest.raises(ValueError, match=message):
        reassign(losses, root, current, margin)
