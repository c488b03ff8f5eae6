"""Merging LoRA tiers into the backbone (shared/merge.py): a plain timm model loaded with the merged
weights predicts like ``TieredLoRAModel`` with those tiers active."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from shared.manifest import TIERS
from shared.merge import merge_lora, model_metadata, pack_model, read_model_metadata
from worker.backbone import create_model, load_state_dict_strict, manifest_for_model
from worker.lora import TieredLoRAModel

pytestmark = pytest.mark.unit

TINY_KWARGS = dict(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=16, depth=2, num_heads=2,
                   mlp_ratio=2)


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _setup(ranks=None, alpha=None):
    torch.manual_seed(0)
    backbone = create_model("vit_tiny_patch16_224", TINY_KWARGS).eval()
    state = {k: v.detach().numpy().copy() for k, v in backbone.state_dict().items()}
    manifest = manifest_for_model(backbone, rank=2, alpha=alpha, ranks=ranks)
    model = TieredLoRAModel(copy.deepcopy(backbone), manifest).eval()
    rng = np.random.default_rng(1)
    tiers = {}
    for tier in TIERS:
        tensors = {name: (0.3 * rng.normal(size=shape)).astype(np.float32)
                   for name, shape in manifest.tier_shapes(tier).items()}
        model.load_tier(tier, tensors)
        tiers[tier] = tensors
    return backbone, state, manifest, model, tiers


def _images(n: int = 6) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(2).random((n, 1, 8, 8)).astype(np.float32))


def _logits_of_merged(backbone, merged: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    plain = copy.deepcopy(backbone)
    load_state_dict_strict(plain, {k: torch.from_numpy(v) for k, v in merged.items()})
    with torch.no_grad():
        return plain.eval()(x)


@pytest.mark.parametrize("active", [("root",), ("root", "cluster"), ("root", "cluster", "leaf"),
                                    ("root", "leaf")])
def test_merged_weights_give_the_tiered_models_logits(active):
    backbone, state, manifest, model, tiers = _setup(ranks={"root": 2, "cluster": 3, "leaf": 1}, alpha=4.0)
    x = _images()
    model.set_active_tiers(active)
    with torch.no_grad():
        expected = model(x)
    merged = merge_lora(state, manifest, {t: tiers[t] for t in active})
    got = _logits_of_merged(backbone, merged, x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, backbone(x), atol=1e-3)  # the tiers did change the model
    # the input state dict is untouched and dtypes are kept
    assert np.array_equal(state["blocks.0.attn.qkv.weight"], backbone.state_dict()["blocks.0.attn.qkv.weight"].numpy())
    assert all(merged[k].dtype == state[k].dtype for k in state)


def test_positional_tiers_and_missing_heads():
    backbone, state, manifest, model, tiers = _setup()
    x = _images()
    by_name = merge_lora(state, manifest, {"root": tiers["root"], "cluster": tiers["cluster"]})
    positional = merge_lora(state, manifest, [tiers["root"], tiers["cluster"]])
    assert all(np.array_equal(by_name[k], positional[k]) for k in by_name)
    # a tier without a head keeps the head of the tier below it (here: root's)
    cluster_no_head = {k: v for k, v in tiers["cluster"].items() if not k.startswith("head.")}
    merged = merge_lora(state, manifest, [tiers["root"], cluster_no_head])
    assert np.array_equal(merged["head.weight"], tiers["root"]["head.weight"])
    assert np.array_equal(merged["blocks.1.attn.qkv.weight"], by_name["blocks.1.attn.qkv.weight"])
    # no tier: the backbone itself
    plain = merge_lora(state, manifest, [])
    assert all(np.array_equal(plain[k], state[k]) for k in state)
    # the k slice of qkv is never touched
    dim = TINY_KWARGS["embed_dim"]
    assert np.array_equal(merged["blocks.0.attn.qkv.weight"][dim:2 * dim], state["blocks.0.attn.qkv.weight"][dim:2 * dim])
    # skipping the cluster positionally is the same as naming root and leaf
    skip = merge_lora(state, manifest, [tiers["root"], None, tiers["leaf"]])
    named = merge_lora(state, manifest, {"root": tiers["root"], "leaf": tiers["leaf"]})
    assert all(np.array_equal(skip[k], named[k]) for k in skip)
    model.set_active_tiers(("root", "leaf"))
    with torch.no_grad():
        torch.testing.assert_close(_logits_of_merged(backbone, skip, x), model(x), atol=1e-4, rtol=1e-4)


def test_shape_and_name_errors_are_clear():
    _, state, manifest, _, tiers = _setup()
    root = tiers["root"]
    name = "blocks.0.attn.qkv.q.lora_A"
    with pytest.raises(ValueError, match=r"tier 'root': blocks.0.attn.qkv.q.lora_A has shape \(3, 16\)"):
        merge_lora(state, manifest, [dict(root, **{name: np.zeros((3, 16), np.float32)})])
    with pytest.raises(ValueError, match="missing LoRA factors"):
        merge_lora(state, manifest, [{k: v for k, v in root.items() if k != name}])
    with pytest.raises(ValueError, match="unknown tensors"):
        merge_lora(state, manifest, [dict(root, extra=np.zeros(1, np.float32))])
    with pytest.raises(ValueError, match="head.weight without head.bias"):
        merge_lora(state, manifest, [{k: v for k, v in root.items() if k != "head.bias"}])
    with pytest.raises(ValueError, match="head.weight has shape"):
        merge_lora(state, manifest, [dict(root, **{"head.weight": np.zeros((2, 16), np.float32)})])
    with pytest.raises(ValueError, match="unknown tiers"):
        merge_lora(state, manifest, {"trunk": root})
    with pytest.raises(ValueError, match="at most 3 tiers"):
        merge_lora(state, manifest, [root, root, root, root])
    missing = {k: v for k, v in state.items() if k != "blocks.1.attn.qkv.weight"}
    with pytest.raises(ValueError, match="no 'blocks.1.attn.qkv.weight'"):
        merge_lora(missing, manifest, [root])
    narrow = dict(state, **{"blocks.1.attn.qkv.weight": np.zeros((40, 16), np.float32)})
    with pytest.raises(ValueError, match="does not fit backbone 'blocks.1.attn.qkv.weight' of shape"):
        merge_lora(narrow, manifest, [root])
    with pytest.raises(ValueError, match="2-d Linear weight"):
        merge_lora(dict(state, **{"blocks.1.attn.qkv.weight": np.zeros(48, np.float32)}), manifest, [root])


def test_model_file_round_trip():
    _, state, manifest, _, tiers = _setup()
    merged = merge_lora(state, manifest, [tiers["root"]])
    meta = model_metadata(model="vit_tiny_patch16_224", model_kwargs=TINY_KWARGS, tiers=["root"],
                          versions={"root": {"id": 3, "version": 2}}, federation_id=1, client="12")
    import safetensors.numpy

    data = pack_model(merged, meta)
    loaded = safetensors.numpy.load(data)
    assert all(np.array_equal(loaded[k], merged[k]) for k in merged)
    from shared.tensors import read_safetensors_header

    decoded = read_model_metadata(read_safetensors_header(data)["__metadata__"])
    assert decoded["model"] == "vit_tiny_patch16_224" and decoded["model_kwargs"] == TINY_KWARGS
    assert decoded["tiers"] == ["root"] and decoded["client"] == "12" and decoded["federation_id"] == 1
    with pytest.raises(ValueError, match="not a hilora merged model"):
        read_model_metadata({})


def _reference_served_leaf(leaf, below_head, mix):
    """training.leaf_mix, the slow way: every target's product B A scaled by mix, the head's weight
    element by element from the tier below's, its bias the leaf's own (float64)."""
    products, head = {}, {}
    for name in leaf:
        if name.endswith(".lora_B"):
            target = name[: -len(".lora_B")]
            b, a = np.asarray(leaf[name], np.float64), np.asarray(leaf[target + ".lora_A"], np.float64)
            products[target] = [[mix * sum(b[i, k] * a[k, j] for k in range(b.shape[1])) for j in range(a.shape[1])]
                                for i in range(b.shape[0])]
    w, w0 = np.asarray(leaf["head.weight"], np.float64), np.asarray(below_head["head.weight"], np.float64)
    head["head.weight"] = [[(1 - mix) * w0[i, j] + mix * w[i, j] for j in range(w.shape[1])] for i in range(w.shape[0])]
    head["head.bias"] = list(np.asarray(leaf["head.bias"], np.float64))
    return products, head


@pytest.mark.parametrize("mix", [0.25, 0.75, 1.0])
def test_served_leaf_scales_the_leafs_change_and_keeps_its_bias(mix):
    from shared.merge import served_leaf

    backbone, state, manifest, model, tiers = _setup(ranks={"root": 2, "cluster": 3, "leaf": 2})
    leaf, below = tiers["leaf"], {k: tiers["cluster"][k] for k in ("head.weight", "head.bias")}
    served = served_leaf(leaf, below, mix)
    products, head = _reference_served_leaf(leaf, below, mix)
    assert set(served) == set(leaf) and all(v.dtype == np.float32 for v in served.values())
    for target, product in products.items():
        got = served[target + ".lora_B"].astype(np.float64) @ served[target + ".lora_A"].astype(np.float64)
        np.testing.assert_allclose(got, np.array(product), rtol=1e-5, atol=1e-6)
        assert np.array_equal(served[target + ".lora_A"], leaf[target + ".lora_A"])  # A is never scaled
    np.testing.assert_allclose(served["head.weight"], np.array(head["head.weight"]), rtol=1e-6, atol=1e-6)
    assert np.array_equal(served["head.bias"], leaf["head.bias"])
    if mix == 1.0:
        assert all(np.array_equal(served[k], leaf[k]) for k in leaf)
    # new arrays: the leaf it was given is untouched
    served["head.bias"][0] += 1.0
    assert not np.array_equal(served["head.bias"], leaf["head.bias"])
    # the merged model with the served leaf predicts as the tiered model with it loaded
    model.load_tier("leaf", served)
    model.set_active_tiers(("root", "cluster", "leaf"))
    x = _images()
    with torch.no_grad():
        expected = model(x)
    merged = merge_lora(state, manifest, {"root": tiers["root"], "cluster": tiers["cluster"], "leaf": served})
    torch.testing.assert_close(_logits_of_merged(backbone, merged, x), expected, atol=1e-4, rtol=1e-4)


def test_served_leaf_refuses_bad_input_clearly():
    from shared.merge import served_leaf

    _, _, _, _, tiers = _setup()
    leaf, below = tiers["leaf"], tiers["cluster"]
    for bad in (0.0, -0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"leaf mix must be in \(0, 1\]"):
            served_leaf(leaf, below, bad)
    with pytest.raises(ValueError, match="the leaf has no 'head.bias'"):
        served_leaf({k: v for k, v in leaf.items() if k != "head.bias"}, below, 0.5)
    with pytest.raises(ValueError, match="no head.weight of shape"):
        served_leaf(leaf, {"head.weight": np.zeros((2, 3), np.float32)}, 0.5)
    with pytest.raises(ValueError, match="no head.weight of shape"):
        served_leaf(leaf, {}, 0.5)


def test_a_leaf_file_records_the_mix_its_client_uses():
    from shared.merge import LEAF_MIX_METADATA, leaf_file_metadata, leaf_file_mix
    from shared.tensors import pack_tensors

    leaf = {"head.bias": np.zeros(3, np.float32)}
    for mix in (0.5, 0.1 + 0.2, 1.0):   # the exact float comes back
        assert leaf_file_mix(pack_tensors(leaf, metadata=leaf_file_metadata(mix))) == mix
    assert leaf_file_mix(pack_tensors(leaf)) == 1.0                              # written before the option
    assert leaf_file_mix(pack_tensors(leaf, metadata={"other": "x"})) == 1.0
    for bad in ("0", "-0.5", "1.5", "nan", "inf", "half", ""):
        with pytest.raises(ValueError, match=f"{LEAF_MIX_METADATA} must be a number in"):
            leaf_file_mix(pack_tensors(leaf, metadata={LEAF_MIX_METADATA: bad}))
    with pytest.raises(ValueError, match="the leaf file cannot be read"):
        leaf_file_mix(b"not safetensors")
