"""The torch-free adapter manifest (shared/vit_shapes.py, issue 19): the table of timm ViTs and the
safetensors header give exactly what worker.backbone.manifest_for_model gives on the model timm
builds; unknown models and malformed checkpoints are clear errors; a coordinator-only install
(torch blocked) creates a federation's config, manifest and preprocessing alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hilora.federation_file import FederationFile, build_federation_config, build_manifest
from shared.tensors import pack_tensors
from shared.vit_shapes import (
    VIT_ARCHITECTURES,
    VIT_MODELS,
    UnknownVit,
    VitShape,
    checkpoint_vit_shape,
    known_models,
    read_checkpoint_header,
    table_vit_shape,
    vit_manifest,
)

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]

# The demo backbone (worker.backbone.DEMO_BACKBONE_*), written out so that these tests run without torch;
# test_the_demo_backbone_is_the_one_the_worker_builds checks it is the worker's.
DEMO_MODEL = "vit_tiny_patch16_224"
DEMO_KWARGS = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
                   mlp_ratio=2)


def _torch_manifest(model: str, model_kwargs: dict, meta: bool = True, **shape):
    """worker.backbone's manifest of the model timm builds (on the meta device: no weights, same modules)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    from worker.backbone import build_backbone, create_model, manifest_for_model

    if meta:
        with torch.device("meta"):
            module = create_model(model, model_kwargs)
    else:
        module = build_backbone(model, model_kwargs, None)
    return manifest_for_model(module, **shape)


def _either(call):
    """The manifest, or 'ValueError' where the call refuses."""
    try:
        return call()
    except ValueError:
        return "ValueError"


def _vit_body(depth: int, dim: int, classes: int | None, extra: dict | None = None) -> bytes:
    rng = np.random.default_rng(0)
    tensors = {f"blocks.{i}.attn.qkv.weight": rng.normal(size=(3 * dim, dim)).astype(np.float32) for i in range(depth)}
    tensors.update({f"blocks.{i}.attn.qkv.bias": np.zeros(3 * dim, np.float32) for i in range(depth)})
    if classes is not None:
        tensors["head.weight"] = rng.normal(size=(classes, dim)).astype(np.float32)
        tensors["head.bias"] = np.zeros(classes, np.float32)
    tensors.update(extra or {})
    return pack_tensors(tensors)


@pytest.mark.parametrize("model", known_models())
def test_every_table_entry_gives_the_manifest_timm_does(model):
    # as named (its pretrained config's head; none for dino/mae/orig_in21k: both refuse), and with the
    # federation's classes and per-tier ranks
    assert _either(lambda: vit_manifest(model, {}, rank=8)) == _either(lambda: _torch_manifest(model, {}, rank=8))
    kwargs = {"num_classes": 7, "drop_path_rate": 0.1}
    shape = dict(rank=4, alpha=8.0, ranks={"leaf": 2})
    assert vit_manifest(model, kwargs, **shape) == _torch_manifest(model, kwargs, **shape)


def test_the_demo_backbone_is_the_one_the_worker_builds():
    pytest.importorskip("torch")
    from worker.backbone import DEMO_BACKBONE_KWARGS, DEMO_BACKBONE_MODEL

    assert (DEMO_BACKBONE_MODEL, DEMO_BACKBONE_KWARGS) == (DEMO_MODEL, DEMO_KWARGS)
    for shape in (dict(rank=4), dict(rank=2, alpha=4.0, ranks={"root": 8, "cluster": 4})):
        expected = _torch_manifest(DEMO_MODEL, DEMO_KWARGS, meta=False, **shape)   # the real build, weights and all
        assert vit_manifest(DEMO_MODEL, DEMO_KWARGS, **shape) == expected


@pytest.mark.parametrize("kwargs", [
    {"embed_dim": 96, "depth": 3, "num_heads": 4, "num_classes": 5, "img_size": 32, "patch_size": 8, "in_chans": 1},
    {"depth": 2, "num_classes": 3, "global_pool": "avg", "fc_norm": True, "qkv_bias": False, "reg_tokens": 4,
     "class_token": False, "init_values": 1e-5, "qk_norm": True},
])
def test_model_kwargs_that_change_or_keep_the_shapes(kwargs):
    assert vit_manifest("vit_small_patch16_224", kwargs, rank=3) == _torch_manifest("vit_small_patch16_224", kwargs,
                                                                                    rank=3)


def test_the_table_names_exist_in_timm_with_their_heads():
    timm = pytest.importorskip("timm")
    for name, (arch, classes) in VIT_MODELS.items():
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg is not None, name
        assert cfg.num_classes == classes, name
        assert name.split(".")[0] == arch and arch in VIT_ARCHITECTURES
    assert "vit_base_patch16_224.augreg_in21k" in VIT_MODELS and VIT_MODELS["vit_base_patch16_224.augreg_in21k"][1] == 21843


def test_the_checkpoint_header_gives_the_same_manifest_as_timm(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from worker.backbone import create_model

    torch.manual_seed(0)
    model = create_model(DEMO_MODEL, DEMO_KWARGS)
    path = tmp_path / "demo.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    expected = _torch_manifest(DEMO_MODEL, DEMO_KWARGS, rank=4)
    assert checkpoint_vit_shape(path) == VitShape(depth=4, embed_dim=64, num_classes=10, head_in_features=64)
    # a name the table does not know: the header alone (file or bytes); a known one: checked against it
    assert vit_manifest("my_own_vit", {}, rank=4, checkpoint=path) == expected
    assert vit_manifest("my_own_vit", {}, rank=4, checkpoint=path.read_bytes()) == expected
    assert vit_manifest(DEMO_MODEL, DEMO_KWARGS, rank=4, checkpoint=path) == expected


def test_the_header_is_read_without_torch_and_only_the_header(tmp_path):
    body = _vit_body(depth=3, dim=16, classes=4)
    path = tmp_path / "b.safetensors"
    path.write_bytes(body)
    assert checkpoint_vit_shape(path) == checkpoint_vit_shape(body) == VitShape(3, 16, 4, 16)
    manifest = vit_manifest("custom", {}, rank=2, checkpoint=path)
    assert [t.name for t in manifest.targets][:2] == ["blocks.0.attn.qkv.q", "blocks.0.attn.qkv.v"]
    assert len(manifest.targets) == 6 and manifest.targets[1].out_offset == 32
    assert (manifest.head.num_classes, manifest.head.in_features) == (4, 16)
    header = read_checkpoint_header(path)
    assert header["head.weight"]["shape"] == [4, 16]


def test_unknown_models_and_kwargs_name_the_model_and_the_way_out():
    for call, named in [(lambda: vit_manifest("resnet50", {}), "'resnet50'"),
                        (lambda: vit_manifest("vit_base_patch16_224", {"attn_layer": "diff"}), "attn_layer"),
                        (lambda: table_vit_shape("vit_huge_patch14_224"), "'vit_huge_patch14_224'")]:
        with pytest.raises(UnknownVit) as info:
            call()
        message = str(info.value)
        assert named in message and '"manifest"' in message and 'pip install "hilora[worker]"' in message
    # a checkpoint that is no ViT does not help an unknown model
    with pytest.raises(UnknownVit, match="'resnet50'.*no blocks.N.attn.qkv.weight.*hilora\\[worker\\]"):
        vit_manifest("resnet50", {}, checkpoint=pack_tensors({"fc.weight": np.zeros((2, 3), np.float32)}))


def test_bad_kwargs_and_headless_models_are_refused():
    with pytest.raises(ValueError, match="embed_dim 100 is not divisible by num_heads 3"):
        vit_manifest("vit_tiny_patch16_224", {"embed_dim": 100})
    with pytest.raises(ValueError, match="depth must be an integer"):
        vit_manifest("vit_tiny_patch16_224", {"depth": "12"})
    with pytest.raises(ValueError, match="no classifier head.*num_classes"):
        vit_manifest("vit_base_patch16_224.orig_in21k", {})
    with pytest.raises(ValueError, match="unknown tiers"):
        vit_manifest("vit_tiny_patch16_224", {}, ranks={"trunk": 2})


@pytest.mark.parametrize("damage, reason", [
    (lambda body: body[:5], "shorter than the 8-byte header length"),
    (lambda body: body[:40], "points past the end"),
    (lambda body: body[:-10], "data section"),                          # truncated tensors
    (lambda body: (12).to_bytes(8, "little") + b"{not json}!!", "not valid JSON"),
    (lambda body: (2).to_bytes(8, "little") + b"[]", "expected an object"),
    (lambda body: b"\xff" * 64, "exceeds"),
])
def test_a_malformed_or_truncated_checkpoint_is_a_clear_error(tmp_path, damage, reason):
    bad = damage(_vit_body(depth=2, dim=8, classes=3))
    path = tmp_path / "bad.safetensors"
    path.write_bytes(bad)
    with pytest.raises(ValueError, match=f"backbone checkpoint {path} is not a safetensors file: .*{reason}"):
        vit_manifest("vit_tiny_patch16_224", {}, checkpoint=path)
    with pytest.raises(ValueError, match=f"not a safetensors file: .*{reason}"):
        vit_manifest("custom", {}, checkpoint=bad)


def test_a_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path):
    kwargs = {"depth": 2, "embed_dim": 8, "num_heads": 2, "num_classes": 3}
    assert vit_manifest("vit_tiny_patch16_224", kwargs, checkpoint=_vit_body(2, 8, 3)).head.num_classes == 3
    for body, said in [(_vit_body(2, 8, 5), "8 -> 5 head"), (_vit_body(3, 8, 3), "3 blocks"),
                       (_vit_body(2, 16, 3), "width 16"), (_vit_body(2, 8, None), "no head.weight")]:
        with pytest.raises(ValueError, match=f"does not fit model 'vit_tiny_patch16_224'.*{said}"):
            vit_manifest("vit_tiny_patch16_224", kwargs, checkpoint=body)
    gap = pack_tensors({"blocks.1.attn.qkv.weight": np.zeros((24, 8), np.float32),
                        "head.weight": np.zeros((3, 8), np.float32)})
    with pytest.raises(ValueError, match="lacks blocks.0.attn.qkv.weight"):
        vit_manifest("custom", {}, checkpoint=gap)


def test_build_manifest_uses_the_table_and_the_file_checkpoint(tmp_path):
    path = tmp_path / "b.safetensors"
    path.write_bytes(_vit_body(2, 8, 3))
    file = FederationFile.model_validate({"name": "f", "adapter": {"rank": 2}, "backbone": {
        "model": "vit_tiny_patch16_224", "model_kwargs": {"depth": 2, "embed_dim": 8, "num_heads": 2,
                                                          "num_classes": 3}, "checkpoint": str(path)}})
    config, data = build_federation_config(file)
    assert data == path.read_bytes()
    assert config.manifest == vit_manifest("vit_tiny_patch16_224", file.backbone.model_kwargs, rank=2)
    assert config.preprocessing is not None and tuple(config.preprocessing.input_size) == (3, 224, 224)
    wrong = file.model_copy(update={"backbone": file.backbone.model_copy(update={"model_kwargs": {"num_classes": 3}})})
    with pytest.raises(ValueError, match="does not fit"):
        build_federation_config(wrong)


def test_build_manifest_falls_back_to_timm_for_a_model_the_table_does_not_know(tmp_path):
    pytest.importorskip("timm")
    file = FederationFile.model_validate({"name": "f", "backbone": {"model": "deit_tiny_patch16_224",
                                                                    "model_kwargs": {"num_classes": 4},
                                                                    "checkpoint": "x"}})
    manifest = build_manifest(file, "deit_tiny_patch16_224", {"num_classes": 4})
    assert manifest == _torch_manifest("deit_tiny_patch16_224", {"num_classes": 4}, rank=8)
    with pytest.raises(ValueError, match="does not fit model 'deit_tiny_patch16_224'"):
        build_manifest(file, "deit_tiny_patch16_224", {"num_classes": 4}, _vit_body(12, 192, 5))


TORCH_BLOCKED = "import sys; sys.modules.update(torch=None, timm=None, torchvision=None)\n"


def test_a_federation_is_configured_without_torch(tmp_path):
    """torch and timm blocked, as on a coordinator-only install: the manifest comes from the table,
    checked against the checkpoint's header, and the preprocessing from shared/preprocess.py's table."""
    path = tmp_path / "vit.safetensors"
    path.write_bytes(_vit_body(12, 192, 10))
    doc = {"name": "f", "adapter": {"rank": 4},
           "backbone": {"model": "vit_tiny_patch16_224", "model_kwargs": {"num_classes": 10}, "checkpoint": str(path)}}
    script = TORCH_BLOCKED + (
        "import json\n"
        "from hilora.federation_file import FederationFile, build_federation_config\n"
        f"config, _ = build_federation_config(FederationFile.model_validate({doc!r}))\n"
        "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n"
        "print(config.model_dump_json())\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)
    assert config["manifest"] == json.loads(vit_manifest("vit_tiny_patch16_224", {"num_classes": 10}, rank=4)
                                            .model_dump_json())
    assert config["preprocessing"] == {"input_size": [3, 224, 224], "interpolation": "bicubic",
                                       "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 0.9}
    # the ways out, without torch: a demo checkpoint, a model neither the table nor a ViT checkpoint knows
    for backbone, said in [({"model": DEMO_MODEL, "checkpoint": "demo"}, '"checkpoint": "demo"'),
                           ({"model": "my_vit", "checkpoint": str(tmp_path / "nope.json")}, "does not exist")]:
        script = TORCH_BLOCKED + (
            "from hilora.federation_file import FederationFile, build_federation_config\n"
            f"build_federation_config(FederationFile.model_validate({{'name': 'f', 'backbone': {backbone!r}}}))\n")
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode != 0 and said in proc.stderr and (
            'pip install "hilora[worker]"' in proc.stderr or "does not exist" in said), proc.stderr


def test_every_table_model_has_a_torch_free_preprocessing_or_says_what_to_write():
    """shared/preprocess.py's table covers the models a federation file names most (ViT-Ti/S/B/L/16 at
    224 and the paper's ViT-B/16 in21k tags); for the others a coordinator-only install needs
    "preprocessing" in the file, and says so."""
    from hilora.federation_file import resolve_preprocessing
    from shared.preprocess import table_preprocessing

    for name in ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
                 "vit_base_patch16_224.augreg_in21k", "vit_large_patch16_224"):
        assert table_preprocessing(name, {}) is not None, name
    file = FederationFile.model_validate({"name": "f", "backbone": {"model": "x", "checkpoint": "x"}})
    unknown = [name for name in VIT_MODELS if table_preprocessing(name, {}) is None]
    for name in unknown:
        try:
            resolve_preprocessing(file, name, {})   # timm, where installed, knows every one
        except ValueError as exc:
            assert '"preprocessing"' in str(exc)
