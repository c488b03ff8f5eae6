"""Exact product-space aggregation (method.md section 2) against the naive form, at ViT-B shapes.

    python bench/aggregation.py [--quick] [--json] [--repeats 3] [--matrices 24]

For n in {10, 100, 1000} clients and ``--matrices`` adapted matrices (ViT-B's q and v: 24, d = 768,
r = 8), times per round of aggregation (the sum over matrices of per-matrix medians):

- ``fast``: ``shared.aggregate.aggregate_product_space(method="auto")`` on the float32 uploads,
  i.e. the QR core when n r < d, else the sum path (certified subspace iteration on the implicit
  sum, falling back to the accumulated d x d sum and a direct truncated SVD);
- ``naive``: the d x d sum built client by client in float64 (``dW += w_i B_i A_i``), then a full
  ``np.linalg.svd`` (the same sign and padding conventions);
- ``previous``: the code before this change for the sum path (the sum accumulated by stacked
  products, then a full SVD), for reference.

Uploads: ``round`` data, what a round aggregates (every client moved a few percent from one
shared root, B orthonormal and A with singular values 2..1, by a drift shared by all clients
plus a move of its own of the same size), and ``flat`` data (independent random
factors: a flat spectrum with no gap at rank r, the worst case for the subspace iteration).
Repetitions are interleaved; ratios are naive / fast. The flat cases use ``--flat-matrices`` (4)
matrices. ``--quick`` keeps every n but only 2 matrices, and flat data at n = 1000 only.
Equality: the largest difference of the factors against the naive ones (B absolute, A relative to
the top singular value). Memory: peak of tracemalloc during one fast call, against the O(d^2 n) of
one d x d matrix per client. BLAS runs single-threaded (``--threads``, see bench/_common.py).
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc

import numpy as np

import _common  # noqa: F401  (puts the repository root on sys.path)
from _common import emit, interleaved, load, machine, median, result, set_threads

from shared.aggregate import _factors_from_svd, aggregate_product_space  # noqa: E402

D, R = 768, 8


def make_uploads(kind: str, n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = rng.uniform(50, 500, size=n)          # sample counts
    if kind == "flat":
        Bs = [rng.standard_normal((D, R), dtype=np.float32) for _ in range(n)]
        As = [rng.standard_normal((R, D), dtype=np.float32) for _ in range(n)]
        return Bs, As, weights
    B_root = np.linalg.qr(rng.standard_normal((D, R)))[0]
    A_root = np.diag(np.linspace(2.0, 1.0, R)) @ rng.standard_normal((R, D)) / np.sqrt(D)
    step = 0.05                                      # each client: a shared drift plus its own move
    drift_B, drift_A = rng.standard_normal((D, R)), rng.standard_normal((R, D))
    Bs = [(B_root + step * (drift_B + rng.standard_normal((D, R))) / np.sqrt(D)).astype(np.float32)
          for _ in range(n)]
    As = [(A_root + step * (drift_A + rng.standard_normal((R, D))) / np.sqrt(D)).astype(np.float32)
          for _ in range(n)]
    return Bs, As, weights


def noise_scale(Bs, As, w) -> float:  # noqa: ANN001
    return float(sum(wi * np.linalg.norm(B.astype(np.float64)) * np.linalg.norm(A.astype(np.float64))
                     for wi, B, A in zip(w, Bs, As)))


def naive(Bs, As, weights, rank):  # noqa: ANN001, ANN201
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    dense = np.zeros((Bs[0].shape[0], As[0].shape[1]))
    for wi, B, A in zip(w, Bs, As):
        dense += wi * (B.astype(np.float64) @ A.astype(np.float64))
    U, s, Vt = np.linalg.svd(dense, full_matrices=False)
    return _factors_from_svd(U[:, :rank], s[:rank], Vt[:rank].T, rank, noise_scale(Bs, As, w))


def previous(Bs, As, weights, rank):  # noqa: ANN001, ANN201
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    weighted = [wi * B.astype(np.float64) for wi, B in zip(w, Bs)]
    A64 = [A.astype(np.float64) for A in As]
    dense = np.zeros((Bs[0].shape[0], As[0].shape[1]))
    for start in range(0, len(weighted), 64):          # 64 clients x r = 512 columns per product
        dense += np.hstack(weighted[start:start + 64]) @ np.vstack(A64[start:start + 64])
    U, s, Vt = np.linalg.svd(dense, full_matrices=False)
    return _factors_from_svd(U[:, :rank], s[:rank], Vt[:rank].T, rank, noise_scale(Bs, As, w))


def fast(Bs, As, weights, rank):  # noqa: ANN001, ANN201
    return aggregate_product_space(Bs, As, weights, rank)


def peak_bytes(fn) -> int:  # noqa: ANN001
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def run_case(kind: str, n: int, matrices: int, repeats: int, with_previous: bool) -> dict[str, object]:
    load_before = load()
    totals: dict[str, float] = {"naive": 0.0, "fast": 0.0, "previous": 0.0}
    b_err = a_err = 0.0
    peak_fast = 0
    for m in range(matrices):
        Bs, As, w = make_uploads(kind, n, seed=1000 * n + m)
        outputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def keep(name: str, fn, Bs=Bs, As=As, w=w, outputs=outputs):  # noqa: ANN001, ANN202
            return lambda: outputs.setdefault(name, fn(Bs, As, w, R))

        contenders = {"naive": keep("naive", naive), "fast": keep("fast", fast)}
        if with_previous:
            contenders["previous"] = keep("previous", previous)
        times = interleaved(contenders, repeats, warmup=False)
        for name, values in times.items():
            totals[name] += median(values)
        (Bn, An), (Bf, Af) = outputs["naive"], outputs["fast"]
        top = float(np.linalg.norm(An[0]))
        b_err = max(b_err, float(np.abs(Bf - Bn).max()))
        a_err = max(a_err, float(np.abs(Af - An).max()) / top)
        if m == 0:
            peak_fast = peak_bytes(lambda Bs=Bs, As=As, w=w: fast(Bs, As, w, R))
    out = {"kind": kind, "n": n, "matrices": matrices, "repeats": repeats,
           "naive_s": round(totals["naive"], 4), "fast_s": round(totals["fast"], 4),
           "ratio": totals["naive"] / totals["fast"], "max_abs_err_B": b_err, "max_rel_err_A": a_err,
           "peak_fast_MB": round(peak_fast / 2**20, 1),
           "one_dxd_per_client_MB": round(D * D * 8 * n / 2**20, 1),
           "load_before": load_before, "load_after": load()}
    if with_previous:
        out["previous_s"] = round(totals["previous"], 4)
        out["ratio_vs_previous"] = totals["previous"] / totals["fast"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 matrices, round data (+ flat at n = 1000)")
    parser.add_argument("--json", action="store_true", help="one JSON object per target")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matrices", type=int, default=24)
    parser.add_argument("--flat-matrices", type=int, default=4, help="matrices of the flat-spectrum cases")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (see bench/_common.py)")
    args = parser.parse_args()
    set_threads(args.threads)
    matrices = 2 if args.quick else args.matrices
    started = time.perf_counter()
    cases = [("round", n) for n in args.clients]
    cases += [("flat", n) for n in args.clients if not args.quick or n == max(args.clients)]
    results = []
    for kind, n in cases:
        case = run_case(kind, n, matrices if kind == "round" else min(matrices, args.flat_matrices), args.repeats,
                        with_previous=n >= 100)
        print(f"# {kind} n={n}: naive {case['naive_s']} s, fast {case['fast_s']} s, load {case['load_after']}",
              file=sys.stderr, flush=True)
        ratio = case.pop("ratio")
        label = f"aggregation {kind} n={n} vs naive (d x d sum + full SVD)"
        if kind == "round" and n >= 100:
            results.append(result(label, ratio, ">= 10", ratio >= 10, **case))
        else:
            results.append(result(label, ratio, "report (no target)", True, **case))
        tolerance_ok = case["max_abs_err_B"] <= 1e-9 and case["max_rel_err_A"] <= 1e-9
        results.append(result(f"aggregation {kind} n={n} equals naive", max(case["max_abs_err_B"], case["max_rel_err_A"]),
                              "<= 1e-9 (factor-wise)", tolerance_ok))
        memory_ratio = case["peak_fast_MB"] / case["one_dxd_per_client_MB"]
        results.append(result(f"aggregation {kind} n={n} peak memory / (n d^2 float64)", memory_ratio,
                              "< 0.25 (never O(d^2 n))", memory_ratio < 0.25,
                              peak_fast_MB=case["peak_fast_MB"], one_dxd_per_client_MB=case["one_dxd_per_client_MB"]))
    header = {"bench": "aggregation", "machine": machine(), "threads": args.threads,
              "command": "python " + " ".join(sys.argv),
              "bench_wall_s": round(time.perf_counter() - started, 1)}
    emit(results, args.json, header)


if __name__ == "__main__":
    main()
