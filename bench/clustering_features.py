"""Which distance between probe uploads finds a family's planted groups? Offline, on stored probes.

Step 1 keeps the probe and root-round uploads of every cell and seed of a family (one short bench
run each: 6 root rounds, the probe, 1 cluster and 1 leaf round):

    python bench/clustering_features.py generate --family core --seeds 0,1,2 --out /tmp/probes

Step 2 clusters the stored probes with LSAC (silhouette K rule, min_silhouette 0.15, as the
service) on each distance and prints K, the ARI against the planted groups and the best silhouette
per cell and seed, then a summary (mean ARI on structured cells, cells with ARI >= 0.9 among those
with >= 30 images, K = 1 on cells without structure):

    python bench/clustering_features.py evaluate /tmp/probes [--distances update,classwise-mix]

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
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

FEATURES = "features.safetensors"   # the arrays; features.json beside it: groups, round stages, the service's K
DISTANCES = ("update", "centered", "head", "lora", "rows", "classwise-held", "classwise", "classwise-mix",
             "update-rounds")


def generate(family: str, seeds: list[int], out: Path) -> None:
    from hilora.bench.family import family_cells

    out.mkdir(parents=True, exist_ok=True)
    for cell in family_cells(family):
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
                                "--workdir", str(work), "--no-progress"], check=True, stdout=subprocess.DEVNULL)
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


def evaluate(folder: Path, names: list[str]) -> None:
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
            result = lsac(D, k_rule="silhouette", min_silhouette=0.15, seed=0)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("--family", default="core")
    gen.add_argument("--seeds", default="0,1,2")
    gen.add_argument("--out", type=Path, required=True)
    ev = sub.add_parser("evaluate")
    ev.add_argument("folder", type=Path)
    ev.add_argument("--distances", default=",".join(DISTANCES))
    args = parser.parse_args()
    if args.command == "generate":
        generate(args.family, [int(s) for s in args.seeds.split(",")], args.out)
    else:
        evaluate(args.folder, args.distances.split(","))


if __name__ == "__main__":
    main()
