"""``hilora bench`` refuses bad input before any work: a clear message, exit code 2, nothing written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hilora.cli import app

pytestmark = pytest.mark.unit


def _bench(tmp_path, *args: str):
    report, plots = tmp_path / "report.json", tmp_path / "plots"
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", "--report", str(report), "--plots", str(plots),
                                      *args])
    assert not report.exists() and not plots.exists()          # nothing half-written
    return result.exit_code, result.output


@pytest.mark.parametrize("args, message", [
    (("--methods", "hilora,fedavg"), "unknown method(s) 'fedavg'"),
    (("-m", "hilora", "-m", "nope"), "unknown method(s) 'nope'"),
    (("--partition", "no-such-partition"), "unknown partition 'no-such-partition'"),
    (("--rounds", "4/3"), "--rounds must be R/C/L"),
    (("--partitions", "kmeans"), "--partitions must be 'spectral' or 'spectral+linkage', got 'kmeans'"),
    (("--probe-loss", "focal"), "--probe-loss must be 'ce' or 'balanced', got 'focal'"),
    (("--rounds", "4/x/2"), "--rounds must be R/C/L"),
    (("--rounds", "0/3/2"), "the root stage needs at least one round"),
    (("--seeds", "0,one"), "--seeds must be integers"),
    (("--seeds", "1,1"), "--seeds repeats a seed"),
    (("--paper", "imagenet"), "--paper must be one of cifar100-scdir, cifar100-gldir, cifar100-patho, domainnet"),
    (("--paper", "cifar100-scdir"), "--paper cifar100-scdir needs --data-root"),
    (("--paper", "domainnet", "--partition", "demo"), "--paper and --partition exclude each other"),
    (("--checkpoint", "pretrained"), "need --model or --paper"),
    (("--model", "vit_tiny_patch16_224", "--model-kwargs", "{"), "--model-kwargs is not valid JSON"),
    (("--model", "vit_tiny_patch16_224", "--model-kwargs", "[1]"), "--model-kwargs must be a JSON object"),
    (("--model", "vit_tiny_patch16_224", "--checkpoint", "/no/such.safetensors"),
     "--checkpoint /no/such.safetensors: no such file"),
    (("--model", "no_such_vit"), "timm has no such model"),
    (("--rank", "0"), "--rank"),
    (("--leaf-bias-fit", "-1"), "--leaf-bias-fit"),
    (("--leaf-bias-fit", "101"), "--leaf-bias-fit"),
    (("--leaf-bias-fit-skewed", "-0.1"), "--leaf-bias-fit-skewed"),
    (("--leaf-bias-fit-skewed", "101"), "--leaf-bias-fit-skewed"),
    (("--leaf-mix", "0"), "--leaf-mix"),
    (("--leaf-mix", "1.5"), "--leaf-mix"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, args, message):
    code, output = _bench(tmp_path, *args)
    assert code == 2, output
    assert message in output


def test_a_partition_file_that_fails_validation_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "train_per_client": 10, "test_per_client": 5, "groups": []}))
    code, output = _bench(tmp_path, "--partition", str(bad))
    assert code == 2 and "groups" in output


def test_a_partition_the_demo_backbone_cannot_read_is_refused(tmp_path):
    from PIL import Image

    root = tmp_path / "data"
    for split in ("train", "test"):
        folder = root / "site-1" / split / "cat"
        folder.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / "a.png")
    spec = tmp_path / "folders.json"
    spec.write_text(json.dumps({"name": "folders", "dataset": "imagefolder", "root": str(root)}))
    code, output = _bench(tmp_path, "--partition", str(spec))
    assert code == 2 and "demo backbone" in output


def test_report_path_that_is_a_directory_is_refused(tmp_path):
    (tmp_path / "adir").mkdir()
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", "--report", str(tmp_path / "adir")])
    assert result.exit_code == 2 and "is a directory" in result.output


def test_paper_setup_over_a_folder_without_the_data_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    code, output = _bench(tmp_path, "--paper", "cifar100-gldir", "--data-root", str(tmp_path / "empty"))
    assert code == 2 and "no CIFAR-100 at" in output
    code, output = _bench(tmp_path, "--paper", "domainnet", "--data-root", str(tmp_path / "missing"))
    assert code == 2 and "no such directory" in output


def test_data_root_for_an_offline_partition_is_refused(tmp_path):
    code, output = _bench(tmp_path, "--partition", "concept-shift", "--data-root", str(tmp_path))
    assert code == 2 and "reads no folder" in output
