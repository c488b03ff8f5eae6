"""Client sampling for partial participation (``Schedule.clients_per_round``), as pure functions.

A root or cluster round trains a drawn subset of its eligible clients: ``k = ceil(fraction * n)``
clamped to ``[min, max]`` and to ``n``, drawn without replacement by a seed derived from the
federation's training seed and the round's identity (stage, scope, number) and recorded on the
round, so anyone can redraw a round's set from the round's record: the eligible client ids in
ascending order, the seed and ``k`` (``draw``). Cluster rounds are per cluster (their scope), so
the draw is stratified by cluster: each cluster trains its own share of members.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

MAX_SEED = 2**32 - 1


def round_seed(training_seed: int, stage: str, scope: str, number: int) -> int:
    """The seed of one round's draw: a hash of the federation's training seed and the round's identity."""
    digest = hashlib.sha256(f"{int(training_seed)}|{stage}|{scope}|{int(number)}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def sample_size(n: int, fraction: float, minimum: int, maximum: int | None) -> int:
    """How many of ``n`` eligible clients a round draws."""
    if n <= 0:
        return 0
    k = math.ceil(fraction * n - 1e-9)
    if maximum is not None:
        k = min(k, maximum)
    return max(1, min(n, max(k, minimum)))


def draw(eligible: Sequence[int], k: int, seed: int) -> list[int]:
    """``k`` of the ``eligible`` client ids (taken in ascending order), drawn without replacement by
    ``seed``; returned ascending. All of them when ``k >= len(eligible)``."""
    ids = sorted(int(i) for i in eligible)
    if k >= len(ids):
        return ids
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"a sampling seed is in [0, {MAX_SEED}], not {seed}")
    picked = np.random.default_rng(seed).choice(len(ids), size=k, replace=False)
    return sorted(ids[int(i)] for i in picked)
