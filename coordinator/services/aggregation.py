"""Aggregation of a finished root or cluster round into a new adapter version.

A pure function of the accepted uploads: they are sorted by client id and combined in float64
(``shared.aggregate``), so the same uploads always produce the same bytes.

Aggregation cannot fail on accepted input. Uploads are bounded at the door (``TierPolicy.
max_abs_value``); should a combination still leave the float32 range the adapters are stored in
(or the math fail on it), the upload with the largest magnitude is quarantined (its task keeps
'done' but gets ``quarantined_at`` and the reason in ``error``; an audit event 'quarantine' names
the client) and the round is combined again without it. When fewer than the round's quorum remain, the round fails with that reason and
a fresh round opens, as for any failed round."""

from __future__ import annotations

import logging
import time
from datetime import datetime

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.blobs import BlobStore
from coordinator.faults import fault_point
from coordinator.models import AdapterVersion, Round, Task
from coordinator.services.adapters import load_version, write_version
from coordinator.services.admin_actions import audit
from coordinator.services.client_features import update_root_b_emas
from shared.aggregate import combine_tier_uploads, relative_change
from shared.config import FederationConfig
from shared.probes import factor_pairs
from shared.robust import cap_weights, clip_uploads
from shared.schemas import TaskStatus
from shared.tensors import TensorValidationError, magnitude

log = logging.getLogger(__name__)


FLOAT32_MAX = float(np.finfo(np.float32).max)


class Unrepresentable(ArithmeticError):
    """The combined adapter does not fit float32 (or the math on the uploads failed)."""


def _max_abs(tensors: dict[str, np.ndarray]) -> float:
    """Largest magnitude of an upload's values (inf for a non-finite one); read tensor by tensor."""
    return max((magnitude(array) for array in tensors.values()), default=0.0)


def _check_representable(tensors: dict[str, np.ndarray]) -> None:
    for name, array in tensors.items():
        if magnitude(array) > FLOAT32_MAX:  # inf for NaN or infinite values
            raise Unrepresentable(f"the combined {name!r} leaves the float32 range")


def aggregate_round(session: Session, blobs: BlobStore, cfg: FederationConfig, rnd: Round,
                    now: datetime) -> AdapterVersion | None:
    """Aggregate the done tasks of a root or cluster round into version n+1 of its adapter and
    record rho on the round. MUST NOT be called with no done task.

    Returns None (and sets ``rnd.failure``) when quarantining uploads the round could not be
    combined with left fewer done tasks than its quorum: the caller fails the round."""
    tasks = list(session.scalars(
        select(Task).where(Task.round_id == rnd.id, Task.status == TaskStatus.done.value,
                           Task.quarantined_at.is_(None))
        .order_by(Task.client_id)
    ))
    if not tasks:
        raise ValueError(f"round {rnd.id} has no accepted upload to aggregate")
    need = rnd.quorum if rnd.quorum is not None else 1
    quarantined: list[str] = []
    while len(tasks) >= need:
        try:
            return _aggregate(session, blobs, cfg, rnd, tasks, now)
        except (Unrepresentable, FloatingPointError, np.linalg.LinAlgError, TensorValidationError) as exc:
            culprit = _quarantine(session, blobs, cfg, rnd, tasks, str(exc), now)
            tasks = [t for t in tasks if t.id != culprit.id]
            quarantined.append(f"client {culprit.client_id}")
    rnd.failure = (f"{len(quarantined)} upload(s) quarantined ({', '.join(quarantined)}): their round could not "
                   f"be combined into float32 values; {len(tasks)} accepted remain, the quorum is {need}")
    return None


def _quarantine(session: Session, blobs: BlobStore, cfg: FederationConfig, rnd: Round, tasks: list[Task],
                why: str, now: datetime) -> Task:
    """Fail the done task whose upload has the largest magnitude, with the reason; name its client."""
    tier = "root" if rnd.stage == "root" else "cluster"
    factors = cfg.tier_policy(tier).uploaded_factors()
    magnitudes = [_max_abs(blobs.map_tensors(t.upload_sha256, strict=False)) if factors else 0.0 for t in tasks]
    culprit = tasks[int(np.argmax(magnitudes))]
    error = (f"quarantined at aggregation: the round could not be combined ({why}); this upload's largest "
             f"magnitude {max(magnitudes):.3g} is the round's largest")
    culprit.quarantined_at = now
    culprit.error = error[:2000]
    session.flush()
    audit(session, now, "quarantine", rnd.federation_id, f"client:{culprit.client_id}",
          {"round_id": rnd.id, "task_id": culprit.id, "stage": str(rnd.stage), "max_abs": max(magnitudes),
           "reason": why[:500]}, actor="scheduler")
    log.warning("round %s: quarantined the upload of client %s (task %s): %s", rnd.id, culprit.client_id,
                culprit.id, why)
    return culprit


def _aggregate(session: Session, blobs: BlobStore, cfg: FederationConfig, rnd: Round, tasks: list[Task],
               now: datetime) -> AdapterVersion:
    start = time.perf_counter()
    tier = "root" if rnd.stage == "root" else "cluster"
    prev_id = rnd.input_root_version_id if tier == "root" else rnd.input_cluster_version_id
    previous_row = session.get(AdapterVersion, prev_id)
    previous = load_version(blobs, previous_row)
    policy = cfg.tier_policy(tier)
    factors = policy.uploaded_factors()
    # memory-mapped and read target by target by the math below, so the round's uploads are never
    # all copied into this process at once; strict=False: each was checked strictly when accepted
    uploads = [blobs.map_tensors(t.upload_sha256, strict=False) if factors else {} for t in tasks]
    raw_uploads = uploads
    reported = [float(max(t.num_samples or 0, 1)) for t in tasks]
    weights, _ = cap_weights(reported, policy.max_weight_ratio)  # no client's claim dominates
    rnd.aggregation_weights = [{"client_id": t.client_id, "reported": r, "weight": w}
                               for t, r, w in zip(tasks, reported, weights)]
    uploads, clip = clip_uploads(cfg.manifest, tier, policy, previous, uploads)  # policy.clip_norm
    if clip is not None:
        rnd.clipped_clients = clip.clipped
        rnd.update_norms = [{"client_id": t.client_id, "norm": n, "scale": s}
                            for t, n, s in zip(tasks, clip.norms, clip.scales)]
    with np.errstate(over="ignore", invalid="ignore"):  # checked right below, with the culprit found
        new = combine_tier_uploads(cfg.manifest, tier, policy, previous, uploads, weights)
    _check_representable(new)  # before any side effect: a quarantine retries this function
    if tier == "root" and cfg.clustering.algorithm == "lsac-paper" and cfg.cluster.enabled:
        # lsac-paper's features: each client's EMA of its unit-norm B, from the raw (unclipped) upload
        update_root_b_emas(session, blobs, cfg.manifest, cfg.clustering.ema, rnd.federation_id, tasks, raw_uploads,
                           now)
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
