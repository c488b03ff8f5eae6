"""One training step (forward + backward) of the worker's fused three-tier LoRA on a CPU timm ViT,
against (a) a single plain LoRA of the same total rank and (b) Hugging Face peft with three LoRA
adapters active.

    python bench/train_step.py [--quick] [--json] [--batch 8] [--repeats 7] [--threads 1]

Model: ``vit_tiny_patch16_224`` (dim 192, depth 12, 224 x 224 RGB, 10 classes), random weights,
frozen. Ranks 8 / 8 / 8 (tiers), alpha = rank. The leaf stage is timed: all three tiers active,
the leaf's A, B and head train, root and cluster frozen (what ``worker.train.train_tier`` does in
its most expensive stage); one step = logits, cross entropy, ``backward()``.

peft cannot adapt the q and v slices of timm's fused ``qkv``, so all three contenders put LoRA on
the whole ``qkv`` rows (for the fused model: a manifest whose targets are full-row slices, which
worker/lora.py supports like any slice):

- ``fused``: ``worker.lora.TieredLoRAModel`` (the worker's code, unchanged);
- ``single``: a plain LoRA Linear, ``base(x) + (x A^T) B^T`` with rank 24, A, B and head training;
- ``peft``: ``get_peft_model`` with adapters root/cluster/leaf active (``set_adapter``), only the
  leaf's factors and the head requiring gradients.

The worker's default (LoRA on the q and v slices only) is timed too, for reference. Repetitions
(``--steps`` steps each) are interleaved, order alternating; ratios of medians. Targets:
fused / single <= 1.15 and fused / peft < 1.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import _common  # noqa: F401
from _common import emit, interleaved, load, machine, median, result, set_threads

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from shared.manifest import TIERS, AdapterManifest, AdapterTarget, HeadSpec, TierSpec  # noqa: E402
from worker.backbone import create_model, manifest_for_model  # noqa: E402
from worker.lora import TieredLoRAModel  # noqa: E402

MODEL = "vit_tiny_patch16_224"
RANK = 8


def backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(MODEL, {"num_classes": 10}).eval()


def full_qkv_manifest(model: nn.Module) -> AdapterManifest:
    dim, depth = model.embed_dim, len(model.blocks)
    targets = [AdapterTarget(name=f"blocks.{i}.attn.qkv", module=f"blocks.{i}.attn.qkv", out_offset=0,
                             in_features=dim, out_features=3 * dim) for i in range(depth)]
    return AdapterManifest(targets=targets, tiers={t: TierSpec(rank=RANK, alpha=float(RANK)) for t in TIERS},
                           head=HeadSpec(in_features=dim, num_classes=10))


def fused_model(full_rows: bool) -> TieredLoRAModel:
    base = backbone()
    manifest = full_qkv_manifest(base) if full_rows else manifest_for_model(base, rank=RANK)
    model = TieredLoRAModel(base, manifest)
    for i, tier in enumerate(TIERS):
        model.init_tier(tier, seed=i)
        with torch.no_grad():
            for target in manifest.targets:
                model.factor(tier, target.name, "B").normal_(0, 0.02)
    model.set_active_tiers(TIERS)
    model.set_trainable("leaf", ("A", "B", "head"))
    return model


class PlainLoRALinear(nn.Module):
    """Textbook LoRA: frozen base plus ``scaling * (x A^T) B^T``."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features**0.5)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, rank) * 0.02)
        self.scaling = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


def single_model() -> nn.Module:
    model = backbone()
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        block.attn.qkv = PlainLoRALinear(block.attn.qkv, 3 * RANK)
    model.head.requires_grad_(True)
    return model


def peft_model() -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["qkv"], lora_dropout=0.0)
    model = get_peft_model(backbone(), config, adapter_name="root")
    model.add_adapter("cluster", copy.deepcopy(config))
    model.add_adapter("leaf", copy.deepcopy(config))
    model.base_model.set_adapter(list(TIERS))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".leaf." in name or name.endswith("head.weight") or name.endswith("head.bias"))
    return model


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int):  # noqa: ANN201
    def run() -> None:
        for _ in range(steps):
            for p in model.parameters():
                p.grad = None
            F.cross_entropy(model(x), y).backward()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 4, 5 repetitions of 1 step")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed repetition")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    torch.set_num_threads(args.threads)
    batch, repeats, steps = (4, 5, 1) if args.quick else (args.batch, args.repeats, args.steps)
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    models = {"fused": fused_model(full_rows=True), "single": single_model(), "peft": peft_model(),
              "fused_qv": fused_model(full_rows=False)}
    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()}
    load_before = load()
    times = interleaved({name: step_fn(m, x, y, steps) for name, m in models.items()}, repeats)
    per_step = {name: median(v) / steps for name, v in times.items()}
    common = {"batch": batch, "repeats": repeats, "steps_per_repeat": steps, "model": MODEL, "ranks": [RANK] * 3,
              "seconds_per_step": {k: round(v, 4) for k, v in per_step.items()}, "trainable_params": trainable,
              "load_before": load_before, "load_after": load()}
    vs_single = per_step["fused"] / per_step["single"]
    vs_peft = per_step["fused"] / per_step["peft"]
    results = [
        result("train step fused 3-tier / single LoRA rank 24 (full qkv)", vs_single, "<= 1.15", vs_single <= 1.15, **common),
        result("train step fused 3-tier / peft 3 adapters (full qkv)", vs_peft, "< 1", vs_peft < 1, **common),
        result("train step fused 3-tier q,v slices / fused full qkv (worker default, info)",
               per_step["fused_qv"] / per_step["fused"], "report", True),
    ]
    header = {"bench": "train_step", "machine": machine(), "threads": args.threads, "torch": torch.__version__,
              "command": "python " + " ".join(sys.argv), "bench_wall_s": round(time.perf_counter() - started, 1)}
    emit(results, args.json, header)


if __name__ == "__main__":
    main()
