"""A worker builds only the models its config allows (issue 15): coordinator-supplied names and
model_kwargs that would make timm open a local file or reach a hub are refused."""

from __future__ import annotations

import pytest

from worker.daemon import WorkerConfig
from worker.model_policy import ARCHITECTURE_KWARGS, ModelRefused, check_remote_model

pytestmark = pytest.mark.unit

DEMO = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2)


@pytest.mark.parametrize("model", ["vit_tiny_patch16_224", "vit_base_patch16_224.augreg_in21k", "resnet50"])
def test_plain_names_with_architecture_kwargs_are_built(model):
    check_remote_model(model, DEMO)
    check_remote_model(model, {})


@pytest.mark.parametrize("model", ["hf-hub:org/model", "hf_hub:timm/vit_base_patch16_224", "local-dir:/etc",
                                   "timm/vit_base_patch16_224", "../x", "", "a" * 300])
def test_hub_and_local_dir_names_are_refused_unless_allowed(model):
    with pytest.raises(ModelRefused, match="allow_hub_models"):
        check_remote_model(model, {})
    if model:
        check_remote_model(model, {}, allow_hub=True)


@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir",
                                 "pretrained_strict", "features_only"])
def test_file_and_hub_kwargs_are_refused_unless_allowed(key):
    assert key not in ARCHITECTURE_KWARGS
    with pytest.raises(ModelRefused, match=rf"\['{key}'\].*allow_model_kwargs"):
        check_remote_model("vit_tiny_patch16_224", {**DEMO, key: "/etc/passwd"})
    check_remote_model("vit_tiny_patch16_224", {**DEMO, key: "/etc/passwd"}, allow_kwargs=[key])


def test_the_worker_config_carries_the_allowances():
    cfg = WorkerConfig.model_validate({"federation_id": 1, "clients": [{"name": "a", "data": {"partition": "demo", "client": "a"}}],
                                       "allow_model_kwargs": ["pretrained_cfg"], "allow_hub_models": True})
    assert (cfg.allow_model_kwargs, cfg.allow_hub_models) == (["pretrained_cfg"], True)
    default = WorkerConfig.model_validate({"federation_id": 1, "clients": [{"name": "a", "data": {"partition": "demo", "client": "a"}}]})
    assert (default.allow_model_kwargs, default.allow_hub_models) == ([], False)
