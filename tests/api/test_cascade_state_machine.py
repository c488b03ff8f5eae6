"""The coordinator's whole stage machine driven by simulated clients (no torch): root rounds,
probe, LSAC, cluster rounds, leaf rounds, serving, and onboarding of a late client."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CLASSES, DEPTH, DIM, RANK, admin_headers, bearer, create_federation, register, tick
from sqlalchemy import select

from coordinator.models import Round
from shared.manifest import qv_targets
from shared.tensors import pack_tensors, unpack_tensors

pytestmark = pytest.mark.api

GROUP_OF = {"a0": 0, "a1": 0, "a2": 0, "b0": 1, "b1": 1, "b2": 1}


def group_directions(seed: int = 7) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{t.name: rng.normal(size=(DIM, RANK)) for t in qv_targets(DEPTH, DIM)} for _ in range(2)]


def simulated_upload(received: dict[str, np.ndarray], group: int, seed: int, dirs) -> dict[str, np.ndarray]:
    """What a client of ``group`` would upload: the received factors moved along its group's
    direction, plus noise."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in qv_targets(DEPTH, DIM):
        out[f"{t.name}.lora_A"] = received[f"{t.name}.lora_A"] + 0.01 * rng.normal(size=(RANK, DIM))
        out[f"{t.name}.lora_B"] = received[f"{t.name}.lora_B"] + dirs[group][t.name] + 0.05 * rng.normal(size=(DIM, RANK))
    out["head.weight"] = received["head.weight"] + (group + 1) * 0.1 + 0.01 * rng.normal(size=(CLASSES, DIM))
    out["head.bias"] = received["head.bias"] + 0.01 * rng.normal(size=(CLASSES,))
    return {k: v.astype(np.float32) for k, v in out.items()}


def run_pending(api, clients: dict[str, tuple[int, str]], dirs, seed: int, groups=GROUP_OF,
                leaf_metrics: dict | None = None, losses=None) -> list[dict]:
    """Every client leases and finishes its task (if it has one). Returns the tasks run, each with
    the client's name under "client". A refine task reads every candidate's adapter and reports
    ``losses(name, candidates)``."""
    ran = []
    for name, (cid, token) in sorted(clients.items()):
        body = api.post(f"/v1/clients/{cid}/lease", headers=bearer(token)).json()
        task = body["task"]
        if task is None:
            continue
        ran.append({**task, "client": name})
        if task["stage"] == "refine":
            for c in task["candidates"]:  # a refine task may read every candidate's adapter
                assert api.get(f"/v1/adapters/{c['adapter']['id']}", headers=bearer(token)).status_code == 200
        received = unpack_tensors(api.get(f"/v1/adapters/{(task['cluster'] or task['root'])['id']}",
                                          headers=bearer(token)).content)
        if task["upload"]:
            tensors = simulated_upload(received, groups[name], seed, dirs)
            keep = {k: v for k, v in tensors.items()
                    if ("A" in task["upload"] and k.endswith("lora_A")) or ("B" in task["upload"] and k.endswith("lora_B"))
                    or ("head" in task["upload"] and k.startswith("head."))}
            r = api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                        content=pack_tensors(keep), headers=bearer(token))
            assert r.status_code == 200, r.text
        else:
            r = api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                        content=b"x", headers=bearer(token))
            assert r.status_code == 409 and r.json()["error"] == "no_upload_expected"
        metrics = ((leaf_metrics or {"acc_root": 0.5, "acc_cluster": 0.7, "acc_leaf": 0.9}) if task["stage"] == "leaf"
                   else losses(name, task["candidates"]) if task["stage"] == "refine" else {})
        r = api.post(f"/v1/tasks/{task['task_id']}/complete",
                     json={"lease_id": task["lease_id"], "num_samples": 10, "metrics": metrics}, headers=bearer(token))
        assert r.status_code == 200, r.text
    tick(api.app)
    return ran


def status(api, fid):
    return api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()


def test_full_cascade_with_simulated_clients(api, app):
    dirs = group_directions()
    fid, secret = create_federation(api, schedule={"min_clients": 6, "root_rounds": 2, "cluster_rounds": 2,
                                                   "leaf_rounds": 2, "unseen_leaf_rounds": 1})
    clients = {name: register(api, fid, secret, name) for name in GROUP_OF}
    tick(app)
    assert status(api, fid)["state"] == "root"
    for r in range(2):
        ran = run_pending(api, clients, dirs, seed=r)
        assert len(ran) == 6 and {t["stage"] for t in ran} == {"root"}
    s = status(api, fid)
    assert s["state"] == "probe" and s["root_version"] == 2
    ran = run_pending(api, clients, dirs, seed=10)
    assert {t["stage"] for t in ran} == {"probe"} and all(sorted(t["upload"]) == ["A", "B", "head"] for t in ran)
    s = status(api, fid)
    assert s["state"] == "cluster"
    assert s["clustering"]["k"] == 2
    members = sorted(sorted(c["members"]) for c in s["clusters"])
    assert members == [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    # a client can read its own cluster's adapter, not the other cluster's
    a0_cid, a0_token = clients["a0"]
    task = api.post(f"/v1/clients/{a0_cid}/lease", headers=bearer(a0_token)).json()["task"]
    assert task["stage"] == "cluster" and task["cluster"]["version"] == 0
    other = [c for c in s["clusters"] if "a0" not in c["members"]][0]
    with app.state.session_factory() as session:
        from coordinator.models import AdapterVersion

        other_version = session.scalars(select(AdapterVersion).where(AdapterVersion.cluster_id == other["id"])).first()
    assert api.get(f"/v1/adapters/{other_version.id}", headers=bearer(a0_token)).status_code == 403
    assert api.get(f"/v1/adapters/{task['cluster']['id']}", headers=bearer(a0_token)).status_code == 200
    # release the lease by letting it expire, then run the cluster rounds
    app.state.clock.advance(31)
    tick(app)
    for r in range(2):
        ran = run_pending(api, clients, dirs, seed=20 + r)
        assert {t["stage"] for t in ran} == {"cluster"} and len(ran) == 6
        assert all(t["cluster"] is not None and t["train_tier"] == "cluster" for t in ran)
    s = status(api, fid)
    assert s["state"] == "leaf"
    assert all(c["adapter_version"] == 2 for c in s["clusters"])
    ran = run_pending(api, clients, dirs, seed=30)
    assert {t["stage"] for t in ran} == {"leaf"} and all(t["reset_leaf"] and t["upload"] == [] for t in ran)
    ran = run_pending(api, clients, dirs, seed=31)
    assert all(not t["reset_leaf"] for t in ran)
    s = status(api, fid)
    assert s["state"] == "serving"
    # the leaf tasks evaluated every final version after training: no evaluation round follows
    assert run_pending(api, clients, dirs, seed=32) == []
    assert not [r for r in status(api, fid)["rounds"] if r["stage"] == "eval"]
    # a late client is onboarded: probe from the final root, nearest cluster, then its leaf
    late = {"b-late": register(api, fid, secret, "b-late")}
    late_groups = {"b-late": 1}
    tick(app)
    ran = run_pending(api, late, dirs, seed=40, groups=late_groups)
    assert [t["stage"] for t in ran] == ["probe"] and ran[0]["scope"].startswith("client:")
    ran = run_pending(api, late, dirs, seed=41, groups=late_groups)
    assert [t["stage"] for t in ran] == ["leaf"] and ran[0]["cluster"] is not None
    s = status(api, fid)
    b_cluster = [c for c in s["clusters"] if "b0" in c["members"]][0]
    assert "b-late" in b_cluster["members"]
    assert s["onboarding_pending"] == 0
    report = api.get(f"/v1/federations/{fid}/report", headers=admin_headers()).json()
    late_report = [c for c in report["clients"] if c["name"] == "b-late"][0]
    assert late_report["cohort"] == "late" and late_report["zero_shot"] == 0.7
    assert report["uploaded_bytes"] > 0
    with app.state.session_factory() as session:
        stages = [r.stage for r in session.scalars(select(Round).order_by(Round.id))]
    assert stages[:3] == ["root", "root", "probe"]


def test_probe_tasks_carry_the_clustering_probe_options_and_other_tasks_do_not(api, app):
    dirs = group_directions()
    fid, secret = create_federation(api, schedule={"min_clients": 6, "root_rounds": 1, "cluster_rounds": 1,
                                                   "leaf_rounds": 1},
                                    clustering={"k_max": 4, "knn": 2, "probe_loss": "balanced", "probe_steps": 7,
                                                "head_weight": 0.5})
    clients = {name: register(api, fid, secret, name) for name in GROUP_OF}
    tick(app)
    root = run_pending(api, clients, dirs, seed=0)
    assert {(t["stage"], t["steps"], t["loss"]) for t in root} == {("root", None, "ce")}
    probe = run_pending(api, clients, dirs, seed=1)
    assert {(t["stage"], t["steps"], t["loss"]) for t in probe} == {("probe", 7, "balanced")}
    s = status(api, fid)
    assert s["state"] == "cluster" and s["clustering"]["k"] == 2   # head_weight 0.5 still separates the groups
    cluster = run_pending(api, clients, dirs, seed=2)
    assert {(t["stage"], t["steps"], t["loss"]) for t in cluster} == {("cluster", None, "ce")}


def test_root_and_cluster_tasks_evaluate_what_they_receive_every_evaluate_every_rounds(api, app):
    dirs = group_directions()
    fid, secret = create_federation(api, schedule={"min_clients": 6, "root_rounds": 5, "cluster_rounds": 3,
                                                   "leaf_rounds": 1, "evaluate_every": 2},
                                    clustering={"k_max": 4, "knn": 2})
    clients = {name: register(api, fid, secret, name) for name in GROUP_OF}
    tick(app)
    seen = []
    for seed in range(12):
        ran = run_pending(api, clients, dirs, seed=seed)
        seen += [(t["stage"], t["round_number"], t["scope"], t["evaluate"]) for t in ran]
        if status(api, fid)["state"] == "serving":
            break
    flags: dict[tuple[str, int, str], set[bool]] = {}
    for stage, number, scope, flag in seen:
        flags.setdefault((stage, number, scope), set()).add(flag)
    assert all(len(f) == 1 for f in flags.values()), flags   # every client of a round is told the same
    root = {number: f.pop() for (stage, number, _), f in flags.items() if stage == "root"}
    assert root == {1: True, 2: False, 3: True, 4: False, 5: True}
    cluster = {(scope, number): f.pop() for (stage, number, scope), f in flags.items() if stage == "cluster"}
    assert len({scope for scope, _ in cluster}) == 2
    assert cluster == {(scope, n): n != 2 for scope, _ in cluster for n in (1, 2, 3)}
    assert status(api, fid)["state"] == "serving"


def test_evaluate_every_must_be_a_positive_round_count(api):
    from conftest import tiny_config, upload_backbone

    sha = upload_backbone(api)
    for bad in (0, -1, "two", 1.5):
        config = tiny_config("bad", sha)
        config["schedule"]["evaluate_every"] = bad
        r = api.post("/v1/federations", json={"config": config}, headers=admin_headers())
        assert r.status_code == 422 and "evaluate_every" in r.text, r.text


@pytest.mark.parametrize("clustering", [{"probe_loss": "focal"}, {"probe_steps": 0}, {"head_weight": -1},
                                        {"classwise_weight": -0.1}, {"classwise_weight": 1.5},
                                        {"head_weight": 1e4}, {"partitions": "kmeans"}, {"partitions": None}])
def test_bad_probe_options_are_refused(api, clustering):
    from conftest import tiny_config, upload_backbone

    sha = upload_backbone(api)
    r = api.post("/v1/federations", json={"config": tiny_config("bad", sha, clustering=clustering)},
                 headers=admin_headers())
    assert r.status_code == 422 and next(iter(clustering)) in r.text, r.text


@pytest.mark.parametrize("partitions", [None, "spectral"])
def test_the_probe_is_class_balanced_by_default_and_lsac_tries_the_configured_partitions(api, app, monkeypatch,
                                                                                       partitions):
    """The defaults chosen on the family (issue 14): probe tasks carry loss 'balanced' unless told
    otherwise, and the clustering tries spectral and average-linkage partitions (or the configured
    ones): the real lsac runs, watched for the partitions it was asked to try."""
    import coordinator.services.clustering as clustering_service

    asked = []
    real_lsac = clustering_service.lsac

    def watched(*args, **kwargs):
        asked.append(kwargs.get("partitions"))
        return real_lsac(*args, **kwargs)

    monkeypatch.setattr(clustering_service, "lsac", watched)
    dirs = group_directions()
    options = {"k_max": 4, "knn": 2} | ({} if partitions is None else {"partitions": partitions})
    fid, secret = create_federation(api, schedule={"min_clients": 6, "root_rounds": 1, "cluster_rounds": 1,
                                                   "leaf_rounds": 1}, clustering=options)
    clients = {name: register(api, fid, secret, name) for name in GROUP_OF}
    tick(app)
    run_pending(api, clients, dirs, seed=0)
    probe = run_pending(api, clients, dirs, seed=1)
    assert {(t["stage"], t["loss"]) for t in probe} == {("probe", "balanced")}
    assert asked == [partitions or "spectral+linkage"]
    assert status(api, fid)["clustering"]["k"] == 2


def test_the_model_each_client_chose_shows_in_the_accuracy_views(api, app):
    dirs = group_directions()
    fid, secret = create_federation(api, schedule={"min_clients": 6, "root_rounds": 1, "cluster_rounds": 1,
                                                   "leaf_rounds": 1}, training={"validation_fraction": 0.25})
    clients = {name: register(api, fid, secret, name) for name in GROUP_OF}
    tick(app)
    chosen = {"acc_root": 0.5, "acc_cluster": 0.7, "acc_leaf": 0.6, "val_root": 0.25, "val_cluster": 0.75,
              "val_leaf": 0.5, "selected": 1.0, "acc_selected": 0.7}
    for seed in range(6):
        if status(api, fid)["state"] == "serving":
            break
        run_pending(api, clients, dirs, seed=seed, leaf_metrics=chosen)
    assert status(api, fid)["state"] == "serving"
    headers = admin_headers()
    accuracy = api.get(f"/v1/federations/{fid}/accuracy", headers=headers).json()
    assert accuracy["latest"]["selected"]["mean"] == pytest.approx(0.7) and accuracy["latest"]["leaf"]["mean"] == 0.6
    assert {c["acc_selected"] for c in accuracy["clients"]} == {0.7}
    table = api.get(f"/v1/federations/{fid}/clients", headers=headers).json()
    assert {c["acc_selected"] for c in table} == {0.7}


@pytest.mark.parametrize(("clustering", "cluster_stage"), [
    ({}, False),                                   # K = 1 found: the cluster stage is skipped (default)
    ({"skip_single_cluster": False}, True),        # ... or trained, when asked
    ({"force_k": 1}, True),                        # K = 1 forced (the no-cluster ablation): trained
    ({"refine_rounds": 1}, True),                  # a refinement follows the first cluster round: trained
])
def test_a_single_cluster_found_skips_the_cluster_stage(api, app, clustering, cluster_stage):
    """clustering.skip_single_cluster: when the clustering finds one cluster by its rule and no
    refinement follows, the leaf stage follows the probe, and the leaves start from the root's model
    (the cluster adapter at version 0: B = 0, the root's head)."""
    dirs = group_directions()
    one_group = {name: 0 for name in GROUP_OF}
    fid, secret = create_federation(api, schedule={"min_clients": 6, "root_rounds": 1, "cluster_rounds": 2,
                                                   "leaf_rounds": 1, "unseen_leaf_rounds": 1},
                                    clustering={"k_max": 4, "knn": 2, **clustering})
    clients = {name: register(api, fid, secret, name) for name in GROUP_OF}
    tick(app)
    run_pending(api, clients, dirs, seed=0, groups=one_group)
    assert status(api, fid)["state"] == "probe"
    run_pending(api, clients, dirs, seed=10, groups=one_group)
    s = status(api, fid)
    assert s["clustering"]["k"] == 1 and len(s["clusters"]) == 1
    assert s["state"] == ("cluster" if cluster_stage else "leaf")
    ran = run_pending(api, clients, dirs, seed=20, groups=one_group)
    assert {t["stage"] for t in ran} == {"cluster" if cluster_stage else "leaf"} and len(ran) == 6
    if not cluster_stage:
        assert all(t["cluster"]["version"] == 0 and t["reset_leaf"] for t in ran)
        assert status(api, fid)["state"] == "serving"
        with app.state.session_factory() as session:
            assert not session.scalars(select(Round).where(Round.stage == "cluster")).all()
