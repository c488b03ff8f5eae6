"""Helpers shared by the issue-7 benchmarks: machine description, load, interleaved timing, output.

Every figure these benchmarks report is a ratio of two contenders timed side by side in one run
(repetitions interleaved, order alternating, medians), because other work shares the machine; the
1-minute load average is recorded before and after each measurement."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


_LIMITS: list[object] = []


def set_threads(threads: int) -> int:
    """Use ``threads`` BLAS/OpenMP threads in this process (and in subprocesses it starts).

    The benchmarks default to 1: on this shared 2-core VM other test suites keep the load above the
    core count, and OpenBLAS's worker threads then spin-wait on each other (measured: a 768 x 768
    SVD took 3.0 s with 1 thread and 14-21 s with 2 at load 10)."""
    from threadpoolctl import threadpool_limits

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    _LIMITS.append(threadpool_limits(threads))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threads


def load() -> list[float]:
    """os.getloadavg(), rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, object]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gb": mem_gb, "python": platform.python_version()}


def interleaved(contenders: Mapping[str, Callable[[], object]], repeats: int,
                warmup: bool = True) -> dict[str, list[float]]:
    """Wall times of each contender, ``repeats`` rounds, round-robin with the order reversed every
    other round (so neither side always runs first after the other)."""
    names = list(contenders)
    if warmup:
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def result(name: str, ratio: float, target: str, met: bool, **extra: object) -> dict[str, object]:
    out: dict[str, object] = {"name": name, "ratio": float(f"{float(ratio):.4g}"), "target": target, "met": bool(met)}
    out.update(extra)
    return out


def emit(results: list[dict[str, object]], as_json: bool, header: Mapping[str, object]) -> None:
    """One JSON object per target (with the header's fields merged in) or a readable table."""
    if as_json:
        for item in results:
            print(json.dumps({**header, **item}, default=float), flush=True)
        return
    print(json.dumps(dict(header), default=float))
    for item in results:
        extras = {k: v for k, v in item.items() if k not in ("name", "ratio", "target", "met")}
        flag = "MET " if item["met"] else "MISS"
        print(f"[{flag}] {item['name']}: ratio {item['ratio']} (target {item['target']}) {json.dumps(extras, default=float)}")
