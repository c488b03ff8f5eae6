"""The admin's federation file: validation, explicit manifests, checkpoint sources."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import tiny_checkpoint, tiny_config

from hilora.federation_file import FederationFile, build_federation_config, load_federation_file

pytestmark = pytest.mark.unit


def test_explicit_manifest_and_local_checkpoint(tmp_path):
    ckpt = tmp_path / "backbone.safetensors"
    ckpt.write_bytes(tiny_checkpoint())
    manifest = tiny_config()["manifest"]
    path = tmp_path / "fed.json"
    path.write_text(json.dumps({"name": "f", "backbone": {"model": "vit_tiny_patch16_224", "checkpoint": str(ckpt)},
                                "manifest": manifest, "schedule": {"root_rounds": 3},
                                "root": {"B": "local", "aggregation": "factor_avg"}}))
    config, data = build_federation_config(load_federation_file(path))
    assert data == ckpt.read_bytes()
    assert config.backbone.sha256 == hashlib.sha256(data).hexdigest()
    assert config.schedule.root_rounds == 3 and config.root.uploaded_factors() == ("A", "head")
    assert config.manifest.tiers["root"].rank == manifest["tiers"]["root"]["rank"]


def test_bad_federation_files_are_refused_with_a_reason(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_federation_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_federation_file(bad)
    with pytest.raises(ValueError, match="product_svd"):
        ckpt = tmp_path / "c.safetensors"
        ckpt.write_bytes(tiny_checkpoint())
        build_federation_config(FederationFile.model_validate(
            {"name": "f", "backbone": {"model": "m", "checkpoint": str(ckpt)}, "manifest": tiny_config()["manifest"],
             "root": {"B": "local"}}))


def test_pretrained_checkpoint_of_an_unknown_model_is_a_clear_error():
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match="could not provide pretrained weights"):
        build_federation_config(FederationFile.model_validate(
            {"name": "f", "backbone": {"model": "no_such_model_xyz", "checkpoint": "pretrained"}}))
