"""Routes through which results leave the coordinator (coordinator/routes_models.py): a client's
newest adapters, and the merged root-only and cluster-level models, on the tiny federation driven
by hand (root round, probe + LSAC, cluster round) with simulated clients."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest import (
    CLASSES,
    DIM,
    RANK,
    admin_headers,
    bearer,
    create_federation,
    register,
    tick,
    tiny_checkpoint,
)

from shared.manifest import AdapterManifest, qv_targets
from shared.merge import leaf_file_metadata, merge_lora, read_model_metadata, served_leaf
from shared.tensors import pack_tensors, read_safetensors_header, unpack_tensors

pytestmark = pytest.mark.api

GROUPS = {"a0": 0, "a1": 0, "a2": 0, "b0": 1, "b1": 1, "b2": 1}
# The tiny checkpoint holds only the head and blocks.0.attn.qkv.weight: a one-block manifest fits it.
TARGETS = qv_targets(1, DIM)
MANIFEST = {"targets": [t.model_dump() for t in TARGETS],
            "tiers": {t: {"rank": RANK, "alpha": 2.0 * RANK} for t in ("root", "cluster", "leaf")},
            "head": {"in_features": DIM, "num_classes": CLASSES}}
SCHEDULE = {"min_clients": 6, "root_rounds": 1, "cluster_rounds": 1, "leaf_rounds": 1, "unseen_leaf_rounds": 1}


def _upload_for(received: dict[str, np.ndarray], group: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(100 + group)
    out = {}
    for t in TARGETS:
        out[f"{t.name}.lora_A"] = received[f"{t.name}.lora_A"] + 0.01 * rng.normal(size=(RANK, DIM))
        out[f"{t.name}.lora_B"] = (received[f"{t.name}.lora_B"] + direction.normal(size=(DIM, RANK))
                                   + 0.05 * rng.normal(size=(DIM, RANK)))
    out["head.weight"] = received["head.weight"] + (group + 1) * 0.1 + 0.01 * rng.normal(size=(CLASSES, DIM))
    out["head.bias"] = received["head.bias"] + 0.01 * rng.normal(size=(CLASSES,))
    return {k: v.astype(np.float32) for k, v in out.items()}


def _run_round(api, clients: dict[str, tuple[int, str]], seed: int) -> list[str]:
    """Every client leases its task, uploads what it asks for and completes; then one tick."""
    stages = []
    for i, (name, (cid, token)) in enumerate(sorted(clients.items())):
        task = api.post(f"/v1/clients/{cid}/lease", headers=bearer(token)).json()["task"]
        if task is None:
            continue
        stages.append(task["stage"])
        ref = task["cluster"] or task["root"]
        received = unpack_tensors(api.get(f"/v1/adapters/{ref['id']}", headers=bearer(token)).content)
        if task["upload"]:
            tensors = _upload_for(received, GROUPS[name], seed * 100 + i)
            keep = {k: v for k, v in tensors.items()
                    if ("A" in task["upload"] and k.endswith("lora_A")) or ("B" in task["upload"] and k.endswith("lora_B"))
                    or ("head" in task["upload"] and k.startswith("head."))}
            r = api.put(f"/v1/tasks/{task['task_id']}/upload", params={"lease_id": task["lease_id"]},
                        content=pack_tensors(keep), headers=bearer(token))
            assert r.status_code == 200, r.text
        r = api.post(f"/v1/tasks/{task['task_id']}/complete",
                     json={"lease_id": task["lease_id"], "num_samples": 10, "metrics": {}}, headers=bearer(token))
        assert r.status_code == 200, r.text
    tick(api.app)
    return stages


def _adapter(api, ref: dict) -> dict[str, np.ndarray]:
    r = api.get(f"/v1/adapters/{ref['id']}", headers=admin_headers())
    assert r.status_code == 200
    return unpack_tensors(r.content)


def _model(api, path: str) -> tuple[dict[str, np.ndarray], dict]:
    r = api.get(path, headers=admin_headers())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["X-Hilora-Sha256"] == hashlib.sha256(r.content).hexdigest()
    meta = read_model_metadata(read_safetensors_header(r.content)["__metadata__"])
    return unpack_tensors(r.content), meta


def _assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-6, err_msg=key)


def test_client_adapters_and_merged_models_through_the_cascade(api, app):
    fid, secret = create_federation(api, manifest=MANIFEST, schedule=SCHEDULE,
                                    clustering={"k_max": 4, "knn": 2, "force_k": 2})
    clients = {name: register(api, fid, secret, name) for name in GROUPS}
    manifest = AdapterManifest.model_validate(MANIFEST)
    backbone = unpack_tensors(tiny_checkpoint())
    a0_id, a0_token = clients["a0"]

    # before training: root version 0, no cluster
    body = api.get(f"/v1/clients/{a0_id}/adapters", headers=bearer(a0_token)).json()
    assert body["cluster"] is None and body["root"]["version"] == 0 and body["root"]["tier"] == "root"

    tick(app)
    assert _run_round(api, clients, seed=1) == ["root"] * 6
    body = api.get(f"/v1/clients/{a0_id}/adapters", headers=bearer(a0_token)).json()
    assert body["root"]["version"] == 1 and body["cluster"] is None
    root_ref = body["root"]
    root = _adapter(api, root_ref)
    assert any(float(np.abs(v).max()) > 0 for k, v in root.items() if k.endswith("lora_B"))

    # the root-only model: backbone + newest root, with the root's head
    merged, meta = _model(api, f"/v1/federations/{fid}/root/model")
    _assert_same(merged, merge_lora(backbone, manifest, [root]))
    assert not np.allclose(merged["blocks.0.attn.qkv.weight"], backbone["blocks.0.attn.qkv.weight"])
    np.testing.assert_array_equal(merged["head.weight"], root["head.weight"])
    assert meta["tiers"] == ["root"] and meta["versions"]["root"] == root_ref
    assert meta["model"] == "vit_tiny_patch16_224" and meta["model_kwargs"] == {}
    assert meta["federation_id"] == fid and "cluster_label" not in meta

    # no clusters yet
    r = api.get(f"/v1/federations/{fid}/clusters/0/model", headers=admin_headers())
    assert r.status_code == 404 and r.json()["error"] == "cluster_not_found"

    # probe round -> LSAC (K forced to 2) -> cluster version 0, then one cluster round
    assert _run_round(api, clients, seed=2) == ["probe"] * 6
    body = api.get(f"/v1/clients/{a0_id}/adapters", headers=bearer(a0_token)).json()
    assert body["cluster"]["version"] == 0 and body["cluster"]["tier"] == "cluster"
    assert body["root"] == root_ref
    assert _run_round(api, clients, seed=3) == ["cluster"] * 6
    status = api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()
    assert status["state"] == "leaf"
    label_of = {m: c["label"] for c in status["clusters"] for m in c["members"]}
    assert label_of["a0"] == label_of["a1"] == label_of["a2"] != label_of["b0"]

    for name in ("a0", "b0"):
        cid, token = clients[name]
        body = api.get(f"/v1/clients/{cid}/adapters", headers=bearer(token)).json()
        assert body["cluster"]["version"] == 1 and body["root"] == root_ref
        cluster = _adapter(api, body["cluster"])
        path = f"/v1/federations/{fid}/clusters/{label_of[name]}/model"
        merged, meta = _model(api, path)
        _assert_same(merged, merge_lora(backbone, manifest, [root, cluster]))
        np.testing.assert_array_equal(merged["head.weight"], cluster["head.weight"])
        assert meta["tiers"] == ["root", "cluster"] and meta["cluster_label"] == label_of[name]
        assert meta["versions"] == {"root": root_ref, "cluster": body["cluster"]}
        # the same inputs: 304 without a body
        etag = api.get(path, headers=admin_headers()).headers["ETag"]
        r = api.get(path, headers={**admin_headers(), "If-None-Match": etag})
        assert r.status_code == 304 and r.content == b""
    a_model = _model(api, f"/v1/federations/{fid}/clusters/{label_of['a0']}/model")[0]
    b_model = _model(api, f"/v1/federations/{fid}/clusters/{label_of['b0']}/model")[0]
    assert not np.allclose(a_model["head.weight"], b_model["head.weight"])


def test_model_routes_refuse_and_report_clearly(api, app):
    fid, secret = create_federation(api, manifest=MANIFEST, schedule=SCHEDULE)
    a_id, a_token = register(api, fid, secret, "a0")
    b_id, b_token = register(api, fid, secret, "b0")
    model = f"/v1/federations/{fid}/root/model"
    cluster_model = f"/v1/federations/{fid}/clusters/0/model"

    # 401: no token, a wrong token, a client's token on the admin routes
    for path in (model, cluster_model, f"/v1/clients/{a_id}/adapters"):
        r = api.get(path)
        assert r.status_code == 401 and r.json()["error"] == "missing_token"
    for path in (model, cluster_model):
        r = api.get(path, headers=bearer(a_token))
        assert r.status_code == 401 and r.json()["error"] == "bad_admin_token"
    r = api.get(f"/v1/clients/{a_id}/adapters", headers=bearer("hlc_not-a-token"))
    assert r.status_code == 401 and r.json()["error"] == "bad_token"
    # 403: another client's adapters; the admin is not a client either
    r = api.get(f"/v1/clients/{b_id}/adapters", headers=bearer(a_token))
    assert r.status_code == 403 and r.json()["error"] == "not_your_client"
    assert api.get(f"/v1/clients/{b_id}/adapters", headers=bearer(b_token)).status_code == 200
    assert api.get(f"/v1/clients/{b_id}/adapters", headers=admin_headers()).status_code == 401
    # 404: unknown federation, unknown cluster label
    for path in (f"/v1/federations/{fid + 99}/root/model", f"/v1/federations/{fid + 99}/clusters/0/model"):
        r = api.get(path, headers=admin_headers())
        assert r.status_code == 404 and r.json()["error"] == "federation_not_found"
    r = api.get(cluster_model, headers=admin_headers())
    assert r.status_code == 404 and r.json()["error"] == "cluster_not_found"
    r = api.get(f"/v1/federations/{fid}/clusters/x/model", headers=admin_headers())
    assert r.status_code == 422
    # version 0 of the root exists from creation: the root-only model is the backbone with the root head
    merged, meta = _model(api, model)
    backbone = unpack_tensors(tiny_checkpoint())
    _assert_same(merged, backbone)
    assert meta["versions"]["root"]["version"] == 0


def test_a_backbone_that_does_not_fit_the_manifest_is_a_clear_conflict(api):
    # the default tiny manifest adapts two blocks; the tiny checkpoint has only blocks.0
    fid, _ = create_federation(api, name="mismatch")
    r = api.get(f"/v1/federations/{fid}/root/model", headers=admin_headers())
    assert r.status_code == 409 and r.json()["error"] == "backbone_mismatch"
    assert "blocks.1.attn.qkv.weight" in r.json()["detail"]


@pytest.mark.parametrize("mix", [None, 0.75, 1.0])
def test_export_composes_local_factors_and_the_leaf_like_the_worker(api, app, tmp_path, mix):
    """FedSA-style (root B kept on the clients, no clusters): ``export_client_model`` takes the
    coordinator's root, puts the client's local B over it and adds the leaf as the daemon uses it
    (training.leaf_mix: the mix its leaf file records; a leaf file without one is used as trained)."""
    import json

    from worker.client import CoordinatorClient
    from worker.export import export_client_model

    fid, secret = create_federation(api, manifest=MANIFEST, schedule={**SCHEDULE, "min_clients": 2},
                                    root={"B": "local", "aggregation": "factor_avg"}, cluster={"enabled": False})
    clients = {name: register(api, fid, secret, name) for name in ("a0", "b0")}
    tick(app)
    assert _run_round(api, clients, seed=5) == ["root", "root"]
    manifest = AdapterManifest.model_validate(MANIFEST)
    cid, token = clients["a0"]
    refs = api.get(f"/v1/clients/{cid}/adapters", headers=bearer(token)).json()
    assert refs["cluster"] is None and refs["root"]["version"] == 1
    root = _adapter(api, refs["root"])
    assert all(float(np.abs(v).max()) == 0 for k, v in root.items() if k.endswith("lora_B"))

    rng = np.random.default_rng(3)
    local_b = {k: rng.normal(size=s).astype(np.float32) for k, s in manifest.factor_shapes("root", "B").items()}
    leaf = {k: rng.normal(size=s).astype(np.float32) for k, s in manifest.tier_shapes("leaf").items()}
    cdir = tmp_path / "state" / f"federation-{fid}" / "a0"
    cdir.mkdir(parents=True)
    (cdir / "credentials.json").write_text(json.dumps({"client_id": cid, "token": token, "name": "a0"}))
    (cdir / "local-root.safetensors").write_bytes(pack_tensors(local_b))
    (cdir / "leaf.safetensors").write_bytes(pack_tensors(leaf, metadata=None if mix is None else leaf_file_metadata(mix)))
    backbone = unpack_tensors(tiny_checkpoint())

    client = CoordinatorClient("http://testserver", max_retries=0)
    client.close()
    client._http = api  # the in-process app (TestClient is an httpx.Client)
    out = tmp_path / "a0.safetensors"
    result = export_client_model(client, tmp_path / "state", fid, "a0", out)
    assert result.tiers == ["root", "leaf"] and result.versions["root"] == refs["root"]
    data = out.read_bytes()
    assert hashlib.sha256(data).hexdigest() == result.sha256
    # the leaf as the client's model uses it (training.leaf_mix): its change taken the recorded
    # share of the way from the root's head and LoRA, as the worker evaluates it
    served = served_leaf(leaf, root, 1.0 if mix is None else mix)
    assert np.array_equal(served["head.weight"], leaf["head.weight"]) is (mix in (None, 1.0))
    _assert_same(unpack_tensors(data), merge_lora(backbone, manifest, {"root": {**root, **local_b}, "leaf": served}))
    meta = read_model_metadata(read_safetensors_header(data)["__metadata__"])
    assert meta["local_factors"] == {"root": sorted(local_b)} and meta["client"] == "a0"
    assert meta["client_id"] == cid and meta["tiers"] == ["root", "leaf"]
    assert meta["versions"]["leaf"]["mix"] == (1.0 if mix is None else mix)

    no_leaf = export_client_model(client, tmp_path / "state", fid, "a0", tmp_path / "r.safetensors",
                                  include_leaf=False)
    assert no_leaf.tiers == ["root"]
    _assert_same(unpack_tensors((tmp_path / "r.safetensors").read_bytes()),
                 merge_lora(backbone, manifest, [{**root, **local_b}]))

    (cdir / "leaf.safetensors").write_bytes(pack_tensors(leaf, metadata={"hilora_leaf_mix": "2"}))
    with pytest.raises(ValueError, match=r"leaf.safetensors: the leaf file's hilora_leaf_mix must be a number in"):
        export_client_model(client, tmp_path / "state", fid, "a0", tmp_path / "x.safetensors")
    (cdir / "leaf.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no leaf yet .*\(--no-leaf\)"):
        export_client_model(client, tmp_path / "state", fid, "a0", tmp_path / "x.safetensors")
    bad = {k: np.zeros((1, 1), np.float32) for k in local_b}
    (cdir / "local-root.safetensors").write_bytes(pack_tensors(bad))
    with pytest.raises(ValueError, match="has shape \\(1, 1\\), the manifest expects"):
        export_client_model(client, tmp_path / "state", fid, "a0", tmp_path / "x.safetensors", include_leaf=False)
    with pytest.raises(ValueError, match="no credentials at"):
        export_client_model(client, tmp_path / "state", fid, "nobody", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
