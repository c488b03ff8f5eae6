"""The worker's fused three-tier LoRA (worker/lora.py) against Hugging Face peft with three LoRA
adapters active on the same timm ViT: same logits and same gradients, to float tolerance.

peft cannot adapt the q and v slices of timm's fused ``qkv`` Linear, so both adapt the whole
``qkv`` (a manifest whose targets are full-row slices). Skipped when peft is not installed (it is in
the ``test`` and ``bench`` extras)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")

from shared.manifest import TIERS, AdapterManifest, AdapterTarget, HeadSpec, TierSpec  # noqa: E402
from worker.backbone import create_model  # noqa: E402
from worker.lora import TieredLoRAModel  # noqa: E402

pytestmark = pytest.mark.unit

TINY_KWARGS = dict(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=16, depth=2, num_heads=2,
                   mlp_ratio=2)
DIM = 16
RANKS = {"root": 2, "cluster": 3, "leaf": 4}
ALPHAS = {"root": 2.0, "cluster": 6.0, "leaf": 2.0}

# Both sides compute the same function in different orders (our fused ``A_cat``/``B_big`` products
# against peft's one product per adapter, summed), so they agree only to rounding. Rounding errors
# scale with the largest magnitudes in the computation, not with each element (a small gradient
# element is a difference of large partial sums), and attention, layer norm and softmax amplify
# them: over seeds 0..11 and 1 or 2 threads the largest difference was ~32 units of
# ``eps * max|expected|`` for the logits (float32 and float64 alike) and ~2,500 for the
# gradients (float32: a few 1e-6 absolute, which an elementwise ``atol=1e-6, rtol=1e-4`` failed on
# small elements). So the tolerances below are absolute, ``ULPS * eps(dtype) * max|expected|``,
# with a 30-60x margin; any real difference (a tier's scaling, a missing term) is O(max|expected|).
LOGIT_ULPS = 2 ** 10
GRAD_ULPS = 2 ** 16


def assert_close_to_rounding(actual: torch.Tensor, expected: torch.Tensor, ulps: int) -> None:
    """``|actual - expected| <= ulps * eps * max|expected|`` everywhere (see the comment above)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = float(expected.abs().max())
    assert scale > 0, "a zero reference would make the comparison vacuous"
    atol = ulps * torch.finfo(expected.dtype).eps * scale
    np.testing.assert_allclose(actual.detach().numpy(), expected.detach().numpy(), rtol=0, atol=atol)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def full_qkv_manifest(depth: int, dim: int, classes: int) -> AdapterManifest:
    targets = [AdapterTarget(name=f"blocks.{i}.attn.qkv", module=f"blocks.{i}.attn.qkv", out_offset=0,
                             in_features=dim, out_features=3 * dim) for i in range(depth)]
    return AdapterManifest(targets=targets,
                           tiers={t: TierSpec(rank=RANKS[t], alpha=ALPHAS[t]) for t in TIERS},
                           head=HeadSpec(in_features=dim, num_classes=classes))


def twin_models(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A TieredLoRAModel and a peft model on copies of one backbone, with the same random factors
    (drawn in float32, then both models converted to ``dtype``)."""
    torch.manual_seed(seed)
    backbone = create_model("vit_tiny_patch16_224", TINY_KWARGS).eval()
    peft_backbone = copy.deepcopy(backbone)
    ours = TieredLoRAModel(backbone, full_qkv_manifest(2, DIM, 5))
    rng = np.random.default_rng(seed + 1)
    for tier in TIERS:
        ours.load_tier(tier, {name: rng.normal(size=shape).astype(np.float32)
                              for name, shape in ours.manifest.tier_shapes(tier).items()})
    from peft import LoraConfig, get_peft_model

    config = {t: LoraConfig(r=RANKS[t], lora_alpha=ALPHAS[t], target_modules=["qkv"], lora_dropout=0.0)
              for t in TIERS}
    theirs = get_peft_model(peft_backbone, config["root"], adapter_name="root")
    theirs.add_adapter("cluster", config["cluster"])
    theirs.add_adapter("leaf", config["leaf"])
    with torch.no_grad():
        for target in ours.manifest.targets:
            layer = theirs.base_model.model.get_submodule(target.module)
            for tier in TIERS:
                layer.lora_A[tier].weight.copy_(ours.factor(tier, target.name, "A"))
                layer.lora_B[tier].weight.copy_(ours.factor(tier, target.name, "B"))
    return ours.to(dtype), theirs.to(dtype)


def use_head(theirs, ours: TieredLoRAModel, tier: str) -> None:  # noqa: ANN001
    with torch.no_grad():
        head = theirs.base_model.model.head
        head.weight.copy_(ours.heads[tier].weight)
        head.bias.copy_(ours.heads[tier].bias)


def images(n: int = 3) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(7).random((n, 1, 8, 8)).astype(np.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tiers", [("root",), ("root", "cluster"), ("root", "cluster", "leaf")])
def test_same_logits_as_peft_with_the_same_adapters_active(tiers, dtype):
    ours, theirs = twin_models(dtype=dtype)
    ours.set_active_tiers(tiers)
    theirs.base_model.set_adapter(list(tiers))
    use_head(theirs, ours, tiers[-1])
    x = images().to(dtype)

    with torch.no_grad():
        expected = theirs(x)
        actual = ours(x)

    assert (expected - theirs.base_model.model.forward_head(
        theirs.base_model.model.forward_features(x))).abs().max() == 0
    assert_close_to_rounding(actual, expected, LOGIT_ULPS)


def test_same_gradients_as_peft_when_the_leaf_trains_under_frozen_root_and_cluster():
    # In float64: float32 gradients agree only to a few 1e-6 (see GRAD_ULPS), too loose to tell a
    # small systematic error from rounding; float64 pins them to ~1e-11 of their largest element.
    ours, theirs = twin_models(seed=3, dtype=torch.float64)
    ours.set_active_tiers(TIERS)
    ours.set_trainable("leaf", ("A", "B"))
    theirs.base_model.set_adapter(list(TIERS))
    for name, parameter in theirs.named_parameters():
        parameter.requires_grad_(".leaf." in name)
    use_head(theirs, ours, "leaf")
    x = images(4).to(torch.float64)
    y = torch.tensor([0, 1, 2, 3])

    torch.nn.functional.cross_entropy(ours(x), y).backward()
    torch.nn.functional.cross_entropy(theirs(x), y).backward()

    for target in ours.manifest.targets:
        layer = theirs.base_model.model.get_submodule(target.module)
        for which, theirs_param in (("A", layer.lora_A["leaf"].weight), ("B", layer.lora_B["leaf"].weight)):
            ours_grad = ours.factor("leaf", target.name, which).grad
            assert ours_grad is not None and theirs_param.grad is not None
            assert_close_to_rounding(ours_grad, theirs_param.grad, GRAD_ULPS)
        assert ours.factor("root", target.name, "A").grad is None
