"""Timings of the shared math at ViT-B sizes (d = 768, r = 8): aggregation by both paths,
LSAC features for many clients, and the clustering itself.

    python bench/shared_math.py [--repeats 3]

Prints the best of ``repeats`` wall times per call, in seconds (numpy on the CPU)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.aggregate import aggregate_product_space  # noqa: E402
from shared.subspace import lsac, subspace_bases, subspace_distance, update_distance  # noqa: E402


def best_of(repeats: int, fn) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--targets", type=int, default=24, help="adapted slices (ViT-B q and v: 24)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    d, r = args.dim, args.rank

    def factors(n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return [rng.normal(size=(d, r)) for _ in range(n)], [rng.normal(size=(r, d)) for _ in range(n)]

    for n in (10, args.clients):
        bs, as_ = factors(n)
        for method in ("qr", "dense", "auto"):
            t = best_of(args.repeats, lambda: aggregate_product_space(bs, as_, np.ones(n), r, method=method))
            print(f"aggregate_product_space n={n:4d} method={method:5s} {t:.4f} s")

    names = [f"t{i}" for i in range(args.targets)]
    root = {k: (rng.normal(size=(d, r)), rng.normal(size=(r, d))) for k in names}
    clients = [{k: (b + 0.1 * rng.normal(size=b.shape), a + 0.1 * rng.normal(size=a.shape))
                for k, (b, a) in root.items()} for _ in range(args.clients)]
    heads = [rng.normal(size=10 * d + 10) for _ in range(args.clients)]
    t = best_of(args.repeats, lambda: update_distance(clients, root, heads))
    print(f"update_distance {args.clients} clients x {args.targets} targets {t:.3f} s")
    t = best_of(args.repeats, lambda: subspace_distance(subspace_bases(clients, root, r)))
    print(f"subspace_distance(subspace_bases) {args.clients} clients x {args.targets} targets {t:.3f} s")
    distance = update_distance(clients, root, heads)
    t = best_of(args.repeats, lambda: lsac(distance))
    print(f"lsac {args.clients} clients {t:.3f} s")


if __name__ == "__main__":
    main()
