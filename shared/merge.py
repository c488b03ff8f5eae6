"""Merging LoRA tiers into a backbone's weights: the model that leaves the system (pure numpy).

``merge_lora`` folds the tiers into the frozen weights exactly as ``worker.lora.TieredLoRAModel``
applies them at prediction time::

    W[out_offset : out_offset + out_features] += sum over given tiers t of scaling_t * B_t @ A_t

(float64 accumulation, cast back to the weight's dtype) and takes the classifier head of the
highest given tier that carries one (root < cluster < leaf), which is the head the tiered model
predicts with. The result is an ordinary state dict of the backbone: a plain timm model loads it
strictly and predicts like the tiered model with those tiers active.

A merged model file is safetensors with ``__metadata__`` (``model_metadata``) saying how to build
the model and what went into it; ``pack_model``/``read_model_metadata`` write and read it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import safetensors.numpy

from shared.manifest import TIERS, AdapterManifest

HEAD_NAMES = ("head.weight", "head.bias")
MODEL_FORMAT = "hilora-merged-model/1"

TierTensors = Mapping[str, np.ndarray]


def _named_tiers(tiers: Sequence[TierTensors | None] | Mapping[str, TierTensors | None]
                 ) -> list[tuple[str, TierTensors]]:
    """(tier name, tensors) in root, cluster, leaf order, skipping absent (None or empty) tiers."""
    if isinstance(tiers, Mapping):
        unknown = sorted(set(tiers) - set(TIERS))
        if unknown:
            raise ValueError(f"unknown tiers {unknown}; tiers are {list(TIERS)}")
        pairs = [(t, tiers.get(t)) for t in TIERS]
    else:
        tiers = list(tiers)
        if len(tiers) > len(TIERS):
            raise ValueError(f"at most {len(TIERS)} tiers (root, cluster, leaf) can be merged, got {len(tiers)}")
        pairs = list(zip(TIERS, tiers))
    return [(name, tensors) for name, tensors in pairs if tensors]


def _check_tier(name: str, tensors: TierTensors, manifest: AdapterManifest) -> bool:
    """Validate one tier's tensors against the manifest. Returns whether it carries a head."""
    lora = manifest.tier_shapes(name, ("A", "B"))
    unknown = sorted(set(tensors) - set(lora) - set(HEAD_NAMES))
    if unknown:
        raise ValueError(f"tier {name!r}: unknown tensors {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''} (expected names like {sorted(lora)[:2]})")
    missing = sorted(set(lora) - set(tensors))
    if missing:
        raise ValueError(f"tier {name!r}: missing LoRA factors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for key, shape in lora.items():
        got = tuple(np.shape(tensors[key]))
        if got != tuple(shape):
            raise ValueError(f"tier {name!r}: {key} has shape {got}, the manifest expects {tuple(shape)}")
    heads = [k for k in HEAD_NAMES if k in tensors]
    if len(heads) == 1:
        raise ValueError(f"tier {name!r}: has {heads[0]} without "
                         f"{next(k for k in HEAD_NAMES if k not in tensors)}")
    return len(heads) == 2


def merge_lora(backbone: Mapping[str, np.ndarray], manifest: AdapterManifest,
               tiers: Sequence[TierTensors | None] | Mapping[str, TierTensors | None]) -> dict[str, np.ndarray]:
    """The backbone's state dict with the given LoRA tiers folded in.

    Args:
        backbone: the backbone's state dict (name -> array), e.g. its safetensors checkpoint.
        manifest: the federation's adapter manifest (targets, per-tier ranks and alpha).
        tiers: the tiers' wire tensors (``{target}.lora_A``, ``{target}.lora_B``, optionally
            ``head.weight``/``head.bias``), either positionally in root, cluster, leaf order (a
            shorter list stops early; None or ``{}`` skips a tier) or as a mapping tier -> tensors.

    Returns:
        A new dict with every backbone tensor (copies; the input is untouched). For each target,
        ``W[out_offset : out_offset + out_features] += scaling_t * B_t @ A_t`` for every given
        tier (accumulated in float64, cast back to W's dtype); ``head.weight``/``head.bias`` come
        from the last given tier that carries a head (the backbone's own when none does).

    Raises:
        ValueError: unknown tiers or tensor names, missing factors, shapes that differ from the
            manifest, a backbone without a target's weight or head, or whose weight/head shapes do
            not fit the manifest.
    """
    named = _named_tiers(tiers)
    with_head = [(name, tensors) for name, tensors in named if _check_tier(name, tensors, manifest)]

    merged = {name: np.array(value, copy=True) for name, value in backbone.items()}
    by_module: dict[str, list] = {}
    for target in manifest.targets:
        by_module.setdefault(target.module, []).append(target)
    for module, targets in by_module.items():
        key = f"{module}.weight"
        if key not in merged:
            raise ValueError(f"the backbone has no {key!r} for the adapter targets "
                             f"{[t.name for t in targets]}")
        weight = merged[key]
        if weight.ndim != 2:
            raise ValueError(f"backbone {key!r} has shape {weight.shape}, expected a 2-d Linear weight")
        acc = weight.astype(np.float64)
        for target in targets:
            end = target.out_offset + target.out_features
            if target.in_features != weight.shape[1] or end > weight.shape[0]:
                raise ValueError(f"target {target.name!r} (rows [{target.out_offset}, {end}) x "
                                 f"{target.in_features} inputs) does not fit backbone {key!r} of shape "
                                 f"{tuple(weight.shape)}")
            for tier, tensors in named:
                a = np.asarray(tensors[f"{target.name}.lora_A"], dtype=np.float64)
                b = np.asarray(tensors[f"{target.name}.lora_B"], dtype=np.float64)
                acc[target.out_offset:end] += manifest.tiers[tier].scaling * (b @ a)
        merged[key] = acc.astype(weight.dtype)

    if with_head:
        tier, tensors = with_head[-1]
        for key in HEAD_NAMES:
            if key not in merged:
                raise ValueError(f"the backbone has no {key!r} to replace with tier {tier!r}'s head")
            value = np.asarray(tensors[key])
            if value.shape != merged[key].shape:
                raise ValueError(f"tier {tier!r}: {key} has shape {value.shape}, the backbone's is "
                                 f"{merged[key].shape}")
            merged[key] = value.astype(merged[key].dtype)
    return merged


def served_leaf(leaf: TierTensors, below_head: TierTensors, mix: float) -> dict[str, np.ndarray]:
    """The leaf as the client's model uses it (``training.leaf_mix``, docs/method.md "The leaf
    tier"): its LoRA change scaled by ``mix`` (each ``lora_B`` times ``mix``, so every target's
    ``B A`` is), its head's weight ``mix`` of the way from the tier below's (``below_head``: the
    cluster's head, or the root's for a client without one) to its own, and its own head bias
    whole (the client's label mix: the bias fit and what training added to it). ``mix`` = 1 is the
    leaf as trained. A weight-space interpolation between the model the leaf started from and the
    leaf, evaluated where it is used; the leaf's file keeps what it trained (and the mix its client
    uses, ``leaf_file_metadata``), so later leaf rounds continue from it. Returns new float32 arrays.

    Raises:
        ValueError: ``mix`` outside (0, 1], a leaf without ``head.weight`` and ``head.bias``, or a
            ``below_head`` without a ``head.weight`` of the leaf's shape.
    """
    mix = float(mix)
    if not 0.0 < mix <= 1.0:
        raise ValueError(f"leaf mix must be in (0, 1], got {mix}")
    missing = [name for name in HEAD_NAMES if name not in leaf]
    if missing:
        raise ValueError(f"the leaf has no {missing[0]!r}")
    weight = np.asarray(leaf["head.weight"], dtype=np.float32)
    if "head.weight" not in below_head or np.shape(below_head["head.weight"]) != weight.shape:
        raise ValueError(f"the tier below has no head.weight of shape {weight.shape} to mix the leaf's head with")
    out: dict[str, np.ndarray] = {}
    for name, value in leaf.items():
        array = np.asarray(value, dtype=np.float32)
        if mix == 1.0:   # the leaf as trained
            out[name] = array.copy()
        elif name.endswith(".lora_B"):
            out[name] = (array * np.float32(mix)).astype(np.float32)
        elif name == "head.weight":
            below = np.asarray(below_head["head.weight"], dtype=np.float32)
            out[name] = (below + np.float32(mix) * (array - below)).astype(np.float32)
        else:
            out[name] = array.copy()
    return out


LEAF_MIX_METADATA = "hilora_leaf_mix"


def leaf_file_metadata(mix: float) -> dict[str, str]:
    """The safetensors metadata of a client's leaf file: the share of the leaf's change its model
    takes (``served_leaf``), decided when the leaf trained (``shared.calibration.leaf_mix_for``)."""
    return {LEAF_MIX_METADATA: repr(float(mix))}


def leaf_file_mix(data: bytes) -> float:
    """The mix a leaf file (safetensors bytes) records (``leaf_file_metadata``); 1 when it records
    none (a leaf written before ``training.leaf_mix``: used as trained).

    Raises:
        ValueError: the file is not readable safetensors, or its mix is not a number in (0, 1].
    """
    from shared.tensors import TensorValidationError, read_safetensors_header

    try:
        meta = read_safetensors_header(data).get("__metadata__") or {}
    except TensorValidationError as exc:
        raise ValueError(f"the leaf file cannot be read: {exc.message}") from None
    if LEAF_MIX_METADATA not in meta:
        return 1.0
    try:
        mix = float(meta[LEAF_MIX_METADATA])
    except ValueError:
        mix = float("nan")
    if not 0.0 < mix <= 1.0:
        raise ValueError(f"the leaf file's {LEAF_MIX_METADATA} must be a number in (0, 1], got "
                         f"{meta[LEAF_MIX_METADATA][:40]!r}")
    return mix


def model_metadata(*, model: str, model_kwargs: Mapping[str, Any], tiers: Sequence[str],
                   versions: Mapping[str, Any], **extra: Any) -> dict[str, str]:
    """The ``__metadata__`` of a merged model file: ``format`` and ``model`` as plain strings,
    every other value (``extra`` included, None values dropped) as JSON text."""
    meta = {"format": MODEL_FORMAT, "model": model, "model_kwargs": json.dumps(dict(model_kwargs), sort_keys=True),
            "tiers": json.dumps(list(tiers)), "versions": json.dumps(dict(versions), sort_keys=True)}
    for key, value in extra.items():
        if value is not None:
            meta[key] = json.dumps(value, sort_keys=True)
    return meta


def pack_model(state: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """A merged state dict as safetensors bytes (dtypes kept) with the given metadata."""
    return safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in state.items()},
                                  metadata=dict(metadata))


def read_model_metadata(header_metadata: Mapping[str, str] | None) -> dict[str, Any]:
    """Decode a merged model file's metadata (JSON fields parsed).

    Raises:
        ValueError: the file is not a hilora merged model (no or another ``format``).
    """
    meta = dict(header_metadata or {})
    if meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"not a hilora merged model (metadata format {meta.get('format')!r}, "
                         f"expected {MODEL_FORMAT!r}); make one with `hilora export`")
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if key in ("format", "model"):
            out[key] = value
            continue
        try:
            out[key] = json.loads(value)
        except ValueError:
            raise ValueError(f"merged model metadata {key!r} is not JSON: {value[:100]!r}") from None
    return out
