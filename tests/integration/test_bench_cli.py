"""CI smoke run of ``hilora bench``: the tiny partition (with one unseen client per group), one round
per stage, hilora and two baselines, report and plots. No accuracy gates: the numbers are checked
for shape and range only (docs/benchmarks.md holds the measured runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

METHODS = ("hilora", "flexlora", "local")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    spec = json.loads(resources.files("worker.partitions").joinpath("tiny.json").read_text())
    spec.update(name="tiny-unseen", unseen_fraction=0.34)      # 3 clients per group -> 1 unseen each
    partition = folder / "tiny-unseen.json"
    partition.write_text(json.dumps(spec))
    report, plots = folder / "report.json", folder / "plots"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HILORA_")}
    env["OMP_NUM_THREADS"] = "1"
    if "HILORA_CACHE_DIR" in os.environ:                        # reuse the cached demo backbone
        env["HILORA_CACHE_DIR"] = os.environ["HILORA_CACHE_DIR"]
    proc = subprocess.run([sys.executable, "-m", "hilora.cli", "bench", "--quick", "--device", "cpu",
                           "--threads", "1", "--partition", str(partition), "--methods", ",".join(METHODS),
                           "--rounds", "1/1/1", "--unseen-leaf-rounds", "1", "--report", str(report),
                           "--plots", str(plots)], capture_output=True, text=True, timeout=220, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(report.read_text()), plots


def _in_unit_range(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_prints_the_table(smoke):
    proc, _, _ = smoke
    header = next(line for line in proc.stdout.splitlines() if line.startswith("method"))
    for column in ("mean", "p10", "worst", "uploaded", "seconds"):
        assert column in header
    for name in METHODS:
        assert any(line.startswith(name) for line in proc.stdout.splitlines())


def test_report_has_every_number_the_issue_asks_for(smoke):
    _, report, _ = smoke
    assert report["rounds"]["total"] == 3 and report["seeds"] == [0]
    for name in METHODS:
        m = report["methods"][name]
        for key in ("mean", "p10", "worst"):
            assert _in_unit_range(m[key]), (name, key, m[key])
        assert m["p10"] <= m["mean"] + 1e-9 and m["worst"] <= m["p10"] + 1e-9
        assert len(m["rounds"]) == 3 and all(_in_unit_range(r["mean"]) for r in m["rounds"])
        assert m["seconds"] > 0
    assert report["methods"]["local"]["bytes_uploaded"] == 0
    assert report["methods"]["hilora"]["bytes_uploaded"] > 0 and report["methods"]["flexlora"]["bytes_uploaded"] > 0
    assert [r["stage"] for r in report["methods"]["hilora"]["rounds"]] == ["root", "cluster", "leaf"]
    assert [r["stage"] for r in report["methods"]["flexlora"]["rounds"]] == ["root"] * 3
    for name in ("hilora", "flexlora"):
        assert report["unseen"][name]["n"] == 2
        assert _in_unit_range(report["unseen"][name]["zero_shot"])
        assert _in_unit_range(report["unseen"][name]["after_leaf"])
    clustering = report["hilora"]["clustering"]
    assert -1.0 <= clustering["ari"] <= 1.0 and clustering["k"] >= 1 and clustering["planted_groups"] == 2
    for tier in ("root", "cluster", "leaf"):
        assert _in_unit_range(report["hilora"]["tiers"][tier]["mean"])
        assert _in_unit_range(report["hilora"]["tiers"][tier]["p10"])


def test_plots_are_png_files(smoke):
    from PIL import Image

    _, _, plots = smoke
    for name in ("accuracy_by_method.png", "accuracy_by_round.png", "hilora_tiers.png", "lsac_affinity.png"):
        path = plots / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        with Image.open(path) as image:
            image.verify()
            assert image.size[0] > 100 and image.size[1] > 100


def test_another_timm_model_on_disk_data_from_the_command_line(tmp_path):
    """``--model`` / ``--model-kwargs`` / ``--data-root`` / ``--rank`` on a tiny CIFAR-100 folder: the
    backbone is sized from the data (100 classes, 3 x 32 x 32) and recorded in the report."""
    from support.datasets import write_fake_cifar

    write_fake_cifar(tmp_path / "cifar")
    partition = tmp_path / "cifar-small.json"
    partition.write_text(json.dumps({"name": "cifar-small", "dataset": "cifar100", "root": "elsewhere",
                                     "scheme": "gldir", "clients": 4, "dirichlet_alpha": 1.0}))
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HILORA_")}
    env.update(OMP_NUM_THREADS="1", HILORA_CACHE_DIR=str(tmp_path / "cache"))
    kwargs = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    proc = subprocess.run([sys.executable, "-m", "hilora.cli", "bench", "--quick", "--device", "cpu",
                           "--partition", str(partition), "--data-root", str(tmp_path / "cifar"),
                           "--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(kwargs), "--rank", "2",
                           "--methods", "hilora,fedit", "--rounds", "1/1/1", "--report", str(report)],
                          capture_output=True, text=True, timeout=200, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(report.read_text())
    backbone = doc["backbone"]
    assert backbone["model"] == "vit_tiny_patch16_224" and backbone["weights"] == "random" and backbone["rank"] == 2
    assert {k: backbone["model_kwargs"][k] for k in ("num_classes", "img_size", "in_chans", "embed_dim")} == {
        "num_classes": 100, "img_size": 32, "in_chans": 3, "embed_dim": 32}
    cached = list((tmp_path / "cache" / "bench-backbones").glob("*.safetensors"))
    assert len(cached) == 1 and doc["backbone_sha256"] == backbone["sha256"]
    for name in ("hilora", "fedit"):
        assert _in_unit_range(doc["methods"][name]["mean"])
    assert doc["options"]["data_root"] == str(tmp_path / "cifar")
