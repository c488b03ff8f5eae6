"""The adapter manifest: which modules carry LoRA, with which shapes, per tier.

The manifest is the contract for every tensor that crosses the wire. The coordinator validates
each upload against ``upload_shapes`` and workers refuse a federation whose manifest does not
match the model they built.

Wire names for one tier (the tier itself is implied by the task or adapter version):

- ``{target.name}.lora_A``: (rank, in_features)
- ``{target.name}.lora_B``: (out_features, rank)
- ``head.weight``: (num_classes, in_features) and ``head.bias``: (num_classes,)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TIERS: tuple[str, ...] = ("root", "cluster", "leaf")
Tier = Literal["root", "cluster", "leaf"]
Factor = Literal["A", "B", "head"]
FACTORS: tuple[str, ...] = ("A", "B", "head")
WIRE_DTYPE = "float32"
WIRE_ITEMSIZE = 4
# Bounds that keep a hostile or mistyped manifest from making the coordinator allocate without end
# (version 0 of every tier is built in memory when a federation is created).
MAX_FEATURES = 1 << 20
MAX_TIER_BYTES = 1 << 31


class AdapterTarget(BaseModel):
    """One adapted output slice of one Linear module of the backbone."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=200, description="wire prefix, e.g. 'blocks.0.attn.qkv.q'")
    module: str = Field(min_length=1, max_length=200, description="module path in the model, e.g. 'blocks.0.attn.qkv'")
    out_offset: int = Field(ge=0, le=MAX_FEATURES, description="first output row of the slice the adapter adds to")
    in_features: int = Field(gt=0, le=MAX_FEATURES)
    out_features: int = Field(gt=0, le=MAX_FEATURES)


class TierSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rank: int = Field(gt=0, le=256)
    alpha: float = Field(gt=0)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class HeadSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    in_features: int = Field(gt=0, le=MAX_FEATURES)
    num_classes: int = Field(gt=0, le=MAX_FEATURES)


class AdapterManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    targets: list[AdapterTarget] = Field(min_length=1, max_length=100_000)
    tiers: dict[Tier, TierSpec]
    head: HeadSpec
    dtype: Literal["float32"] = WIRE_DTYPE

    @model_validator(mode="after")
    def _check(self) -> "AdapterManifest":
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError("adapter target names must be unique")
        if set(self.tiers) != set(TIERS):
            raise ValueError(f"manifest must define exactly the tiers {TIERS}")
        for name in names:
            if name.startswith("head.") or "/" in name:
                raise ValueError(f"invalid target name {name!r}")
        for tier in TIERS:
            if self.max_body_bytes(tier) > MAX_TIER_BYTES:
                raise ValueError(f"the {tier} tier would be {self.max_body_bytes(tier)} bytes; "
                                 f"at most {MAX_TIER_BYTES} bytes per tier")
        return self

    def factor_shapes(self, tier: str, factor: str) -> dict[str, tuple[int, ...]]:
        """Names and shapes of one factor ('A', 'B' or 'head') of one tier."""
        rank = self.tiers[tier].rank  # type: ignore[index]
        if factor == "A":
            return {f"{t.name}.lora_A": (rank, t.in_features) for t in self.targets}
        if factor == "B":
            return {f"{t.name}.lora_B": (t.out_features, rank) for t in self.targets}
        if factor == "head":
            return {
                "head.weight": (self.head.num_classes, self.head.in_features),
                "head.bias": (self.head.num_classes,),
            }
        raise ValueError(f"unknown factor {factor!r}")

    def tier_shapes(self, tier: str, factors: tuple[str, ...] = FACTORS) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the given factors of one tier (default: all of them)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for factor in factors:
            shapes.update(self.factor_shapes(tier, factor))
        return shapes

    def max_body_bytes(self, tier: str, factors: tuple[str, ...] = FACTORS) -> int:
        """Upper bound on a valid safetensors body for these factors (data + generous header)."""
        shapes = self.tier_shapes(tier, factors)
        data = sum(WIRE_ITEMSIZE * _prod(s) for s in shapes.values())
        return data + 8 + header_allowance(len(shapes))


def header_allowance(num_tensors: int) -> int:
    """The most header bytes a valid body of ``num_tensors`` tensors may carry (generous: a name of
    up to ~200 characters, dtype, shape and offsets per tensor, plus 4 KiB). The validator refuses
    a longer header before parsing it (``shared.tensors``)."""
    return 256 * (num_tensors + 1) + 4096


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def tier_specs(rank: int, alpha: float | None = None, ranks: Mapping[str, int] | None = None) -> dict[str, TierSpec]:
    """Every tier's rank and alpha: ``rank`` unless ``ranks`` overrides it per tier; ``alpha``
    defaults to each tier's rank (scaling 1).

    Raises:
        ValueError: ``ranks`` names an unknown tier.
    """
    ranks = dict(ranks or {})
    unknown = sorted(set(ranks) - set(TIERS))
    if unknown:
        raise ValueError(f"ranks name unknown tiers {unknown}; tiers are {list(TIERS)}")
    specs = {}
    for tier in TIERS:
        tier_rank = int(ranks.get(tier, rank))
        specs[tier] = TierSpec(rank=tier_rank, alpha=float(alpha) if alpha is not None else float(tier_rank))
    return specs


def qv_targets(depth: int, dim: int, module_fmt: str = "blocks.{i}.attn.qkv") -> list[AdapterTarget]:
    """Targets for the q and v slices of a fused timm ``qkv`` Linear (out = 3 * dim) per block."""
    targets: list[AdapterTarget] = []
    for i in range(depth):
        module = module_fmt.format(i=i)
        targets.append(AdapterTarget(name=f"{module}.q", module=module, out_offset=0,
                                     in_features=dim, out_features=dim))
        targets.append(AdapterTarget(name=f"{module}.v", module=module, out_offset=2 * dim,
                                     in_features=dim, out_features=dim))
    return targets
