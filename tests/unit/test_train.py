"""Local training and evaluation (worker/train.py) and the cached demo backbone (worker/backbone.py)."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch

from shared.manifest import TIERS
from worker.backbone import (
    DEMO_BACKBONE_KWARGS,
    DEMO_BACKBONE_MODEL,
    build_backbone,
    checkpoint_sha256,
    create_model,
    demo_backbone_path,
    manifest_for_model,
    pretrain_demo_backbone,
)
from worker.data import ClientData, client_arrays, load_partition, parse_partition
from worker.lora import TieredLoRAModel
from worker.train import evaluate, evaluate_tiers, predict, tiers_up_to, train_tier

pytestmark = pytest.mark.unit

SHORT_EPOCHS = 10


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def short_backbone(tmp_path_factory):
    """The demo recipe with 10 epochs, cached in a temp dir (about 6 s on 2 cores)."""
    torch.set_num_threads(2)
    cache = tmp_path_factory.mktemp("hilora-cache")
    messages: list[str] = []
    artifact = pretrain_demo_backbone(cache_dir=cache, epochs=SHORT_EPOCHS, progress=messages.append)
    return artifact, cache, messages


def small_model(seed: int = 0, rank: int = 2) -> TieredLoRAModel:
    torch.manual_seed(seed)
    backbone = create_model(DEMO_BACKBONE_MODEL, dict(DEMO_BACKBONE_KWARGS, embed_dim=16, depth=2, num_heads=2))
    model = TieredLoRAModel(backbone.eval(), manifest_for_model(backbone, rank=rank))
    for i, tier in enumerate(TIERS):
        model.init_tier(tier, seed=100 + i)
    return model


def small_data(n: int = 48, seed: int = 0) -> ClientData:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 16, 16)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int64)
    return ClientData(x_train=x, y_train=y, x_test=x[:16], y_test=y[:16], train_indices=np.arange(n),
                      test_indices=np.arange(16))


def _train(model, tier="root", data=None, seed=0, **kw):
    args = dict(epochs=2, lr=1e-2, head_lr=1e-2, batch_size=16, weight_decay=0.0, gamma_c=0.1, gamma_l=0.1,
                seed=seed)
    args.update(kw)
    return train_tier(model, tier, data if data is not None else small_data(), **args)


def _snapshot(model: TieredLoRAModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiers_up_to():
    assert tiers_up_to("root") == ("root",)
    assert tiers_up_to("cluster") == ("root", "cluster")
    assert tiers_up_to("leaf") == TIERS
    with pytest.raises(ValueError, match="unknown tier"):
        tiers_up_to("stem")


def test_train_tier_changes_exactly_the_trainable_factors():
    model = small_model()
    with torch.no_grad():   # non-zero root and cluster B so every factor would get a gradient
        for t in model.manifest.targets:
            model.factor("root", t.name, "B").normal_()
            model.factor("cluster", t.name, "B").normal_()
    before = _snapshot(model)
    result = _train(model, "cluster", trainable=("B",))
    assert result["steps"] == 2 * 3
    after = _snapshot(model)
    trained = {name for name in before if not torch.equal(before[name], after[name])}
    expected = {name for name, p in model.named_parameters()
                if any(p is q for q in model.tier_parameters("cluster", ("B",)))}
    assert trained == expected and len(expected) == len(model.manifest.targets)
    assert not any(p.requires_grad for p in model.parameters())   # frozen again afterwards


def test_train_tier_with_head_uses_the_head_learning_rate():
    model = small_model()
    before = model.export_tier("leaf")
    _train(model, "leaf", trainable=("A", "B", "head"), head_lr=1e-12, lr=1e-2)
    after = model.export_tier("leaf")
    assert np.abs(after["head.weight"] - before["head.weight"]).max() < 1e-6
    assert np.abs(after["blocks.0.attn.qkv.q.lora_B"] - before["blocks.0.attn.qkv.q.lora_B"]).max() > 1e-4


def test_train_tier_is_deterministic_for_a_seed():
    first, second, third = small_model(), small_model(), small_model()
    r1 = _train(first, seed=5)
    r2 = _train(second, seed=5)
    _train(third, seed=6)
    assert r1 == r2
    e1, e2, e3 = first.export_tier("root"), second.export_tier("root"), third.export_tier("root")
    for name in e1:
        np.testing.assert_array_equal(e1[name], e2[name])
    assert any(not np.array_equal(e1[n], e3[n]) for n in e1)


def test_train_tier_fits_a_small_training_set():
    model = small_model(rank=4)
    data = small_data(20)
    before = evaluate(model, data.x_train, data.y_train, ("root",))
    result = _train(model, data=data, epochs=60, lr=3e-2, head_lr=3e-2, batch_size=20)
    after = evaluate(model, data.x_train, data.y_train, ("root",))
    assert result["train_loss"] < 1.0
    assert after >= 0.9 > before


def test_train_tier_rejects_bad_arguments():
    model = small_model()
    with pytest.raises(ValueError, match="nothing to train"):
        _train(model, trainable=())
    with pytest.raises(ValueError, match="epochs"):
        _train(model, epochs=0)
    empty = small_data(0)
    with pytest.raises(ValueError, match="no training samples"):
        _train(model, data=empty)


def test_evaluate_and_evaluate_tiers_compute_accuracies():
    model = small_model()
    data = small_data(40)
    predicted = predict(model, data.x_test, ("root",))
    labels = predicted.copy()
    labels[:4] = (labels[:4] + 1) % 10   # exactly 4 of 16 wrong
    assert evaluate(model, data.x_test, labels, ("root",), batch_size=5) == pytest.approx(12 / 16)
    metrics = evaluate_tiers(model, data, ("root", "cluster"), "cpu")
    assert set(metrics) == {"acc_root", "acc_cluster"}
    assert metrics["acc_root"] == pytest.approx(float(np.mean(predicted == data.y_test)))
    with torch.no_grad():
        model.heads["cluster"].bias.copy_(torch.tensor([0.0] * 3 + [1e6] + [0.0] * 6))
        model.heads["leaf"].bias.copy_(torch.tensor([0.0] * 7 + [1e6] + [0.0] * 2))
    metrics = evaluate_tiers(model, data, TIERS, "cpu")
    assert metrics["acc_cluster"] == pytest.approx(float(np.mean(data.y_test == 3)))
    assert metrics["acc_leaf"] == pytest.approx(float(np.mean(data.y_test == 7)))
    assert set(evaluate_tiers(model, data, ("root", "leaf"), "cpu")) == {"acc_root", "acc_leaf"}


def test_pretrained_backbone_is_cached_and_root_training_learns_a_label_permutation(short_backbone):
    artifact, cache, messages = short_backbone
    assert artifact.path.parent == cache / "backbones" and artifact.path.suffix == ".safetensors"
    assert artifact.sha256 == checkpoint_sha256(artifact.path)
    assert artifact.model == DEMO_BACKBONE_MODEL and artifact.model_kwargs == DEMO_BACKBONE_KWARGS
    assert any("pretraining" in m for m in messages)
    started = time.monotonic()
    again = pretrain_demo_backbone(cache_dir=cache, epochs=SHORT_EPOCHS)
    assert again.path == artifact.path and again.sha256 == artifact.sha256
    assert time.monotonic() - started < 1.0              # from the cache, not retrained
    assert demo_backbone_path(cache, SHORT_EPOCHS) == artifact.path
    assert demo_backbone_path(cache, SHORT_EPOCHS + 1) != artifact.path   # the recipe is the cache key

    backbone = build_backbone(artifact.model, artifact.model_kwargs, artifact.path)
    spec = parse_partition({**load_partition("tiny").model_dump(mode="json"), "train_per_client": 100})
    upright = client_arrays(spec, "upright-00")
    permuted = client_arrays(spec, "permuted-00")
    reference = copy.deepcopy(backbone)
    with torch.no_grad():
        upright_acc = float((reference(torch.from_numpy(upright.x_test)).argmax(1).numpy() == upright.y_test).mean())
    assert upright_acc >= 0.6                            # pretrained on upright digits
    model = TieredLoRAModel(backbone, manifest_for_model(backbone, rank=4))
    model.init_tier("root", seed=0)
    before = evaluate_tiers(model, permuted, ("root",), "cpu")["acc_root"]
    train_tier(model, "root", permuted, epochs=15, lr=3e-3, head_lr=1e-2, batch_size=32, weight_decay=0.0,
               gamma_c=0.1, gamma_l=0.1, seed=0)
    after = evaluate_tiers(model, permuted, ("root",), "cpu")["acc_root"]
    assert before < 0.3 and after > before + 0.3


def test_steps_replace_epochs_and_cycle_the_data():
    by_epochs, by_steps, cut = small_model(), small_model(), small_model()
    assert _train(by_epochs, epochs=2)["steps"] == 6                 # 48 samples, batch 16: 3 per pass
    assert _train(by_steps, epochs=1, steps=6)["steps"] == 6         # the same two shuffled passes
    for name, value in by_epochs.export_tier("root").items():
        np.testing.assert_array_equal(value, by_steps.export_tier("root")[name])
    assert _train(cut, epochs=9, steps=5)["steps"] == 5              # steps win over epochs, a pass cut short
    assert _train(small_model(), data=small_data(8), epochs=1, steps=7)["steps"] == 7   # 7 passes of one batch
    with pytest.raises(ValueError, match="steps must be >= 1"):
        _train(small_model(), steps=0)


def test_class_weights_give_every_present_class_the_same_total():
    from worker.train import _class_weights

    y = torch.tensor([0, 0, 0, 0, 0, 0, 3, 3, 7, 7, 7, 7])
    w = _class_weights(y, 10)
    assert w.shape == (10,) and w[1] == 0 and w[5] == 0
    totals = [float(w[c] * (y == c).sum()) for c in (0, 3, 7)]
    np.testing.assert_allclose(totals, [4.0, 4.0, 4.0])              # n / k = 12 / 3 each
    assert float((w[y]).sum()) == pytest.approx(12.0)


def test_balanced_loss_matches_a_per_sample_reference_and_is_plain_on_balanced_data():
    from torch.nn import functional as F

    from worker.train import _class_weights

    torch.manual_seed(0)
    logits = torch.randn(12, 10, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 0, 0, 3, 3, 7, 7, 7, 7])
    w = _class_weights(y, 10).to(torch.float64)
    per_sample = [-torch.log_softmax(logits[i], 0)[y[i]] * w[y[i]] for i in range(12)]
    reference = sum(per_sample) / sum(w[y[i]] for i in range(12))
    torch.testing.assert_close(F.cross_entropy(logits, y, weight=w), reference)
    balanced = ClientData(**{**small_data().__dict__, "y_train": np.repeat(np.arange(8), 6).astype(np.int64)})
    plain, weighted = small_model(), small_model()
    _train(plain, data=balanced)
    _train(weighted, data=balanced, class_balanced=True)
    for name, value in plain.export_tier("root").items():            # all weights 1: the same training
        np.testing.assert_allclose(value, weighted.export_tier("root")[name], rtol=1e-4, atol=1e-6)


def test_balanced_loss_changes_training_on_skewed_data():
    skewed = ClientData(**{**small_data().__dict__, "y_train": np.array([0] * 40 + [1] * 8, dtype=np.int64)})
    plain, weighted = small_model(), small_model()
    _train(plain, data=skewed)
    _train(weighted, data=skewed, class_balanced=True)
    bias_plain, bias_weighted = plain.export_tier("root")["head.bias"], weighted.export_tier("root")["head.bias"]
    # the majority class's logit gains less over the minority's when each class weighs the same
    assert bias_weighted[0] - bias_weighted[1] < bias_plain[0] - bias_plain[1]


def test_split_validation_holds_out_a_seeded_share_and_keeps_the_rest():
    from worker.train import split_validation

    data = small_data(20)
    split = split_validation(data, 0.2, seed=3)
    assert split.x.shape[0] == 4 and split.fit.x_train.shape[0] == 16
    held = sorted(set(range(20)) - set(split.fit.train_indices.tolist()))
    np.testing.assert_array_equal(split.y, data.y_train[held])
    np.testing.assert_array_equal(split.fit.x_test, data.x_test)          # the test set is untouched
    again = split_validation(data, 0.2, seed=3)
    np.testing.assert_array_equal(again.fit.train_indices, split.fit.train_indices)
    assert not np.array_equal(split_validation(data, 0.2, seed=4).fit.train_indices, split.fit.train_indices)
    assert split_validation(data, 0.0, seed=3) is None
    assert split_validation(small_data(1), 0.5, seed=3) is None            # nothing to hold out
    tiny = split_validation(small_data(3), 0.01, seed=0)                   # at least one held out, one kept
    assert tiny.x.shape[0] == 1 and tiny.fit.x_train.shape[0] == 2
    two = split_validation(small_data(2), 0.5, seed=0)
    assert two.x.shape[0] == 1 and two.fit.x_train.shape[0] == 1


def test_select_tier_takes_the_best_and_breaks_ties_toward_the_smaller_model():
    from worker.train import select_tier

    assert select_tier({"root": 0.5, "cluster": 0.75, "leaf": 0.5}) == "cluster"
    assert select_tier({"root": 0.5, "cluster": 0.75, "leaf": 0.75}) == "cluster"
    assert select_tier({"root": 0.8, "cluster": 0.8}) == "root"
    assert select_tier({"root": 0.1, "cluster": 0.2, "leaf": 0.3}) == "leaf"
    # the model trained alone (training.alone_epochs) is a candidate; ties go to the federation's
    assert select_tier({"root": 0.1, "cluster": 0.2, "leaf": 0.3, "alone": 0.4}) == "alone"
    assert select_tier({"root": 0.1, "cluster": 0.2, "leaf": 0.4, "alone": 0.4}) == "leaf"
    assert select_tier({"root": 0.5, "alone": 0.5}) == "root"
    with pytest.raises(ValueError, match="no validation accuracy"):
        select_tier({})


def test_add_alone_candidate_joins_the_choice():
    from worker.train import CANDIDATES, add_alone_candidate, evaluate_with_selection, split_validation

    model, data = small_model(), small_data(40)
    split = split_validation(data, 0.25, seed=0)
    metrics = evaluate_with_selection(model, split.fit, ("root", "cluster", "leaf"), split)
    federation_best = max(metrics[f"val_{t}"] for t in ("root", "cluster", "leaf"))
    # a different root-shaped model stands in for the one trained alone
    torch.manual_seed(5)
    model.init_tier("root", seed=11, head_from=None)
    with torch.no_grad():
        model.heads["root"].weight.add_(torch.randn_like(model.heads["root"].weight))
    out = add_alone_candidate(dict(metrics), model, split.fit, split)
    assert out["acc_alone"] == evaluate(model, split.fit.x_test, split.fit.y_test, ("root",))
    assert out["val_alone"] == evaluate(model, split.x, split.y, ("root",))
    chosen = CANDIDATES[int(out["selected"])]
    assert out["acc_selected"] == out[f"acc_{chosen}"]
    assert (chosen == "alone") == (out["val_alone"] > federation_best)
    assert {k: out[k] for k in metrics if k not in ("selected", "acc_selected")} == {
        k: metrics[k] for k in metrics if k not in ("selected", "acc_selected")}


def test_evaluate_with_selection_reports_the_chosen_models_test_accuracy():
    from worker.train import evaluate_with_selection, split_validation

    model, data = small_model(), small_data(40)
    split = split_validation(data, 0.25, seed=0)
    plain = evaluate_with_selection(model, split.fit, ("root", "cluster", "leaf"), None)
    assert set(plain) == {"acc_root", "acc_cluster", "acc_leaf"}
    metrics = evaluate_with_selection(model, split.fit, ("root", "cluster", "leaf"), split)
    validation = {t: evaluate(model, split.x, split.y, ("root", "cluster", "leaf")[: i + 1])
                  for i, t in enumerate(("root", "cluster", "leaf"))}
    assert {t: metrics[f"val_{t}"] for t in validation} == validation
    chosen = ("root", "cluster", "leaf")[int(metrics["selected"])]
    assert validation[chosen] == max(validation.values())
    assert metrics["acc_selected"] == metrics[f"acc_{chosen}"]


# --------------------------------------------------------------------------- precision (issue 17)

def test_precision_is_resolved_by_device():
    from worker.train import resolve_precision

    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown training.precision 'fp8'"):
        resolve_precision("fp8", "cpu")


def test_bf16_autocast_on_cpu_trains_float32_factors_close_to_fp32():
    """bf16 autocast (forward passes and the loss): the factors, their gradients and the optimizer
    stay float32, and the trained model computes what the fp32 one does up to bf16 round-off.
    Compared on the function, not the factors: from B = 0 and near-zero gradients Adam's
    normalised steps magnify round-off in single entries (up to 12 % of a factor's norm measured)
    while the logits agree. Measured over 6 seeds: logits within 0.08-0.73 % (bf16's unit
    round-off is 0.39 %), training loss within 2e-4 relative; bounds at about 4x that."""
    for seed in (0, 4):
        data = small_data(seed=seed)
        fp32, bf16 = small_model(seed), small_model(seed)
        out32 = _train(fp32, data=data)
        out16 = _train(bf16, data=data, precision="bf16")
        assert out16["steps"] == out32["steps"] == 6
        assert all(v.dtype == np.float32 and np.all(np.isfinite(v)) for v in bf16.export_tier("root").values())
        assert all(p.dtype == torch.float32 for p in bf16.parameters())
        assert abs(out16["train_loss"] - out32["train_loss"]) < 1e-3 * out32["train_loss"]
        x = torch.from_numpy(data.x_train)
        with torch.no_grad():
            fp32.set_active_tiers(("root",))
            bf16.set_active_tiers(("root",))
            a, b = fp32(x), bf16(x)
        rel = float((a - b).norm() / a.norm())
        assert 0 < rel < 0.03, rel   # > 0: autocast was on, not bit for bit fp32


def test_fp32_training_is_unchanged_by_the_precision_option():
    m1, m2 = small_model(), small_model()
    _train(m1)
    _train(m2, precision="fp32")
    for name, value in m1.export_tier("root").items():
        np.testing.assert_array_equal(value, m2.export_tier("root")[name])


# --------------------------------------------------------------------------- checkpoints (issue 17)

@pytest.mark.parametrize(("tier", "stop_after", "every"), [("root", 4, 0), ("root", 7, 3), ("leaf", 6, 0),
                                                          ("root", 1, 0)])
def test_a_stopped_run_resumes_from_its_checkpoint_to_the_same_bytes(tmp_path, tier, stop_after, every):
    """Stopped between batches (a pre-emption), then run again with the same checkpoint key: the
    factors, the loss and the step count are those of a run never interrupted, bit for bit. With
    ``every`` the run also saves as it goes (3 epochs x 3 batches = 9 steps)."""
    from worker.train import Checkpointing, TrainingStopped

    data = small_data()
    reference = small_model()
    expected = _train(reference, tier=tier, epochs=3)
    ck = Checkpointing(path=tmp_path / "ck.safetensors", key="task-1", every=every)
    model = small_model()
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > stop_after

    with pytest.raises(TrainingStopped, match=f"stopped after {stop_after} steps"):
        _train(model, tier=tier, epochs=3, should_stop=stop, checkpoint=ck)
    assert ck.path.is_file()
    resumed_model = small_model()   # a fresh process: everything comes from the checkpoint
    out = _train(resumed_model, tier=tier, epochs=3, checkpoint=ck)
    assert out.pop("resumed_at_step") == stop_after   # the stop saved the steps done by then
    assert out == expected and out["steps"] == 9
    for name, value in reference.export_tier(tier).items():
        np.testing.assert_array_equal(resumed_model.export_tier(tier)[name], value)


def test_a_checkpoint_of_another_task_is_ignored(tmp_path):
    from worker.train import Checkpointing, TrainingStopped

    ck = Checkpointing(path=tmp_path / "ck.safetensors", key="task-1")
    with pytest.raises(TrainingStopped):
        _train(small_model(), epochs=3, should_stop=lambda: True, checkpoint=ck)
    reference, other = small_model(), small_model()
    expected = _train(reference, epochs=3)
    assert _train(other, epochs=3, checkpoint=Checkpointing(path=ck.path, key="task-2")) == expected
    ck.path.write_bytes(b"torn")   # a torn file: started afresh
    assert _train(small_model(), epochs=3, checkpoint=ck) == expected


# --------------------------------------------------------------------------- streamed images (issue 17)

def _grey_folder(tmp_path, n_per_class: int = 6):
    from PIL import Image

    rng = np.random.default_rng(5)
    root = tmp_path / "org"
    for split, count in (("train", n_per_class), ("test", 2)):
        for label in range(3):
            for i in range(count):
                path = root / split / f"c{label}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(path)
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_images_train_and_evaluate_like_the_same_images_in_memory(tmp_path, workers):
    """Images decoded batch by batch (in ``workers`` processes) give the bytes, the loss, the
    predictions and the refine losses that the same images held in memory give."""
    from worker.data import FolderClientSpec, client_arrays
    from worker.stream import LazyImages
    from worker.train import mean_loss, split_validation

    spec = FolderClientSpec(folder=str(_grey_folder(tmp_path)), channels=1)
    eager = client_arrays(spec, "org")
    lazy = client_arrays(spec, "org", lazy=True, workers=workers)
    assert isinstance(lazy.x_train, LazyImages) and lazy.x_train.shape == eager.x_train.shape == (18, 1, 16, 16)
    np.testing.assert_array_equal(np.asarray(lazy.x_train), eager.x_train)
    results = []
    for data in (eager, lazy):
        split = split_validation(data, 0.2, seed=3)
        model = small_model()
        out = _train(model, data=split.fit, epochs=3, batch_size=4)
        acc = evaluate(model, data.x_test, data.y_test, ("root",))
        loss = mean_loss(model, split.x, split.y, ("root",), batch_size=5)
        results.append((out, acc, loss, model.export_tier("root")))
    (out_e, acc_e, loss_e, tier_e), (out_l, acc_l, loss_l, tier_l) = results
    assert out_e == out_l and acc_e == acc_l and loss_e == loss_l
    for name, value in tier_e.items():
        np.testing.assert_array_equal(tier_l[name], value)


def test_a_streamed_run_resumes_from_its_checkpoint_too(tmp_path):
    from worker.data import FolderClientSpec, client_arrays
    from worker.train import Checkpointing, TrainingStopped

    spec = FolderClientSpec(folder=str(_grey_folder(tmp_path)), channels=1)
    lazy = client_arrays(spec, "org", lazy=True)
    reference = small_model()
    expected = _train(reference, data=client_arrays(spec, "org"), epochs=3, batch_size=4)
    ck = Checkpointing(path=tmp_path / "ck.safetensors", key="k")
    calls = iter(range(100))
    with pytest.raises(TrainingStopped):
        _train(small_model(), data=lazy, epochs=3, batch_size=4, checkpoint=ck, should_stop=lambda: next(calls) >= 7)
    resumed = small_model()
    out = _train(resumed, data=lazy, epochs=3, batch_size=4, checkpoint=ck)
    assert out.pop("resumed_at_step") == 7 and out == expected
    for name, value in reference.export_tier("root").items():
        np.testing.assert_array_equal(resumed.export_tier("root")[name], value)


# --------------------------------------------------------------------------- train-time augmentation

@pytest.mark.parametrize("mode", ["flip", "crop_flip"])
def test_augmentation_is_seeded_keeps_the_shape_and_changes_the_batch(mode):
    from worker.train import augment_batch

    x = torch.from_numpy(np.random.default_rng(0).random((16, 1, 16, 16)).astype(np.float32))
    a, b = augment_batch(x, mode, seed=7), augment_batch(x, mode, seed=7)
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b)      # the same seed: the same batch
    assert not torch.equal(a, augment_batch(x, mode, seed=8)) and not torch.equal(a, x)
    assert float(a.min()) >= float(x.min()) - 1e-6 and float(a.max()) <= float(x.max()) + 1e-6
    if mode == "flip":   # each image either itself or its mirror, about half of each
        mirrored = [torch.equal(a[i], x[i].flip(-1)) for i in range(16)]
        assert all(m or torch.equal(a[i], x[i]) for i, m in enumerate(mirrored)) and 2 <= sum(mirrored) <= 14
    assert augment_batch(x, "none", seed=7) is x
    with pytest.raises(ValueError, match="unknown training.augment"):
        augment_batch(x, "rotate", seed=1)


def test_an_augmented_run_resumes_to_the_same_bytes(tmp_path):
    from worker.train import Checkpointing, TrainingStopped

    reference = small_model()
    expected = _train(reference, epochs=3, augment="crop_flip")
    assert expected != _train(small_model(), epochs=3)   # augmentation changed the training
    ck = Checkpointing(path=tmp_path / "ck.safetensors", key="k")
    calls = iter(range(100))
    with pytest.raises(TrainingStopped):
        _train(small_model(), epochs=3, augment="crop_flip", checkpoint=ck, should_stop=lambda: next(calls) >= 5)
    resumed = small_model()
    out = _train(resumed, epochs=3, augment="crop_flip", checkpoint=ck)
    assert out.pop("resumed_at_step") == 5 and out == expected
    for name, value in reference.export_tier("root").items():
        np.testing.assert_array_equal(resumed.export_tier("root")[name], value)


def test_a_model_already_on_its_device_is_not_moved_and_one_elsewhere_is():
    from worker.train import _to_device

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    moves: list[object] = []
    original = model.to
    model.to = lambda *a, **k: moves.append(a) or original(*a, **k)  # type: ignore[method-assign]
    _to_device(model, "cpu")
    _to_device(model, torch.device("cpu"))
    assert moves == []
    _to_device(model, "meta")            # a device the parameters are not on: moved
    assert moves == [("meta",)]
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("tiers", [("root", "cluster", "leaf"), ("root", "leaf")])
def test_leaf_as_served_swaps_the_leaf_in_and_always_back(tiers):
    """training.leaf_mix: inside the block the model's leaf is shared.merge.served_leaf of the
    trained one against the head of the tier below it (cluster, or root without one); on exit,
    an exception included, the trained leaf is back; mix 1 or no leaf in ``tiers`` change nothing."""
    from shared.merge import served_leaf
    from worker.train import leaf_as_served

    model = small_model()
    rng = np.random.default_rng(4)
    for tier in TIERS:
        model.load_tier(tier, {name: rng.normal(size=shape).astype(np.float32)
                               for name, shape in model.manifest.tier_shapes(tier).items()})
    trained = model.export_tier("leaf")
    expected = served_leaf(trained, model.export_tier(tiers[-2], ("head",)), 0.3)

    def leaf_is(reference):
        return all(np.array_equal(model.export_tier("leaf")[k], v) for k, v in reference.items())

    with leaf_as_served(model, tiers, 0.3):
        assert leaf_is(expected) and not leaf_is(trained)
    assert leaf_is(trained)
    with pytest.raises(RuntimeError, match="inside"):
        with leaf_as_served(model, tiers, 0.3):
            raise RuntimeError("inside")
    assert leaf_is(trained)
    for mix, active in ((1.0, tiers), (0.3, tiers[:-1])):
        with leaf_as_served(model, active, mix):
            assert leaf_is(trained)
