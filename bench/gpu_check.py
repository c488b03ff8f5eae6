"""The GPU check (issue 17): ViT-B/16 rank-8 training speed on one GPU, fused three-tier LoRA against
peft, fp32 against bf16 autocast, peak GPU memory, and a smoke run of the worker's own training
function. Unattended, offline (random weights, synthetic 224 x 224 data), within about 5 minutes.

    python bench/gpu_check.py [--quick] [--json] [--batch 64] [--steps 20]
    python bench/gpu_check.py --cpu-smoke --json     # the script itself, on a CPU, in seconds (CI)

Needs CUDA torch, timm and peft (``pip install "hilora[worker,bench]"``); without a GPU it says so
and exits 2 (unless ``--cpu-smoke``, which runs the same code on a CPU with a tiny ViT at 32 x 32).

Contenders, each timed on the leaf stage (all three tiers active, the leaf's A, B and head train,
what ``worker.train.train_tier`` does in its most expensive stage; AdamW step included):

- ``fused``: ``worker.lora.TieredLoRAModel`` with the worker's default targets (the q and v slices
  of every block's fused qkv), and ``fused-qkv`` with LoRA on the whole qkv rows;
- ``peft``: Hugging Face peft with adapters root/cluster/leaf on ``qkv`` (peft cannot adapt the q
  and v slices of timm's fused qkv, so it is compared with ``fused-qkv``);

each in fp32 and in bf16 autocast (fp16 with loss scaling where the GPU has no bf16). Reported:
images per second (median of 3 timed blocks of ``--steps`` steps after 3 warm-up steps) and peak
GPU memory (``torch.cuda.max_memory_allocated`` during that contender). The smoke run trains the
leaf of a ViT-B/16 with ``worker.train.train_tier`` (``precision`` auto) on 256 synthetic images
and reports its steps, loss and seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from shared.manifest import TIERS, AdapterManifest, AdapterTarget, HeadSpec, TierSpec  # noqa: E402
from worker.backbone import create_model, manifest_for_model  # noqa: E402
from worker.lora import TieredLoRAModel  # noqa: E402

RANK = 8
CLASSES = 100


def build_backbone(model: str, kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(model, {"num_classes": CLASSES, **kwargs}).eval()


def fused(model: str, kwargs: dict, full_rows: bool) -> torch.nn.Module:
    base = build_backbone(model, kwargs)
    if full_rows:
        dim, depth = base.embed_dim, len(base.blocks)
        manifest = AdapterManifest(
            targets=[AdapterTarget(name=f"blocks.{i}.attn.qkv", module=f"blocks.{i}.attn.qkv", out_offset=0,
                                   in_features=dim, out_features=3 * dim) for i in range(depth)],
            tiers={t: TierSpec(rank=RANK, alpha=float(RANK)) for t in TIERS},
            head=HeadSpec(in_features=dim, num_classes=CLASSES))
    else:
        manifest = manifest_for_model(base, rank=RANK)
    out = TieredLoRAModel(base, manifest)
    for i, tier in enumerate(TIERS):
        out.init_tier(tier, seed=i)
    out.set_active_tiers(TIERS)
    out.set_trainable("leaf", ("A", "B", "head"))
    return out


def peft(model: str, kwargs: dict) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["qkv"], lora_dropout=0.0)
    out = get_peft_model(build_backbone(model, kwargs), config, adapter_name="root")
    out.add_adapter("cluster", copy.deepcopy(config))
    out.add_adapter("leaf", copy.deepcopy(config))
    out.base_model.set_adapter(list(TIERS))
    for name, parameter in out.named_parameters():
        parameter.requires_grad_(".leaf." in name or name.endswith("head.weight") or name.endswith("head.bias"))
    return out


def time_contender(make, device: str, precision: str, batch: int, size: int, steps: int) -> dict:
    from worker.train import autocast, optimizer_step

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = make().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    channels = 3
    x = torch.randn(batch, channels, size, size, device=device)
    y = torch.randint(0, CLASSES, (batch,), device=device)

    def step() -> None:
        with autocast(device, precision):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer_step(loss, optimizer, scaler)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    sync()
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        rates.append(batch * steps / (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del model, optimizer
    return {"images_per_s": round(statistics.median(rates), 1), "peak_gib": None if peak is None else round(peak, 2)}


def smoke(model: str, kwargs: dict, device: str, size: int) -> dict:
    """The worker's own training function on this device, precision auto, a few steps."""
    import numpy as np

    from worker.data import ClientData
    from worker.train import resolve_precision, train_tier

    lora = fused(model, kwargs, full_rows=False)
    rng = np.random.default_rng(0)
    x = rng.random((256, 3, size, size), dtype=np.float32)
    y = rng.integers(0, CLASSES, 256).astype(np.int64)
    data = ClientData(x_train=x, y_train=y, x_test=x[:64], y_test=y[:64], train_indices=np.arange(256),
                      test_indices=np.arange(64))
    precision = resolve_precision("auto", device)
    start = time.perf_counter()
    out = train_tier(lora, "leaf", data, epochs=1, lr=1e-3, head_lr=1e-3, batch_size=32, weight_decay=0.0,
                     gamma_c=0.1, gamma_l=0.1, seed=0, device=device, precision=precision)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"precision": precision, "steps": out["steps"], "train_loss": round(float(out["train_loss"]), 4),
            "seconds": round(time.perf_counter() - start, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 steps per timed block, batch 32")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="no GPU: a tiny ViT at 32 x 32 on the CPU, to check the script itself")
    args = parser.parse_args()
    if args.cpu_smoke:
        device, model, size = "cpu", "vit_tiny_patch16_224", 32
        kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
        batch, steps = 4, 1
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device: this check needs a GPU (torch.cuda.is_available() is False); "
                  "--cpu-smoke checks the script on a CPU", file=sys.stderr)
            return 2
        device, model, size, kwargs = "cuda", "vit_base_patch16_224", 224, {}
        batch, steps = (32, 5) if args.quick else (args.batch, args.steps)
    reduced = "bf16" if device == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    started = time.perf_counter()
    contenders = {
        "fused": lambda: fused(model, kwargs, full_rows=False),
        "fused-qkv": lambda: fused(model, kwargs, full_rows=True),
        "peft": lambda: peft(model, kwargs),
    }
    results = []
    for name, make in contenders.items():
        for precision in ("fp32", reduced):
            row = {"contender": name, "precision": precision,
                   **time_contender(make, device, precision, batch, size, steps)}
            results.append(row)
            if not args.json:
                print(f"{name:10s} {precision:5s} {row['images_per_s']:9.1f} img/s  peak {row['peak_gib']} GiB",
                      flush=True)
    report = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "model": model, "image_size": size, "rank": RANK, "batch": batch,
        "steps_per_block": steps, "results": results, "smoke": smoke(model, kwargs, device, size),
    }
    speed = {(r["contender"], r["precision"]): r["images_per_s"] for r in results}
    report["fused_qkv_over_peft"] = {p: round(speed[("fused-qkv", p)] / speed[("peft", p)], 3)
                                     for p in ("fp32", reduced)}
    report["reduced_over_fp32"] = {c: round(speed[(c, reduced)] / speed[(c, "fp32")], 3) for c in contenders}
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=None if args.json else 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
