"""Which distance between probe uploads finds a family's planted groups? Offline, on stored probes.

Step 1 keeps the probe and root-round uploads of every cell and seed of a family (one short bench
run each: 6 root rounds, the probe, 1 cluster and 1 leaf round):

    python bench/clustering_features.py generate --family core --seeds 0,1,2 --out /tmp/probes \
        [--bench-args "--probe-loss ce"]

Step 2 clusters the stored probes with LSAC (silhouette K rule, min_silhouette 0.15, spectral and
average-linkage partitions: the service's defaults; ``--partitions spectral`` as before 2026-12-06)
on each distance and prints K, the ARI against the planted groups and the best silhouette
per cell and seed, then a summary (mean ARI on structured cells, cells with ARI >= 0.9 among those
with >= 30 images, K = 1 on cells without structure):

    python bench/clustering_features.py evaluate /tmp/probes [--distances update,classwise-mix] [--partitions spectral]

Step 3 (optional) compares K rules on one distance (``k_rule_labels``, over spectral partitions):

    python bench/clustering_features.py k-rules /tmp/probes [--rules best,largest:0.05]

Distances: ``update`` (the service's 'update' features: cosine of the flattened LoRA update plus
the head delta), ``centered`` (the same Gram matrix double-centred first), ``head`` (head delta
alone), ``lora`` (LoRA update alone), ``rows`` (each class's head-row delta scaled to unit norm,
all classes), ``classwise-held`` (rows compared only on the classes both clients hold),
``classwise`` (``shared.probes.classwise_head_distance``: classes both hold or both lack),
``classwise-mix`` (half ``update``, half ``classwise``: the service's default since issue 14),
``update-rounds`` (``update`` averaged over the probe and the root rounds). docs/benchmarks.md,
"Class-wise head distance".
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

FEATURES = "features.safetensors"   # the arrays; features.json beside it: groups, round stages, the service's K
DISTANCES = ("update", "centered", "head", "lora", "rows", "classwise-held", "classwise", "classwise-mix",
             "update-rounds")


def generate(family: str, seeds: list[int], out: Path, cells: list[str] | None = None,
             bench_args: list[str] | None = None) -> None:
    """``bench_args``: more ``hilora bench`` options for every run (a probe option under study, e.g.
    ``--probe-loss balanced``); they are written to ``out``/bench_args.json, and a folder generated
    with other options is refused rather than mixed."""
    from hilora.bench.family import family_cells

    chosen = family_cells(family)
    if cells:
        unknown = sorted(set(cells) - {cell.name for cell in chosen})
        if unknown:
            raise SystemExit(f"--cells: {', '.join(unknown)} not in family {family!r}; cells: "
                             + ", ".join(cell.name for cell in chosen))
        chosen = [cell for cell in chosen if cell.name in cells]
    out.mkdir(parents=True, exist_ok=True)
    bench_args = list(bench_args or [])
    recorded = out / "bench_args.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != bench_args:
        raise SystemExit(f"{out}: its probes were generated with bench options "
                         f"{json.loads(recorded.read_text())}, not {bench_args}; use another --out")
    recorded.write_text(json.dumps(bench_args))
    for cell in chosen:
        for seed in seeds:
            name = f"{cell.name}-s{seed}"
            work = out / name
            if (work / FEATURES).is_file():
                continue
            partition = out / f"{name}.json"
            partition.write_text(json.dumps(cell.partition(seed)))
            if not work.is_dir():
                subprocess.run([sys.executable, "-m", "hilora.cli", "bench", "--partition", str(partition),
                                "--standard", "--rounds", "6/1/1", "-m", "hilora", "--seed", str(seed),
                                "--workdir", str(work), "--no-progress", *bench_args], check=True, stdout=subprocess.DEVNULL)
            save_features(work, extract(work))
            print(name, flush=True)


def extract(work: Path) -> dict:
    """Per done root or probe round (all clients present): the LoRA update Gram matrix and the head
    deltas; and the K of the service's own clustering of these probes, with its classwise weight."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from coordinator.blobs import BlobStore
    from coordinator.models import AdapterVersion, Client, ClusteringRun, Federation, Round, Task
    from shared.config import FederationConfig
    from shared.probes import factor_pairs
    from shared.subspace import _update_gram
    from shared.tensors import unpack_tensors

    engine = create_engine(f"sqlite:///{work}/coordinator.db")
    blobs = BlobStore(work / "blobs")
    rounds, order = [], None
    with Session(engine) as s:
        fed = s.scalars(select(Federation)).first()
        cfg = FederationConfig.model_validate(fed.config)
        names = {c.id: c.name for c in s.scalars(select(Client))}
        for r in s.scalars(select(Round).where(Round.federation_id == fed.id, Round.stage.in_(["root", "probe"]),
                                               Round.status == "done").order_by(Round.id)):
            tasks = sorted(s.scalars(select(Task).where(Task.round_id == r.id, Task.status == "done")),
                           key=lambda t: t.client_id)
            ids = [t.client_id for t in tasks]
            order = order or ids
            if ids != order or any(t.upload_sha256 is None for t in tasks):
                continue
            root = unpack_tensors(blobs.get_bytes(s.get(AdapterVersion, r.input_root_version_id).blob_sha256))
            probes = [unpack_tensors(blobs.get_bytes(t.upload_sha256)) for t in tasks]
            rounds.append({
                "stage": r.stage,
                "lora_gram": _update_gram([factor_pairs(cfg.manifest, p) for p in probes],
                                          factor_pairs(cfg.manifest, root), None),
                "head_weight": np.array([np.asarray(p["head.weight"], np.float64) - root["head.weight"] for p in probes]),
                "head_bias": np.array([np.asarray(p["head.bias"], np.float64) - root["head.bias"] for p in probes]),
            })
        first_run = s.scalars(select(ClusteringRun).where(ClusteringRun.federation_id == fed.id)
                              .order_by(ClusteringRun.id)).first()
        service = None if first_run is None else {"k": first_run.k,
                                                   "classwise_weight": cfg.clustering.classwise_weight}
    return {"groups": [names[i].rsplit("-", 1)[0] for i in order], "rounds": rounds, "service": service}


def save_features(work: Path, data: dict) -> None:
    """``extract``'s result as safetensors (float64 arrays, round by round) and a JSON sidecar."""
    from safetensors.numpy import save_file

    arrays = {f"round{i}.{key}": np.ascontiguousarray(r[key], dtype=np.float64)
              for i, r in enumerate(data["rounds"]) for key in ("lora_gram", "head_weight", "head_bias")}
    (work / "features.json").write_text(json.dumps({"groups": data["groups"], "service": data["service"],
                                                    "stages": [r["stage"] for r in data["rounds"]]}))
    save_file(arrays, str(work / FEATURES))


def load_features(work: Path) -> dict:
    """What ``save_features`` wrote, in ``extract``'s shape (read with the project's safetensors reader)."""
    from shared.tensors import unpack_tensors

    meta = json.loads((work / "features.json").read_text())
    arrays = unpack_tensors((work / FEATURES).read_bytes())
    rounds = [{"stage": stage, **{key: arrays[f"round{i}.{key}"] for key in ("lora_gram", "head_weight", "head_bias")}}
              for i, stage in enumerate(meta["stages"])]
    return {"groups": meta["groups"], "service": meta["service"], "rounds": rounds}


def _cosine_distance(gram: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.clip(np.diag(gram), 1e-30, None))
    distance = np.clip(1.0 - gram / norms[:, None] / norms[None, :], 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    return distance


def _rows_distance(weights: np.ndarray, biases: np.ndarray, held_only: bool) -> np.ndarray:
    """Unit head-row cosines averaged over all classes, or over the classes both clients hold."""
    norms = np.linalg.norm(weights, axis=2, keepdims=True)
    unit = np.divide(weights, norms, out=np.zeros_like(weights), where=norms > 0)
    if not held_only:
        similarity = np.einsum("icd,jcd->ij", unit, unit) / weights.shape[1]
    else:
        held = (biases > 0).astype(float)
        total = np.einsum("ic,jc,icd,jcd->ij", held, held, unit, unit)
        count = held @ held.T
        similarity = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    distance = np.clip(1.0 - similarity, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    return distance


def distance(rnd: dict, name: str) -> np.ndarray:
    weights, biases = rnd["head_weight"], rnd["head_bias"]
    flat = weights.reshape(len(weights), -1)
    head_gram = flat @ flat.T + biases @ biases.T
    if name == "update":
        return _cosine_distance(rnd["lora_gram"] + head_gram)
    if name == "centered":
        n = len(head_gram)
        centre = np.eye(n) - 1.0 / n
        return _cosine_distance(centre @ (rnd["lora_gram"] + head_gram) @ centre)
    if name == "head":
        return _cosine_distance(head_gram)
    if name == "lora":
        return _cosine_distance(rnd["lora_gram"])
    if name == "rows":
        return _rows_distance(weights, biases, held_only=False)
    if name == "classwise-held":
        return _rows_distance(weights, biases, held_only=True)
    if name == "classwise":
        from shared.probes import classwise_head_distance
        zero = {"head.weight": np.zeros_like(weights[0]), "head.bias": np.zeros_like(biases[0])}
        return classwise_head_distance(zero, [{"head.weight": w, "head.bias": b} for w, b in zip(weights, biases)])
    if name == "classwise-mix":
        return 0.5 * distance(rnd, "update") + 0.5 * distance(rnd, "classwise")
    raise ValueError(f"unknown distance {name!r}; distances: {', '.join(DISTANCES)}")


def evaluate(folder: Path, names: list[str], partitions: str = "spectral+linkage") -> None:
    from sklearn.metrics import adjusted_rand_score

    from shared.subspace import lsac

    files = sorted(folder.glob(f"*/{FEATURES}"))
    if not files:
        raise SystemExit(f"{folder}: no */{FEATURES} (run `generate` first)")
    summary: dict = defaultdict(list)
    print(f"{'cell-seed':<28}" + "".join(f"{n:>20}" for n in names))
    for path in files:
        cell = path.parent.name
        data = load_features(path.parent)
        images = int(cell.split("-")[0][1:])
        structured = "-none-" not in cell
        row = f"{cell:<28}"
        for name in names:
            if name == "update-rounds":
                D = np.mean([distance(r, "update") for r in data["rounds"]], axis=0)
            else:
                D = distance(data["rounds"][-1], name)
            result = lsac(D, k_rule="silhouette", min_silhouette=0.15, seed=0, partitions=partitions)
            ari = adjusted_rand_score(data["groups"], result.labels)
            row += f"{'K%d ARI %.2f s %.2f' % (result.k, ari, result.silhouettes.max()):>20}"
            if structured:
                summary[name, "ari"].append(ari)
                if images >= 30:
                    summary[name, "good"].append(ari >= 0.9)
            else:
                summary[name, "k1"].append(result.k == 1)
        print(row)
    print(f"{'mean ARI (structured)':<28}" + "".join(f"{np.mean(summary[n, 'ari']):>20.3f}" for n in names))
    print(f"{'ARI >= 0.9 (>= 30 images)':<28}"
          + "".join(f"{'%d/%d' % (sum(summary[n, 'good']), len(summary[n, 'good'])):>20}" for n in names))
    print(f"{'K = 1 (no structure)':<28}"
          + "".join(f"{'%d/%d' % (sum(summary[n, 'k1']), len(summary[n, 'k1'])):>20}" for n in names))


K_RULES = ("best", "smallest:0.05", "smallest:0.1", "largest:0.03", "largest:0.05", "largest:0.1", "knn:3",
           "knn:4", "knn:7", "minsize:2", "minsize:3")


def k_rule_labels(D: np.ndarray, rule: str) -> np.ndarray:
    """LSAC's partition of D under one K rule, over spectral partitions only (the service's before
    2026-12-06, when these rules were compared; all with the silhouette floor 0.15: below it, K = 1):
    ``best`` (the service: the K of the highest mean silhouette, knn 5), ``smallest:T`` (the service's
    ``silhouette_tolerance`` T: the smallest K within (1 - T) of the best), ``largest:T`` (the largest
    K within (1 - T) of the best: splitting preferred to merging), ``knn:N`` (best, another kNN for
    the affinity's scale), ``minsize:M`` (best among the partitions whose clusters all have >= M
    clients)."""
    from shared.subspace import lsac, self_tuning_affinity, silhouette, spectral_labels

    kind, _, value = rule.partition(":")
    if kind not in ("best", "smallest", "largest", "knn", "minsize") or (kind == "best") == bool(value):
        raise ValueError(f"unknown K rule {rule!r}; rules: {', '.join(K_RULES)}")
    try:
        float(value or 0)
    except ValueError:
        raise ValueError(f"K rule {rule!r}: {value!r} is not a number") from None
    n = D.shape[0]
    if kind == "best":
        return lsac(D, k_rule="silhouette", min_silhouette=0.15, seed=0).labels
    if kind == "smallest":
        return lsac(D, k_rule="silhouette", min_silhouette=0.15, silhouette_tolerance=float(value), seed=0).labels
    if kind == "knn":
        return lsac(D, k_rule="silhouette", min_silhouette=0.15, knn=int(value), seed=0).labels
    affinity = self_tuning_affinity(D, 5)
    candidates = [spectral_labels(affinity, k, 0) for k in range(2, min(10, n - 1) + 1)]
    scores = np.array([silhouette(D, c) if 2 <= c.max() + 1 <= n - 1 else -1.0 for c in candidates])
    if kind == "largest":
        if scores.size == 0 or scores.max() < 0.15:
            return np.zeros(n, dtype=np.int64)
        return candidates[int(np.flatnonzero(scores >= max(scores.max() * (1 - float(value)), 0.15))[-1])]
    if kind == "minsize":
        allowed = [i for i, c in enumerate(candidates) if np.bincount(c).min() >= int(value)]
        if not allowed or scores[allowed].max() < 0.15:
            return np.zeros(n, dtype=np.int64)
        return candidates[max(allowed, key=lambda i: (scores[i], -i))]
    raise ValueError(f"unknown K rule {rule!r}; rules: {', '.join(K_RULES)}")


def evaluate_k_rules(folder: Path, rules: list[str], distance_name: str = "classwise-mix") -> None:
    """Every K rule on the same stored probes (one distance): the evaluate summary, plus the cells
    whose ARI is >= 0.9 on every seed (>= 30 images) and the per cell-seed K / ARI of the misses."""
    from sklearn.metrics import adjusted_rand_score

    files = sorted(folder.glob(f"*/{FEATURES}"))
    if not files:
        raise SystemExit(f"{folder}: no */{FEATURES} (run `generate` first)")
    results: dict = {}
    for path in files:
        data = load_features(path.parent)
        D = distance(data["rounds"][-1], distance_name)
        for rule in rules:
            labels = k_rule_labels(D, rule)
            results[path.parent.name, rule] = (int(labels.max()) + 1, adjusted_rand_score(data["groups"], labels))
    names = sorted({name for name, _ in results})
    print(f"{'rule':<16}{'mean ARI':>10}{'cell-seeds':>12}{'cells':>8}{'K = 1':>8}")
    for rule in rules:
        structured = [results[n, rule][1] for n in names if "-none-" not in n]
        big = [n for n in names if "-none-" not in n and int(n.split("-")[0][1:]) >= 30]
        cells = sorted({n.rsplit("-s", 1)[0] for n in big})
        good_cells = sum(all(results[n, rule][1] >= 0.9 for n in big if n.rsplit("-s", 1)[0] == c) for c in cells)
        k1 = [results[n, rule][0] == 1 for n in names if "-none-" in n]
        print(f"{rule:<16}{np.mean(structured):>10.3f}{'%d/%d' % (sum(results[n, rule][1] >= 0.9 for n in big), len(big)):>12}"
              f"{'%d/%d' % (good_cells, len(cells)):>8}{'%d/%d' % (sum(k1), len(k1)):>8}")
    print(f"\n{'cell-seed (a miss somewhere)':<30}" + "".join(f"{r:>15}" for r in rules))
    for n in names:
        if any(results[n, r][1] < 0.9 for r in rules):
            print(f"{n:<30}" + "".join(f"{'K%d %.2f' % results[n, r]:>15}" for r in rules))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("--family", default="core")
    gen.add_argument("--seeds", default="0,1,2")
    gen.add_argument("--out", type=Path, required=True)
    gen.add_argument("--cells", default="", help="comma-separated cell names (default: every cell); "
                     "two processes on disjoint cells may share --out")
    gen.add_argument("--bench-args", default="", help="more `hilora bench` options for every run, one string "
                     "(e.g. \"--probe-loss balanced\"); recorded in --out, which then refuses other options")
    ev = sub.add_parser("evaluate")
    ev.add_argument("folder", type=Path)
    ev.add_argument("--distances", default=",".join(DISTANCES))
    from shared.subspace import PARTITIONS

    ev.add_argument("--partitions", default="spectral+linkage", choices=PARTITIONS,
                    help="the partitions LSAC tries per K (clustering.partitions; 'spectral' before 2026-12-06)")
    kr = sub.add_parser("k-rules", help="compare K rules on one distance (docs/benchmarks.md, \"K rules\")")
    kr.add_argument("folder", type=Path)
    kr.add_argument("--rules", default=",".join(K_RULES))
    kr.add_argument("--distance", default="classwise-mix", choices=DISTANCES[:-1])
    args = parser.parse_args()
    if args.command == "k-rules":
        try:
            evaluate_k_rules(args.folder, args.rules.split(","), args.distance)
        except ValueError as exc:   # an unknown or malformed rule
            raise SystemExit(f"--rules: {exc}") from None
    elif args.command == "generate":
        generate(args.family, [int(s) for s in args.seeds.split(",")], args.out,
                 [c for c in args.cells.split(",") if c] or None, shlex.split(args.bench_args))
    else:
        evaluate(args.folder, args.distances.split(","), args.partitions)


if __name__ == "__main__":
    main()
