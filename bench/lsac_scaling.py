"""LSAC at scale (method.md section 4, shared/lsac_scale.py): time and memory for many clients at
ViT-B shapes, exact path against the matmul floor, approximate path against the exact clustering.

    python bench/lsac_scaling.py [--quick] [--json] [--targets 24] [--threads 1]

Population: ``--targets`` adapted matrices (ViT-B q and v: 24, d = 768, r = 8) plus a CIFAR-100
head delta (100 x 768 + 100 numbers); 5 planted groups of unequal sizes (35/25/20/12/8 %), every
client = root + step x (its group's direction + noise), uniform noise of the same scale per entry
(noise windows cut at random offsets from one shared bank, so generating 10,000 ViT-B clients does
not take minutes). Data generation is never timed.

1. Exact distances (``update``: Gram of the flattened updates from the factors, cosine;
   ``subspace``: ``||U_i^T U_j||_F^2`` of the bases) for n in {100, 1000}, float32 GEMMs. The
   floor is the GEMM flops the method performs (counted below) over the machine's sgemm rate,
   measured in the same run by a 2048^3 sgemm between the targets (median). Target: time <= 1.5 x
   floor. n = 10,000 exact is not run; its predicted time (flops / rate) is reported.
2. Approximate path (sketch + kNN + sparse affinity + Lanczos + k-means), n in {100, 1000,
   10000}; target: n = 10,000 within 180 s, everything included except data generation.
3. Agreement: at n = 2,000 (``--ari-clients``), ARI of the approximate labels against the exact
   path's labels (``lsac`` on the exact float32 distances), both feature sets. Target >= 0.99.

Memory (tracemalloc): exact path, the peak of one target's computation (its n clients' factors are
the input); approximate path, the sketch matrix (n x width float32), the peak of sketching one
chunk of clients for one target, and the peak of ``approximate_lsac`` on the sketches (kNN blocks,
graph, eigenvectors) - clients are streamed, never all held.
``--quick`` uses 1 target for every part and sketches of 1024 numbers per client (the output
says ``targets``); the targets are judged on the full run.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc

import numpy as np

import _common  # noqa: F401
from _common import emit, load, machine, median, result, set_threads

from shared import lsac_scale as ls  # noqa: E402
from shared.subspace import lsac  # noqa: E402

D, R = 768, 8
HEAD = 100 * 768 + 100
GROUPS = np.array([0.35, 0.25, 0.20, 0.12, 0.08])
CHUNK = 500                     # clients per generated chunk (same data whatever the access order)
STEP, NOISE = 0.05, 0.8
BANK = 1 << 24


class Population:
    """Deterministic planted population, generated per (target, chunk of clients)."""

    def __init__(self, n: int, targets: int, seed: int = 0) -> None:
        self.n, self.targets, self.seed = n, targets, seed
        rng = np.random.default_rng(seed)
        counts = np.floor(GROUPS * n).astype(int)
        counts[0] += n - counts.sum()
        self.truth = rng.permutation(np.repeat(np.arange(len(GROUPS)), counts))
        self.bank = ((rng.random(BANK, dtype=np.float32) - 0.5) * np.sqrt(12.0)).astype(np.float32)
        self.roots = []
        self.directions = []
        for t in range(targets):
            trng = np.random.default_rng((seed, t))
            B0 = np.linalg.qr(trng.standard_normal((D, R)))[0]
            A0 = np.diag(np.linspace(2.0, 1.0, R)) @ trng.standard_normal((R, D)) / np.sqrt(D)
            self.roots.append((B0, A0))
            self.directions.append([(trng.standard_normal((D, R)).astype(np.float32) / np.sqrt(D),
                                     trng.standard_normal((R, D)).astype(np.float32) / np.sqrt(D))
                                    for _ in GROUPS])
        hrng = np.random.default_rng((seed, 10**6))
        self.head_directions = hrng.standard_normal((len(GROUPS), HEAD)).astype(np.float32) / np.sqrt(HEAD)

    def _noise(self, rng: np.random.Generator, count: int, size: int) -> np.ndarray:
        offsets = rng.integers(0, BANK - size, size=count)
        return np.stack([self.bank[o:o + size] for o in offsets])

    def target(self, t: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(Bs, As) of clients [lo, hi) for target t: (m, D, R) and (m, R, D) float32."""
        Bs, As = [], []
        for c in range(lo // CHUNK, (hi + CHUNK - 1) // CHUNK):
            a, b = max(lo, c * CHUNK), min(hi, (c + 1) * CHUNK)
            rng = np.random.default_rng((self.seed, t, c))
            groups = self.truth[c * CHUNK:min(self.n, (c + 1) * CHUNK)]
            m = groups.size
            dirs_B = np.stack([self.directions[t][g][0] for g in groups])
            dirs_A = np.stack([self.directions[t][g][1] for g in groups])
            B0, A0 = self.roots[t]
            B = B0.astype(np.float32) + STEP * (dirs_B + NOISE * self._noise(rng, m, D * R).reshape(m, D, R) / np.sqrt(D))
            A = A0.astype(np.float32) + STEP * (dirs_A + NOISE * self._noise(rng, m, D * R).reshape(m, R, D) / np.sqrt(D))
            Bs.append(B[a - c * CHUNK:b - c * CHUNK])
            As.append(A[a - c * CHUNK:b - c * CHUNK])
        return np.concatenate(Bs), np.concatenate(As)

    def heads(self, lo: int, hi: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, 10**6 + 1, lo, hi))
        groups = self.truth[lo:hi]
        return STEP * (self.head_directions[groups] + NOISE * self._noise(rng, hi - lo, HEAD) / np.sqrt(HEAD))


def sgemm_rate(size: int = 2048) -> float:
    a = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    t0 = time.perf_counter()
    a @ a
    return 2.0 * size**3 / (time.perf_counter() - t0)


def update_flops(n: int) -> float:
    """GEMM flops of ``update_gram_target`` for one target (upper-triangle blocks as performed)."""
    rows = max(1, ls._BLOCK_ENTRIES // max(1, R * R * n))
    pair = sum(2.0 * (min(n, s + rows) - s) * R * (n - s) * R * (D + D) for s in range(0, n, rows))
    prep = 2.0 * n * R * R * D * 2 + 2.0 * n * R * R * D       # B0^T dB, (..) A, R dA
    return pair + prep + 2.0 * n * n * R * D + 1.0 * n * n * R * D   # cross + syrk


def subspace_flops(n: int) -> float:
    rows = max(1, ls._BLOCK_ENTRIES // max(1, R * R * n))
    pair = sum(2.0 * (min(n, s + rows) - s) * R * (n - s) * R * D for s in range(0, n, rows))
    return pair + 2.0 * n * D * R * R * 2                       # Gram dB^T dB, U = dB W


def exact(pop: Population, features: str) -> tuple[np.ndarray, float, float, list[float], int]:
    """Exact distance matrix; returns (D, seconds computing, flops, sgemm rates, peak bytes)."""
    n = pop.n
    gram = np.zeros((n, n))
    seconds, flops, rates, peak = 0.0, 0.0, [], 0
    for t in range(pop.targets):
        Bs, As = pop.target(t, 0, n)
        rates.append(sgemm_rate())
        tracemalloc.start()
        t0 = time.perf_counter()
        if features == "update":
            gram += ls.update_gram_target(pop.roots[t][0], pop.roots[t][1], Bs, As)
            flops += update_flops(n)
        else:
            gram += ls.subspace_overlap_target(ls.subspace_bases_target(pop.roots[t][0], Bs, R))
            flops += subspace_flops(n)
        seconds += time.perf_counter() - t0
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        del Bs, As
    if features == "update":
        heads = pop.heads(0, n)
        t0 = time.perf_counter()
        gram += ls._syrk(heads)
        seconds += time.perf_counter() - t0
        flops += 1.0 * n * n * HEAD
        del heads
        t0 = time.perf_counter()
        distance = ls.cosine_distance_from_gram(gram)
    else:
        t0 = time.perf_counter()
        distance = ls.subspace_distance_from_overlap(gram, R, pop.targets)
    seconds += time.perf_counter() - t0
    rates.append(sgemm_rate())
    return distance, seconds, flops, rates, peak


def approximate(pop: Population, features: str, sketch_dim: int) -> tuple[ls.ApproximateLsacResult, float, int, dict]:
    """Streamed sketches (chunks of clients, all targets) then approximate_lsac."""
    n = pop.n
    sketch = ls.FeatureSketch({f"t{t:02d}": (D, D) for t in range(pop.targets)}, sketch_dim,
                              HEAD if features == "update" else None, seed=7)
    width = sketch.width if features == "update" else sketch.width - sketch.head_width
    Z = np.zeros((n, width), dtype=np.float32)
    seconds = 0.0
    sketch_peak = 0
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        for t in range(pop.targets):
            Bs, As = pop.target(t, lo, hi)
            name = f"t{t:02d}"
            trace = lo == 0 and t == 0
            if trace:
                tracemalloc.start()
            t0 = time.perf_counter()
            if features == "update":
                Z[lo:hi, sketch.columns(name)] = sketch.update_target(name, pop.roots[t][0], pop.roots[t][1], Bs, As)
            else:
                Z[lo:hi, sketch.columns(name)] = sketch.subspace_target(
                    name, ls.subspace_bases_target(pop.roots[t][0], Bs, R))
            seconds += time.perf_counter() - t0
            if trace:
                sketch_peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
        if features == "update":
            heads = pop.heads(lo, hi)
            t0 = time.perf_counter()
            Z[lo:hi, sketch.width - sketch.head_width:] = sketch.heads(heads)
            seconds += time.perf_counter() - t0
            del heads
    sketch_seconds = seconds
    tracemalloc.start()
    t0 = time.perf_counter()
    if features == "update":
        res = ls.approximate_lsac(Z, "cosine")
    else:
        res = ls.approximate_lsac(Z, "inner", scale=float(R * pop.targets))
    seconds += time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return res, seconds, peak, {"sketch_s": round(sketch_seconds, 2), "graph_cluster_s": round(seconds - sketch_seconds, 2),
                                "sketch_width": width, "sketch_matrix_MB": round(Z.nbytes / 2**20, 1),
                                "sketch_chunk_peak_MB": round(sketch_peak / 2**20, 1),
                                "chunk_clients": CHUNK}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 target everywhere, sketches of 1024")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--targets", type=int, default=24)
    parser.add_argument("--exact-clients", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--approx-clients", type=int, nargs="*", default=[100, 1000, 10000])
    parser.add_argument("--ari-clients", type=int, default=2000, help="0: skip the agreement check")
    parser.add_argument("--sketch-dim", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    targets = 1 if args.quick else args.targets
    sketch_dim = 1024 if args.quick else args.sketch_dim
    started = time.perf_counter()
    results = []

    def note(msg: str) -> None:
        print(f"# {msg} load {load()}", file=sys.stderr, flush=True)

    for n in args.exact_clients:
        pop = Population(n, targets)
        for features in ("update", "subspace"):
            load_before = load()
            _, seconds, flops, rates, peak = exact(pop, features)
            rate = median(rates)
            floor = flops / rate
            ratio = seconds / floor
            note(f"exact {features} n={n}: {seconds:.2f} s, floor {floor:.2f} s")
            results.append(result(f"lsac exact {features} n={n} time / matmul floor", ratio, "<= 1.5", ratio <= 1.5,
                                  seconds=round(seconds, 3), floor_s=round(floor, 3), gflop=round(flops / 1e9, 1),
                                  sgemm_gflops=round(rate / 1e9, 1), peak_MB=round(peak / 2**20, 1), targets=targets,
                                  load_before=load_before, load_after=load()))
    rate = sgemm_rate()
    for features, per_n in (("update", update_flops), ("subspace", subspace_flops)):
        results.append(result(f"lsac exact {features} n=10000 (not run): predicted seconds", targets * per_n(10000) / rate,
                              "report", True, targets=targets, sgemm_gflops=round(rate / 1e9, 1)))

    # ARI of the approximate path against the exact clustering.
    pop = Population(args.ari_clients, targets, seed=1)
    for features in (("update", "subspace") if args.ari_clients else ()):
        load_before = load()
        distance, exact_seconds, _, _, _ = exact(pop, features)
        t0 = time.perf_counter()
        exact_result = lsac(distance)
        exact_seconds += time.perf_counter() - t0
        del distance
        approx_result, approx_seconds, _, _ = approximate(pop, features, sketch_dim)
        from sklearn.metrics import adjusted_rand_score

        ari = adjusted_rand_score(exact_result.labels, approx_result.labels)
        note(f"ARI {features} n={pop.n}: {ari:.4f}")
        results.append(result(f"lsac approximate vs exact {features} n={pop.n} ARI", ari, ">= 0.99", ari >= 0.99,
                              exact_k=exact_result.k, approx_k=approx_result.k,
                              ari_exact_vs_truth=round(adjusted_rand_score(pop.truth, exact_result.labels), 4),
                              exact_s=round(exact_seconds, 2), approx_s=round(approx_seconds, 2), targets=targets,
                              load_before=load_before, load_after=load()))
    del pop

    for n in args.approx_clients:
        pop = Population(n, targets, seed=2)
        for features in ("update", "subspace"):
            load_before = load()
            res, seconds, peak, parts = approximate(pop, features, sketch_dim)
            from sklearn.metrics import adjusted_rand_score

            note(f"approximate {features} n={n}: {seconds:.1f} s")
            target = n == 10000
            results.append(result(f"lsac approximate {features} n={n} seconds", seconds,
                                  "<= 180" if target else "report", seconds <= 180 if target else True,
                                  k=res.k, ari_vs_truth=round(adjusted_rand_score(pop.truth, res.labels), 4),
                                  cluster_peak_MB=round(peak / 2**20, 1), targets=targets, load_before=load_before,
                                  load_after=load(), **parts))
        del pop
    header = {"bench": "lsac_scaling", "machine": machine(), "threads": args.threads,
              "command": "python " + " ".join(sys.argv), "bench_wall_s": round(time.perf_counter() - started, 1)}
    emit(results, args.json, header)


if __name__ == "__main__":
    main()
