"""Tiered LoRA model (worker/lora.py) and backbone helpers (worker/backbone.py), on a tiny random ViT."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from shared.manifest import TIERS, AdapterManifest
from worker.backbone import build_backbone, create_model, manifest_for_model
from worker.lora import ManifestMismatchError, TensorMismatchError, TieredLoRALinear, TieredLoRAModel, check_manifest_matches

pytestmark = pytest.mark.unit

TINY_KWARGS = dict(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=16, depth=2, num_heads=2,
                   mlp_ratio=2)
DIM = 16


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def tiny_backbone(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("vit_tiny_patch16_224", TINY_KWARGS).eval()


def tiny_model(ranks=None, alpha=None, seed: int = 0) -> tuple[TieredLoRAModel, torch.nn.Module]:
    backbone = tiny_backbone(seed)
    reference = copy.deepcopy(backbone)
    manifest = manifest_for_model(backbone, rank=2, alpha=alpha, ranks=ranks)
    return TieredLoRAModel(backbone, manifest), reference


def random_tier(model: TieredLoRAModel, tier: str, seed: int, zero_b: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {name: rng.normal(size=shape).astype(np.float32)
               for name, shape in model.manifest.tier_shapes(tier).items()}
    if zero_b:
        tensors = {k: (np.zeros_like(v) if k.endswith("lora_B") else v) for k, v in tensors.items()}
    model.load_tier(tier, tensors)
    return tensors


def assert_close_to_rounding(actual: torch.Tensor, expected: torch.Tensor, ulps: int) -> None:
    """``|actual - expected| <= ulps * eps * max|expected|`` everywhere.

    Two float32 evaluations of one function in different orders (fused vs per-tier products, merged
    vs separate weights) differ by rounding of the largest partial sums, so the error is a few eps
    times the largest magnitude for every element, small ones included: a fixed ``atol`` is too
    tight when the outputs are large (the qkv outputs here reach ~100) and an elementwise ``rtol``
    fails on small elements. Any real mistake (a tier's scaling, a slice offset) is O(max|expected|).
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = float(expected.abs().max())
    assert scale > 0
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=0,
                               atol=ulps * torch.finfo(expected.dtype).eps * scale)


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((n, 1, 8, 8)).astype(np.float32))


def slow_module_reference(wrapper: TieredLoRALinear, model: TieredLoRAModel, tiers, x: torch.Tensor) -> torch.Tensor:
    """Frozen Linear output plus, per active tier and per slice, scaling * x A^T B^T (explicit loops)."""
    out = wrapper.base(x).clone()
    for tier in tiers:
        scaling = model.manifest.tiers[tier].scaling
        for target in wrapper.targets:
            a = model.factor(tier, target.name, "A")
            b = model.factor(tier, target.name, "B")
            lo, hi = target.out_offset, target.out_offset + target.out_features
            out[..., lo:hi] += scaling * (x @ a.T) @ b.T
    return out


def merged_reference(reference: torch.nn.Module, model: TieredLoRAModel, tiers) -> torch.nn.Module:
    """A plain copy of the backbone with W0 + sum_t scaling_t B_t A_t merged into each slice."""
    merged = copy.deepcopy(reference)
    with torch.no_grad():
        for target in model.manifest.targets:
            weight = merged.get_submodule(target.module).weight
            for tier in tiers:
                delta = model.factor(tier, target.name, "B") @ model.factor(tier, target.name, "A")
                weight[target.out_offset:target.out_offset + target.out_features] += \
                    model.manifest.tiers[tier].scaling * delta
        if tiers:
            merged.head.load_state_dict(model.heads[tiers[-1]].state_dict())
    return merged


@pytest.mark.parametrize("ranks, alpha", [(None, None), ({"root": 1, "cluster": 3, "leaf": 4}, 6.0)])
@pytest.mark.parametrize("tiers", [("root",), ("cluster",), ("root", "cluster"), ("root", "leaf"),
                                   ("root", "cluster", "leaf")])
def test_fused_forward_equals_per_tier_per_slice_reference(ranks, alpha, tiers):
    model, reference = tiny_model(ranks, alpha)
    for i, tier in enumerate(TIERS):
        random_tier(model, tier, seed=10 + i)
    model.set_active_tiers(tiers)
    x_tokens = torch.from_numpy(np.random.default_rng(2).normal(size=(3, 5, DIM)).astype(np.float32))
    with torch.no_grad():
        # Measured (1 and 2 threads): <= 2 units of eps * max|expected| for one layer, <= 5 for the
        # logits through the whole ViT; the tolerances leave a 30-50x margin.
        for wrapper in model._wrapped.values():
            assert_close_to_rounding(wrapper(x_tokens), slow_module_reference(wrapper, model, tiers, x_tokens),
                                     ulps=2 ** 6)
        x = images()
        assert_close_to_rounding(model(x), merged_reference(reference, model, tiers)(x), ulps=2 ** 8)


def test_fused_forward_with_gradients_matches_the_cached_one():
    model, _ = tiny_model()
    for i, tier in enumerate(TIERS):
        random_tier(model, tier, seed=i)
    model.set_active_tiers(TIERS)
    x = images()
    with torch.no_grad():
        cached = model(x)
    model.set_trainable("leaf", ("A", "B"))
    live = model(x)
    assert live.requires_grad
    np.testing.assert_allclose(live.detach().numpy(), cached.numpy(), rtol=1e-6, atol=1e-6)


def test_only_the_q_and_v_slices_change():
    model, _ = tiny_model()
    for i, tier in enumerate(TIERS):
        random_tier(model, tier, seed=i)
    model.set_active_tiers(TIERS)
    x_tokens = torch.from_numpy(np.random.default_rng(3).normal(size=(2, 4, DIM)).astype(np.float32))
    with torch.no_grad():
        for wrapper in model._wrapped.values():
            adapted, base = wrapper(x_tokens), wrapper.base(x_tokens)
            assert torch.equal(adapted[..., DIM:2 * DIM], base[..., DIM:2 * DIM])      # k untouched
            assert (adapted[..., :DIM] - base[..., :DIM]).abs().max() > 1e-3            # q changed
            assert (adapted[..., 2 * DIM:] - base[..., 2 * DIM:]).abs().max() > 1e-3    # v changed


def test_all_b_zero_equals_the_backbone():
    model, reference = tiny_model()
    for i, tier in enumerate(TIERS):
        model.init_tier(tier, seed=i)          # A random, B zero, head = backbone head
    x = images(4)
    with torch.no_grad():
        expected = reference(x)
        for tiers in [(), ("root",), ("root", "cluster", "leaf")]:
            model.set_active_tiers(tiers)
            np.testing.assert_allclose(model(x).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
        random_tier(model, "root", seed=5, zero_b=True)
        model.set_active_tiers(("root",))
        # zero B but a different root head: only the head changes the logits
        merged = merged_reference(reference, model, ("root",))
        np.testing.assert_allclose(model(x).numpy(), merged(x).numpy(), rtol=1e-5, atol=1e-5)


def test_head_of_the_highest_active_tier_predicts():
    model, reference = tiny_model()
    for i, tier in enumerate(TIERS):
        model.init_tier(tier, seed=i)
    with torch.no_grad():
        model.heads["cluster"].bias.add_(torch.arange(5, dtype=torch.float32))
        x = images()
        base_logits = reference(x)
        model.set_active_tiers(("root",))
        np.testing.assert_allclose(model(x).numpy(), base_logits.numpy(), atol=1e-6)
        model.set_active_tiers(("root", "cluster"))
        np.testing.assert_allclose(model(x).numpy(), (base_logits + torch.arange(5.0)).numpy(), atol=1e-5)
        model.set_active_tiers(("root", "cluster", "leaf"))
        np.testing.assert_allclose(model(x).numpy(), base_logits.numpy(), atol=1e-6)


def test_cache_is_invalidated_when_a_tier_changes():
    model, _ = tiny_model()
    random_tier(model, "root", seed=1)
    model.set_active_tiers(("root",))
    x = images()
    with torch.no_grad():
        first = model(x).clone()
        assert torch.equal(model(x), first)
        random_tier(model, "root", seed=2)
        second = model(x).clone()
        assert not torch.allclose(first, second)
        model.factor("root", "blocks.0.attn.qkv.q", "B").mul_(0.0)
        assert not torch.allclose(model(x), second)


def test_orthogonality_loss_matches_the_formula_and_vanishes_for_orthogonal_bs():
    model, _ = tiny_model()
    targets = [t.name for t in model.manifest.targets]
    eye = np.eye(DIM, dtype=np.float32)
    with torch.no_grad():
        for name in targets:  # root B on e0, e1; cluster on e2, e3; leaf on e4, e5: mutually orthogonal
            for k, tier in enumerate(TIERS):
                model.factor(tier, name, "B").copy_(torch.from_numpy(3.0 * eye[:, 2 * k:2 * k + 2]))
    assert float(model.orthogonality_loss("root", 0.1, 0.1)) == 0.0
    assert float(model.orthogonality_loss("cluster", 0.1, 0.1)) == pytest.approx(0.0, abs=1e-12)
    assert float(model.orthogonality_loss("leaf", 0.1, 0.1)) == pytest.approx(0.0, abs=1e-12)

    tensors = {tier: random_tier(model, tier, seed=20 + k) for k, tier in enumerate(TIERS)}

    def term(upper: str, lower: str) -> float:
        return sum(float(np.sum((tensors[upper][f"{n}.lora_B"].T.astype(np.float64)
                                 @ tensors[lower][f"{n}.lora_B"]) ** 2)) for n in targets)

    cluster = float(model.orthogonality_loss("cluster", 0.3, 0.7))
    leaf = float(model.orthogonality_loss("leaf", 0.3, 0.7))
    assert cluster > 0 and leaf > 0
    assert cluster == pytest.approx(0.3 * term("root", "cluster"), rel=1e-5)
    assert leaf == pytest.approx(0.3 * term("root", "leaf") + 0.7 * term("cluster", "leaf"), rel=1e-5)


def test_orthogonality_loss_gradient_reaches_only_the_training_tier():
    model, _ = tiny_model()
    for k, tier in enumerate(TIERS):
        random_tier(model, tier, seed=k)
    model.set_trainable("leaf", ("B",))
    for name in [t.name for t in model.manifest.targets]:   # even a root B that could train gets no gradient
        model.factor("root", name, "B").requires_grad_(True)
    model.orthogonality_loss("leaf", 1.0, 1.0).backward()
    assert model.factor("leaf", "blocks.0.attn.qkv.q", "B").grad.abs().sum() > 0
    assert model.factor("root", "blocks.0.attn.qkv.q", "B").grad is None   # detached upper tier


def test_set_trainable_freezes_exactly_what_it_says():
    model, _ = tiny_model()
    model.set_trainable("cluster", ("B", "head"))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    expected = {id(p) for p in model.tier_parameters("cluster", ("B", "head"))}
    assert trainable == expected
    assert len(expected) == len(model.manifest.targets) + 2
    assert not any(p.requires_grad for p in model.backbone.parameters() if id(p) not in expected)
    model.set_trainable("root", ("A",))
    assert {id(p) for p in model.parameters() if p.requires_grad} == {
        id(model.factor("root", t.name, "A")) for t in model.manifest.targets}
    with pytest.raises(ValueError, match="unknown factors"):
        model.set_trainable("root", ("C",))
    with pytest.raises(ValueError, match="unknown tier"):
        model.set_trainable("trunk", ("A",))


def test_init_tier_is_seeded_and_copies_the_head():
    model, reference = tiny_model()
    model.init_tier("root", seed=7)
    a1 = model.export_tier("root")
    assert all(np.all(v == 0) for k, v in a1.items() if k.endswith("lora_B"))
    assert all(np.abs(v).max() > 0 for k, v in a1.items() if k.endswith("lora_A"))
    np.testing.assert_array_equal(a1["head.weight"], reference.head.weight.detach().numpy())
    model.init_tier("root", seed=7)
    for k, v in model.export_tier("root").items():
        np.testing.assert_array_equal(v, a1[k])
    model.init_tier("root", seed=8)
    assert not np.array_equal(model.export_tier("root")["blocks.0.attn.qkv.q.lora_A"], a1["blocks.0.attn.qkv.q.lora_A"])
    with torch.no_grad():
        model.heads["cluster"].bias.fill_(2.5)
    model.init_tier("leaf", seed=1, head_from="cluster")
    assert np.all(model.export_tier("leaf", ("head",))["head.bias"] == 2.5)
    with pytest.raises(ValueError, match="head_from"):
        model.init_tier("leaf", seed=1, head_from="trunk")


def test_export_load_round_trip():
    model, _ = tiny_model({"root": 2, "cluster": 3, "leaf": 1})
    written = random_tier(model, "cluster", seed=3)
    exported = model.export_tier("cluster")
    assert set(exported) == set(model.manifest.tier_shapes("cluster"))
    for name, array in exported.items():
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, written[name])
    other, _ = tiny_model({"root": 2, "cluster": 3, "leaf": 1})
    other.load_tier("cluster", exported)
    model.set_active_tiers(("root", "cluster"))
    other.set_active_tiers(("root", "cluster"))
    with torch.no_grad():
        assert torch.equal(model(images()), other(images()))
    only_b = model.export_tier("cluster", ("B",))
    assert set(only_b) == {f"{t.name}.lora_B" for t in model.manifest.targets}
    exported["head.bias"][0] = 123.0     # exports are copies
    assert float(model.heads["cluster"].bias[0]) != 123.0


def test_load_tier_refuses_wrong_names_shapes_and_values():
    model, _ = tiny_model()
    good = model.export_tier("root")
    before = model.export_tier("root")
    with pytest.raises(TensorMismatchError, match="unknown tensors.*blocks.9.attn.qkv.q.lora_A"):
        model.load_tier("root", {**good, "blocks.9.attn.qkv.q.lora_A": np.zeros((2, DIM), np.float32)})
    with pytest.raises(TensorMismatchError, match="missing tensors.*head.bias"):
        model.load_tier("root", {k: v for k, v in good.items() if k != "head.bias"})
    bad_shape = dict(good, **{"blocks.0.attn.qkv.v.lora_B": np.ones((DIM, 3), np.float32)})
    with pytest.raises(TensorMismatchError, match=r"blocks.0.attn.qkv.v.lora_B: shape \(16, 3\), expected \(16, 2\)"):
        model.load_tier("root", bad_shape)
    bad_value = dict(good, **{"head.bias": np.full(5, np.nan, np.float32)})
    with pytest.raises(TensorMismatchError, match="non-finite"):
        model.load_tier("root", bad_value)
    for name, array in model.export_tier("root").items():   # nothing changed by refused loads
        np.testing.assert_array_equal(array, before[name])
    model.load_tier("root", {"head.bias": np.arange(5, dtype=np.float32)}, partial=True)
    assert model.export_tier("root", ("head",))["head.bias"].tolist() == [0, 1, 2, 3, 4]


def test_check_manifest_matches_reports_mismatches():
    backbone = tiny_backbone()
    manifest = manifest_for_model(backbone, rank=2)
    check_manifest_matches(backbone, manifest)
    wrong_dim = manifest_for_model(create_model("vit_tiny_patch16_224", dict(TINY_KWARGS, embed_dim=32)), rank=2)
    with pytest.raises(ManifestMismatchError, match="in_features 32 but blocks.0.attn.qkv has 16"):
        check_manifest_matches(backbone, wrong_dim)
    deeper = manifest_for_model(create_model("vit_tiny_patch16_224", dict(TINY_KWARGS, depth=3)), rank=2)
    with pytest.raises(ManifestMismatchError, match="'blocks.2.attn.qkv' does not exist"):
        check_manifest_matches(backbone, deeper)
    doc = manifest.model_dump()
    doc["head"]["num_classes"] = 7
    with pytest.raises(ManifestMismatchError, match="head is Linear"):
        check_manifest_matches(backbone, AdapterManifest.model_validate(doc))
    doc = manifest.model_dump()
    doc["targets"][1]["out_offset"] = 40          # v slice [40, 56) runs past qkv's 48 outputs
    with pytest.raises(ManifestMismatchError, match="exceeds"):
        TieredLoRAModel(tiny_backbone(), AdapterManifest.model_validate(doc))


def test_manifest_for_model_uses_qv_slices_ranks_and_alpha():
    backbone = tiny_backbone()
    manifest = manifest_for_model(backbone, rank=4, ranks={"leaf": 2})
    assert [t.name for t in manifest.targets] == ["blocks.0.attn.qkv.q", "blocks.0.attn.qkv.v",
                                                  "blocks.1.attn.qkv.q", "blocks.1.attn.qkv.v"]
    assert [t.out_offset for t in manifest.targets] == [0, 2 * DIM, 0, 2 * DIM]
    assert {t: (s.rank, s.alpha) for t, s in manifest.tiers.items()} == {
        "root": (4, 4.0), "cluster": (4, 4.0), "leaf": (2, 2.0)}
    assert (manifest.head.in_features, manifest.head.num_classes) == (DIM, 5)
    assert manifest_for_model(backbone, rank=4, alpha=8).tiers["root"].scaling == 2.0
    with pytest.raises(ValueError, match="unknown tiers"):
        manifest_for_model(backbone, ranks={"trunk": 2})


def test_build_backbone_loads_strictly(tmp_path):
    from safetensors.torch import save, save_file

    source = tiny_backbone(seed=3)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / "b.safetensors"
    save_file(state, str(path))
    x = images()
    for checkpoint in (path, str(path), path.read_bytes()):
        built = build_backbone("vit_tiny_patch16_224", TINY_KWARGS, checkpoint)
        with torch.no_grad():
            assert torch.equal(built(x), source(x))
    missing = {k: v for k, v in state.items() if k != "head.bias"}
    with pytest.raises(ValueError, match=r"missing 1 tensors.*head.bias"):
        build_backbone("vit_tiny_patch16_224", TINY_KWARGS, save(missing))
    with pytest.raises(ValueError, match="shape mismatches.*head.weight"):
        build_backbone("vit_tiny_patch16_224", dict(TINY_KWARGS, num_classes=3), path)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        build_backbone("vit_tiny_patch16_224", TINY_KWARGS, b"\x00" * 3)
    with pytest.raises(ValueError, match="does not exist"):
        build_backbone("vit_tiny_patch16_224", TINY_KWARGS, tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="cannot build timm model"):
        build_backbone("no_such_model_xyz", {}, None)
