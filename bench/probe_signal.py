"""How well do a federation's probe and root-round uploads separate its planted groups?

For each done root round and the probe round of the first federation in a bench work folder
(``hilora bench --partition FILE --workdir DIR``; uploads are kept there), LSAC (defaults: knn 5,
contrast 1.25) on that round's update similarity, and on the mean similarity of several rounds;
prints K, the ARI against the planted groups (client names ``<group>-<i>``), the contrast ratio,
and K and ARI without the contrast test. docs/benchmarks.md, "Screening the levers".

    python bench/probe_signal.py /tmp/w-n20-rot [more work folders]
"""
import sys, json
import numpy as np
from pathlib import Path
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from sklearn.metrics import adjusted_rand_score
from coordinator.blobs import BlobStore
from coordinator.models import Round, Task, AdapterVersion, Client, Federation
from shared.config import FederationConfig
from shared.probes import probe_distance
from shared.subspace import lsac
from shared.tensors import unpack_tensors

def analyse(work):
    eng = create_engine(f"sqlite:///{work}/coordinator.db")
    blobs = BlobStore(Path(work) / "blobs")
    with Session(eng) as s:
        fed = s.scalars(select(Federation)).first()
        cfg = FederationConfig.model_validate(fed.config)
        names = {c.id: c.name for c in s.scalars(select(Client))}
        rounds = list(s.scalars(select(Round).where(Round.federation_id == fed.id, Round.stage.in_(["root", "probe"]), Round.status == "done").order_by(Round.id)))
        sims = []
        order = None
        for r in rounds:
            tasks = sorted(s.scalars(select(Task).where(Task.round_id == r.id, Task.status == "done")), key=lambda t: t.client_id)
            ids = [t.client_id for t in tasks]
            if order is None: order = ids
            if ids != order or any(t.upload_sha256 is None for t in tasks): continue
            root = unpack_tensors(blobs.get_bytes(s.get(AdapterVersion, r.input_root_version_id).blob_sha256))
            probes = [unpack_tensors(blobs.get_bytes(t.upload_sha256)) for t in tasks]
            sims.append((r.stage, r.number, 1.0 - probe_distance(cfg.manifest, "update", root, probes)))
    groups = [names[i].rsplit("-", 1)[0] for i in order]
    out = {}
    def run(label, S):
        D = np.clip(1.0 - S, 0, 2)
        res = lsac(D, k_min=1, k_max=10, knn=5, contrast=1.25, seed=0)
        forced = lsac(D, k_min=1, k_max=10, knn=5, contrast=0.0, seed=0)
        print(f"  {label:<22} K={res.k} ARI={adjusted_rand_score(groups, res.labels):.2f} contrast={res.contrast_ratio or 0:.3f} | no-test K={forced.k} ARI={adjusted_rand_score(groups, forced.labels):.2f}")
    for st, num, S in sims:
        run(f"{st} {num}", S)
    probe = [S for st, _, S in sims if st == "probe"][0]
    roots = [S for st, _, S in sims if st == "root"]
    run("mean(root[1:]+probe)", np.mean(roots[1:] + [probe], axis=0))
    run("mean(all)", np.mean(roots + [probe], axis=0))
    run("mean(last3 root+probe)", np.mean(roots[-3:] + [probe], axis=0))

for w in sys.argv[1:]:
    print(w); analyse(w)
