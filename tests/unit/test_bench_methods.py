"""``hilora bench``: every method is the configuration it claims to be, the clustering variants are
what they say (k-means on flattened updates, the paper's median-sigma LSAC), and the one engine
run on a tiny random model uploads exactly the factors each configuration aggregates."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from hilora.bench import (
    BASELINES,
    METHODS,
    BenchSetup,
    default_methods,
    method_config,
    parse_methods,
    parse_rounds,
    preset,
)
from hilora.options import RunOptions
from shared.manifest import AdapterManifest, HeadSpec, TierSpec, qv_targets
from shared.subspace import (
    gram_kmeans_labels,
    lsac,
    lsac_paper,
    median_sigma_affinity,
    update_gram,
)

pytestmark = pytest.mark.unit

OPTS = RunOptions(root_rounds=3, cluster_rounds=2, leaf_rounds=1)


def test_flat_baselines_spend_every_round_on_one_global_adapter():
    for name in BASELINES:
        cfg = method_config(name, OPTS)
        assert not cfg.hierarchical and not cfg.cluster.enabled
        assert (cfg.schedule.root_rounds, cfg.schedule.cluster_rounds, cfg.schedule.leaf_rounds) == (6, 0, 0)
        assert cfg.schedule.local_epochs == OPTS.local_epochs
        assert cfg.schedule.unseen_leaf_rounds == OPTS.unseen_leaf_rounds
    hilora = method_config("hilora", OPTS)
    assert hilora.hierarchical
    assert (hilora.schedule.root_rounds, hilora.schedule.cluster_rounds, hilora.schedule.leaf_rounds) == (3, 2, 1)


def test_fedsa_averages_a_and_keeps_b_local():
    root = method_config("fedsa", OPTS).root
    assert (root.A, root.B, root.head, root.aggregation) == ("aggregate", "local", "aggregate", "factor_avg")
    assert root.uploaded_factors() == ("A", "head")
    assert set(root.trained_factors()) == {"A", "B", "head"}


def test_ffa_freezes_a_and_averages_b():
    root = method_config("ffa", OPTS).root
    assert (root.A, root.B, root.aggregation) == ("frozen", "aggregate", "factor_avg")
    assert "A" not in root.trained_factors()
    assert root.uploaded_factors() == ("B", "head")


def test_fedit_averages_factors_and_flexlora_aggregates_in_product_space():
    fedit = method_config("fedit", OPTS).root
    flex = method_config("flexlora", OPTS).root
    assert (fedit.A, fedit.B, fedit.aggregation) == ("aggregate", "aggregate", "factor_avg")
    assert (flex.A, flex.B, flex.aggregation) == ("aggregate", "aggregate", "product_svd")


def test_local_uploads_nothing():
    root = method_config("local", OPTS).root
    assert root.uploaded_factors() == ()
    assert set(root.trained_factors()) == {"A", "B", "head"}


def test_ablations_change_one_thing_of_hilora():
    hilora = method_config("hilora", OPTS)
    assert method_config("no-cluster", OPTS).clustering.force_k == 1
    no_ortho = method_config("no-ortho", OPTS)
    assert (no_ortho.training.gamma_c, no_ortho.training.gamma_l) == (0.0, 0.0)
    assert (hilora.training.gamma_c, hilora.training.gamma_l) == (OPTS.gamma_c, OPTS.gamma_l)
    assert method_config("kmeans-flat", OPTS).clustering.algorithm == "kmeans-flat"
    assert method_config("lsac-subspace", OPTS).clustering.features == "subspace"
    assert method_config("lsac-update", OPTS).clustering.features == "update"
    paper = method_config("lsac-paper", OPTS)
    assert paper.clustering.algorithm == "lsac-paper" and paper.clustering.features == "subspace"
    for name in ("no-cluster", "no-ortho", "kmeans-flat", "lsac-subspace", "lsac-paper"):
        cfg = method_config(name, OPTS)
        assert cfg.root == hilora.root and cfg.cluster == hilora.cluster and cfg.schedule == hilora.schedule


def test_every_method_is_a_valid_federation_config():
    dim, depth, rank = 8, 2, 2
    manifest = AdapterManifest(targets=qv_targets(depth, dim), tiers={t: TierSpec(rank=rank, alpha=rank)
                                                                      for t in ("root", "cluster", "leaf")},
                               head=HeadSpec(in_features=dim, num_classes=3))
    backbone = {"model": "vit_tiny_patch16_224", "model_kwargs": {}, "sha256": "0" * 64}
    for name in METHODS:
        config = method_config(name, OPTS, {"a": "g1", "b": "g2"}).federation_config(backbone, manifest)
        assert config.cluster.enabled == (name not in BASELINES)


def test_oracle_clusters_by_the_planted_groups_and_runs_only_when_asked_for():
    from hilora.bench import planted_assignment

    groups = {"up-00": "upright", "up-01": "upright", "perm-00": "permuted", "perm-01-unseen": "permuted"}
    assert planted_assignment(groups) == {"perm-00": 0, "perm-01-unseen": 0, "up-00": 1, "up-01": 1}
    oracle = method_config("oracle", OPTS, groups)
    hilora = method_config("hilora", OPTS)
    assert oracle.clustering.algorithm == "manual" and oracle.clustering.assignment == planted_assignment(groups)
    assert (oracle.root, oracle.cluster, oracle.schedule, oracle.training) == (
        hilora.root, hilora.cluster, hilora.schedule, hilora.training)
    assert "oracle" in parse_methods(["oracle"]) and "oracle" not in default_methods(OPTS)
    with pytest.raises(ValueError, match="planted groups"):
        method_config("oracle", OPTS)


def test_default_methods_skip_the_feature_set_hilora_already_uses():
    assert "lsac-update" not in default_methods(RunOptions(features="update"))
    assert "lsac-subspace" in default_methods(RunOptions(features="update"))
    assert "lsac-subspace" not in default_methods(RunOptions(features="subspace"))
    assert default_methods(OPTS)[0] == "hilora"


def test_presets_use_the_demo_settings_and_the_paper_shape():
    quick, full = preset(True), preset(False)
    assert (quick.root_rounds, quick.cluster_rounds, quick.leaf_rounds) == (2, 2, 1)
    assert (full.root_rounds, full.cluster_rounds, full.leaf_rounds) == (20, 20, 10)
    assert quick.partition == full.partition == "demo"
    assert quick.local_epochs == full.local_epochs and quick.rank == full.rank
    standard = preset("standard")
    assert (standard.root_rounds, standard.cluster_rounds, standard.leaf_rounds) == (6, 6, 3)
    assert standard.local_epochs == quick.local_epochs and standard.unseen_leaf_rounds == 2
    assert preset("quick") == quick and preset("full") == full
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")


def test_parse_rounds_and_methods():
    assert parse_rounds("4/3/2") == (4, 3, 2)
    assert parse_rounds(" 1/0/0 ") == (1, 0, 0)
    for bad in ("4/3", "4/3/2/1", "a/b/c", "0/1/1", "-1/2/3", "4//2"):
        with pytest.raises(ValueError, match="--rounds"):
            parse_rounds(bad)
    assert parse_methods(["hilora,fedit", "local", "fedit"]) == ["hilora", "fedit", "local"]
    assert parse_methods(None) == []
    with pytest.raises(ValueError, match="unknown method.*'fedavg'"):
        parse_methods(["hilora,fedavg"])


# ------------------------------------------------------------------ the clustering variants

def _planted_updates(seed: int = 0, per_group: int = 5, groups: int = 3, d: int = 12, r: int = 2):
    """Clients whose update B A - B_root A_root comes from one of ``groups`` directions, plus noise."""
    rng = np.random.default_rng(seed)
    root = {"t": (rng.standard_normal((d, r)), rng.standard_normal((r, d)))}
    centres = [(rng.standard_normal((d, r)), rng.standard_normal((r, d))) for _ in range(groups)]
    clients, truth = [], []
    for g in range(groups):
        for _ in range(per_group):
            dB = centres[g][0] + 0.05 * rng.standard_normal((d, r))
            dA = centres[g][1] + 0.05 * rng.standard_normal((r, d))
            clients.append({"t": (root["t"][0] + 0.3 * dB, root["t"][1] + 0.3 * dA)})
            truth.append(g)
    return clients, root, np.array(truth)


def _flattened(clients, root):
    B0, A0 = root["t"]
    return np.stack([(c["t"][0] @ c["t"][1] - B0 @ A0).ravel() for c in clients])


def test_kmeans_flat_is_kmeans_on_the_flattened_updates():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    clients, root, truth = _planted_updates()
    flat = _flattened(clients, root)
    gram = update_gram(clients, root)
    np.testing.assert_allclose(gram, flat @ flat.T, rtol=1e-9, atol=1e-9)
    labels = gram_kmeans_labels(gram, 3, seed=0)
    direct = KMeans(n_clusters=3, n_init=10, random_state=0).fit_predict(flat)
    assert adjusted_rand_score(labels, direct) == pytest.approx(1.0)
    assert adjusted_rand_score(labels, truth) == pytest.approx(1.0)
    assert labels[0] == 0                                    # canonical labels
    assert np.all(gram_kmeans_labels(gram, 1) == 0)


def _two_groups(sizes, seed=1):
    rng = np.random.default_rng(seed)
    points = np.concatenate([rng.normal(5 * g, 0.05, (n, 2)) for g, n in enumerate(sizes)])
    return np.linalg.norm(points[:, None] - points[None], axis=2)


def test_lsac_paper_uses_the_median_distance_and_allows_k_1():
    D = _two_groups((9, 3))
    sigma = np.median(D[np.triu_indices(12, 1)])
    S = median_sigma_affinity(D)
    assert S[0, 10] == pytest.approx(np.exp(-D[0, 10] ** 2 / (2 * sigma**2)))
    assert np.all(np.diag(S) == 0)
    # most pairs within a group: the median is a within-group distance and K = 2 is found
    found = lsac_paper(D, k_min=1, k_max=5, seed=0)
    assert found.k == 2 and len(set(found.labels[:9])) == 1 and found.labels[0] != found.labels[9]
    # balanced groups: the median is a between-group distance and the paper's eigengap over [1, k_max]
    # picks K = 1 (what method.md measured before any code; the service's lsac does not)
    balanced = _two_groups((6, 6))
    assert lsac_paper(balanced, k_min=1, k_max=5, seed=0).k == 1
    assert lsac(balanced, knn=3, seed=0).k == 2
    assert lsac_paper(balanced, k_min=2, k_max=5, seed=0).k == 2
    # forcing K = 1 is the "no-cluster" ablation, through the service's own lsac
    assert lsac(balanced, force_k=1).k == 1
    with pytest.raises(ValueError):
        lsac_paper(D, k_min=0)


# ------------------------------------------------------------------ the engine on a tiny random model

@pytest.fixture(scope="module")
def tiny_service(tmp_path_factory):
    """A service in process and a set-up on a tiny random ViT with random data (3 clients per group,
    one of each held out as unseen)."""
    import torch
    from safetensors.torch import save_file

    from hilora.bench import open_service
    from worker.backbone import DEMO_BACKBONE_KWARGS, build_backbone, checkpoint_sha256, manifest_for_model
    from worker.data import ClientData

    torch.set_num_threads(1)
    workdir = tmp_path_factory.mktemp("tiny-engine")
    kwargs = {**DEMO_BACKBONE_KWARGS, "embed_dim": 16, "depth": 1, "num_heads": 2}
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny_patch16_224", kwargs, None)
    path = workdir / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    artifact = SimpleNamespace(model="vit_tiny_patch16_224", model_kwargs=kwargs, path=path,
                               sha256=checkpoint_sha256(path))
    manifest = manifest_for_model(backbone, rank=2)
    rng = np.random.default_rng(0)
    clients = [SimpleNamespace(name=f"{g}-{i:02d}", group=g, unseen=(i == 2)) for g in ("a", "b") for i in range(3)]

    def arrays(n):
        return rng.random((n, 1, 16, 16), dtype=np.float32), rng.integers(0, 10, n).astype(np.int64)

    data = {}
    for c in clients:
        (xt, yt), (xs, ys) = arrays(16), arrays(8)
        data[c.name] = ClientData(xt, yt, xs, ys, np.arange(16), np.arange(8))
    opts = RunOptions(root_rounds=2, cluster_rounds=1, leaf_rounds=1, unseen_leaf_rounds=1, local_epochs=1,
                      probe_epochs=1, rank=2, threads=1, knn=2, k_max=3)
    partition = SimpleNamespace(name="random", model_dump=lambda mode="json": {"name": "random"})
    setup = BenchSetup(opts=opts, artifact=artifact, partition=partition,
                       train=[c for c in clients if not c.unseen], unseen=[c for c in clients if c.unseen],
                       data=data, manifest=manifest)
    service = open_service(workdir / "service", opts)
    service.admin.put_blob(service.admin_token, path.read_bytes())
    yield service, setup, setup.write_partition(workdir)
    service.close()


def test_a_single_cluster_found_skips_the_cluster_stage(tiny_service):
    """clustering.skip_single_cluster (RunOptions, default on) reaches the service: on data without
    groups the clustering finds K = 1, no cluster round runs, and +cluster is the root's model (the
    cluster adapter at its version 0). (A forced K = 1 keeps its rounds: tests/api.)"""
    from dataclasses import replace

    from hilora.bench import run_method

    service, setup, partition_file = tiny_service
    o = setup.opts
    assert o.skip_single_cluster and method_config("hilora", o).clustering.skip_single_cluster
    assert not method_config("hilora", replace(o, skip_single_cluster=False)).clustering.skip_single_cluster
    found = run_method(service, setup, "lsac-subspace", partition_file)
    assert found["clustering"]["k"] == 1
    assert [r["stage"] for r in found["rounds"]] == ["root"] * o.root_rounds + ["leaf"] * o.leaf_rounds
    assert found["tiers"]["cluster"] == found["tiers"]["root"]


def _factor_bytes(manifest, factors, rounds, clients):
    from shared.tensors import pack_tensors

    tensors = {name: np.zeros(shape, np.float32) for f in factors
               for name, shape in manifest.factor_shapes("root", f).items()}
    return rounds * clients * len(pack_tensors(tensors))


def test_engine_uploads_exactly_the_aggregated_factors(tiny_service):
    from hilora.bench import run_method

    service, setup, partition_file = tiny_service
    m, n, total = setup.manifest, len(setup.train), setup.opts.total_rounds
    expected = {"local": 0, "fedit": _factor_bytes(m, ("A", "B", "head"), total, n),
                "fedsa": _factor_bytes(m, ("A", "head"), total, n), "ffa": _factor_bytes(m, ("B", "head"), total, n)}
    for name, size in expected.items():
        result = run_method(service, setup, name, partition_file)
        assert result["bytes_uploaded"] == size, name
        assert [r["stage"] for r in result["rounds"]] == ["root"] * total
        assert result["clustering"] is None and set(result["tiers"]) == {"root"}
        assert result["unseen"]["zero_shot"]["n"] == 2 and result["unseen"]["bytes_uploaded"] == 0
        assert all(0.0 <= row["final"] <= 1.0 for row in result["clients"])


def test_engine_runs_the_cascade_for_hierarchical_methods(tiny_service):
    from dataclasses import replace

    from hilora.bench import run_method

    service, setup, partition_file = tiny_service
    # the random data has no groups (K = 1 found): the cluster stage runs only when asked to
    setup = replace(setup, opts=replace(setup.opts, skip_single_cluster=False))
    o = setup.opts
    for name in ("no-cluster", "kmeans-flat", "lsac-paper"):
        result = run_method(service, setup, name, partition_file)
        stages = [r["stage"] for r in result["rounds"]]
        assert stages == ["root"] * o.root_rounds + ["cluster"] * o.cluster_rounds + ["leaf"] * o.leaf_rounds
        assert result["clustering"]["clusterer"] == method_config(name, o).clustering.algorithm
        assert set(result["tiers"]) == {"root", "cluster", "leaf"}
        assert result["unseen"]["bytes_uploaded"] > 0          # unseen clients' probes
        assert all(r["cluster"] in set(result["clustering"]["labels"]) for r in result["unseen_clients"])
        if name == "no-cluster":
            assert result["clustering"]["k"] == 1
