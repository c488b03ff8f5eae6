"""Memory of hosted clients whose images stay on disk (issue 17, ``worker.stream``): peak RSS of a
worker-like process that hosts S sites (ImageFolder clients of N RGB images at 224 x 224 each) and
trains a small timm ViT one epoch on each, streamed (decoded batch by batch) against the same
images held in memory, for N and 4N images per site.

    python bench/stream_memory.py [--sites 3] [--images 2000] [--workdir DIR] [--data-workers 0]
    python bench/stream_memory.py --sites 1 --images 500     # a quicker look

Each measurement is a fresh subprocess (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, children
excluded), so nothing of one run stays in the next. The images are random RGB PNGs of 256 x 192
(prepared by the federation pipeline of ViT's pretrained config: bicubic, crop 0.9, to 224), written
once under ``--workdir``. The model is timm's ViT (patch 16, embed 64, depth 2, 2 heads, 224 x 224,
10 classes): small enough for 2 cores, with the real input size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL_KWARGS = {"patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}


def write_folder(root: Path, images: int, seed: int = 0) -> Path:
    """``root``/train/c<k>/<i>.png (10 classes) and a small test split, once."""
    import numpy as np
    from PIL import Image

    marker = root / f".complete-{images}"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    for split, count in (("train", images), ("test", 20)):
        for i in range(count):
            path = root / split / f"c{i % 10}" / f"{i:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (192, 256, 3), dtype=np.uint8), "RGB").save(path, compress_level=1)
    marker.touch()
    return root


def child(folders: str, lazy: bool, workers: int) -> None:
    """One measurement, in its own process: host every site of ``folders`` (comma-separated), train
    one epoch on each, print peak RSS."""
    import resource

    import torch

    from shared.preprocess import table_preprocessing
    from worker.backbone import create_model, manifest_for_model
    from worker.data import FolderClientSpec, client_arrays
    from worker.lora import TieredLoRAModel
    from worker.train import train_tier

    torch.set_num_threads(1)
    pipeline = table_preprocessing("vit_tiny_patch16_224", {})
    start = time.perf_counter()
    sites = [client_arrays(FolderClientSpec(folder=folder), "org", pipeline, lazy=lazy, workers=workers)
             for folder in folders.split(",")]   # a worker holds every hosted client's data
    loaded = time.perf_counter() - start
    torch.manual_seed(0)
    backbone = create_model("vit_tiny_patch16_224", MODEL_KWARGS).eval()
    model = TieredLoRAModel(backbone, manifest_for_model(backbone, rank=4))
    model.set_input_normalization(pipeline.mean, pipeline.std)
    steps = 0
    for i, data in enumerate(sites):
        model.init_tier("root", seed=i)
        steps += train_tier(model, "root", data, epochs=1, lr=1e-3, head_lr=1e-3, batch_size=32, weight_decay=0.0,
                            gamma_c=0.0, gamma_l=0.0, seed=i)["steps"]
    print(json.dumps({"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "load_seconds": round(loaded, 2), "seconds": round(time.perf_counter() - start, 2),
                      "steps": steps}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=3, help="S: clients hosted by the measured process")
    parser.add_argument("--images", type=int, default=2000, help="N: training images per site (then 4N)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the image folders here")
    parser.add_argument("--data-workers", type=int, default=0)
    parser.add_argument("--eager-max-images", type=int, default=8000,
                        help="skip the in-memory run above this many images in the process (0.6 MB each at 224)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # folders, lazy|eager, workers
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1] == "lazy", int(args.child[2]))
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hilora-stream-"))
    rows = []
    for n in (args.images, 4 * args.images):
        folders = ",".join(str(write_folder(work / f"n{n}-site{i}" / "org", n, seed=i)) for i in range(args.sites))
        for mode in ("lazy", "eager"):
            if mode == "eager" and args.sites * n > args.eager_max_images:
                print(f"in memory, {args.sites} x {n} images: skipped (--eager-max-images "
                      f"{args.eager_max_images}: about {args.sites * n * 0.6 / 1024:.1f} GB of float32)", flush=True)
                continue
            proc = subprocess.run([sys.executable, __file__, "--child", folders, mode, str(args.data_workers)],
                                  capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            row = {"sites": args.sites, "images": n, "mode": "streamed" if mode == "lazy" else "in memory",
                   **json.loads(proc.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| sites x training images | images | peak RSS (MiB) | one epoch each, incl. loading (s) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['sites']} x {row['images']} | {row['mode']} | {row['peak_rss_mib']} | {row['seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
