"""Adapter versions: creation of version 0 in numpy, immutable versions as blobs, loading; and
``ensure_blob_row``, the one way a blob's row is recorded."""

from __future__ import annotations

import functools
import hashlib
from datetime import datetime

import numpy as np
from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from coordinator.blobs import BlobStore
from coordinator.errors import Invalid
from coordinator.models import AdapterVersion, Blob, Cluster
from shared.manifest import AdapterManifest
from shared.tensors import pack_tensors, unpack_tensors

Tensors = dict[str, np.ndarray]


def ensure_blob_row(session: Session, sha256: str, size: int, kind: str, now: datetime) -> None:
    """Record a blob (its file already in the store) unless its row exists. Race-safe: two
    transactions recording the same bytes at once (two uploads of one body; an adapter version
    equal to an upload) both succeed, where a SELECT-then-INSERT lets the second one fail with a
    unique violation (under load on Postgres it did: a 500). On PostgreSQL and SQLite one
    INSERT .. ON CONFLICT DO NOTHING; elsewhere an INSERT in a savepoint whose unique violation is
    ignored. The first row wins: its kind stays."""
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        session.connection().execute(_insert_blob_statement(dialect),
                                     {"blob_sha": sha256, "blob_size": size, "blob_kind": kind, "blob_at": now})
        return
    if session.get(Blob, sha256) is not None:
        return
    try:
        with session.begin_nested():
            session.add(Blob(sha256=sha256, size=size, kind=kind, created_at=now))
    except IntegrityError:
        pass  # recorded concurrently by another transaction


@functools.cache
def _insert_blob_statement(dialect: str):  # noqa: ANN202
    """INSERT .. ON CONFLICT DO NOTHING of a blob row, built once per dialect (every upload runs it)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return (insert(Blob.__table__)
            .values(sha256=bindparam("blob_sha"), size=bindparam("blob_size"), kind=bindparam("blob_kind"),
                    created_at=bindparam("blob_at"))
            .on_conflict_do_nothing(index_elements=[Blob.__table__.c.sha256]))


def _seed_for(*parts: object) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def initial_tier_tensors(manifest: AdapterManifest, tier: str, head: Tensors, seed_parts: tuple) -> Tensors:
    """Version 0 of a tier: A uniform in +-1/sqrt(in) (kaiming-uniform with a = sqrt(5), as
    ``nn.Linear``), B zero (so the tier starts as the identity update), head copied from ``head``."""
    rng = np.random.default_rng(_seed_for(*seed_parts))
    out: Tensors = {}
    for name, shape in manifest.factor_shapes(tier, "A").items():
        bound = 1.0 / np.sqrt(shape[1])
        out[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    for name, shape in manifest.factor_shapes(tier, "B").items():
        out[name] = np.zeros(shape, dtype=np.float32)
    for name, shape in manifest.factor_shapes(tier, "head").items():
        value = np.asarray(head[name], dtype=np.float32)
        if value.shape != shape:
            raise Invalid(f"head tensor {name} has shape {value.shape}, manifest expects {shape}")
        out[name] = value.copy()
    return out


def backbone_head(manifest: AdapterManifest, backbone: bytes) -> Tensors:
    """The backbone checkpoint's classifier head when its shape fits the manifest, else zeros."""
    try:
        tensors = unpack_tensors(backbone)
    except ValueError as exc:
        raise Invalid(f"the backbone blob is not a readable safetensors checkpoint: {exc}") from exc
    shapes = manifest.factor_shapes("root", "head")
    head: Tensors = {}
    for name, shape in shapes.items():
        value = tensors.get(name)
        head[name] = (np.asarray(value, dtype=np.float32) if value is not None and value.shape == shape
                      else np.zeros(shape, dtype=np.float32))
    return head


def write_version(session: Session, blobs: BlobStore, *, federation_id: int, tier: str, scope: str,
                  cluster_id: int | None, version: int, tensors: Tensors, now: datetime) -> AdapterVersion:
    data = pack_tensors(tensors)
    sha = blobs.put_bytes(data)
    ensure_blob_row(session, sha, len(data), "adapter", now)
    row = AdapterVersion(federation_id=federation_id, tier=tier, scope=scope, cluster_id=cluster_id,
                         version=version, blob_sha256=sha, created_at=now)
    session.add(row)
    session.flush()
    return row


def latest_version(session: Session, federation_id: int, scope: str) -> AdapterVersion | None:
    return session.scalars(
        select(AdapterVersion)
        .where(AdapterVersion.federation_id == federation_id, AdapterVersion.scope == scope)
        .order_by(AdapterVersion.version.desc())
        .limit(1)
    ).first()


def serving_version(session: Session, cluster: Cluster) -> AdapterVersion | None:
    """The version a cluster serves: an admin's pin (or rollback) when set, else its newest. Its
    cluster rounds train on from the newest all the same; what clients use (leaf and evaluation
    rounds, onboarding, their adapters, exports, refinement candidates) is this one."""
    if cluster.pinned_version_id is not None:
        pinned = session.get(AdapterVersion, cluster.pinned_version_id)
        if pinned is not None:
            return pinned
    return latest_version(session, cluster.federation_id, f"cluster:{cluster.id}")


def load_version(blobs: BlobStore, version: AdapterVersion) -> Tensors:
    return unpack_tensors(blobs.get_bytes(version.blob_sha256))


def head_of(tensors: Tensors) -> Tensors:
    return {k: v for k, v in tensors.items() if k.startswith("head.")}
