"""Backbones: building a timm ViT from a safetensors checkpoint, the tiny demo backbone, and the
adapter manifest a model implies.

The demo backbone is a small timm ``VisionTransformer`` (16 x 16 grey images, patch 4, dim 64,
depth 4) pretrained on the upright ``pretrain`` pool of the digits (``worker.data``). It is cached
by a hash of its recipe, so every process on a machine uses the same file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from shared.manifest import TIERS, AdapterManifest, HeadSpec, TierSpec, qv_targets
from worker.files import atomic_write

DEMO_BACKBONE_MODEL = "vit_tiny_patch16_224"
DEMO_BACKBONE_KWARGS: dict[str, Any] = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=64,
                                            depth=4, num_heads=4, mlp_ratio=2)
# Bump when the pretraining code changes in a way the recipe does not capture: it is part of the
# cache key, so old cached files are simply not used any more.
DEMO_RECIPE_VERSION = 1


@dataclass(frozen=True)
class BackboneArtifact:
    """A backbone checkpoint on disk: its path, the sha256 of its bytes, and how to build it."""

    path: Path
    sha256: str
    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def create_model(model: str, model_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """A randomly initialised timm model (never downloads: ``pretrained=False``)."""
    try:
        return timm.create_model(model, pretrained=False, **dict(model_kwargs or {}))
    except RuntimeError as exc:  # timm's "Unknown model"
        raise ValueError(f"cannot build timm model {model!r}: {exc}") from exc


def _read_state_dict(checkpoint: str | os.PathLike | bytes) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    try:
        if isinstance(checkpoint, (bytes, bytearray, memoryview)):
            return load(bytes(checkpoint))
        path = Path(checkpoint)
        if not path.is_file():
            raise ValueError(f"backbone checkpoint {path} does not exist")
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"backbone checkpoint is not a readable safetensors file: {exc}") from exc


def load_state_dict_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Load ``state`` into ``module``: every name present, none extra, every shape equal.

    Raises:
        ValueError: listing missing names, unexpected names and shape mismatches.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{name}: checkpoint {tuple(state[name].shape)} vs model {tuple(expected[name].shape)}"
                  for name in sorted(set(expected) & set(state)) if tuple(state[name].shape) != tuple(expected[name].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:5]})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[:5]})")
        raise ValueError(f"{what} does not match the model: " + "; ".join(parts))
    module.load_state_dict(dict(state), strict=True)


def build_backbone(model: str, model_kwargs: Mapping[str, Any] | None,
                   checkpoint: str | os.PathLike | bytes | None) -> nn.Module:
    """The timm model ``model(**model_kwargs)`` with the checkpoint's weights, in eval mode.

    ``checkpoint`` is a safetensors file path, its bytes, or None (random initialisation). The
    state dict is loaded strictly: a missing, extra or differently shaped tensor is a ValueError.
    """
    backbone = create_model(model, model_kwargs)
    if checkpoint is not None:
        load_state_dict_strict(backbone, _read_state_dict(checkpoint), f"checkpoint for {model}")
    return backbone.eval()


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$HILORA_CACHE_DIR`` or ``~/.cache/hilora``."""
    env = os.environ.get("HILORA_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "hilora"


DEMO_BACKBONE_DATASETS = ("digits", "mnist5k")


def _check_backbone_dataset(dataset: str) -> None:
    if dataset not in DEMO_BACKBONE_DATASETS:
        raise ValueError(f"the demo backbone pretrains on {' or '.join(DEMO_BACKBONE_DATASETS)}, not {dataset!r}")


def demo_backbone_dataset(spec: Any) -> str:
    """Which offline pretraining pool the demo backbone learns from for a partition spec: the
    partition's own dataset (``mnist5k`` partitions get a backbone pretrained on MNIST-5k's
    ``pretrain`` pool, which no client's data overlaps), the digits otherwise."""
    dataset = getattr(spec, "dataset", "digits")
    return dataset if dataset in DEMO_BACKBONE_DATASETS else "digits"


def demo_recipe(epochs: int = 60, dataset: str = "digits") -> dict[str, Any]:
    """Everything that determines the demo backbone's weights (its hash is the cache key).

    ``dataset`` is the offline dataset whose upright ``pretrain`` pool it learns from: ``digits``
    (the demo's, 600 images) or ``mnist5k`` (1,000 images, for the MNIST-5k partitions). No image of
    either pool is in any client's training or test data (``worker.data``)."""
    _check_backbone_dataset(dataset)
    return {"version": DEMO_RECIPE_VERSION, "model": DEMO_BACKBONE_MODEL, "model_kwargs": DEMO_BACKBONE_KWARGS,
            "data": f"{dataset}/pretrain", "epochs": epochs, "batch_size": 32, "optimizer": "adamw", "lr": 3e-3,
            "weight_decay": 0.0, "schedule": "onecycle", "seed": 0}



def _train_demo_backbone(recipe: dict[str, Any], progress: Callable[[str], None] | None) -> nn.Module:
    from worker.data import pool_arrays, pretrain_arrays

    dataset = recipe["data"].split("/")[0]
    torch.manual_seed(recipe["seed"])
    model = create_model(recipe["model"], recipe["model_kwargs"])
    x, y = pretrain_arrays(dataset)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    batch, epochs = recipe["batch_size"], recipe["epochs"]
    steps_per_epoch = math.ceil(len(y) / batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe["lr"], epochs=epochs,
                                                    steps_per_epoch=steps_per_epoch)
    generator = torch.Generator().manual_seed(recipe["seed"])
    model.train()
    started = time.monotonic()
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for start in range(0, len(y), batch):
            index = order[start:start + batch]
            loss = nn.functional.cross_entropy(model(x_t[index]), y_t[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(index)
        if progress is not None and (epoch + 1) % 10 == 0:
            progress(f"epoch {epoch + 1}/{epochs} loss {total / len(y):.4f} ({time.monotonic() - started:.1f}s)")
    model.eval()
    if progress is not None:
        x_test, y_test = pool_arrays("test", dataset)
        with torch.no_grad():
            accuracy = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
        progress(f"upright held-out accuracy {accuracy:.3f}")
    return model


def demo_backbone_path(cache_dir: str | os.PathLike | None = None, epochs: int = 60, dataset: str = "digits") -> Path:
    """Where the demo backbone of this recipe is cached:
    ``{cache_dir}/backbones/<sha256 of the recipe JSON>[:16].safetensors``."""
    key = hashlib.sha256(json.dumps(demo_recipe(epochs, dataset), sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / "backbones" / f"{key}.safetensors"


def pretrain_demo_backbone(cache_dir: str | os.PathLike | None = None, force: bool = False, epochs: int = 60,
                           progress: Callable[[str], None] | None = None,
                           dataset: str = "digits") -> BackboneArtifact:
    """The demo backbone, pretrained on the upright ``pretrain`` pool of ``dataset`` (``digits``,
    the default, or ``mnist5k``) once and cached.

    The file is ``{cache_dir}/backbones/<sha256 of the recipe JSON>[:16].safetensors`` with
    ``cache_dir`` defaulting to ``$HILORA_CACHE_DIR`` or ``~/.cache/hilora``. A cached file is
    returned as is (no retraining) unless ``force``; otherwise the model trains (seeded, about 30 s
    on 2 cores for 60 epochs) and the file is written atomically (temp file, then rename).
    ``progress`` receives a line of text now and then.
    """
    from safetensors.torch import save

    recipe = demo_recipe(epochs, dataset)
    path = demo_backbone_path(cache_dir, epochs, dataset)
    if path.is_file() and not force:
        if progress is not None:
            progress(f"using cached {path}")
    else:
        if progress is not None:
            progress(f"pretraining {DEMO_BACKBONE_MODEL} on upright {dataset} for {epochs} epochs")
        model = _train_demo_backbone(recipe, progress)
        state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
        atomic_write(path, save(state, metadata={"recipe": json.dumps(recipe, sort_keys=True)}))
    return BackboneArtifact(path=path, sha256=checkpoint_sha256(path), model=recipe["model"],
                            model_kwargs=dict(recipe["model_kwargs"]))


def manifest_for_model(model: nn.Module, rank: int = 8, alpha: float | None = None,
                       ranks: Mapping[str, int] | None = None) -> AdapterManifest:
    """The adapter manifest for a timm ViT: LoRA on the q and v slices of every ``blocks.N.attn.qkv``.

    Every tier gets ``rank`` unless ``ranks`` overrides it per tier; ``alpha`` defaults to each
    tier's rank (scaling 1). The head spec is the model's classifier head.

    Raises:
        ValueError: the model has no ``blocks``/``head`` of the expected kind or ``ranks`` names
            an unknown tier.
    """
    ranks = dict(ranks or {})
    unknown = sorted(set(ranks) - set(TIERS))
    if unknown:
        raise ValueError(f"ranks name unknown tiers {unknown}; tiers are {list(TIERS)}")
    blocks = getattr(model, "blocks", None)
    head = getattr(model, "head", None)
    if blocks is None or not isinstance(head, nn.Linear):
        raise ValueError("manifest_for_model needs a timm VisionTransformer (with .blocks and a Linear .head)")
    depth = len(blocks)
    dim = int(getattr(model, "embed_dim", blocks[0].attn.qkv.in_features))
    for i, block in enumerate(blocks):
        qkv = getattr(getattr(block, "attn", None), "qkv", None)
        if not isinstance(qkv, nn.Linear) or qkv.out_features != 3 * dim or qkv.in_features != dim:
            raise ValueError(f"blocks.{i}.attn.qkv is not a Linear({dim}, {3 * dim})")
    tiers = {}
    for tier in TIERS:
        tier_rank = int(ranks.get(tier, rank))
        tiers[tier] = TierSpec(rank=tier_rank, alpha=float(alpha) if alpha is not None else float(tier_rank))
    return AdapterManifest(targets=qv_targets(depth, dim), tiers=tiers,
                           head=HeadSpec(in_features=head.in_features, num_classes=head.out_features))

