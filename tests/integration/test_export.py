"""Results leave the system: a real tiny federation runs to serving, then ``hilora export`` writes a
client's merged model, ``hilora predict`` classifies PNGs with it, and the predictions are the
worker's own (TieredLoRAModel with root + cluster + leaf) on the same images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_end_to_end import (  # tests/integration is on sys.path
    _federation_file,
    _run_to_serving,
)
from typer.testing import CliRunner

from hilora.cli import app as cli_app
from hilora.launcher import LocalCluster
from shared.tensors import unpack_tensors
from worker.client import CoordinatorClient
from worker.state import ClientFiles

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CLIENT = "permuted-00"  # its labels are permuted: the backbone alone gets them wrong


@pytest.fixture(scope="module")
def demo_backbone():
    from worker.backbone import pretrain_demo_backbone

    return pretrain_demo_backbone()


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(cli_app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def _write_pngs(directory, images: np.ndarray) -> np.ndarray:
    """Write (N, 1, 16, 16) images in [0, 1] as 8-bit grey PNGs; return what the PNGs hold."""
    from PIL import Image

    directory.mkdir()
    pixels = np.rint(images[:, 0] * 255).astype(np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(directory / f"img-{i:03d}.png")
    return (pixels.astype(np.float32) / 255.0)[:, None]


def _workers_model(url: str, fid: int, cdir, status):
    """The client's model as its worker holds it: the adapter versions its last leaf round used,
    its leaf file, in a TieredLoRAModel."""
    from worker.backbone import build_backbone
    from worker.lora import TieredLoRAModel

    client_id, token = ClientFiles(cdir).read_credentials()
    with CoordinatorClient(url) as client:
        cfg = client.federation_config(fid, token)
        refs = client.client_adapters(client_id, token)
        assert refs.root.version == status.root_version
        assert refs.cluster.version == next(c.adapter_version for c in status.clusters if CLIENT in c.members)
        checkpoint = client.backbone(fid, token, cfg.backbone.sha256)
        root = unpack_tensors(client.adapter(refs.root.id, token, refs.root.sha256))
        cluster = unpack_tensors(client.adapter(refs.cluster.id, token, refs.cluster.sha256))
    model = TieredLoRAModel(build_backbone(cfg.backbone.model, cfg.backbone.model_kwargs, checkpoint), cfg.manifest)
    model.load_tier("root", root)
    model.load_tier("cluster", cluster)
    model.load_tier("leaf", unpack_tensors(ClientFiles(cdir).leaf.read_bytes()))
    model.set_active_tiers(("root", "cluster", "leaf"))
    return model.eval()


def test_export_then_predict_gives_the_workers_predictions(tmp_path, demo_backbone):
    from worker.data import client_arrays, load_partition, partition_clients
    from worker.export import load_merged_model, predict_images

    clients = [c for c in partition_clients(load_partition("tiny")) if not c.unseen]
    cluster = LocalCluster(tmp_path / "run")
    try:
        doc = _federation_file(len(clients))
        doc["classes"] = [str(d) for d in range(10)]   # the digits' own names: the export carries them
        fid = _run_to_serving(cluster, doc, clients, workers=2)
        with CoordinatorClient(cluster.url) as client:
            status = client.federation_status(cluster.admin_token, fid)
            report = client.federation_report(cluster.admin_token, fid)
        state = tmp_path / "run" / "state"
        cdir = ClientFiles.of(state, fid, CLIENT).dir

        out = tmp_path / "model.safetensors"
        info = json.loads(_invoke("export", "--coordinator", cluster.url, "--state-dir", str(state),
                                  "--federation", str(fid), "--client", CLIENT, "--out", str(out)))
        assert info["tiers"] == ["root", "cluster", "leaf"] and info["path"] == str(out)
        assert info["versions"]["root"]["version"] == status.root_version
        assert not list(tmp_path.glob("model.safetensors.*.tmp"))

        data = client_arrays(load_partition("tiny"), CLIENT)
        images = tmp_path / "images"
        decoded = _write_pngs(images, data.x_test[:12])
        rows = json.loads(_invoke("predict", "--model", str(out), "--images", str(images), "--json"))
        assert [r["file"] for r in rows] == [f"img-{i:03d}.png" for i in range(12)]

        worker_model = _workers_model(cluster.url, fid, cdir, status)
        with torch.no_grad():
            probs = torch.softmax(worker_model(torch.from_numpy(decoded)), dim=1)
        expected_p, expected_c = probs.max(dim=1)
        assert [r["class"] for r in rows] == expected_c.tolist()
        assert [r["name"] for r in rows] == [str(c) for c in expected_c.tolist()]
        np.testing.assert_allclose([r["probability"] for r in rows], expected_p.numpy(), atol=1e-4)
        text = _invoke("predict", "--model", str(out), "--images", str(images)).strip().splitlines()
        assert [line.split("\t")[:3] for line in text] == [[r["file"], str(r["class"]), r["name"]] for r in rows]

        # on the client's whole test set the merged model scores what the worker reported for its leaf
        merged, meta = load_merged_model(out)
        assert meta["client"] == CLIENT and meta["tiers"] == ["root", "cluster", "leaf"]
        assert meta["classes"] == [str(d) for d in range(10)]
        classes, _ = predict_images(merged, data.x_test)
        reported = next(c for c in report.clients if c.name == CLIENT)
        assert abs(float((classes == data.y_test).mean()) - reported.metrics["acc_leaf"]) <= 1.5 / len(data.y_test)

        # without the leaf the client's model is its cluster-level model, as the admin downloads it
        no_leaf = tmp_path / "no-leaf.safetensors"
        info = json.loads(_invoke("export", "--coordinator", cluster.url, "--state-dir", str(state),
                                  "--federation", str(fid), "--client", CLIENT, "--out", str(no_leaf),
                                  "--no-leaf"))
        assert info["tiers"] == ["root", "cluster"]
        admin_model = tmp_path / "cluster.safetensors"
        written = _invoke("admin", "export-model", "--coordinator", cluster.url, "--admin-token", cluster.admin_token,
                          "--federation", str(fid), "--cluster", str(reported.cluster_label), "--out", str(admin_model))
        assert written.startswith(f"wrote {admin_model} (") and "sha256 " in written
        ours, theirs = unpack_tensors(no_leaf.read_bytes()), unpack_tensors(admin_model.read_bytes())
        assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)
        root_model = tmp_path / "root.safetensors"
        _invoke("admin", "export-model", "--coordinator", cluster.url, "--admin-token", cluster.admin_token,
                "--federation", str(fid), "--out", str(root_model))
        assert json.loads(_invoke("admin", "export-model", "--coordinator", cluster.url, "--admin-token",
                                  cluster.admin_token, "--federation", str(fid), "--out", str(root_model),
                                  "--json"))["path"] == str(root_model)
        rows_root = json.loads(_invoke("predict", "--model", str(root_model), "--images", str(images), "--json"))
        assert len(rows_root) == 12

        # the admin moves the client to a cluster of its own by hand; the others stay
        moved = json.loads(_invoke("admin", "assign", "--coordinator", cluster.url, "--admin-token",
                                   cluster.admin_token, "--federation", str(fid), "--assignment",
                                   json.dumps({CLIENT: 9}), "--reason", "known site", "--json"))
        assert moved["clusters_created"] == [9] and moved["run"]["algorithm"] == "manual"
        assert [(m["name"], m["from_label"], m["to_label"]) for m in moved["moves"]] == [
            (CLIENT, reported.cluster_label, 9)]
        result = CliRunner().invoke(cli_app, ["admin", "assign", "--coordinator", cluster.url, "--admin-token",
                                              cluster.admin_token, "--federation", str(fid), "--assignment",
                                              json.dumps({"nobody": 1})])
        assert result.exit_code == 1 and "nobody" in result.stderr and len(result.stderr.splitlines()) == 1
    finally:
        cluster.stop()


def test_export_refuses_clearly(tmp_path):
    result = CliRunner().invoke(cli_app, ["export", "--coordinator", "http://127.0.0.1:9", "--state-dir",
                                          str(tmp_path), "--federation", "1", "--client", "nobody",
                                          "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 2 and "no credentials at" in result.output
    (tmp_path / "images").mkdir()
    result = CliRunner().invoke(cli_app, ["predict", "--model", str(tmp_path / "missing.safetensors"),
                                          "--images", str(tmp_path / "images")])
    assert result.exit_code == 2 and "does not exist" in result.output
