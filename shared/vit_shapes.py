"""The adapter manifest of a timm ViT without torch (issue 19): ``hilora admin create`` on a
coordinator-only install.

``worker.backbone.manifest_for_model`` builds the model with timm and reads LoRA's targets off it
(the q and v slices of every ``blocks.N.attn.qkv``) and the head's shape. Two torch-free sources
give the same manifest (``tests/unit/test_vit_shapes.py`` checks each against timm):

- ``VIT_MODELS``: timm's ViT architectures by name, with every pretrained tag timm knows for them
  (``vit_base_patch16_224.augreg_in21k``) and the classifier head each tag's pretrained config
  gives, computed in pure Python with the ``model_kwargs`` that change the shapes (``embed_dim``,
  ``depth``, ``num_classes``; ``num_heads`` must divide ``embed_dim``) and those known to leave
  them alone (``img_size``, ``patch_size``, ``in_chans``, ``mlp_ratio``, dropouts, ...). The demo's
  tiny ViT is ``vit_tiny_patch16_224`` with such kwargs.
- a safetensors checkpoint's JSON header (``checkpoint_vit_shape``): the shapes of
  ``blocks.N.attn.qkv.weight`` and ``head.weight``, read without loading a tensor.

A model or kwarg neither knows is an ``UnknownVit`` (a ValueError) naming the model and the ways
out: an explicit ``"manifest"``, or the worker extra (torch and timm).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.manifest import AdapterManifest, HeadSpec, qv_targets, tier_specs

# timm's ViT architectures: (embed_dim, depth, num_heads) as timm's model functions set them.
VIT_ARCHITECTURES: dict[str, tuple[int, int, int]] = {
    "vit_tiny_patch16_224": (192, 12, 3),
    "vit_small_patch16_224": (384, 12, 6),
    "vit_base_patch16_224": (768, 12, 12),
    "vit_large_patch16_224": (1024, 24, 16),
    "vit_tiny_patch16_384": (192, 12, 3),
    "vit_small_patch16_384": (384, 12, 6),
    "vit_base_patch16_384": (768, 12, 12),
    "vit_large_patch16_384": (1024, 24, 16),
}
IN1K, IN21K = 1000, 21843
# Each architecture's pretrained tags (timm 1.0) and the num_classes of each tag's pretrained config,
# which timm gives the model unless model_kwargs say otherwise (0: the head is removed). The
# untagged name is timm's default tag, an ImageNet-1k classifier for every architecture here.
VIT_TAGS: dict[str, dict[str, int]] = {
    "vit_tiny_patch16_224": {"augreg_in21k": IN21K, "augreg_in21k_ft_in1k": IN1K},
    "vit_small_patch16_224": {"augreg_in1k": IN1K, "augreg_in21k": IN21K, "augreg_in21k_ft_in1k": IN1K, "dino": 0},
    "vit_base_patch16_224": {"augreg2_in21k_ft_in1k": IN1K, "augreg_in1k": IN1K, "augreg_in21k": IN21K,
                             "augreg_in21k_ft_in1k": IN1K, "bamboo": 115217, "dino": 0, "mae": 0, "orig_in21k": 0,
                             "orig_in21k_ft_in1k": IN1K, "sam_in1k": IN1K},
    "vit_large_patch16_224": {"augreg_in21k": IN21K, "augreg_in21k_ft_in1k": IN1K, "mae": 0, "orig_in21k": 0},
    "vit_tiny_patch16_384": {"augreg_in21k_ft_in1k": IN1K},
    "vit_small_patch16_384": {"augreg_in1k": IN1K, "augreg_in21k_ft_in1k": IN1K},
    "vit_base_patch16_384": {"augreg_in1k": IN1K, "augreg_in21k_ft_in1k": IN1K, "orig_in21k_ft_in1k": IN1K},
    "vit_large_patch16_384": {"augreg_in21k_ft_in1k": IN1K},
}
# Every name the table knows -> (architecture, default num_classes).
VIT_MODELS: dict[str, tuple[str, int]] = {
    **{arch: (arch, IN1K) for arch in VIT_ARCHITECTURES},
    **{f"{arch}.{tag}": (arch, classes) for arch, tags in VIT_TAGS.items() for tag, classes in tags.items()},
}
# VisionTransformer arguments that change the manifest (read here) ...
SHAPE_KWARGS = frozenset({"embed_dim", "depth", "num_classes", "num_heads"})
# ... and those that leave the q/v targets and the head alone. Any other is not guessed at.
NEUTRAL_KWARGS = frozenset({
    "img_size", "patch_size", "in_chans", "global_pool", "mlp_ratio", "qkv_bias", "qk_norm", "scale_attn_norm",
    "scale_mlp_norm", "proj_bias", "init_values", "class_token", "pos_embed", "no_embed_class", "reg_tokens",
    "pre_norm", "final_norm", "fc_norm", "pool_include_prefix", "dynamic_img_size", "dynamic_img_pad", "drop_rate",
    "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "weight_init",
    "fix_init",
})
WAY_OUT = ('give an explicit "manifest" in the federation file (docs/usage.md), or install torch and timm '
           '(pip install "hilora[worker]") to build the model')
_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.weight")


class UnknownVit(ValueError):
    """The torch-free table cannot say what this model (or one of its kwargs) looks like."""


@dataclass(frozen=True)
class VitShape:
    """What the manifest needs of a ViT: blocks, width and the classifier head (0 classes: none)."""

    depth: int
    embed_dim: int
    num_classes: int
    head_in_features: int

    @classmethod
    def of_manifest(cls, manifest: AdapterManifest) -> "VitShape":
        """The shape of a q/v manifest (``qv_targets``: two targets per block)."""
        return cls(depth=len(manifest.targets) // 2, embed_dim=manifest.targets[0].in_features,
                   num_classes=manifest.head.num_classes, head_in_features=manifest.head.in_features)

    def describe(self) -> str:
        head = f"a {self.head_in_features} -> {self.num_classes} head" if self.num_classes > 0 else "no head"
        return f"{self.depth} blocks of width {self.embed_dim}, {head}"


def _int_kwarg(model_kwargs: Mapping[str, Any], name: str, default: int, minimum: int) -> int:
    value = model_kwargs.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"model_kwargs {name} must be an integer >= {minimum}, got {value!r}")
    return value


def table_vit_shape(model: str, model_kwargs: Mapping[str, Any] | None = None) -> VitShape:
    """The shape timm gives ``model(**model_kwargs)``, from ``VIT_MODELS``.

    Raises:
        UnknownVit: a model the table does not know, or a kwarg it cannot account for.
        ValueError: a kwarg of the wrong type, or ``num_heads`` that does not divide the width.
    """
    kwargs = dict(model_kwargs or {})
    if model not in VIT_MODELS:
        raise UnknownVit(f"the adapter manifest of model {model!r} cannot be computed without torch: the table of "
                         f"timm ViTs (shared/vit_shapes.py: {', '.join(VIT_ARCHITECTURES)} and their pretrained tags) "
                         f"does not know it and no safetensors checkpoint gives its shapes; {WAY_OUT}")
    unknown = sorted(set(kwargs) - SHAPE_KWARGS - NEUTRAL_KWARGS)
    if unknown:
        raise UnknownVit(f"the adapter manifest of model {model!r} cannot be computed without torch: model_kwargs "
                         f"{', '.join(unknown)} are not known to the table of timm ViTs (shared/vit_shapes.py); "
                         f"{WAY_OUT}")
    arch, default_classes = VIT_MODELS[model]
    dim, depth, heads = VIT_ARCHITECTURES[arch]
    dim = _int_kwarg(kwargs, "embed_dim", dim, 1)
    depth = _int_kwarg(kwargs, "depth", depth, 0)
    heads = _int_kwarg(kwargs, "num_heads", heads, 1)
    if dim % heads:
        raise ValueError(f"model {model!r}: embed_dim {dim} is not divisible by num_heads {heads}")
    value = kwargs.get("num_classes", default_classes)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"model_kwargs num_classes must be an integer, got {value!r}")
    return VitShape(depth=depth, embed_dim=dim, num_classes=max(value, 0), head_in_features=dim)


def read_checkpoint_header(checkpoint: str | os.PathLike | bytes | bytearray | memoryview) -> dict[str, Any]:
    """The JSON header of a safetensors checkpoint (a file path or its bytes), strictly checked
    (``shared.tensors``), without reading or copying the tensors.

    Raises:
        ValueError: not a safetensors file (too short, a header past the end, malformed JSON, entries
            that do not cover the data section: a truncated file), naming the file.
    """
    from shared.tensors import HEADER_LENGTH_BYTES

    in_memory = isinstance(checkpoint, (bytes, bytearray, memoryview))
    what = "the backbone checkpoint" if in_memory else f"backbone checkpoint {checkpoint}"
    try:
        if in_memory:
            view = memoryview(checkpoint)
            header = _parse_header(lambda n: bytes(view[HEADER_LENGTH_BYTES:HEADER_LENGTH_BYTES + n]),
                                   bytes(view[:HEADER_LENGTH_BYTES]), len(view))
        else:
            with open(checkpoint, "rb") as fh:
                header = _parse_header(fh.read, fh.read(HEADER_LENGTH_BYTES), os.fstat(fh.fileno()).st_size)
    except OSError as exc:
        raise ValueError(f"{what} cannot be read: {exc}") from exc
    except ValueError as exc:   # TensorValidationError is one
        raise ValueError(f"{what} is not a safetensors file: {exc}") from exc
    return header


def _parse_header(read_header: Callable[[int], bytes], prefix: bytes, total: int) -> dict[str, Any]:
    """``read_checkpoint_header`` on the first 8 bytes, a reader of the next n and the total size."""
    from shared.tensors import HEADER_LENGTH_BYTES, MAX_HEADER_BYTES, _check_header

    if len(prefix) < HEADER_LENGTH_BYTES:
        raise ValueError(f"{total} bytes, shorter than the 8-byte header length")
    length = int.from_bytes(prefix, "little")
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"header length {length} exceeds {MAX_HEADER_BYTES}")
    if HEADER_LENGTH_BYTES + length > total:
        raise ValueError(f"header length {length} points past the end of {total} bytes (a truncated file?)")
    return _check_header(read_header(length), total - HEADER_LENGTH_BYTES - length)


def header_vit_shape(header: Mapping[str, Any]) -> VitShape:
    """The shape of the timm ViT whose state dict ``header`` describes (``read_checkpoint_header``):
    ``blocks.N.attn.qkv.weight`` of shape (3 * width, width) for N = 0 .. depth - 1 and ``head.weight``.

    Raises:
        ValueError: no such blocks, a missing block, a qkv of another shape, or no ``head.weight``.
    """
    qkv: dict[int, list[int]] = {}
    for name, entry in header.items():
        match = _QKV.fullmatch(name)
        if match:
            qkv[int(match.group(1))] = list(entry["shape"])
    if not qkv:
        raise ValueError("the backbone checkpoint has no blocks.N.attn.qkv.weight: not a timm ViT state dict")
    depth = max(qkv) + 1
    missing = sorted(set(range(depth)) - set(qkv))
    if missing:
        raise ValueError(f"the backbone checkpoint lacks blocks.{missing[0]}.attn.qkv.weight of its {depth} blocks")
    dim = qkv[0][-1] if qkv[0] else 0
    for i in range(depth):
        if dim <= 0 or qkv[i] != [3 * dim, dim]:
            raise ValueError(f"the backbone checkpoint's blocks.{i}.attn.qkv.weight is {qkv[i]}, expected "
                             f"[3 * width, width] = {[3 * dim, dim]} (a fused qkv Linear of a timm ViT)")
    head = header.get("head.weight")
    if head is None:
        raise ValueError("the backbone checkpoint has no head.weight: a ViT without a classifier head; give "
                         "model_kwargs num_classes and a checkpoint with that head")
    shape = list(head["shape"])
    if len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"the backbone checkpoint's head.weight is {shape}, expected [classes, features]")
    return VitShape(depth=depth, embed_dim=dim, num_classes=shape[0], head_in_features=shape[1])


def checkpoint_vit_shape(checkpoint: str | os.PathLike | bytes | bytearray | memoryview) -> VitShape:
    """``header_vit_shape`` of a safetensors file (path) or body (bytes)."""
    return header_vit_shape(read_checkpoint_header(checkpoint))


def manifest_from_shape(shape: VitShape, rank: int = 8, alpha: float | None = None,
                        ranks: Mapping[str, int] | None = None, model: str = "the model") -> AdapterManifest:
    """The manifest ``worker.backbone.manifest_for_model`` gives a model of this shape.

    Raises:
        ValueError: no classifier head, or ``ranks`` names an unknown tier.
    """
    tiers = tier_specs(rank, alpha, ranks)
    if shape.num_classes <= 0:
        raise ValueError(f"{model} has no classifier head (num_classes 0): give model_kwargs "
                         f"{{\"num_classes\": N}}, N the number of classes of the federation")
    return AdapterManifest(targets=qv_targets(shape.depth, shape.embed_dim), tiers=tiers,
                           head=HeadSpec(in_features=shape.head_in_features, num_classes=shape.num_classes))


def vit_manifest(model: str, model_kwargs: Mapping[str, Any] | None = None, rank: int = 8,
                 alpha: float | None = None, ranks: Mapping[str, int] | None = None,
                 checkpoint: str | os.PathLike | bytes | None = None) -> AdapterManifest:
    """The adapter manifest of ``model(**model_kwargs)`` without torch: from the table where it
    knows the model (checked against the checkpoint's header when one is given), else from the
    checkpoint's header (a file path, of which only the header is read, or the file's bytes).

    Raises:
        UnknownVit: neither the table nor a checkpoint says (with the ways out).
        ValueError: a malformed checkpoint, or one that does not fit the model.
    """
    header = read_checkpoint_header(checkpoint) if checkpoint is not None else None
    try:
        shape = table_vit_shape(model, model_kwargs)
    except UnknownVit:
        if header is None:
            raise
        try:
            shape = header_vit_shape(header)
        except ValueError as reason:
            raise UnknownVit(f"the adapter manifest of model {model!r} cannot be computed without torch: the table "
                             f"of timm ViTs (shared/vit_shapes.py) does not know it and {reason}; {WAY_OUT}") from None
    else:
        if header is not None and shape.num_classes > 0:   # (a model without a head is refused below)
            check_checkpoint_fits(header, shape, model, model_kwargs)
    return manifest_from_shape(shape, rank=rank, alpha=alpha, ranks=ranks, model=repr(model))


def check_checkpoint_fits(header: Mapping[str, Any], shape: VitShape, model: str,
                          model_kwargs: Mapping[str, Any] | None) -> None:
    """Raise a ValueError unless the checkpoint's header describes a ViT of ``shape`` (workers load
    the checkpoint strictly: one that does not fit would fail on every one of them)."""
    what = f"the backbone checkpoint does not fit model {model!r} with model_kwargs {dict(model_kwargs or {})}"
    try:
        found = header_vit_shape(header)
    except ValueError as reason:
        raise ValueError(f"{what}: {reason}") from None
    if found != shape:
        raise ValueError(f"{what}: the checkpoint has {found.describe()}, the model {shape.describe()}")


def known_models() -> list[str]:
    """Every model name the table knows, sorted."""
    return sorted(VIT_MODELS)


__all__ = ["VIT_ARCHITECTURES", "VIT_MODELS", "VIT_TAGS", "UnknownVit", "VitShape", "checkpoint_vit_shape",
           "header_vit_shape", "known_models", "manifest_from_shape", "read_checkpoint_header", "table_vit_shape",
           "vit_manifest"]
