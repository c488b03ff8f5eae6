"""Helpers shared by the tests."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def bench_module(filename: str) -> ModuleType:
    """A script of bench/ imported as a module (once per session), for tests that run its ``run``."""
    name = f"hilora_bench_{Path(filename).stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH_DIR / filename)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def run_bench_script(filename: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """``python bench/<filename> args`` from the repository root, one torch thread, with none of the
    caller's HILORA_ settings but the cache directory; output captured as text."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HILORA_") or k == "HILORA_CACHE_DIR"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, str(BENCH_DIR / filename), *args], cwd=BENCH_DIR.parent, env=env,
                          capture_output=True, text=True, timeout=timeout)
