"""Clustering runs (``clustering.algorithm``: LSAC, k-means-flat or LSAC as the paper writes it;
docs/method.md, "Clustering algorithms"), cluster creation, refinement by loss
(``clustering.refine_rounds``), nearest-cluster onboarding of late clients, and an admin's
recluster of a running federation."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import numpy as np
from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from coordinator.blobs import BlobStore
from coordinator.errors import Conflict, Invalid
from coordinator.metrics import observe_clustering_seconds
from coordinator.models import AdapterVersion, Assignment, Client, Cluster, ClusteringRun, Federation, Round, Task
from coordinator.services.adapters import (
    ensure_blob_row,
    head_of,
    initial_tier_tensors,
    latest_version,
    load_version,
    serving_version,
    write_version,
)
from coordinator.services.admin_actions import audit
from coordinator.services.client_features import Bases, load_root_b_emas, normalised_b, subspace_bases_of
from coordinator.services.federations import federation_config, get_federation
from coordinator.services.tasks import refine_candidates, task_status_may_become
from shared.aggregate import merge_adapters
from shared.config import Clustering, FederationConfig, approximate_refusal
from shared.lsac_scale import lsac_auto
from shared.probes import factor_pairs, head_delta, probe_distance
from shared.refine import UNASSIGNED, reassign
from shared.schemas import refine_metric
from shared.states import ClientStatus, RoundStatus, Stage, TaskStatus
from shared.subspace import (
    LsacResult,
    assign_to_clusters,
    gram_kmeans_labels,
    lsac,
    lsac_paper,
    manual_labels,
    match_cluster_ids,
    subspace_distance,
    update_gram,
)
from shared.tensors import pack_tensors, unpack_tensors

Tensors = dict[str, np.ndarray]
log = logging.getLogger("hilora.coordinator.clustering")


def _done_probe_tasks(session: Session, round_id: int) -> list[Task]:
    return list(session.scalars(
        select(Task).where(Task.round_id == round_id, Task.status == TaskStatus.done.value)
        .order_by(Task.client_id)
    ))


def _probe_inputs(session: Session, blobs: BlobStore, probe_round: Round, c: Clustering | None = None,
                  ) -> tuple[list[Task], Tensors, list[Tensors]]:
    """The done tasks of a probe round that still hold their upload, the root they started from,
    and their uploads (none read above ``c.approximate_above`` clients: the approximate path maps them)."""
    tasks = [t for t in _done_probe_tasks(session, probe_round.id) if t.upload_sha256]
    if not tasks:
        raise ValueError(f"probe round {probe_round.id} has no done task to cluster")
    root = load_version(blobs, session.get(AdapterVersion, probe_round.input_root_version_id))
    if c is not None and len(tasks) > c.approximate_above:
        return tasks, root, []
    probes = [unpack_tensors(blobs.get_bytes(t.upload_sha256)) for t in tasks]
    return tasks, root, probes


def _member_bases(session: Session, blobs: BlobStore, cfg: FederationConfig, tasks: list[Task],
                  probes: list[Tensors]) -> list[Bases]:
    """lsac-paper's features of the clients of ``tasks``: per target, the top-r left singular
    vectors of the client's root-B EMA (client_features); a client without one (no root upload
    aggregated) gets those of its unit-norm probe B, as a late client does."""
    emas = load_root_b_emas(session, blobs, [t.client_id for t in tasks])
    return [subspace_bases_of(cfg.manifest, emas[t.client_id] if t.client_id in emas
                              else normalised_b(cfg.manifest, probe)) for t, probe in zip(tasks, probes)]


def _cluster(session: Session, blobs: BlobStore, cfg: FederationConfig, c: Clustering, tasks: list[Task],
             root: Tensors, probes: list[Tensors]) -> tuple[LsacResult, np.ndarray]:
    """The partition of the clients of ``tasks`` by ``c.algorithm`` and the distance matrix behind
    it. The result's ``labels`` and ``k`` are the final ones; for kmeans-flat its eigengaps,
    contrast ratio and affinity are those of the LSAC run that chose K."""
    if len(tasks) > c.approximate_above:
        if c.algorithm != "lsac":
            raise ValueError(approximate_refusal(c.algorithm, len(tasks), c.approximate_above))
        return _approximate(cfg, c, tasks, root, blobs), None
    if c.algorithm == "lsac-paper":
        distance = subspace_distance(_member_bases(session, blobs, cfg, tasks, probes))
        k_min, k_max = (c.k_min, c.k_max) if c.force_k is None else (c.force_k, c.force_k)
        return lsac_paper(distance, k_min=k_min, k_max=k_max, seed=c.seed), distance
    distance = probe_distance(cfg.manifest, c.features, root, probes, c.head_weight, c.classwise_weight)
    result = lsac(distance, k_min=c.k_min, k_max=c.k_max, knn=c.knn, contrast=c.contrast,
                  force_k=c.force_k, seed=c.seed, k_rule=c.k_rule, min_silhouette=c.min_silhouette,
                  silhouette_tolerance=c.silhouette_tolerance, partitions=c.partitions)
    if c.algorithm == "kmeans-flat":  # LSAC's K, k-means on the flattened probe updates B A - B_root A_root
        gram = update_gram([factor_pairs(cfg.manifest, p) for p in probes], factor_pairs(cfg.manifest, root))
        labels = gram_kmeans_labels(gram, result.k, seed=c.seed)
        result = replace(result, k=int(labels.max()) + 1, labels=labels)
    elif c.algorithm == "manual":  # the admin's labels; LSAC's affinity and eigengaps stay for the record
        names = [session.get(Client, t.client_id).name for t in tasks]
        labels = manual_labels(names, c.assignment or {}, 1.0 - distance)
        result = replace(result, k=len(set(labels.tolist())), labels=labels)
    return result, distance


class _WireFactors(Mapping):
    """One upload's (B, A) per target, read from its memory-mapped blob when asked: the approximate
    path sketches target by target, so only one target of every client is paged in at a time."""

    def __init__(self, manifest, tensors: Tensors) -> None:  # noqa: ANN001
        self._names = [t.name for t in manifest.targets]
        self._tensors = tensors

    def __getitem__(self, name: str):  # noqa: ANN204
        return self._tensors[f"{name}.lora_B"], self._tensors[f"{name}.lora_A"]

    def __iter__(self):  # noqa: ANN204
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _approximate(cfg: FederationConfig, c: Clustering, tasks: list[Task], root: Tensors, blobs: BlobStore):  # noqa: ANN202
    """LSAC's approximate path (``shared.lsac_scale.lsac_auto`` above its exact limit) on the probe
    uploads as memory maps, never all in memory at once."""
    mapped = [blobs.map_tensors(t.upload_sha256, strict=False) for t in tasks]
    heads = None
    if c.features == "update" and c.head_weight != 0.0:
        heads = [c.head_weight * head_delta(m, root) for m in mapped]
    return lsac_auto(c.features, [_WireFactors(cfg.manifest, m) for m in mapped], factor_pairs(cfg.manifest, root),
                     heads, cfg.manifest.tiers["root"].rank, exact_max_clients=c.approximate_above,
                     k_min=c.k_min, k_max=c.k_max, knn=c.knn, contrast=c.contrast, force_k=c.force_k, seed=c.seed,
                     k_rule=c.k_rule, min_silhouette=c.min_silhouette, silhouette_tolerance=c.silhouette_tolerance)


def _run_lsac(session: Session, blobs: BlobStore, cfg: FederationConfig, c: Clustering, probe_round: Round,
              now: datetime) -> tuple[ClusteringRun, list[Task], LsacResult, Tensors]:
    """Clustering (``c.algorithm``) with settings ``c`` of the clients of a probe round's done
    uploads; stores the distance and affinity matrices as a blob and records the ClusteringRun.
    Its duration goes to the app's metrics."""
    started = time.perf_counter()
    tasks, root, probes = _probe_inputs(session, blobs, probe_round, c)
    result, distance = _cluster(session, blobs, cfg, c, tasks, root, probes)
    sha = None
    if distance is not None:  # (the approximate path has no dense matrices to keep)
        data = pack_tensors({"distance": distance.astype(np.float32),
                             "affinity": np.asarray(result.affinity, dtype=np.float32)},
                            metadata={"client_ids": ",".join(str(t.client_id) for t in tasks)})
        sha = blobs.put_bytes(data)
        ensure_blob_row(session, sha, len(data), "affinity", now)
    run = ClusteringRun(federation_id=probe_round.federation_id, probe_round_id=probe_round.id,
                        cycle=federation_cycle(session, probe_round.federation_id),
                        features=c.features, algorithm=c.algorithm, k=int(result.k), num_clients=len(tasks),
                        eigengaps=[float(x) for x in result.eigengaps],
                        contrast_ratio=None if result.contrast_ratio is None else float(result.contrast_ratio),
                        affinity_sha256=sha, created_at=now)
    session.add(run)
    session.flush()
    observe_clustering_seconds(time.perf_counter() - started, c.features)
    return run, tasks, result, root


def _new_cluster(session: Session, blobs: BlobStore, cfg: FederationConfig, federation_id: int, label: int,
                 run: ClusteringRun, root: Tensors, now: datetime, start: Tensors | None = None) -> Cluster:
    """A cluster made by ``run``, with version 0 of its adapter: ``start`` (a warm start: another
    cluster's adapter), else A seeded, B zero, head = root's."""
    cluster = Cluster(federation_id=federation_id, label=label, created_run_id=run.id, created_at=now)
    session.add(cluster)
    session.flush()
    tensors = start if start is not None else initial_tier_tensors(
        cfg.manifest, "cluster", head_of(root), ("cluster", label, cfg.training.seed))
    write_version(session, blobs, federation_id=federation_id, tier="cluster", scope=f"cluster:{cluster.id}",
                  cluster_id=cluster.id, version=0, tensors=tensors, now=now)
    return cluster


def federation_cycle(session: Session, federation_id: int) -> int:
    """The federation's cycle now (recorded on its rounds, runs and assignments)."""
    return session.scalar(select(Federation.cycle).where(Federation.id == federation_id)) or 0


def _assign(session: Session, run: ClusteringRun, tasks: list[Task], clusters: list[Cluster], now: datetime,
            source: str = "lsac") -> None:
    """Record that the client of ``tasks[i]`` is in ``clusters[i]`` (``source``: 'lsac', 'cycle', or
    'manual' for an admin's assignment) and move it."""
    for task, cluster in zip(tasks, clusters):
        session.add(Assignment(client_id=task.client_id, cluster_id=cluster.id, clustering_run_id=run.id,
                               source=source, cycle=run.cycle or 0, created_at=now))
        session.get(Client, task.client_id).cluster_id = cluster.id
    session.flush()


def cluster_probes(session: Session, blobs: BlobStore, cfg: FederationConfig, probe_round: Round,
                   now: datetime) -> ClusteringRun:
    """Run LSAC on the done tasks of a probe round; create clusters, assignments and version 0 of
    every cluster adapter (A seeded, B zero, head = the final root's head)."""
    run, tasks, result, root = _run_lsac(session, blobs, cfg, cfg.clustering, probe_round, now)
    clusters = {label: _new_cluster(session, blobs, cfg, probe_round.federation_id, label, run, root, now)
                for label in sorted({int(x) for x in result.labels})}
    _assign(session, run, tasks, [clusters[int(label)] for label in result.labels], now)
    return run


REFINE = "refine"  # ClusteringRun.algorithm of a refinement (its probe_round_id is the refine round)


def recluster_cycle(session: Session, blobs: BlobStore, cfg: FederationConfig, probe_round: Round,
                    now: datetime) -> ClusteringRun:
    """A cycle's clustering of its probe round (docs/operations.md, "Cycles"): the federation's
    algorithm on every probed client, with stable cluster ids. New clusters are matched to the
    existing ones by membership overlap (``match_cluster_ids``): a matched cluster keeps its row,
    label and adapter (its cluster rounds go on from its newest version). An unmatched one is a new
    cluster, warm-started from the adapter the old cluster most of its members come from serves
    (a split), else from the root (a group of newcomers). A cluster whose members come from
    several trained clusters (a merge) keeps the id of the one it is matched to and starts from its
    parents' adapters combined in product space, weighted by members (a new version). Every probed
    client gets an assignment (source 'cycle')."""
    federation_id = probe_round.federation_id
    run, tasks, result, root = _run_lsac(session, blobs, cfg, cfg.clustering, probe_round, now)
    members = [session.get(Client, t.client_id) for t in tasks]
    clusters = list(session.scalars(select(Cluster).where(Cluster.federation_id == federation_id)))
    by_id, by_label = {c.id: c for c in clusters}, {c.label: c for c in clusters}
    # the cluster each member is served now (warm starts) and the one the newest clustering that
    # included it chose (ids are matched on these: a late client onboarded into the nearest cluster
    # since then says nothing about which group that cluster is)
    old_labels = np.array([by_id[c.cluster_id].label if c.cluster_id in by_id else -1 for c in members])
    clustered = _clustered_labels(session, federation_id, by_id)
    match_labels = np.array([clustered.get(c.id, -1) for c in members])
    matches = match_cluster_ids(match_labels, result.labels)
    next_label = max(by_label, default=-1) + 1
    target: dict[int, Cluster] = {}
    warm: dict[int, int | None] = {}
    merged: dict[int, dict[str, int]] = {}
    for new_label in sorted(matches):
        if matches[new_label] is not None:
            target[new_label] = by_label[matches[new_label]]
            parents = _merged_parents(session, by_label, old_labels[result.labels == new_label])
            if len(parents) > 1:
                _warm_start_merge(session, blobs, cfg, target[new_label], parents, now)
                merged[target[new_label].label] = {str(p.label): n for p, _, n in parents}
            continue
        came_from = old_labels[(result.labels == new_label) & (old_labels >= 0)]
        parent = by_label[int(np.bincount(came_from).argmax())] if came_from.size else None
        start = None
        if parent is not None:
            version = serving_version(session, parent)
            start = load_version(blobs, version) if version is not None and version.version >= 1 else None
        target[new_label] = _new_cluster(session, blobs, cfg, federation_id, next_label, run, root, now, start=start)
        warm[next_label] = parent.label if start is not None else None
        next_label += 1
    chosen = [target[int(label)] for label in result.labels]
    moves = [(c.id, by_id[c.cluster_id].label if c.cluster_id in by_id else None, cluster.label)
             for c, cluster in zip(members, chosen) if c.cluster_id != cluster.id]
    _assign(session, run, tasks, chosen, now, source="cycle")
    followed = _follow_cluster_mates(session, run, federation_id, clustered, members, match_labels, chosen, now)
    moves += [(cid, by_id[a].label if a in by_id else None, by_id[b].label) for cid, a, b in followed]
    audit(session, now, "cycle_recluster", federation_id, f"clustering_run:{run.id}",
          {"run_id": run.id, "cycle": run.cycle, "k": run.k, "moved": len(moves), "followed": len(followed),
           "clusters_created": {str(k): v for k, v in warm.items()},
           "clusters_merged": {str(k): v for k, v in merged.items()},
           "moves": [{"client_id": cid, "from": a, "to": b} for cid, a, b in moves[:200]]}, actor="scheduler")
    log.info("cycle %s of federation %s: K=%s, %d clients moved, clusters created %s (warm-started from %s), "
             "merged %s", run.cycle, federation_id, run.k, len(moves), sorted(warm), warm, merged)
    return run


def _clustered_labels(session: Session, federation_id: int, by_id: dict[int, Cluster]) -> dict[int, int]:
    """Client id -> label of the cluster the newest clustering that included the client put it in
    (LSAC, a cycle, a refinement or an admin's manual run; onboardings do not count), -1 for none."""
    newest = (select(Assignment.client_id, func.max(Assignment.id).label("id"))
              .join(Client, Client.id == Assignment.client_id)
              .where(Client.federation_id == federation_id, Assignment.source != "onboarding")
              .group_by(Assignment.client_id).subquery())
    rows = session.execute(select(Assignment.client_id, Assignment.cluster_id)
                           .join(newest, newest.c.id == Assignment.id))
    return {client_id: by_id[cluster_id].label if cluster_id in by_id else -1 for client_id, cluster_id in rows}


def _follow_cluster_mates(session: Session, run: ClusteringRun, federation_id: int, clustered: dict[int, int],
                          members: list[Client], match_labels: np.ndarray, chosen: list[Cluster], now: datetime
                          ) -> list[tuple[int, int | None, int]]:
    """Clients in a cluster that the cycle did not probe (away, inactive) go where most of the
    probed clients their last clustering grouped them with went: without news of their own, their
    old group is the best guess (were they left in place, a split that hands their cluster's id to
    other clients would leave them in a stranger's cluster). A client none of whose old group was
    probed stays. Returns the moves (client id, from cluster id, to cluster id), each recorded as an
    assignment of ``run``."""
    probed = {c.id for c in members}
    moves = []
    for client in session.scalars(select(Client).where(
            Client.federation_id == federation_id, Client.status == ClientStatus.active,
            Client.cluster_id.is_not(None)).order_by(Client.id)):
        label = clustered.get(client.id, -1)
        if client.id in probed or label < 0:
            continue
        mates = [c.id for c, m in zip(chosen, match_labels.tolist()) if m == label]
        if not mates:
            continue
        counts: dict[int, int] = {}
        for cluster_id in mates:
            counts[cluster_id] = counts.get(cluster_id, 0) + 1
        to = max(sorted(counts), key=lambda k: counts[k])
        if to != client.cluster_id:
            session.add(Assignment(client_id=client.id, cluster_id=to, clustering_run_id=run.id, source="cycle",
                                   cycle=run.cycle or 0, created_at=now))
            moves.append((client.id, client.cluster_id, to))
            client.cluster_id = to
    session.flush()
    return moves


def _merged_parents(session: Session, by_label: dict[int, Cluster], old_labels: np.ndarray
                    ) -> list[tuple[Cluster, AdapterVersion, int]]:
    """The old clusters a new cluster's members come from whose served adapter was trained (version
    >= 1), each with that version and how many members it brings, in label order."""
    parents = []
    labels, counts = np.unique(old_labels[old_labels >= 0], return_counts=True)
    for label, count in zip(labels.tolist(), counts.tolist()):
        version = serving_version(session, by_label[label])
        if version is not None and version.version >= 1:
            parents.append((by_label[label], version, count))
    return parents


def _warm_start_merge(session: Session, blobs: BlobStore, cfg: FederationConfig, cluster: Cluster,
                      parents: list[tuple[Cluster, AdapterVersion, int]], now: datetime) -> AdapterVersion:
    """A cluster that takes in members of other trained clusters starts the cycle's cluster rounds
    from its parents' served adapters combined in product space, weighted by the members each brings
    (``shared.aggregate.merge_adapters``): the next version of the cluster it is matched to."""
    tensors = merge_adapters(cfg.manifest, "cluster", [load_version(blobs, v) for _, v, _ in parents],
                             [float(n) for _, _, n in parents])
    newest = latest_version(session, cluster.federation_id, f"cluster:{cluster.id}")
    return write_version(session, blobs, federation_id=cluster.federation_id, tier="cluster",
                         scope=f"cluster:{cluster.id}", cluster_id=cluster.id, version=newest.version + 1,
                         tensors=tensors, now=now)


def latest_run(session: Session, federation_id: int, probed: bool = False) -> ClusteringRun | None:
    """The newest clustering run; with ``probed``, the newest one made from a probe round (not a
    refinement, whose round holds losses, not probe uploads)."""
    query = select(ClusteringRun).where(ClusteringRun.federation_id == federation_id)
    if probed:
        query = query.where(ClusteringRun.algorithm != REFINE)
    return session.scalars(query.order_by(ClusteringRun.id.desc()).limit(1)).first()


def unassigned_client_ids(session: Session, federation_id: int) -> set[int]:
    """Active clients that fit no cluster: without a cluster, and whose newest assignment (from a
    refinement, or an onboarding when no cluster had members) put them in none. They are served
    the root and their own leaf."""
    newest = (select(Assignment.client_id, func.max(Assignment.id).label("id"))
              .join(Client, Client.id == Assignment.client_id)
              .where(Client.federation_id == federation_id).group_by(Assignment.client_id).subquery())
    return set(session.scalars(
        select(Assignment.client_id).join(newest, newest.c.id == Assignment.id)
        .join(Client, Client.id == Assignment.client_id)
        .where(Assignment.cluster_id.is_(None), Client.cluster_id.is_(None), Client.status == ClientStatus.active)))


@dataclass
class RefineOutcome:
    run: ClusteringRun | None
    moves: list[tuple[int, int | None, int | None]]  # (client id, from cluster id, to cluster id); None: unassigned
    evaluated: int


def refine_clusters(session: Session, blobs: BlobStore, cfg: FederationConfig, refine_round: Round, now: datetime,
                    may_create: bool = True) -> RefineOutcome:
    """Apply a decided refine round: each client that reported its losses (``refine_metric``) is
    reassigned by ``shared.refine.reassign`` (margin ``clustering.refine_margin``); a client that no
    cluster fits better than the root becomes unassigned (``cluster_id`` None, an Assignment row
    without a cluster). With ``may_create`` (more cluster rounds follow) and at least
    ``clustering.refine_new_cluster`` such clients, they form a new cluster instead (next free label,
    version 0 from the root: they are the clients the root served better than any cluster), which the
    following cluster rounds train and the next refinement offers to everyone. Recorded as a
    ClusteringRun (algorithm 'refine', K = clusters with members afterwards) with an Assignment
    (source 'refine') per evaluated client, and audited with the moves. A client that did not report
    keeps its cluster. Nothing is recorded when no client reported or no cluster adapter was trained."""
    federation_id = refine_round.federation_id
    candidates = [cluster for cluster, _ in refine_candidates(session, federation_id)]
    tasks = [t for t in _done_probe_tasks(session, refine_round.id)
             if isinstance(t.metrics, dict)
             and all(refine_metric(c) in t.metrics for c in [None] + [c.id for c in candidates])]
    if not candidates or not tasks:
        return RefineOutcome(None, [], 0)
    index = {c.id: i for i, c in enumerate(candidates)}
    clients = [session.get(Client, t.client_id) for t in tasks]
    losses = np.array([[float(t.metrics[refine_metric(c.id)]) for c in candidates] for t in tasks])
    root_loss = np.array([float(t.metrics[refine_metric(None)]) for t in tasks])
    current = np.array([index.get(c.cluster_id, UNASSIGNED) for c in clients])
    chosen = reassign(losses, root_loss, current, cfg.clustering.refine_margin)
    targets: list[Cluster | None] = [candidates[j] if j != UNASSIGNED else None for j in chosen.tolist()]
    fit_none = sum(1 for t in targets if t is None)
    minimum = cfg.clustering.refine_new_cluster
    run = ClusteringRun(federation_id=federation_id, probe_round_id=refine_round.id, features="loss",
                        cycle=federation_cycle(session, federation_id), algorithm=REFINE, k=0, num_clients=len(tasks), eigengaps=[], contrast_ratio=None,
                        affinity_sha256=None, created_at=now)
    session.add(run)
    session.flush()
    created = None
    if may_create and minimum and fit_none >= minimum:
        root = load_version(blobs, latest_version(session, federation_id, "root"))
        label = (session.scalar(select(func.max(Cluster.label)).where(Cluster.federation_id == federation_id)) or 0) + 1
        created = _new_cluster(session, blobs, cfg, federation_id, label, run, root, now)
        targets = [created if t is None else t for t in targets]
    moves = []
    for client, target in zip(clients, targets):
        to = target.id if target is not None else None
        session.add(Assignment(client_id=client.id, cluster_id=to, clustering_run_id=run.id, source=REFINE,
                               similarity=None, cycle=run.cycle, created_at=now))
        if client.cluster_id != to:
            moves.append((client.id, client.cluster_id, to))
            client.cluster_id = to
    session.flush()
    run.k = session.scalar(select(func.count(func.distinct(Client.cluster_id))).where(
        Client.federation_id == federation_id, Client.status == ClientStatus.active,
        Client.cluster_id.is_not(None))) or 0
    session.flush()
    labels = {c.id: c.label for c in candidates + ([created] if created is not None else [])}
    audit(session, now, "refine", federation_id, f"clustering_run:{run.id}",
          {"run_id": run.id, "refine_round": refine_round.number, "evaluated": len(tasks), "k": run.k,
           "moved": len(moves), "unassigned": sum(1 for t in targets if t is None),
           "cluster_created": created.label if created is not None else None,
           "moves": [{"client_id": cid, "from": labels.get(a), "to": labels.get(b)} for cid, a, b in moves[:200]]},
          actor="scheduler")
    log.info("refinement %s of federation %s: %d clients evaluated, %d moved, %d unassigned, K=%d%s",
             refine_round.number, federation_id, len(tasks), len(moves), sum(1 for t in targets if t is None), run.k,
             f", cluster {created.label} made of the {fit_none} clients no cluster fitted" if created else "")
    return RefineOutcome(run, moves, len(tasks))


def assign_late_client(session: Session, blobs: BlobStore, cfg: FederationConfig, client: Client,
                       probe_task: Task, now: datetime) -> Cluster | None:
    """Join a late client to the cluster whose members' probes are most similar to its own probe
    (mean similarity, method.md section 5; both probes start from the same final root). With
    lsac-paper the members' features are their root-B EMA subspaces and the late client's the
    subspace of its unit-norm probe B. With 'manual', a late client the assignment names joins the
    cluster of its label when that cluster exists."""
    run = latest_run(session, client.federation_id, probed=True)
    if run is None:
        raise ValueError("no clustering run to assign against")
    given = (cfg.clustering.assignment or {}).get(client.name) if cfg.clustering.algorithm == "manual" else None
    named = session.scalars(select(Cluster).where(Cluster.federation_id == client.federation_id,
                                                  Cluster.label == given)).first() if given is not None else None
    if named is not None:  # 'manual' names this client: its cluster, without a probe comparison
        session.add(Assignment(client_id=client.id, cluster_id=named.id, clustering_run_id=None,
                               source="onboarding", similarity=None,
                               cycle=federation_cycle(session, client.federation_id), created_at=now))
        client.cluster_id = named.id
        session.flush()
        return named
    members = _done_probe_tasks(session, run.probe_round_id)
    # the members' clusters now (a refinement or recluster may have moved them since the probe);
    # unassigned members are no cluster's
    labels_by_client = {cid: cluster_id for cid, cluster_id in session.execute(
        select(Client.id, Client.cluster_id).where(Client.id.in_([t.client_id for t in members]),
                                                    Client.cluster_id.is_not(None)))}
    members = [t for t in members if t.client_id in labels_by_client]
    if not members:  # every member was unassigned by refinement: no cluster to join
        session.add(Assignment(client_id=client.id, cluster_id=None, clustering_run_id=None,
                               source="onboarding", similarity=None,
                               cycle=federation_cycle(session, client.federation_id), created_at=now))
        client.cluster_id = None
        session.flush()
        return None
    probe_round = session.get(Round, run.probe_round_id)
    root = load_version(blobs, session.get(AdapterVersion, probe_round.input_root_version_id))
    probes = [unpack_tensors(blobs.get_bytes(t.upload_sha256)) for t in members]
    probes.append(unpack_tensors(blobs.get_bytes(probe_task.upload_sha256)))
    if cfg.clustering.algorithm == "lsac-paper":
        bases = _member_bases(session, blobs, cfg, members, probes[:-1])
        bases.append(subspace_bases_of(cfg.manifest, normalised_b(cfg.manifest, probes[-1])))
        similarity = 1.0 - subspace_distance(bases)
    else:
        similarity = 1.0 - probe_distance(cfg.manifest, cfg.clustering.features, root, probes,
                                          cfg.clustering.head_weight, cfg.clustering.classwise_weight)
    member_clusters = np.array([labels_by_client[t.client_id] for t in members])
    chosen = int(assign_to_clusters(similarity[-1:, :-1], member_clusters)[0])
    score = float(similarity[-1, :-1][member_clusters == chosen].mean())
    cluster = session.get(Cluster, chosen)
    session.add(Assignment(client_id=client.id, cluster_id=cluster.id, clustering_run_id=None,
                           source="onboarding", similarity=score,
                           cycle=federation_cycle(session, client.federation_id), created_at=now))
    client.cluster_id = cluster.id
    session.flush()
    return cluster


def assign_late_client_by_loss(session: Session, cfg: FederationConfig, client: Client, task: Task,
                               now: datetime) -> Cluster | None:
    """``clustering.onboard`` 'loss': join a late client to the cluster whose adapter has the lowest
    loss on its training data (its refine task's report), unless the root is not clearly worse
    (``shared.refine.reassign`` for a client without a cluster): then it fits no cluster (an
    Assignment without one) and is served root + its own leaf. The assignment's similarity is the
    relative loss gain over the root, ``1 - loss / root_loss``."""
    candidates = [cluster for cluster, _ in refine_candidates(session, client.federation_id)]
    metrics = task.metrics or {}
    names = [refine_metric(None)] + [refine_metric(c.id) for c in candidates]
    chosen = None
    gain = None
    if candidates and all(name in metrics for name in names):
        losses = np.array([[float(metrics[refine_metric(c.id)]) for c in candidates]])
        root_loss = float(metrics[refine_metric(None)])
        j = int(reassign(losses, np.array([root_loss]), np.array([UNASSIGNED]), cfg.clustering.refine_margin)[0])
        if j != UNASSIGNED:
            chosen = candidates[j]
            gain = 1.0 - float(losses[0, j]) / root_loss if root_loss > 0 else None
    session.add(Assignment(client_id=client.id, cluster_id=chosen.id if chosen else None, clustering_run_id=None,
                           source="onboarding", similarity=gain,
                           cycle=federation_cycle(session, client.federation_id), created_at=now))
    client.cluster_id = chosen.id if chosen else None
    session.flush()
    return chosen


@dataclass
class ReclusterOutcome:
    run: ClusteringRun
    clusters_kept: list[int]
    clusters_created: list[int]
    moves: list[tuple[int, str, int | None, int | None]]  # (client id, name, from label, to label)
    tasks_cancelled: int


def newest_done_probe_round(session: Session, federation_id: int) -> Round | None:
    """The newest done probe round of all training clients (scope 'all'); None before one exists."""
    return session.scalars(
        select(Round).where(Round.federation_id == federation_id, Round.stage == Stage.probe, Round.scope == "all",
                            Round.status == RoundStatus.done).order_by(Round.number.desc()).limit(1)).first()


def recluster(session: Session, blobs: BlobStore, federation_id: int, now: datetime, *,
              force_k: int | None = None, features: str | None = None, knn: int | None = None,
              assignment: dict[str, int] | None = None, reason: str = "") -> ReclusterOutcome:
    """Rerun the federation's clustering algorithm (with optional overrides of its settings) on
    the clients of the newest done all-clients probe round (lsac-paper: on their stored root-B
    EMAs), and move the training clients to the new clusters. With ``assignment`` (client name ->
    cluster label) the run is a manual one (``clustering.algorithm`` 'manual' for this run only):
    the named clients go to the cluster of that label; the other clients of the probe round keep
    their cluster (one without a cluster joins the cluster its probe is closest to).

    - New labels are matched to the existing clusters by membership overlap
      (``shared.subspace.match_cluster_ids``): a matched cluster keeps its row, label and adapter
      versions; an unmatched one becomes a new cluster with a version-0 adapter (like
      ``cluster_probes``) and the next free label. A manual run's labels are the clusters' labels
      themselves: an existing label is that cluster, a new one a new cluster with that label.
    - Every clustered client gets an Assignment row (source 'lsac', or 'manual') of the new run.
    - A client that changed cluster can no longer read its old cluster's adapter: its open
      (pending or leased) cluster, leaf and eval tasks are cancelled, and its next round is one of its
      new cluster (docs/operations.md, "Reclustering").
    - Late clients keep their cluster; later onboardings are assigned against the new run.

    MUST fail: 404 for an unknown federation; 409 ``no_probe_round`` before a probe round of all
    clients is done (or once its uploads are gone); 422 ``bad_clustering`` for invalid overrides;
    422 ``unknown_clients`` for an assignment naming a client that is not in that probe round.
    """
    fed = get_federation(session, federation_id, lock=True)
    cfg = federation_config(fed)
    probe_round = newest_done_probe_round(session, federation_id)
    if probe_round is None:
        hint = (" (to fix the clusters before training, create the federation with clustering.algorithm 'manual')"
                if assignment is not None else "")
        raise Conflict(f"federation {federation_id} has no done probe round yet: nothing to recluster "
                       f"(it is {fed.state}){hint}", code="no_probe_round")
    overrides: dict[str, Any] = {k: v for k, v in (("force_k", force_k), ("features", features), ("knn", knn))
                                 if v is not None}
    clusters = list(session.scalars(select(Cluster).where(Cluster.federation_id == federation_id)))
    by_id = {c.id: c for c in clusters}
    if assignment is not None:
        probed = [session.get(Client, t.client_id) for t in _done_probe_tasks(session, probe_round.id)]
        unknown = sorted(set(assignment) - {c.name for c in probed})
        if unknown:
            raise Invalid(f"the assignment names {len(unknown)} client(s) that are not clustered training clients "
                          f"of the newest probe round (round {probe_round.number}): {', '.join(unknown[:10])}",
                          code="unknown_clients")
        # the clients it does not name stay where they are
        current = {c.name: by_id[c.cluster_id].label for c in probed if c.cluster_id in by_id}
        overrides.update(algorithm="manual", assignment={**current, **assignment})
    try:
        settings = Clustering.model_validate({**cfg.clustering.model_dump(), **overrides})
    except ValidationError as exc:
        raise Invalid("; ".join(e["msg"] for e in exc.errors()), code="bad_clustering") from None
    try:
        run, tasks, result, root = _run_lsac(session, blobs, cfg, settings, probe_round, now)
    except ValueError as exc:
        raise Conflict(f"probe round {probe_round.id} cannot be clustered again: {exc}", code="no_probe_round") from None
    members = [session.get(Client, t.client_id) for t in tasks]
    by_label = {c.label: c for c in clusters}
    target: dict[int, Cluster] = {}
    created: list[int] = []
    if assignment is not None:
        kept = sorted({int(x) for x in result.labels} & set(by_label))
        for label in sorted({int(x) for x in result.labels}):
            if label in by_label:
                target[label] = by_label[label]
            else:
                target[label] = _new_cluster(session, blobs, cfg, federation_id, label, run, root, now)
                created.append(label)
    else:
        old_labels = np.array([by_id[c.cluster_id].label if c.cluster_id in by_id else -1 for c in members])
        matches = match_cluster_ids(old_labels, result.labels)
        next_label = max(by_label, default=-1) + 1
        for new_label in sorted(matches):
            old = matches[new_label]
            if old is not None:
                target[new_label] = by_label[old]
            else:
                target[new_label] = _new_cluster(session, blobs, cfg, federation_id, next_label, run, root, now)
                created.append(next_label)
                next_label += 1
        kept = sorted({target[k].label for k, old in matches.items() if old is not None})
    chosen = [target[int(label)] for label in result.labels]
    moves = [(c.id, c.name, by_id[c.cluster_id].label if c.cluster_id in by_id else None, cluster.label)
             for c, cluster in zip(members, chosen) if c.cluster_id != cluster.id]
    _assign(session, run, tasks, chosen, now, source="manual" if assignment is not None else "lsac")
    moved_ids = [m[0] for m in moves]
    cancelled = 0
    if moved_ids:
        open_rounds = select(Round.id).where(Round.federation_id == federation_id, Round.status == RoundStatus.open,
                                             Round.stage.in_((Stage.cluster, Stage.leaf, Stage.eval)))
        cancelled = session.execute(
            update(Task).where(Task.client_id.in_(moved_ids), Task.round_id.in_(open_rounds),
                               task_status_may_become(TaskStatus.cancelled))
            .values(status=TaskStatus.cancelled, lease_expires_at=None, finished_at=now,
                    error="the client moved to another cluster (recluster)")
        ).rowcount or 0
    action = "assign" if assignment is not None else "recluster"
    details: dict[str, Any] = {"run_id": run.id, "probe_round_id": probe_round.id, "k": run.k,
                               "clusters_kept": kept, "clusters_created": created, "moved": len(moves),
                               "tasks_cancelled": cancelled, "reason": reason[:500]}
    if assignment is not None:
        details["assigned"] = len(assignment)
    else:
        details["overrides"] = overrides
    audit(session, now, action, federation_id, f"clustering_run:{run.id}", details)
    log.info("%s of federation %s: run %s, K=%s, kept %s, created %s, %s clients moved, %s tasks cancelled",
             action, federation_id, run.id, run.k, kept, created, len(moves), cancelled)
    return ReclusterOutcome(run=run, clusters_kept=kept, clusters_created=created, moves=moves,
                            tasks_cancelled=cancelled)
