"""Three-tier LoRA on a frozen timm ViT (method.md sections 1 and 3).

Each Linear named by the manifest (e.g. ``blocks.0.attn.qkv``) is wrapped so that, on each adapted
output slice ``[out_offset, out_offset + out_features)``, its output gets

    sum over ACTIVE tiers t of  scaling_t * x A_t^T B_t^T        (scaling_t = alpha_t / rank_t)

computed as ONE fused low-rank product per wrapped module: the active tiers' A's of all slices are
concatenated along the rank dimension (``A_cat``), the B's are placed block-diagonally into a
(module out) x (total rank) matrix whose zero rows are the unadapted outputs (``B_big``, e.g. the
k slice of ``qkv``), and the delta is ``(x A_cat^T) B_big^T``. When no involved parameter needs a
gradient the two matrices are cached per active-tier set and invalidated by any in-place change
of the parameters (their version counters).

Every tier also owns a copy of the classifier head; prediction with active tiers up to T uses T's
head (no tier active: the backbone's own head). Tensor names on the wire are the manifest's:
``{target}.lora_A`` (rank x in), ``{target}.lora_B`` (out x rank), ``head.weight``, ``head.bias``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from shared.manifest import FACTORS, TIERS, AdapterManifest, AdapterTarget


class ManifestMismatchError(ValueError):
    """The model does not have the modules or shapes the adapter manifest describes."""


class TensorMismatchError(ValueError):
    """Tensors given to ``load_tier`` do not have the manifest's names or shapes."""


def _check_tier(tier: str) -> None:
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; tiers are {list(TIERS)}")


def _check_factors(factors: Iterable[str]) -> tuple[str, ...]:
    factors = tuple(factors)
    unknown = [f for f in factors if f not in FACTORS]
    if unknown:
        raise ValueError(f"unknown factors {unknown}; factors are {list(FACTORS)}")
    return factors


class TieredLoRALinear(nn.Module):
    """A frozen Linear plus per-tier LoRA factors on one or more disjoint output slices.

    ``lora_A[f"{tier}_{j}"]`` is (rank_t x in) and ``lora_B[f"{tier}_{j}"]`` is (out_j x rank_t)
    for slot j (a manifest target on this module). Only ``active_tiers`` contribute.
    """

    def __init__(self, base: nn.Linear, targets: Sequence[AdapterTarget], ranks: Mapping[str, int],
                 scalings: Mapping[str, float]) -> None:
        super().__init__()
        self.base = base
        self.targets = sorted(targets, key=lambda t: t.out_offset)
        self.scalings = dict(scalings)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for tier in TIERS:
            for j, target in enumerate(self.targets):
                self.lora_A[f"{tier}_{j}"] = nn.Parameter(torch.zeros(ranks[tier], target.in_features),
                                                          requires_grad=False)
                self.lora_B[f"{tier}_{j}"] = nn.Parameter(torch.zeros(target.out_features, ranks[tier]),
                                                          requires_grad=False)
        self.active_tiers: tuple[str, ...] = ()
        self._cache_key: tuple | None = None
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def slot_of(self, target_name: str) -> int:
        """Index of the slot (target) named ``target_name`` in this module."""
        for j, target in enumerate(self.targets):
            if target.name == target_name:
                return j
        raise KeyError(target_name)

    def _involved(self) -> list[nn.Parameter]:
        return [p for tier in self.active_tiers for j in range(len(self.targets))
                for p in (self.lora_A[f"{tier}_{j}"], self.lora_B[f"{tier}_{j}"])]

    def _build_fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A_cat`` (R x in, scalings folded in) and ``B_big`` (out x R), R = total active rank."""
        a_blocks: list[torch.Tensor] = []
        b_blocks: list[torch.Tensor] = []
        reference = self.lora_B[f"{self.active_tiers[0]}_0"]
        row = 0
        for j, target in enumerate(self.targets):
            if target.out_offset > row:  # unadapted rows (e.g. k of qkv): zero rows, no columns
                b_blocks.append(reference.new_zeros(target.out_offset - row, 0))
            a_blocks.extend(self.scalings[t] * self.lora_A[f"{t}_{j}"] for t in self.active_tiers)
            b_blocks.append(torch.cat([self.lora_B[f"{t}_{j}"] for t in self.active_tiers], dim=1))
            row = target.out_offset + target.out_features
        if self.base.out_features > row:
            b_blocks.append(reference.new_zeros(self.base.out_features - row, 0))
        return torch.cat(a_blocks, dim=0), torch.block_diag(*b_blocks)

    def fused_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused ``(A_cat, B_big)`` of the active tiers, cached when nothing needs a gradient."""
        involved = self._involved()
        if torch.is_grad_enabled() and any(p.requires_grad for p in involved):
            self._cache_key, self._cache = None, None
            return self._build_fused()
        key = (self.active_tiers, tuple((p._version, p.data_ptr(), p.device, p.dtype) for p in involved))
        if self._cache is None or self._cache_key != key:
            with torch.no_grad():
                self._cache = self._build_fused()
            self._cache_key = key
        return self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x)`` plus the fused low-rank delta of the active tiers."""
        out = self.base(x)
        if not self.active_tiers:
            return out
        a_cat, b_big = self.fused_factors()
        return out + F.linear(F.linear(x, a_cat), b_big)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.backbone if isinstance(model, TieredLoRAModel) else model


def check_manifest_matches(model: nn.Module, manifest: AdapterManifest) -> None:
    """Check that a timm backbone (or a TieredLoRAModel) has every module and shape the manifest names.

    Raises:
        ManifestMismatchError: listing every problem (missing or non-Linear modules, in_features
            that differ, slices beyond the module's outputs or overlapping, a head of other shape).
    """
    backbone = _unwrap(model)
    problems: list[str] = []
    by_module: dict[str, list[AdapterTarget]] = {}
    for target in manifest.targets:
        by_module.setdefault(target.module, []).append(target)
    for module_name, targets in by_module.items():
        try:
            module = backbone.get_submodule(module_name)
        except AttributeError:
            problems.append(f"module {module_name!r} does not exist in the model")
            continue
        if isinstance(module, TieredLoRALinear):
            module = module.base
        if not isinstance(module, nn.Linear):
            problems.append(f"module {module_name!r} is a {type(module).__name__}, not a Linear")
            continue
        row = 0
        for target in sorted(targets, key=lambda t: t.out_offset):
            if target.in_features != module.in_features:
                problems.append(f"target {target.name!r}: in_features {target.in_features} but "
                                f"{module_name} has {module.in_features}")
            end = target.out_offset + target.out_features
            if end > module.out_features:
                problems.append(f"target {target.name!r}: slice [{target.out_offset}, {end}) exceeds "
                                f"{module_name}'s {module.out_features} outputs")
            if target.out_offset < row:
                problems.append(f"target {target.name!r}: slice overlaps another target on {module_name}")
            row = max(row, end)
    head = getattr(backbone, "head", None)
    if not isinstance(head, nn.Linear):
        problems.append("the model has no Linear classifier head named 'head'")
    elif (head.in_features, head.out_features) != (manifest.head.in_features, manifest.head.num_classes):
        problems.append(f"head is Linear({head.in_features}, {head.out_features}) but the manifest says "
                        f"({manifest.head.in_features}, {manifest.head.num_classes})")
    if problems:
        raise ManifestMismatchError("the model does not match the adapter manifest: " + "; ".join(problems))


class TieredLoRAModel(nn.Module):
    """A frozen timm ViT with root, cluster and leaf LoRA tiers and one classifier head per tier.

    All LoRA factors start at zero and every parameter starts frozen; use ``init_tier`` or
    ``load_tier`` to set a tier, ``set_active_tiers`` to choose which tiers the forward uses and
    ``set_trainable`` to choose what trains.
    """

    def __init__(self, backbone: nn.Module, manifest: AdapterManifest) -> None:
        super().__init__()
        check_manifest_matches(backbone, manifest)
        self.manifest = manifest
        self.backbone = backbone
        for parameter in backbone.parameters():
            parameter.requires_grad_(False)
        ranks = {t: manifest.tiers[t].rank for t in TIERS}
        scalings = {t: manifest.tiers[t].scaling for t in TIERS}
        by_module: dict[str, list[AdapterTarget]] = {}
        for target in manifest.targets:
            by_module.setdefault(target.module, []).append(target)
        self._wrapped: dict[str, TieredLoRALinear] = {}
        for module_name, targets in by_module.items():
            wrapper = TieredLoRALinear(backbone.get_submodule(module_name), targets, ranks, scalings)
            parent_name, _, child = module_name.rpartition(".")
            setattr(backbone.get_submodule(parent_name) if parent_name else backbone, child, wrapper)
            self._wrapped[module_name] = wrapper
        self._slots = {t.name: (self._wrapped[t.module], self._wrapped[t.module].slot_of(t.name))
                       for t in manifest.targets}
        self.heads = nn.ModuleDict({tier: copy.deepcopy(backbone.head) for tier in TIERS})
        for parameter in self.heads.parameters():
            parameter.requires_grad_(False)
        self.active_tiers: tuple[str, ...] = ()
        # the federation's per-channel input normalisation (shared.preprocess), if any: not part
        # of the state dict, so exports and adapters are the same with or without it
        self.register_buffer("input_mean", None, persistent=False)
        self.register_buffer("input_std", None, persistent=False)

    def set_input_normalization(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        """Inputs become ``(x - mean) / std`` per channel before the backbone (None: as given)."""
        if mean is None or std is None:
            self.input_mean = self.input_std = None
            return
        device = next(self.backbone.parameters()).device
        self.input_mean = torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.input_std = torch.tensor(list(std), dtype=torch.float32, device=device).view(1, -1, 1, 1)

    # ------------------------------------------------------------------ structure

    def factor(self, tier: str, target_name: str, which: str) -> nn.Parameter:
        """The parameter holding one factor (``"A"`` or ``"B"``) of one target of one tier."""
        _check_tier(tier)
        wrapper, j = self._slots[target_name]
        return (wrapper.lora_A if which == "A" else wrapper.lora_B)[f"{tier}_{j}"]

    def tier_parameters(self, tier: str, factors: Iterable[str] = FACTORS) -> list[nn.Parameter]:
        """The parameters of the given factors of one tier, in manifest order."""
        _check_tier(tier)
        factors = _check_factors(factors)
        params: list[nn.Parameter] = []
        for which in ("A", "B"):
            if which in factors:
                params.extend(self.factor(tier, t.name, which) for t in self.manifest.targets)
        if "head" in factors:
            params.extend([self.heads[tier].weight, self.heads[tier].bias])
        return params

    def _named_tier_tensors(self, tier: str, factors: Iterable[str]) -> dict[str, torch.Tensor]:
        factors = _check_factors(factors)
        named: dict[str, torch.Tensor] = {}
        for which in ("A", "B", "head"):
            if which not in factors:
                continue
            if which == "head":
                named["head.weight"] = self.heads[tier].weight
                named["head.bias"] = self.heads[tier].bias
            else:
                for target in self.manifest.targets:
                    named[f"{target.name}.lora_{which}"] = self.factor(tier, target.name, which)
        return named

    # ------------------------------------------------------------------ state

    def set_active_tiers(self, tiers: Iterable[str]) -> None:
        """Use exactly these tiers in the forward (kept in root, cluster, leaf order)."""
        tiers = set(tiers)
        for tier in tiers:
            _check_tier(tier)
        self.active_tiers = tuple(t for t in TIERS if t in tiers)
        for wrapper in self._wrapped.values():
            wrapper.active_tiers = self.active_tiers

    def set_trainable(self, tier: str, factors: Iterable[str]) -> None:
        """Make exactly the given factors ('A', 'B', 'head') of ``tier`` trainable; freeze all else."""
        _check_tier(tier)
        factors = _check_factors(factors)
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        for parameter in self.tier_parameters(tier, factors):
            parameter.requires_grad_(True)

    def freeze_all(self) -> None:
        """Freeze every parameter (what ``set_trainable`` with no factors does)."""
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def init_tier(self, tier: str, seed: int, head_from: str | None = None) -> None:
        """Fresh factors for ``tier``: A kaiming-uniform (seeded, a = sqrt(5), as nn.Linear), B zero,
        and the head copied from tier ``head_from`` (None: the backbone's own head)."""
        _check_tier(tier)
        if head_from is None:
            source = self.backbone.head
        elif head_from in TIERS:
            source = self.heads[head_from]
        else:
            raise ValueError(f"head_from must be None or one of {list(TIERS)}, got {head_from!r}")
        generator = torch.Generator().manual_seed(int(seed))
        for target in self.manifest.targets:
            a = self.factor(tier, target.name, "A")
            fresh = torch.empty(a.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            a.copy_(fresh)
            self.factor(tier, target.name, "B").zero_()
        self.heads[tier].weight.copy_(source.weight.detach().clone())
        self.heads[tier].bias.copy_(source.bias.detach().clone())

    @torch.no_grad()
    def load_tier(self, tier: str, tensors: Mapping[str, object], partial: bool = False) -> None:
        """Set a tier from wire tensors (numpy arrays or tensors) named as in the manifest.

        Without ``partial`` every name of the tier (A, B and head) must be present; with it any
        subset may be. Nothing is changed unless every tensor is valid.

        Raises:
            TensorMismatchError: unknown or missing names, wrong shapes or non-finite values.
        """
        _check_tier(tier)
        expected = self.manifest.tier_shapes(tier)
        unknown = sorted(set(tensors) - set(expected))
        missing = [] if partial else sorted(set(expected) - set(tensors))
        problems: list[str] = []
        if unknown:
            problems.append(f"unknown tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''} "
                            f"(expected names like {sorted(expected)[:2]})")
        if missing:
            problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        arrays: dict[str, torch.Tensor] = {}
        for name in sorted(set(tensors) & set(expected)):
            value = tensors[name]
            array = value.detach().cpu().float() if isinstance(value, torch.Tensor) else torch.from_numpy(
                np.asarray(value, dtype=np.float32))
            if tuple(array.shape) != tuple(expected[name]):
                problems.append(f"{name}: shape {tuple(array.shape)}, expected {tuple(expected[name])}")
            elif not bool(torch.isfinite(array).all()):
                problems.append(f"{name}: non-finite values")
            arrays[name] = array
        if problems:
            raise TensorMismatchError(f"cannot load tier {tier!r}: " + "; ".join(problems))
        named = self._named_tier_tensors(tier, FACTORS)
        for name, array in arrays.items():
            named[name].copy_(array)

    @torch.no_grad()
    def export_tier(self, tier: str, factors: Iterable[str] = FACTORS) -> dict[str, np.ndarray]:
        """The given factors of one tier as wire tensors: name -> float32 numpy array (a copy)."""
        _check_tier(tier)
        return {name: tensor.detach().cpu().float().numpy().copy()
                for name, tensor in self._named_tier_tensors(tier, factors).items()}

    # ------------------------------------------------------------------ compute

    def orthogonality_loss(self, tier: str, gamma_c: float, gamma_l: float) -> torch.Tensor:
        """Cross-tier orthogonality penalty on B (method.md section 3), summed over targets.

        root: 0. cluster: ``gamma_c * sum ||B_root^T B_cluster||_F^2``. leaf:
        ``gamma_c * sum ||B_root^T B_leaf||_F^2 + gamma_l * sum ||B_cluster^T B_leaf||_F^2``.
        The upper tiers' B's are detached (they are frozen in that stage).
        """
        _check_tier(tier)
        reference = self.factor(tier, self.manifest.targets[0].name, "B")
        loss = reference.new_zeros(())
        if tier == "root":
            return loss
        pairs = [("root", gamma_c)] if tier == "cluster" else [("root", gamma_c), ("cluster", gamma_l)]
        for upper, gamma in pairs:
            if gamma == 0:
                continue
            for target in self.manifest.targets:
                b_upper = self.factor(upper, target.name, "B").detach()
                b_own = self.factor(tier, target.name, "B")
                loss = loss + gamma * (b_upper.T @ b_own).pow(2).sum()
        return loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the backbone with the active tiers' LoRA, through the highest active tier's head
        (inputs normalised first when ``set_input_normalization`` set a mean and std)."""
        if self.input_mean is not None:
            x = (x - self.input_mean) / self.input_std
        features = self.backbone.forward_features(x)
        pooled = self.backbone.forward_head(features, pre_logits=True)
        head = self.heads[self.active_tiers[-1]] if self.active_tiers else self.backbone.head
        return head(pooled)
