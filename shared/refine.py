"""Refinement after clustering: reassign clients by the loss of each cluster adapter on their own
training data (docs/method.md, "Refinement"). Pure: numpy in, numpy out.

Each client reports its mean training loss with the root alone and with root + each candidate
cluster adapter. The rule, per client with current cluster ``c`` (or none: unassigned), and one
margin ``m`` for every change (noise must not shuffle clients between equally good models):

- ``b`` is the candidate with the lowest loss (a tie goes to the current cluster, then to the
  lower index);
- in a cluster: it moves to ``b`` only when ``loss[b] < (1 - m) * loss[c]``; then, in whichever
  cluster ``x`` that leaves it, it fits no cluster (unassigned, -1: served root + its own leaf)
  when the root is clearly better: ``root_loss < (1 - m) * loss[x]``;
- unassigned: it joins ``b`` only when ``loss[b] < (1 - m) * root_loss``.
"""

from __future__ import annotations

import numpy as np

UNASSIGNED = -1


def reassign(losses: np.ndarray, root_loss: np.ndarray, current: np.ndarray, margin: float) -> np.ndarray:
    """New cluster indices (n,), -1 for unassigned.

    ``losses`` (n, K): client i's loss with root + candidate k; ``root_loss`` (n,): with the root
    alone; ``current`` (n,): each client's candidate index now, -1 when it has none (unassigned, or
    in a cluster that is not a candidate). Every loss must be finite and >= 0; 0 <= margin < 1."""
    losses = np.asarray(losses, dtype=np.float64)
    root_loss = np.asarray(root_loss, dtype=np.float64).reshape(-1)
    current = np.asarray(current, dtype=np.int64).reshape(-1)
    if losses.ndim != 2 or losses.shape[0] != root_loss.shape[0] or current.shape[0] != root_loss.shape[0]:
        raise ValueError(f"losses {losses.shape}, root_loss {root_loss.shape} and current {current.shape} "
                         f"must describe the same clients")
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    if not (np.isfinite(losses).all() and np.isfinite(root_loss).all()) or (losses < 0).any() or (root_loss < 0).any():
        raise ValueError("losses must be finite and non-negative")
    n, k = losses.shape
    if ((current < -1) | (current >= k)).any():
        raise ValueError(f"current indices must be in [-1, {k})")
    out = np.full(n, UNASSIGNED, dtype=np.int64)
    if k == 0:
        return out
    keep = 1.0 - margin
    for i in range(n):
        row, cur, root = losses[i], int(current[i]), root_loss[i]
        best = int(np.argmin(row))
        if cur >= 0 and row[cur] <= row[best]:
            best = cur  # a tie keeps the client where it is
        if cur < 0:
            out[i] = best if row[best] < keep * root else UNASSIGNED
            continue
        stay = best if row[best] < keep * row[cur] else cur
        out[i] = UNASSIGNED if root < keep * row[stay] else stay
    return out
