"""Lifecycle of data: retention of uploads, garbage collection of blobs, deletion of clients.

What is kept, always: every adapter version (the federation's history; clients and exports refer
to them by id), every backbone, clustering affinities, each client's current clustering features
(table client_features: lsac-paper's root-B EMA), and the uploads of open rounds. What goes:

- uploads of rounds closed more than ``upload_retention_seconds`` ago, except the probe uploads
  of the newest done probe round of each scope (a clustering rerun needs them);
- blob rows of kind upload or client_feature that nothing refers to any more (a client's
  superseded EMA, a deleted client's features), and their files;
- files in the blob store with no row (left by a crash between writing a blob and committing its
  row), and temp files, once older than ``grace_seconds`` (an upload in flight is younger).

Rows are deleted in one transaction; files are unlinked after it commits, so a crash in between
leaves only orphan files, which the next collection removes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, union, update
from sqlalchemy.orm import Session

from coordinator.blobs import BlobStore
from coordinator.errors import Conflict, NotFound
from coordinator.models import (
    AdapterVersion,
    Assignment,
    Blob,
    Client,
    ClientFeature,
    Cluster,
    ClusteringRun,
    Federation,
    Invitation,
    Round,
    Task,
)
from shared.states import Machine, RoundStatus, Stage, terminal

COLLECTABLE_KINDS = ("upload", "client_feature")


@dataclass
class GcReport:
    uploads_released: int = 0
    blobs_deleted: int = 0
    bytes_freed: int = 0
    orphan_files_deleted: int = 0
    temp_files_deleted: int = 0
    dry_run: bool = False
    deleted_sha256: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = dict(self.__dict__)
        out["deleted_sha256"] = len(self.deleted_sha256)
        return out


# Every column that refers to a blob: a blob is kept while one of them names it.
REFERENCES = (Task.upload_sha256, AdapterVersion.blob_sha256, Federation.backbone_sha256,
              ClusteringRun.affinity_sha256, ClientFeature.blob_sha256)


def _referenced():  # noqa: ANN202
    """Every sha256 some row still refers to."""
    return union(*(select(column).where(column.is_not(None)) for column in REFERENCES))


def _kept_probe_rounds(session: Session):  # noqa: ANN202
    """Ids of the newest done probe round of every (federation, scope)."""
    newest = (select(func.max(Round.id)).where(Round.stage == Stage.probe, Round.status == RoundStatus.done)
              .group_by(Round.federation_id, Round.scope))
    return set(session.scalars(newest))


def release_old_uploads(session: Session, now: datetime, retention_seconds: float) -> int:
    """Drop the reference from tasks of rounds closed before ``now - retention``. Returns the count."""
    cutoff = now - timedelta(seconds=retention_seconds)
    keep = _kept_probe_rounds(session)
    old_rounds = select(Round.id).where(Round.status.in_(terminal(Machine.round)), Round.closed_at < cutoff)
    if keep:
        old_rounds = old_rounds.where(Round.id.not_in(keep))
    return session.execute(
        update(Task).where(Task.round_id.in_(old_rounds), Task.upload_sha256.is_not(None))
        .values(upload_sha256=None)
    ).rowcount or 0


def delete_unreferenced_blobs(session: Session, limit: int = 10_000) -> list[tuple[str, int]]:
    """Delete rows of collectable blobs nothing refers to; return (sha256, size) of each."""
    rows = session.execute(
        select(Blob.sha256, Blob.size)
        .where(Blob.kind.in_(COLLECTABLE_KINDS), Blob.sha256.not_in(_referenced()))
        .order_by(Blob.sha256).limit(limit)
    ).all()
    if rows:
        session.execute(delete(Blob).where(Blob.sha256.in_([sha for sha, _ in rows])))
    return [(sha, size) for sha, size in rows]


def release_blob_if_unreferenced(session: Session, sha256: str) -> bool:
    """Delete the row of a collectable blob (an upload superseded by a newer body under the same
    lease) when no row refers to it any more. True: the caller unlinks its file once the
    transaction has committed (a crash in between leaves an orphan file for the next collection)."""
    for column in REFERENCES:
        if session.scalars(select(column).where(column == sha256).limit(1)).first() is not None:
            return False
    return (session.execute(delete(Blob).where(Blob.sha256 == sha256, Blob.kind.in_(COLLECTABLE_KINDS)))
            .rowcount or 0) == 1


def _sweep_files(blobs: BlobStore, known: set[str], grace_seconds: float, dry_run: bool) -> tuple[int, int]:
    """Remove blob files without a row and stale temp files, both older than the grace period."""
    cutoff = time.time() - grace_seconds
    orphans = temps = 0
    for entry in sorted(blobs.root.iterdir()):
        if not entry.is_dir():
            continue
        for path in entry.iterdir():
            try:
                old = path.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            if not old:
                continue
            if entry.name == "tmp":
                temps += 1
            elif path.name not in known:
                orphans += 1
            else:
                continue
            if not dry_run:
                path.unlink(missing_ok=True)
    return orphans, temps


def collect_garbage(session_factory, blobs: BlobStore, now: datetime, *,  # noqa: ANN001
                    retention_seconds: float | None, grace_seconds: float = 3600.0,
                    dry_run: bool = False, sweep_files: bool = True) -> GcReport:
    """Release old uploads, delete unreferenced upload blobs and, with ``sweep_files``, walk the
    store for orphan and stale temp files (the one step whose cost grows with the store)."""
    report = GcReport(dry_run=dry_run)
    with session_factory() as session:
        with session.begin():
            if retention_seconds is not None:
                report.uploads_released = release_old_uploads(session, now, retention_seconds)
            deleted = delete_unreferenced_blobs(session)
            report.blobs_deleted = len(deleted)
            report.bytes_freed = sum(size for _, size in deleted)
            report.deleted_sha256 = [sha for sha, _ in deleted]
            if dry_run:
                session.rollback()
        known = set(session.scalars(select(Blob.sha256)))
    if not dry_run:
        for sha in report.deleted_sha256:
            try:
                os.unlink(blobs.path(sha))
            except FileNotFoundError:
                pass
    if sweep_files:
        report.orphan_files_deleted, report.temp_files_deleted = _sweep_files(blobs, known, grace_seconds, dry_run)
    return report


def delete_client(session: Session, federation_id: int, client_id: int) -> dict:
    """Delete a client: its row, token, assignments, tasks (so its uploads and per-task metrics)
    and clustering features go; the adapter versions it contributed to stay. Open tasks of it disappear from their rounds,
    whose quorum is then judged on the remaining tasks. Returns what was removed."""
    client = session.get(Client, client_id)
    if client is None or client.federation_id != federation_id:
        raise NotFound(f"client {client_id} is not in federation {federation_id}", code="client_not_found")
    counts = dict(session.execute(
        select(Task.status, func.count()).where(Task.client_id == client_id).group_by(Task.status)).all())
    uploads = session.scalar(select(func.count()).select_from(Task).where(
        Task.client_id == client_id, Task.upload_sha256.is_not(None))) or 0
    session.execute(delete(Task).where(Task.client_id == client_id))
    session.execute(delete(ClientFeature).where(ClientFeature.client_id == client_id))
    session.delete(client)
    session.flush()
    return {"client_id": client_id, "name": client.name, "tasks_deleted": sum(counts.values()),
            "uploads_released": uploads}


def delete_federation(session: Session, federation_id: int, confirm: str | None) -> tuple[dict, list[str]]:
    """Delete a federation and everything it stored: clients (their tokens), rounds, tasks, uploads,
    adapter versions, clusters, clustering runs, assignments, invitations, clustering features; and
    the blobs only it referred to (its backbone too, unless another federation uses the same one).
    ``confirm`` must repeat the federation's name. Returns what went and the sha256 of the blobs
    whose rows went: the caller unlinks their files after commit (a crash in between leaves orphan
    files for the next collection). The audit events stay.

    MUST fail: 404 unknown federation; 409 ``confirmation_required`` when ``confirm`` is not its name."""
    fed = session.get(Federation, federation_id, with_for_update=True)
    if fed is None:
        raise NotFound(f"federation {federation_id} does not exist", code="federation_not_found")
    if confirm != fed.name:
        raise Conflict(f"deleting federation {federation_id} removes its clients, adapters and uploads for good: "
                       f"confirm with its name ({fed.name!r})", code="confirmation_required")
    mine = {fed.backbone_sha256}
    for column, owner in ((AdapterVersion.blob_sha256, AdapterVersion.federation_id),
                          (Task.upload_sha256, Task.federation_id),
                          (ClusteringRun.affinity_sha256, ClusteringRun.federation_id),
                          (ClientFeature.blob_sha256, ClientFeature.federation_id)):
        mine.update(sha for sha in session.scalars(select(column).where(owner == federation_id)) if sha)
    clients = select(Client.id).where(Client.federation_id == federation_id)
    counts = {
        "clients": session.scalar(select(func.count()).select_from(Client).where(Client.federation_id == federation_id)),
        "rounds": session.scalar(select(func.count()).select_from(Round).where(Round.federation_id == federation_id)),
        "adapter_versions": session.scalar(select(func.count()).select_from(AdapterVersion).where(
            AdapterVersion.federation_id == federation_id)),
    }
    # children before parents, cross references cut first, so every backend deletes in one go
    session.execute(update(Client).where(Client.federation_id == federation_id).values(cluster_id=None))
    session.execute(update(Cluster).where(Cluster.federation_id == federation_id).values(pinned_version_id=None))
    session.execute(delete(Assignment).where(Assignment.client_id.in_(clients)))
    session.execute(delete(Task).where(Task.federation_id == federation_id))
    session.execute(delete(ClientFeature).where(ClientFeature.federation_id == federation_id))
    session.execute(delete(Invitation).where(Invitation.federation_id == federation_id))
    session.execute(delete(AdapterVersion).where(AdapterVersion.federation_id == federation_id))
    session.execute(delete(Cluster).where(Cluster.federation_id == federation_id))
    session.execute(delete(ClusteringRun).where(ClusteringRun.federation_id == federation_id))
    session.execute(delete(Round).where(Round.federation_id == federation_id))
    session.execute(delete(Client).where(Client.federation_id == federation_id))
    name = fed.name
    session.delete(fed)
    session.flush()
    still = set(session.scalars(_referenced()))
    gone = sorted(mine - still)
    sizes = dict(session.execute(select(Blob.sha256, Blob.size).where(Blob.sha256.in_(gone))).all()) if gone else {}
    if gone:
        session.execute(delete(Blob).where(Blob.sha256.in_(gone)))
    return ({"federation_id": federation_id, "name": name, **{k: int(v or 0) for k, v in counts.items()},
             "blobs_deleted": len(sizes), "bytes_freed": int(sum(sizes.values()))}, sorted(sizes))
