"""The wheel works (issue 19): ``python -m build`` makes an sdist and a wheel holding everything the
coordinator needs at run time; ``pip install`` of that wheel into a clean venv (no torch) runs
``hilora migrate``, a real ``hilora coordinator`` and ``hilora admin create`` with the adapter
manifest computed torch-free, and the commands that need an extra say which in one line;
``hilora[worker]`` from the same wheel, in another clean venv, runs ``hilora demo`` offline.

Both venvs are made with ``python -m venv`` from the base interpreter (none of this project's venv
is visible in them) and filled by their own pip from the machine's configured package index, with
constraints.txt (the versions CI's own venv has, so torch is the same release and file); torch
comes from there, never from the internet (HF_HUB_OFFLINE=1, and the demo's backbone comes from
the HILORA_CACHE_DIR cache, warmed here). ``--no-compile`` skips byte-compiling torch's thousands
of modules at install (they compile as they are imported). pip's own cache is left on: a
dependency that only comes as an sdist is built into a wheel once and reused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "wheel-test-admin-token-0123456789"
WORKER_EXTRA = 'pip install "hilora[worker]"'


def _run(args: list[str], *, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="session")
def dist(tmp_path_factory) -> Path:
    """``python -m build`` of the checkout (the sdist, then the wheel built from the sdist)."""
    pytest.importorskip("build", reason="the test extra installs `build` (pip install -e '.[test]')")
    out = tmp_path_factory.mktemp("dist")
    proc = _run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def wheel(dist) -> Path:
    (found,) = dist.glob("hilora-*-py3-none-any.whl")
    return found


def _clean_env(venv: Path, **extra: str) -> dict[str, str]:
    """The environment of a command in ``venv``: no HILORA_* setting, no PYTHONPATH or VIRTUAL_ENV of
    ours, the venv's bin first on PATH, nothing fetched from a model hub."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HILORA_", "PYTHON", "VIRTUAL_ENV", "PYTEST", "COV_"))}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.update(extra)
    return env


def _make_venv(root: Path, requirement: str) -> Path:
    """A clean venv at ``root`` with ``requirement`` installed by its own pip, constrained by the lock."""
    proc = _run([sys.executable, "-m", "venv", "--clear", str(root)])
    assert proc.returncode == 0, proc.stderr
    proc = _run([str(root / "bin" / "python"), "-m", "pip", "install", "--no-compile", "-c", str(REPO / "constraints.txt"),
                 requirement], env=_clean_env(root), cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


@pytest.fixture(scope="session")
def coordinator_venv(tmp_path_factory, wheel) -> Path:
    root = tmp_path_factory.mktemp("coordinator-only") / "venv"
    try:
        yield _make_venv(root, str(wheel))
    finally:
        shutil.rmtree(root, ignore_errors=True)   # pytest keeps its last 3 temp folders: not 250 MB venvs


def _hilora(venv: Path, *args: str, cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return _run([str(venv / "bin" / "hilora"), *args], cwd=cwd, timeout=timeout, env=_clean_env(venv, **env))


def _one_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2 and one line on stderr naming ``words``, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_the_wheel_and_the_sdist_hold_what_the_coordinator_needs(dist, wheel):
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = setuptools["packages"]
    names = set(zipfile.ZipFile(wheel).namelist())
    # every package of the checkout that the wheel ships is listed, and every module of it is in the wheel
    for top in {p.split(".")[0] for p in packages}:
        for init in (REPO / top).rglob("__init__.py"):
            package = ".".join(init.parent.relative_to(REPO).parts)
            assert package in packages, f"{package} is a package of the checkout but not in [tool.setuptools]"
    for package in packages:
        folder = REPO.joinpath(*package.split("."))
        for module in folder.glob("*.py"):
            assert module.relative_to(REPO).as_posix() in names, module
    # the run-time data files: migrations, the dashboard, the built-in partitions
    for pattern in ("migrations/alembic.ini", "migrations/script.py.mako", "migrations/env.py",
                    "migrations/versions/*.py", "coordinator/dashboard/*.html", "coordinator/dashboard/*.js",
                    "coordinator/dashboard/*.css", "worker/partitions/*.json"):
        expected = {p.relative_to(REPO).as_posix() for p in REPO.glob(pattern)}
        assert expected and expected <= names, (pattern, expected - names)
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]
    info = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheel).read(info).decode()
    for extra in ("worker", "postgres", "demo", "bench", "test"):
        assert f"Provides-Extra: {extra}" in metadata
    assert re.search(r"^Requires-Dist: torch.*extra == \"worker\"", metadata, re.M)
    assert not re.search(r"^Requires-Dist: torch[^;]*$", metadata, re.M)   # torch only with the worker extra
    entry_points = zipfile.ZipFile(wheel).read(info.replace("METADATA", "entry_points.txt")).decode()
    assert "hilora = hilora.cli:main" in entry_points
    # the sdist builds that wheel (python -m build made the wheel from it) and carries the same files
    import tarfile

    (sdist,) = dist.glob("hilora-*.tar.gz")
    in_sdist = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    assert {"pyproject.toml", "README.md", "LICENSE"} <= in_sdist
    shipped = {n for n in names if ".dist-info/" not in n}
    assert shipped <= in_sdist, shipped - in_sdist


def _write_vit_federation(folder: Path, venv: Path) -> Path:
    """A federation file naming timm's ViT-Ti/16 with 10 classes and a safetensors checkpoint of its
    shapes (written by the venv's numpy: no torch anywhere)."""
    script = (
        "import numpy as np, sys\n"
        "from safetensors.numpy import save_file\n"
        "rng = np.random.default_rng(0)\n"
        "t = {}\n"
        "for i in range(12):\n"
        "    t[f'blocks.{i}.attn.qkv.weight'] = rng.normal(size=(576, 192)).astype(np.float32)\n"
        "    t[f'blocks.{i}.attn.qkv.bias'] = np.zeros(576, np.float32)\n"
        "t['head.weight'] = rng.normal(size=(10, 192)).astype(np.float32)\n"
        "t['head.bias'] = np.zeros(10, np.float32)\n"
        "save_file(t, sys.argv[1])\n")
    checkpoint = folder / "vit_ti16.safetensors"
    proc = _run([str(venv / "bin" / "python"), "-c", script, str(checkpoint)], cwd=folder, env=_clean_env(venv))
    assert proc.returncode == 0, proc.stderr
    path = folder / "federation.json"
    path.write_text(json.dumps({"name": "wheel-vit", "adapter": {"rank": 4}, "backbone": {
        "model": "vit_tiny_patch16_224", "model_kwargs": {"num_classes": 10}, "checkpoint": str(checkpoint)},
        "schedule": {"min_clients": 2}}))
    return path


@pytest.mark.timeout(600)
def test_a_coordinator_only_install_serves_and_creates_a_federation(coordinator_venv, tmp_path):
    import httpx

    venv = coordinator_venv
    proc = _run([str(venv / "bin" / "python"), "-c", "import torch"], cwd=tmp_path, env=_clean_env(venv))
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr   # coordinator only
    proc = _run([str(venv / "bin" / "python"), "-c", "import hilora.cli, coordinator.app; print(coordinator.app.__file__)"],
                cwd=tmp_path, env=_clean_env(venv))
    assert proc.returncode == 0 and Path(proc.stdout.strip()).is_relative_to(venv), proc.stdout + proc.stderr

    from importlib.metadata import version

    proc = _hilora(venv, "--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"hilora {version('hilora')}", proc.stderr
    settings = {"HILORA_DATABASE_URL": f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}",
                "HILORA_BLOB_DIR": str(tmp_path / "state" / "blobs"), "HILORA_ADMIN_TOKEN": ADMIN_TOKEN}
    proc = _hilora(venv, "migrate", cwd=tmp_path, **settings)
    assert proc.returncode == 0 and "schema at head" in proc.stdout, proc.stderr

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "coordinator.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen([str(venv / "bin" / "hilora"), "coordinator"], cwd=tmp_path, stdout=log,
                              stderr=subprocess.STDOUT,
                              env=_clean_env(venv, HILORA_PORT=str(port), HILORA_HOST="127.0.0.1", **settings))
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "coordinator.log").read_text()
            try:
                if httpx.get(f"{url}/v1/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "coordinator.log").read_text()
            time.sleep(0.2)

        federation = _write_vit_federation(tmp_path, venv)
        proc = _hilora(venv, "admin", "create", "--config", str(federation), cwd=tmp_path,
                       HILORA_COORDINATOR=url, HILORA_ADMIN_TOKEN=ADMIN_TOKEN)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        fid = int(re.search(r"federation (\d+) created: wheel-vit", proc.stdout).group(1))
        assert "enrollment secret: hle_" in proc.stdout
        proc = _hilora(venv, "admin", "status", "--federation", str(fid), cwd=tmp_path,
                       HILORA_COORDINATOR=url, HILORA_ADMIN_TOKEN=ADMIN_TOKEN)
        assert proc.returncode == 0 and f"federation {fid} wheel-vit" in proc.stdout, proc.stderr
        assert re.search(r"state\s+enrolling", proc.stdout), proc.stdout

        # the manifest and the preprocessing were computed torch-free, as this checkout computes them
        from shared.vit_shapes import vit_manifest

        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        config = httpx.get(f"{url}/v1/federations/{fid}/config", headers=headers, timeout=10).json()
        expected = vit_manifest("vit_tiny_patch16_224", {"num_classes": 10}, rank=4)
        assert config["manifest"] == json.loads(expected.model_dump_json())
        assert len(config["manifest"]["targets"]) == 24 and config["manifest"]["head"]["num_classes"] == 10
        assert config["preprocessing"] == {"input_size": [3, 224, 224], "interpolation": "bicubic",
                                           "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 0.9}
        # the dashboard's static files came with the wheel
        page = httpx.get(f"{url}/dashboard", timeout=10, follow_redirects=True)
        assert page.status_code == 200 and "<html" in page.text.lower()
        for asset in ("dashboard.js", "dashboard.css"):
            served = httpx.get(f"{url}/dashboard/assets/{asset}", timeout=10)
            assert served.status_code == 200 and len(served.content) > 1000, asset
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)
        log.close()


@pytest.mark.timeout(600)
def test_a_coordinator_only_install_names_the_extra_in_one_line(coordinator_venv, tmp_path):
    venv = coordinator_venv
    for args in (["worker", "--coordinator", "http://127.0.0.1:9", "--config", "w.json"],
                 ["predict", "--model", "m.safetensors", "--images", "."], ["demo"], ["bench", "--quick"],
                 ["pretrain-demo-backbone"]):
        _one_line(_hilora(venv, *args, cwd=tmp_path), f"hilora {args[0]} needs torch", WORKER_EXTRA)
    federation = tmp_path / "demo-federation.json"
    federation.write_text(json.dumps({"name": "d", "backbone": {"model": "vit_tiny_patch16_224", "checkpoint": "demo"}}))
    _one_line(_hilora(venv, "admin", "create", "--config", str(federation), cwd=tmp_path,
                      HILORA_ADMIN_TOKEN=ADMIN_TOKEN), '"checkpoint": "demo"', WORKER_EXTRA)
    postgres = "postgresql+psycopg://hilora:pw-not-shown@127.0.0.1:9/hilora"
    for command in ("coordinator", "migrate"):
        proc = _hilora(venv, command, cwd=tmp_path, HILORA_DATABASE_URL=postgres, HILORA_ADMIN_TOKEN=ADMIN_TOKEN)
        _one_line(proc, "HILORA_DATABASE_URL", 'pip install "hilora[postgres]"')
        assert "pw-not-shown" not in proc.stderr
    _one_line(_hilora(venv, "coordinator", cwd=tmp_path, HILORA_PORT="abc", HILORA_ADMIN_TOKEN=ADMIN_TOKEN,
                      HILORA_DATABASE_URL=f"sqlite:///{tmp_path / 'c.db'}"), "HILORA_PORT='abc'")
    assert not (tmp_path / "c.db").exists()


@pytest.fixture(scope="session")
def demo_cache() -> Path:
    """The cache the demo's pretrained tiny ViT lives in (HILORA_CACHE_DIR, else ~/.cache/hilora),
    warmed by this checkout's worker where torch is installed (the wheel's demo finds it there)."""
    cache = Path(os.environ["HILORA_CACHE_DIR"]) if os.environ.get("HILORA_CACHE_DIR") else \
        Path.home() / ".cache" / "hilora"
    try:
        from worker.backbone import pretrain_demo_backbone
    except ImportError:
        return cache   # the wheel's demo pretrains it (about 30 s)
    pretrain_demo_backbone(cache_dir=cache)
    return cache


@pytest.mark.timeout(600)
def test_the_worker_extra_from_the_wheel_runs_the_demo_offline(tmp_path_factory, wheel, demo_cache, tmp_path):
    root = tmp_path_factory.mktemp("worker") / "venv"
    try:
        _worker_extra_runs_the_demo(root, wheel, demo_cache, tmp_path)
    finally:
        shutil.rmtree(root, ignore_errors=True)   # torch's CUDA build: 5.5 GB


def _worker_extra_runs_the_demo(root: Path, wheel: Path, demo_cache: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    venv = _make_venv(root, f"{wheel}[worker]")
    installed = time.monotonic() - started
    proc = _run([str(venv / "bin" / "python"), "-c", "import torch, timm; print(torch.__file__)"], cwd=tmp_path,
                env=_clean_env(venv))
    assert proc.returncode == 0 and Path(proc.stdout.strip()).is_relative_to(venv), proc.stdout + proc.stderr

    before = {p: p.stat().st_mtime for p in demo_cache.glob("backbones/*")}
    report = tmp_path / "demo.json"
    proc = _hilora(venv, "demo", "--partition", "tiny", "--workers", "1", "--root-rounds", "1", "--cluster-rounds",
                   "1", "--leaf-rounds", "1", "--local-epochs", "1", "--timeout", "300", "--report", str(report),
                   cwd=tmp_path, timeout=500, HILORA_CACHE_DIR=str(demo_cache))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ARI" in proc.stdout and "training: +leaf" in proc.stdout
    data = json.loads(report.read_text())
    assert data["clustering"]["k"] >= 1
    for tier in ("root", "cluster", "leaf"):
        assert 0.0 <= data["tiers"][tier]["mean"] <= 1.0
    if before:   # the cached backbone was used as it was: nothing trained or fetched
        assert {p: p.stat().st_mtime for p in demo_cache.glob("backbones/*")} == before
    print(f"worker venv installed in {installed:.0f} s, demo in {time.monotonic() - started - installed:.0f} s")
