"""The backbone's own preprocessing (issue 17, shared/preprocess.py): the torch-free table agrees
with timm's data-config helpers; the worker's image pipeline is timm's evaluation transform, bit
for bit; a federation file resolves it (demo: none); and the round trip holds: the workers' model
on its prepared data and ``hilora predict`` on the exported model and the same image files give the
same predictions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.preprocess import PREPROCESSING_TABLE, Preprocessing, table_preprocessing, timm_preprocessing, with_model_kwargs

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("model", sorted(PREPROCESSING_TABLE))
def test_the_table_is_what_timm_resolves(model):
    assert table_preprocessing(model, {}) == timm_preprocessing(model, {})
    kwargs = {"img_size": 96, "in_chans": 1}
    assert table_preprocessing(model, kwargs) == timm_preprocessing(model, kwargs)
    assert table_preprocessing(model, kwargs).input_size == (1, 96, 96)


def test_model_kwargs_set_the_input_size():
    values = PREPROCESSING_TABLE["vit_base_patch16_224"]
    assert with_model_kwargs(values, {"img_size": [64, 48]})["input_size"] == (3, 64, 48)
    assert with_model_kwargs(values, {})["input_size"] == (3, 224, 224)
    assert table_preprocessing("no_such_model", {}) is None and timm_preprocessing("no_such_model", {}) is None


@pytest.mark.parametrize(("values", "message"), [
    ({"input_size": (2, 8, 8), "mean": (0, 0), "std": (1, 1)}, "1 \\(grey\\) or 3"),
    ({"input_size": (3, 8, 8), "mean": (0, 0), "std": (1, 1, 1)}, "mean has 2 values for 3 channels"),
    ({"input_size": (1, 8, 8), "mean": (0,), "std": (0,)}, "std values must be positive"),
    ({"input_size": (1, 0, 8), "mean": (0,), "std": (1,)}, "not an image size"),
    ({"input_size": (1, 8, 8), "mean": (0,), "std": (1,), "crop_pct": 1.5}, "crop_pct"),
    ({"input_size": (1, 8, 8), "mean": (0,), "std": (1,), "interpolation": "lanczos"}, "interpolation"),
])
def test_bad_preprocessing_is_refused(values, message):
    with pytest.raises(ValueError, match=message):
        Preprocessing.model_validate(values)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("size", [(300, 200), (200, 300), (224, 224), (97, 131), (31, 40)])
def test_the_worker_pipeline_is_timms_evaluation_transform(interpolation, size):
    from timm.data import create_transform

    from worker.datasets import prepare_image

    rng = np.random.default_rng(size[0] * size[1])
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    pipeline = Preprocessing(input_size=(3, 224, 224), interpolation=interpolation, mean=(0.485, 0.456, 0.406),
                             std=(0.229, 0.224, 0.225), crop_pct=0.875)
    reference = create_transform(input_size=(3, 224, 224), interpolation=interpolation, mean=pipeline.mean,
                                 std=pipeline.std, crop_pct=0.875)(image).numpy()
    ours = (prepare_image(image, pipeline) - np.array(pipeline.mean, np.float32)[:, None, None]) \
        / np.array(pipeline.std, np.float32)[:, None, None]
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)


def _checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "b.safetensors"
    path.write_bytes(b"x")
    return path


def test_a_federation_file_resolves_the_preprocessing(tmp_path, monkeypatch):
    import hilora.federation_file as ff
    from conftest import tiny_config

    manifest = tiny_config()["manifest"]

    def build(**extra):
        file = ff.FederationFile.model_validate({"name": "f", "manifest": manifest, **extra})
        return ff.build_federation_config(file)[0].preprocessing

    tiny = {"model": "vit_tiny_patch16_224", "model_kwargs": {"img_size": 32}, "checkpoint": str(_checkpoint(tmp_path))}
    resolved = build(backbone=tiny)
    assert resolved == timm_preprocessing("vit_tiny_patch16_224", {"img_size": 32})
    assert resolved.input_size == (3, 32, 32) and resolved.interpolation == "bicubic" and resolved.crop_pct == 0.9
    # a coordinator without torch: the table gives the same
    monkeypatch.setattr(ff, "timm_preprocessing", lambda *_: None)
    assert build(backbone=tiny) == resolved
    given = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.1, 0.2, 0.3], "std": [1, 2, 3],
             "crop_pct": 1.0}
    assert build(backbone=tiny, preprocessing=given) == Preprocessing.model_validate(given)
    assert build(backbone=tiny, preprocessing="none") is None
    with pytest.raises(ValueError, match="no image preprocessing is known for model 'my_net'.*\"none\""):
        build(backbone={**tiny, "model": "my_net"})


def test_the_demo_backbone_keeps_its_own_pipeline():
    from hilora.federation_file import FederationFile, resolve_preprocessing

    file = FederationFile.model_validate({"name": "d", "backbone": {"model": "x", "checkpoint": "demo"}})
    assert resolve_preprocessing(file, "vit_tiny_patch16_224", {}) is None


def test_train_export_and_predict_see_the_same_inputs(tmp_path):
    """The workers' model (normalisation inside it) on data prepared from an ImageFolder, and the
    exported plain model through ``hilora predict``'s path on the same files: same predictions,
    same probabilities. Images of several sizes, none of them the input size."""
    from shared.manifest import TIERS
    from shared.merge import model_metadata, pack_model
    from worker.backbone import create_model, manifest_for_model
    from worker.data import client_arrays, load_partition
    from worker.export import predict_directory
    from worker.lora import TieredLoRAModel
    from shared.merge import merge_lora

    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 3}
    pipeline = Preprocessing(input_size=(3, 32, 32), interpolation="bicubic", mean=(0.3, 0.5, 0.7),
                             std=(0.2, 0.25, 0.3), crop_pct=0.875)
    rng = np.random.default_rng(0)
    root, flat = tmp_path / "site", tmp_path / "flat"
    flat.mkdir()
    for i, (w, h) in enumerate([(40, 30), (33, 57), (64, 64), (50, 41)]):
        path = root / "site-a" / "train" / "cat" / f"img-{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path)
        shutil.copy(path, flat / path.name)
    (root / "site-a" / "test" / "cat").mkdir(parents=True)
    shutil.copy(flat / "img-0.png", root / "site-a" / "test" / "cat" / "t.png")
    spec_path = tmp_path / "site.json"
    spec_path.write_text(json.dumps({"name": "s", "dataset": "imagefolder", "root": str(root)}))
    data = client_arrays(load_partition(spec_path), "site-a", pipeline)
    assert data.x_train.shape == (4, 3, 32, 32)

    torch.manual_seed(0)
    backbone = create_model("vit_tiny_patch16_224", kwargs).eval()
    checkpoint = {k: v.detach().numpy().copy() for k, v in backbone.state_dict().items()}
    model = TieredLoRAModel(backbone, manifest_for_model(backbone, rank=2))
    for i, tier in enumerate(TIERS):
        model.init_tier(tier, seed=i)
        with torch.no_grad():
            for target in model.manifest.targets:
                model.factor(tier, target.name, "B").normal_(0, 0.05)
    model.set_input_normalization(pipeline.mean, pipeline.std)
    model.set_active_tiers(TIERS)
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(data.x_train)), dim=1)
    expected_p, expected_c = probs.max(dim=1)

    merged = merge_lora(checkpoint, model.manifest, {t: model.export_tier(t) for t in TIERS})
    out = tmp_path / "model.safetensors"
    out.write_bytes(pack_model(merged, model_metadata(
        model="vit_tiny_patch16_224", model_kwargs=kwargs, tiers=list(TIERS), versions={},
        preprocessing=pipeline.model_dump(mode="json"))))
    rows = predict_directory(out, flat)
    assert [r["file"] for r in rows] == [f"img-{i}.png" for i in range(4)]
    assert [r["class"] for r in rows] == expected_c.tolist()
    np.testing.assert_allclose([r["probability"] for r in rows], expected_p.numpy(), atol=1e-5)
