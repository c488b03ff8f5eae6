"""LSAC runs on probe uploads, cluster creation, and nearest-cluster onboarding of late clients."""

from __future__ import annotations

from datetime import datetime

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.blobs import BlobStore
from coordinator.models import AdapterVersion, Assignment, Blob, Client, Cluster, ClusteringRun, Round, Task
from coordinator.services.adapters import head_of, initial_tier_tensors, load_version, write_version
from shared.config import FederationConfig
from shared.schemas import TaskStatus
from shared.probes import probe_distance
from shared.subspace import assign_to_clusters, lsac
from shared.tensors import pack_tensors, unpack_tensors


def _done_probe_tasks(session: Session, round_id: int) -> list[Task]:
    return list(session.scalars(
        select(Task).where(Task.round_id == round_id, Task.status == TaskStatus.done.value)
        .order_by(Task.client_id)
    ))


def cluster_probes(session: Session, blobs: BlobStore, cfg: FederationConfig, probe_round: Round,
                   now: datetime) -> ClusteringRun:
    """Run LSAC on the done tasks of a probe round; create clusters, assignments and version 0 of
    every cluster adapter (A seeded, B zero, head = the final root's head)."""
    tasks = _done_probe_tasks(session, probe_round.id)
    if not tasks:
        raise ValueError(f"probe round {probe_round.id} has no done task to cluster")
    root_row = session.get(AdapterVersion, probe_round.input_root_version_id)
    root = load_version(blobs, root_row)
    probes = [unpack_tensors(blobs.get_bytes(t.upload_sha256)) for t in tasks]
    distance = probe_distance(cfg.manifest, cfg.clustering.features, root, probes)
    c = cfg.clustering
    result = lsac(distance, k_min=c.k_min, k_max=c.k_max, knn=c.knn, contrast=c.contrast,
                  force_k=c.force_k, seed=c.seed)
    data = pack_tensors({"distance": distance.astype(np.float32),
                         "affinity": np.asarray(result.affinity, dtype=np.float32)},
                        metadata={"client_ids": ",".join(str(t.client_id) for t in tasks)})
    sha = blobs.put_bytes(data)
    if session.get(Blob, sha) is None:
        session.add(Blob(sha256=sha, size=len(data), kind="affinity", created_at=now))
        session.flush()
    run = ClusteringRun(federation_id=probe_round.federation_id, probe_round_id=probe_round.id,
                        features=c.features, k=int(result.k), num_clients=len(tasks),
                        eigengaps=[float(x) for x in result.eigengaps],
                        contrast_ratio=None if result.contrast_ratio is None else float(result.contrast_ratio),
                        affinity_sha256=sha, created_at=now)
    session.add(run)
    session.flush()
    clusters: dict[int, Cluster] = {}
    for label in sorted({int(x) for x in result.labels}):
        cluster = Cluster(federation_id=probe_round.federation_id, label=label, created_run_id=run.id,
                          created_at=now)
        session.add(cluster)
        session.flush()
        clusters[label] = cluster
        tensors = initial_tier_tensors(cfg.manifest, "cluster", head_of(root),
                                       ("cluster", probe_round.federation_id, label, cfg.training.seed))
        write_version(session, blobs, federation_id=probe_round.federation_id, tier="cluster",
                      scope=f"cluster:{cluster.id}", cluster_id=cluster.id, version=0, tensors=tensors,
                      now=now)
    for task, label in zip(tasks, result.labels):
        cluster = clusters[int(label)]
        session.add(Assignment(client_id=task.client_id, cluster_id=cluster.id, clustering_run_id=run.id,
                               source="lsac", created_at=now))
        session.get(Client, task.client_id).cluster_id = cluster.id
    session.flush()
    return run


def latest_run(session: Session, federation_id: int) -> ClusteringRun | None:
    return session.scalars(
        select(ClusteringRun).where(ClusteringRun.federation_id == federation_id)
        .order_by(ClusteringRun.id.desc()).limit(1)
    ).first()


def assign_late_client(session: Session, blobs: BlobStore, cfg: FederationConfig, client: Client,
                       probe_task: Task, now: datetime) -> Cluster:
    """Join a late client to the cluster whose members' probes are most similar to its own probe
    (mean similarity, method.md section 5; both probes start from the same final root)."""
    run = latest_run(session, client.federation_id)
    if run is None:
        raise ValueError("no clustering run to assign against")
    members = _done_probe_tasks(session, run.probe_round_id)
    labels_by_client = {a.client_id: a.cluster_id for a in session.scalars(
        select(Assignment).where(Assignment.clustering_run_id == run.id))}
    members = [t for t in members if t.client_id in labels_by_client]
    probe_round = session.get(Round, run.probe_round_id)
    root = load_version(blobs, session.get(AdapterVersion, probe_round.input_root_version_id))
    probes = [unpack_tensors(blobs.get_bytes(t.upload_sha256)) for t in members]
    probes.append(unpack_tensors(blobs.get_bytes(probe_task.upload_sha256)))
    similarity = 1.0 - probe_distance(cfg.manifest, cfg.clustering.features, root, probes)
    member_clusters = np.array([labels_by_client[t.client_id] for t in members])
    chosen = int(assign_to_clusters(similarity[-1:, :-1], member_clusters)[0])
    score = float(similarity[-1, :-1][member_clusters == chosen].mean())
    cluster = session.get(Cluster, chosen)
    session.add(Assignment(client_id=client.id, cluster_id=cluster.id, clustering_run_id=None,
                           source="onboarding", similarity=score, created_at=now))
    client.cluster_id = cluster.id
    session.flush()
    return cluster
