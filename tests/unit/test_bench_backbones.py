"""``hilora bench`` beyond the demo backbone: the MNIST-5k-pretrained demo backbone for the mnist5k
partitions, other timm models sized for the partition's data (random, pretrained or a checkpoint
file), the paper-scale set-ups over a data folder, and client data held in bounded memory."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from support.datasets import write_fake_cifar

from hilora import bench
from hilora.options import RunOptions
from worker import backbone as wb
from worker.data import client_arrays, load_partition

pytestmark = [pytest.mark.unit, pytest.mark.timeout(240)]

TINY_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2}


@pytest.fixture()
def cifar_partition(tmp_path: Path) -> Path:
    write_fake_cifar(tmp_path / "cifar")
    spec = tmp_path / "cifar-small.json"
    spec.write_text(json.dumps({"name": "cifar-small", "dataset": "cifar100", "root": "cifar", "scheme": "gldir",
                                "clients": 5, "dirichlet_alpha": 1.0, "unseen_fraction": 0.2}))
    return spec


def _opts(tmp_path: Path, **kw) -> RunOptions:
    base = RunOptions(root_rounds=1, cluster_rounds=1, leaf_rounds=1, unseen_leaf_rounds=1,
                      local_epochs=1, probe_epochs=1, rank=2, k_max=3, knn=2, cache_dir=str(tmp_path / "cache"))
    return replace(base, **kw)


def test_mnist5k_partitions_get_a_backbone_pretrained_on_mnist5k():
    assert wb.demo_backbone_dataset(load_partition("concept-shift")) == "mnist5k"
    assert wb.demo_backbone_dataset(load_partition("scdir-like")) == "mnist5k"
    assert wb.demo_backbone_dataset(load_partition("demo")) == "digits"
    digits, mnist = wb.demo_recipe(), wb.demo_recipe(dataset="mnist5k")
    assert digits["data"] == "digits/pretrain" and mnist["data"] == "mnist5k/pretrain"
    assert {k: v for k, v in digits.items() if k != "data"} == {k: v for k, v in mnist.items() if k != "data"}
    assert wb.demo_backbone_path("/c") != wb.demo_backbone_path("/c", dataset="mnist5k")
    with pytest.raises(ValueError, match="pretrains on digits or mnist5k, not 'cifar100'"):
        wb.demo_recipe(dataset="cifar100")


def test_the_digits_backbone_cache_key_is_unchanged():
    # the key existing caches (and the demo's CI cache) use, as before the mnist5k backbone existed;
    # a change retrains every user's backbone (bump DEMO_RECIPE_VERSION on purpose, then update this)
    assert wb.demo_backbone_path("/c").name == "3f3e4c4e5da01862.safetensors"
    assert wb.demo_backbone_path("/c", dataset="digits") == wb.demo_backbone_path("/c")


def test_paper_setups_are_the_papers_partitions_over_a_data_root(tmp_path):
    for name, fields in bench.PAPER_PARTITIONS.items():
        spec = bench.paper_partition(name, str(tmp_path))
        assert spec.name == name and spec.root == str(tmp_path.resolve())
        assert spec.image_size == 224 and spec.unseen_fraction == pytest.approx(0.1)
        for key, value in fields.items():
            assert getattr(spec, key) == value
    assert bench.paper_partition("cifar100-scdir", str(tmp_path)).superclass_groups == 3
    assert bench.paper_partition("domainnet", str(tmp_path)).clients_per_domain == 15
    with pytest.raises(ValueError, match="needs --data-root"):
        bench.paper_partition("cifar100-gldir", None)
    with pytest.raises(ValueError, match="no such directory"):
        bench.paper_partition("domainnet", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown paper set-up 'imagenet'"):
        bench.paper_partition("imagenet", str(tmp_path))
    with pytest.raises(ValueError, match="no CIFAR-100 at"):
        bench.check_partition("demo", "cifar100-scdir", str(tmp_path))


def test_a_paper_setup_builds_its_100_clients_from_the_data(tmp_path):
    write_fake_cifar(tmp_path / "data", train_per_class=12)
    spec = bench.check_partition("demo", "cifar100-patho", str(tmp_path / "data"))
    from worker.data import partition_clients

    clients = partition_clients(spec)
    assert len(clients) == 100 and sum(c.unseen for c in clients) == 10
    first = client_arrays(spec, clients[0].name)
    assert first.x_train.shape[1:] == (3, 224, 224) and len(np.unique(first.y_train)) == 10


def test_client_data_cache_is_bounded_and_returns_the_same_arrays():
    spec = load_partition("tiny")
    names = [f"{g.name}-{i:02d}" for g in spec.groups for i in range(g.clients)]
    one = client_arrays(spec, names[0])
    size = sum(a.nbytes for a in (one.x_train, one.y_train, one.x_test, one.y_test))
    cache = bench.ClientDataCache(spec, names, max_bytes=int(2.5 * size))
    for name in names:
        cache[name]
    assert len(cache._held) == 2 and cache._bytes <= cache.max_bytes
    assert list(cache._held) == names[-2:]                       # least recently used went first
    again = cache[names[0]]
    np.testing.assert_array_equal(again.x_train, one.x_train)
    np.testing.assert_array_equal(again.y_test, one.y_test)
    assert len(cache) == len(names) and list(cache) == names
    with pytest.raises(KeyError):
        cache["nobody"]
    whole = bench.ClientDataCache(spec, names, max_bytes=1)      # nothing fits: served, never held
    np.testing.assert_array_equal(whole[names[1]].x_train, client_arrays(spec, names[1]).x_train)
    assert not whole._held


def test_another_timm_model_is_sized_for_the_data_and_cached(tmp_path, cifar_partition):
    opts = _opts(tmp_path, partition=str(cifar_partition), model="vit_tiny_patch16_224", model_kwargs=TINY_VIT)
    setup = bench.prepare(opts)
    kw = setup.artifact.model_kwargs
    assert (kw["num_classes"], kw["img_size"], kw["in_chans"]) == (100, 32, 3)
    assert kw["embed_dim"] == 32 and setup.artifact.path.parent == tmp_path / "cache" / "bench-backbones"
    assert setup.manifest.head.num_classes == 100 and setup.manifest.tiers["root"].rank == 2
    assert len(setup.train) == 4 and len(setup.unseen) == 1
    again = bench.prepare(opts)                                   # the seeded random init is reused
    assert again.artifact.sha256 == setup.artifact.sha256 == wb.checkpoint_sha256(setup.artifact.path)
    # the same weights through --checkpoint FILE
    from_file = bench.prepare(replace(opts, checkpoint=str(setup.artifact.path)))
    assert from_file.artifact.sha256 == setup.artifact.sha256 and from_file.artifact.path == setup.artifact.path


def test_a_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path, cifar_partition):
    opts = _opts(tmp_path, partition=str(cifar_partition), model="vit_tiny_patch16_224", model_kwargs=TINY_VIT)
    other = bench.prepare(replace(opts, model_kwargs={**TINY_VIT, "embed_dim": 48}))
    with pytest.raises(ValueError, match="does not match the model"):
        bench.prepare(replace(opts, checkpoint=str(other.artifact.path)))
    with pytest.raises(ValueError, match="no such file"):
        bench.prepare(replace(opts, checkpoint=str(tmp_path / "none.safetensors")))


def test_methods_run_end_to_end_on_another_backbone(tmp_path, cifar_partition):
    torch.manual_seed(0)
    opts = _opts(tmp_path, partition=str(cifar_partition), model="vit_tiny_patch16_224", model_kwargs=TINY_VIT)
    setup = bench.prepare(opts)
    report = bench.run_bench(opts, ["hilora", "fedit", "local"], [0])
    for result in report["runs"]:
        assert result["final"]["n"] == 4
        assert 0.0 <= result["final"]["mean"] <= 1.0 and np.isfinite(result["final"]["mean"])
        assert result["unseen"]["zero_shot"]["n"] == 1
        assert (result["bytes_uploaded"] > 0) == (result["method"] != "local")
    assert report["backbone"]["model"] == "vit_tiny_patch16_224"
    assert report["backbone"]["weights"] == "random" and report["backbone"]["rank"] == 2
    assert report["backbone_sha256"] == setup.artifact.sha256 and report["partition"] == "cifar-small"


def test_images_that_do_not_fit_the_backbone_are_refused(tmp_path, cifar_partition):
    data = client_arrays(load_partition(cifar_partition), "all-00")
    with pytest.raises(ValueError, match=r"the demo backbone takes \(1, 16, 16\)"):
        bench.check_client_data("all-00", data)
    with pytest.raises(ValueError, match="has label .*; the backbone has 10 classes"):
        bench.check_client_data("all-00", data, {"in_chans": 3, "img_size": 32, "num_classes": 10})
    with pytest.raises(ValueError, match=r"the backbone takes \(3, 64, 64\)"):
        bench.check_client_data("all-00", data, {"in_chans": 3, "img_size": 64, "num_classes": 100})
    with pytest.raises(ValueError, match="timm has no such model"):
        bench.check_partition_data(str(cifar_partition), model="no_such_vit")
    with pytest.raises(ValueError, match="reads no folder"):
        bench.check_partition("demo", None, str(tmp_path))


def test_the_paper_backbone_is_vit_b16_on_imagenet_21k_and_pretrained_asks_timm_for_that_tag(
        tmp_path, cifar_partition, monkeypatch):
    """The tag's resolution, not the download (no network here): timm knows the tag, its weights are
    ImageNet-21k's (21,843 classes, not fine-tuned on 1k), and --checkpoint pretrained passes it on."""
    import timm

    assert bench.PAPER_MODEL == "vit_base_patch16_224.augreg_in21k"
    assert bench.PAPER_MODEL in timm.list_pretrained("vit_base_patch16_224*")
    cfg = timm.models.get_pretrained_cfg(bench.PAPER_MODEL)
    assert cfg.num_classes == 21843 and "in21k" in cfg.tag and "ft" not in cfg.tag
    default = timm.models.get_pretrained_cfg("vit_base_patch16_224")
    assert default.num_classes == 1000   # the untagged name would have been 1k-fine-tuned weights
    asked = []

    def fake_create_model(name, pretrained=False, **kwargs):
        asked.append((name, pretrained))
        raise RuntimeError("no network in tests")

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    from worker.data import partition_clients

    spec = load_partition(cifar_partition)
    sample = client_arrays(spec, partition_clients(spec)[0].name)
    with pytest.raises(ValueError, match="timm could not load vit_base_patch16_224.augreg_in21k's weights"):
        bench.bench_backbone(_opts(tmp_path, checkpoint="pretrained", paper="cifar100-gldir"), spec, sample)
    assert asked == [("vit_base_patch16_224.augreg_in21k", True)]
