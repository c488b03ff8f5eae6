"""Per-client clustering features kept between rounds (table ``client_features``).

Today one kind: ``root_b_ema``, the input of ``clustering.algorithm = 'lsac-paper'`` (docs/method.md,
"Clustering algorithms"). Each root round of such a federation, every client whose upload the
round aggregates moves its EMA: ``ema = lambda * ema + (1 - lambda) * B / ||B||_F`` per target
(``lambda = clustering.ema``; its first upload sets it), from the raw upload (before any clipping).
The EMA is a float32 safetensors blob (kind ``client_feature``) named by target; a new blob replaces
the row's old one, which garbage collection then frees (coordinator/services/retention.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.blobs import BlobStore
from coordinator.models import ClientFeature, Task
from coordinator.services.adapters import ensure_blob_row
from shared.manifest import AdapterManifest
from shared.subspace import top_left_singular_vectors
from shared.tensors import pack_tensors, unpack_tensors

ROOT_B_EMA = "root_b_ema"
BLOB_KIND = "client_feature"

Bases = dict[str, np.ndarray]


def normalised_b(manifest: AdapterManifest, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per target, the tier's ``<target>.lora_B`` of ``tensors`` scaled to unit Frobenius norm
    (float64; a zero B stays zero)."""
    out = {}
    for t in manifest.targets:
        b = np.asarray(tensors[f"{t.name}.lora_B"], dtype=np.float64)
        norm = float(np.linalg.norm(b))
        out[t.name] = b / norm if norm > 0 else b
    return out


def subspace_bases_of(manifest: AdapterManifest, b_by_target: Mapping[str, np.ndarray]) -> Bases:
    """Per target, the top-r left singular vectors (r = the root tier's rank) of a B-like matrix."""
    r = manifest.tiers["root"].rank
    return {k: top_left_singular_vectors(np.asarray(v, dtype=np.float64), r) for k, v in b_by_target.items()}


def _rows(session: Session, client_ids: Sequence[int], kind: str) -> dict[int, ClientFeature]:
    if not client_ids:
        return {}
    return {row.client_id: row for row in session.scalars(
        select(ClientFeature).where(ClientFeature.client_id.in_(list(client_ids)), ClientFeature.kind == kind))}


def update_root_b_emas(session: Session, blobs: BlobStore, manifest: AdapterManifest, lam: float,
                       federation_id: int, tasks: Sequence[Task], uploads: Sequence[Mapping[str, np.ndarray]],
                       now: datetime) -> int:
    """Move the root-B EMA of the client of each ``tasks[i]`` by its upload ``uploads[i]`` (the raw
    upload of a root round being aggregated). Returns how many rows were written."""
    existing = _rows(session, [t.client_id for t in tasks], ROOT_B_EMA)
    written = 0
    for task, upload in zip(tasks, uploads):
        if not all(f"{t.name}.lora_B" in upload for t in manifest.targets):
            continue  # B not uploaded (config validation requires root.B aggregated for lsac-paper)
        b = normalised_b(manifest, upload)
        row = existing.get(task.client_id)
        if row is None:
            ema, rounds = b, 1
        else:
            previous = unpack_tensors(blobs.get_bytes(row.blob_sha256))
            ema = {k: lam * np.asarray(previous[k], dtype=np.float64) + (1.0 - lam) * v for k, v in b.items()}
            rounds = row.rounds + 1
        data = pack_tensors(ema, metadata={"kind": ROOT_B_EMA, "client_id": str(task.client_id),
                                           "rounds": str(rounds), "ema": repr(lam)})
        sha = blobs.put_bytes(data)
        ensure_blob_row(session, sha, len(data), BLOB_KIND, now)
        if row is None:
            session.add(ClientFeature(federation_id=federation_id, client_id=task.client_id, kind=ROOT_B_EMA,
                                      blob_sha256=sha, rounds=rounds, updated_at=now))
        else:
            row.blob_sha256, row.rounds, row.updated_at = sha, rounds, now
        written += 1
    session.flush()
    return written


def load_root_b_emas(session: Session, blobs: BlobStore, client_ids: Sequence[int]) -> dict[int, dict[str, np.ndarray]]:
    """client id -> its root-B EMA (target -> float64 matrix), for the clients that have one."""
    return {cid: {k: np.asarray(v, dtype=np.float64) for k, v in unpack_tensors(blobs.get_bytes(row.blob_sha256)).items()}
            for cid, row in _rows(session, client_ids, ROOT_B_EMA).items()}
