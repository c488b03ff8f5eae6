"""Aggregation of a finished root or cluster round into a new adapter version.

A pure function of the accepted uploads: they are sorted by client id and combined in float64
(``shared.aggregate``), so the same uploads always produce the same bytes."""

from __future__ import annotations

import time
from datetime import datetime

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.blobs import BlobStore
from coordinator.faults import fault_point
from coordinator.models import AdapterVersion, Round, Task
from coordinator.services.adapters import load_version, write_version
from coordinator.services.client_features import update_root_b_emas
from shared.aggregate import combine_tier_uploads, relative_change
from shared.config import FederationConfig
from shared.probes import factor_pairs
from shared.robust import cap_weights, clip_uploads
from shared.schemas import TaskStatus


def aggregate_round(session: Session, blobs: BlobStore, cfg: FederationConfig, rnd: Round,
                    now: datetime) -> AdapterVersion:
    """Aggregate the done tasks of a root or cluster round into version n+1 of its adapter and
    record rho on the round. MUST NOT be called with no done task."""
    start = time.perf_counter()
    tier = "root" if rnd.stage == "root" else "cluster"
    prev_id = rnd.input_root_version_id if tier == "root" else rnd.input_cluster_version_id
    previous_row = session.get(AdapterVersion, prev_id)
    previous = load_version(blobs, previous_row)
    tasks = list(session.scalars(
        select(Task).where(Task.round_id == rnd.id, Task.status == TaskStatus.done.value)
        .order_by(Task.client_id)
    ))
    if not tasks:
        raise ValueError(f"round {rnd.id} has no accepted upload to aggregate")
    policy = cfg.tier_policy(tier)
    factors = policy.uploaded_factors()
    # memory-mapped and read target by target by the math below, so the round's uploads are never
    # all copied into this process at once; strict=False: each was checked strictly when accepted
    uploads = [blobs.map_tensors(t.upload_sha256, strict=False) if factors else {} for t in tasks]
    if tier == "root" and cfg.clustering.algorithm == "lsac-paper" and cfg.cluster.enabled:
        # lsac-paper's features: each client's EMA of its unit-norm B, from the raw (unclipped) upload
        update_root_b_emas(session, blobs, cfg.manifest, cfg.clustering.ema, rnd.federation_id, tasks, uploads, now)
    reported = [float(max(t.num_samples or 0, 1)) for t in tasks]
    weights, _ = cap_weights(reported, policy.max_weight_ratio)  # no client's claim dominates
    rnd.aggregation_weights = [{"client_id": t.client_id, "reported": r, "weight": w}
                               for t, r, w in zip(tasks, reported, weights)]
    uploads, clip = clip_uploads(cfg.manifest, tier, policy, previous, uploads)  # policy.clip_norm
    if clip is not None:
        rnd.clipped_clients = clip.clipped
        rnd.update_norms = [{"client_id": t.client_id, "norm": n, "scale": s}
                            for t, n, s in zip(tasks, clip.norms, clip.scales)]
    new = combine_tier_uploads(cfg.manifest, tier, policy, previous, uploads, weights)
    old_pairs = factor_pairs(cfg.manifest, previous)
    # rho is undefined against a zero update (version 0 has B = 0): record None, not 1/eps
    starts_at_zero = all(not np.any(b) or not np.any(a) for b, a in old_pairs.values())
    rnd.rho = None if starts_at_zero else relative_change(factor_pairs(cfg.manifest, new), old_pairs)
    rnd.aggregation_seconds = time.perf_counter() - start  # reading the uploads, the math, the rho
    version = write_version(session, blobs, federation_id=rnd.federation_id, tier=tier,
                            scope=previous_row.scope, cluster_id=previous_row.cluster_id,
                            version=previous_row.version + 1, tensors=new, now=now)
    fault_point("during_aggregation")
    return version
