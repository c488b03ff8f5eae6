"""The Dockerfile and compose.yaml for real (issue 19): both targets are built with podman on a base
made from Debian's packages, and the compose demo federation runs from those images.

The public base images (python, postgres) come from a container registry our machines cannot
reach, so the base is made here: ``mmdebstrap`` writes a minimal Debian root file system (python3,
venv, CA certificates) from this machine's apt sources, ``podman import`` turns it into an image, and
a venv first on PATH makes it a base the Dockerfile accepts (Debian's own python3 refuses
``pip install``). The images are then built as a user would, ``--target coordinator`` with
``PYTHON_BASE`` and ``--target worker`` with ``WORKER_BASE`` set to that base; the build
containers see this machine's pip configuration (config files, certificate bundle, local package
indexes) through read-only mounts, so nothing of this machine ends up in the images.

compose.yaml's services are run with ``podman run`` from the file's own environment, commands,
entrypoints and volumes, with two changes: the host's network (every address is loopback), and
PostgreSQL from tests/pg.py in place of the ``postgres:15`` image. The setup service creates the
federation and writes the worker configs, both workers train it to ``serving`` with the demo's
three planted clusters found, a second setup run changes nothing, and ``podman stop`` with
compose's grace period ends each worker with exit code 0.

Everything lives in a private podman store under the test's temporary folder, removed at the end.
Needs root, podman (runc or crun) and mmdebstrap (.ci/run installs them from Debian); skipped
otherwise, unless HILORA_TEST_CONTAINERS=required (CI), where it fails.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
SECRETS = {"HILORA_ADMIN_TOKEN": "containers-test-admin-token-0123456789",
           "HILORA_METRICS_TOKEN": "containers-test-metrics-token-0123456789",
           "POSTGRES_PASSWORD": "containers-test-password"}
BASE = "localhost/hilora-test-python:latest"
COORDINATOR = "localhost/hilora-coordinator:test"
WORKER = "localhost/hilora-worker:test"


def _unavailable() -> str | None:
    for tool in ("podman", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install podman runc mmdebstrap)"
    if os.geteuid() != 0:
        return "needs root (rootful podman and mmdebstrap)"
    if shutil.which("runc") is None and shutil.which("crun") is None:
        return "no OCI runtime (apt-get install runc)"
    return None


def _run(args: list[str], *, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check:
        assert proc.returncode == 0, (args[:6], proc.stdout[-3000:], _quiet(proc.stderr)[-3000:])
    return proc


def _quiet(text: str) -> str:
    """pip's noise about configured local indexes that have no page for a package, left out."""
    return "\n".join(line for line in text.splitlines() if "is ignored: it is neither a file nor a directory" not in line)


class Podman:
    """podman on a private store (``--root``/``--runroot`` under ``folder``) with its own
    containers.conf: runc when installed (crun refuses this VM's hybrid cgroups) and ulimits
    within the host's hard limits (podman's default raises RLIMIT_NPROC, which a VM may forbid)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        nofile = min(16384, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        nproc = min(4096, resource.getrlimit(resource.RLIMIT_NPROC)[1])
        conf = folder / "containers.conf"
        conf.write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            "[engine]\n"
            f'runtime = "{"runc" if shutil.which("runc") else "crun"}"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n')
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.argv = ["podman", "--root", str(folder / "storage"), "--runroot", str(folder / "run")]

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return _run([*self.argv, *args], timeout=timeout, check=check, env=self.env)

    def logs(self, name: str) -> str:
        proc = self("logs", "--tail", "40", name, check=False)
        return _quiet(proc.stdout + proc.stderr)

    def remove_everything(self) -> None:
        for args in (["rm", "--all", "--force", "--time", "0"], ["volume", "rm", "--all", "--force"],
                     ["rmi", "--all", "--force"]):
            self(*args, check=False, timeout=300)
        shutil.rmtree(self.folder, ignore_errors=True)


def _pip_mounts() -> list[str]:
    """``-v`` options giving a build container this machine's pip configuration, read-only: the
    config files, and every absolute path they name (certificate bundle, constraint file, local
    index and find-links folders). Run as root, the build's pip reads /root/.config/pip."""
    home = Path.home()
    mounts: dict[Path, str] = {}
    for path, target in ((Path("/etc/pip.conf"), "/etc/pip.conf"), (Path("/etc/xdg/pip"), "/etc/xdg/pip"),
                         (home / ".config" / "pip", "/root/.config/pip"), (home / ".pip", "/root/.pip")):
        if path.exists():
            mounts[path] = target
    proc = _run([sys.executable, "-m", "pip", "config", "list"], check=False, timeout=60)
    values = [line.partition("=")[2].strip().strip("'\"") for line in proc.stdout.splitlines()]
    values += [v for k, v in os.environ.items() if k.startswith("PIP_")]
    for value in values:
        for item in value.split():
            item = item.removeprefix("file://")
            if not item.startswith("/"):
                continue
            path = Path(item)
            if path.name == "simple":   # a local index: its files lie beside it
                path = path.parent
            if path.exists() and path != Path("/"):
                mounts.setdefault(path, str(path))
    options = []
    for path, target in sorted(mounts.items()):
        options += ["-v", f"{path}:{target}:ro"]
    return options


def _debian_rootfs(out: Path) -> Path:
    """A minimal Debian root file system with python3, its venv module and CA certificates, from this
    machine's apt sources and release."""
    release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    suite = release.get("VERSION_CODENAME", "").strip('"') or "bookworm"
    sources = next((p for p in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
                    if p.is_file() and p.stat().st_size), None)
    tarball = out / "rootfs.tar"
    args = ["mmdebstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
            "--aptopt=Acquire::Retries \"3\"", "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
            suite, str(tarball)]
    if sources is not None:
        args.append(str(sources))
    _run(args, timeout=900)
    return tarball


def _timed(timings: dict[str, float], name: str, started: float) -> None:
    timings[name] = round(time.monotonic() - started, 1)


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("HILORA_TEST_CONTAINERS", "").lower() == "required":
            pytest.fail(f"HILORA_TEST_CONTAINERS=required but {reason}", pytrace=False)
        pytest.skip(f"container tests skipped: {reason}")
    engine = Podman(tmp_path_factory.mktemp("podman"))
    try:
        yield engine
    finally:
        engine.remove_everything()


@pytest.fixture(scope="module")
def images(podman) -> dict[str, float]:
    """The Debian base, then both Dockerfile targets on it; returns how long each step took."""
    timings: dict[str, float] = {}
    mounts = _pip_mounts()
    work = podman.folder / "base"
    work.mkdir()

    started = time.monotonic()
    tarball = _debian_rootfs(work)
    _timed(timings, "debian rootfs (mmdebstrap)", started)
    started = time.monotonic()
    podman("import", "--change", 'CMD ["/bin/sh"]', str(tarball), "localhost/hilora-test-rootfs:latest")
    tarball.unlink()
    (work / "Containerfile").write_text(
        "FROM localhost/hilora-test-rootfs:latest\n"
        "RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --upgrade pip\n"
        "ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n")
    podman("build", "--pull=never", *mounts, "-t", BASE, str(work))
    _timed(timings, "base image (import, venv)", started)

    for target, tag, arg in (("coordinator", COORDINATOR, "PYTHON_BASE"), ("worker", WORKER, "WORKER_BASE")):
        started = time.monotonic()
        podman("build", "--pull=never", "--format", "docker", *mounts, "--build-arg", f"PYTHON_BASE={BASE}",
               "--build-arg", f"{arg}={BASE}", "--target", target, "-t", tag, str(REPO), timeout=1200)
        _timed(timings, f"{target} image", started)
    print("container build timings (s):", json.dumps(timings))
    return timings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)==([^\s;]+)", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1).lower())] = m.group(2)
    return pins


def _installed(podman: Podman, image: str) -> dict[str, str]:
    proc = podman("run", "--rm", "--entrypoint", "pip", image, "list", "--format", "json", "--disable-pip-version-check")
    return {re.sub(r"[-_.]+", "-", p["name"].lower()): p["version"] for p in json.loads(proc.stdout)}


def _wait_ready(podman: Podman, name: str, url: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        state = podman("inspect", name, "--format", "{{.State.Running}}", check=False).stdout.strip()
        assert state == "true", podman.logs(name)
        try:
            if httpx.get(f"{url}/v1/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, podman.logs(name)
        time.sleep(0.5)


def test_both_images_build_on_a_debian_base_with_the_locked_versions(podman, images):
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    pins = _pins()
    for image, must, must_not in ((COORDINATOR, {"fastapi", "sqlalchemy", "psycopg", "hilora"}, {"torch", "timm"}),
                                  (WORKER, {"torch", "timm", "hilora"}, set())):
        installed = _installed(podman, image)
        assert must <= set(installed) and not must_not & set(installed), (image, sorted(installed))
        # every package the lock pins is installed at the pinned version (pip and setuptools are the base's)
        off = {name: (version, pins[name]) for name, version in installed.items() if name in pins and pins[name] != version}
        assert not off, (image, off)
        assert set(installed) - set(pins) <= {"hilora", "pip", "setuptools"}, (image, set(installed) - set(pins))
        podman("run", "--rm", "--entrypoint", "pip", image, "check")
        proc = podman("run", "--rm", "--entrypoint", "hilora", image, "--version")
        assert proc.stdout.strip() == f"hilora {version}", proc.stdout
    info = json.loads(podman("image", "inspect", COORDINATOR).stdout)[0]
    config = info["Config"]
    assert config["User"] == "10001" and config["Cmd"] == ["hilora", "coordinator"]
    health = info.get("Healthcheck") or config.get("Healthcheck")   # podman: top level; docker: in Config
    assert health and "/v1/readyz" in " ".join(health["Test"]), info.keys()
    config = json.loads(podman("image", "inspect", WORKER).stdout)[0]["Config"]
    assert config["User"] == "10001" and config["Entrypoint"] == ["hilora", "worker", "--state-dir", "/state"]


def test_the_coordinator_image_serves_on_postgres(podman, images, pg_server):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    podman("run", "-d", "--name", "coordinator-pg", "--network", "host",
           "-e", f"HILORA_DATABASE_URL={pg_server.create_database()}", "-e", f"HILORA_PORT={port}",
           "-e", "HILORA_HOST=127.0.0.1", "-e", f"HILORA_ADMIN_TOKEN={SECRETS['HILORA_ADMIN_TOKEN']}", COORDINATOR)
    try:
        _wait_ready(podman, "coordinator-pg", url)
        # the image's own HEALTHCHECK passes (it reads HILORA_PORT)
        podman("healthcheck", "run", "coordinator-pg", timeout=60)
        proc = podman("exec", "-e", f"HILORA_ADMIN_TOKEN={SECRETS['HILORA_ADMIN_TOKEN']}", "-e",
                      f"HILORA_COORDINATOR={url}", "coordinator-pg", "hilora", "admin", "list")
        assert "no federation yet" in proc.stdout, proc.stdout
        assert podman("exec", "coordinator-pg", "id", "-u").stdout.strip() == "10001"
    finally:
        podman("rm", "--force", "--time", "5", "coordinator-pg", check=False)


# ------------------------------------------------------------------------------- compose.yaml

VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?[^}]*\}")


def _compose_args(name: str, service: dict, *, coordinator_url: str, prefix: str,
                  extra_env: dict[str, str] | None = None, extra_volumes: tuple[str, ...] = ()) -> list[str]:
    """``podman run`` options and arguments for a compose service: its environment (required
    variables from SECRETS), volumes (named ones prefixed, ./ paths from the repository), entrypoint
    and command, on the host's network with the coordinator's address on loopback."""
    def fix(value: str) -> str:
        value = VAR.sub(lambda m: SECRETS[m.group(1)], str(value))
        return value.replace("http://coordinator:8700", coordinator_url)

    env = {key: fix(value) for key, value in (service.get("environment") or {}).items()}
    env.update(extra_env or {})
    args = ["--name", f"{prefix}-{name}", "--network", "host"]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    for volume in service.get("volumes") or []:
        source, rest = volume.split(":", 1)
        source = str((REPO / source).resolve()) if source.startswith(".") else f"{prefix}-{source}"
        args += ["-v", f"{source}:{rest}"]
    for volume in extra_volumes:
        args += ["-v", volume]
    if "entrypoint" in service:
        args += ["--entrypoint", json.dumps(service["entrypoint"])]
    args.append({"coordinator": COORDINATOR}.get(service["build"]["target"], WORKER))
    return args + [fix(part) for part in service.get("command") or []]


@pytest.fixture
def demo_cache(tmp_path) -> Path:
    """The demo backbone pretrained by this checkout (once, cached in HILORA_CACHE_DIR), copied where
    the setup container (uid 10001) can read it: compose's setup would otherwise pretrain it inside
    the container (minutes on a shared 2-core machine)."""
    from worker.backbone import pretrain_demo_backbone

    artifact = pretrain_demo_backbone()
    cache = tmp_path / "hilora-cache"
    (cache / "backbones").mkdir(parents=True)
    shutil.copy2(artifact.path, cache / "backbones" / artifact.path.name)
    for path in (cache, cache / "backbones", *cache.rglob("*")):
        path.chmod(0o777 if path.is_dir() else 0o666)
    return cache


def test_the_compose_demo_federation_runs_from_the_images(podman, images, pg_server, demo_cache):
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    assert services["postgres"]["image"] == "postgres:15"   # replaced by tests/pg.py's server here
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    prefix = "demo"
    for volume in compose["volumes"]:
        if volume != "pgdata":
            podman("volume", "create", f"{prefix}-{volume}")
    coordinator_env = {"HILORA_DATABASE_URL": pg_server.create_database(), "HILORA_HOST": "127.0.0.1",
                       "HILORA_PORT": str(port)}
    setup_cache = f"{demo_cache}:{services['setup']['environment']['HILORA_CACHE_DIR']}"
    workers = [name for name, s in services.items() if name.startswith("worker-")]
    assert len(workers) == 2
    grace = int(re.fullmatch(r"(\d+)s", services[workers[0]]["stop_grace_period"]).group(1))
    started = time.monotonic()
    try:
        podman("run", "-d", *_compose_args("coordinator", services["coordinator"], coordinator_url=url,
                                           prefix=prefix, extra_env=coordinator_env))
        _wait_ready(podman, f"{prefix}-coordinator", url)

        proc = podman("run", "--rm", *_compose_args("setup", services["setup"], coordinator_url=url, prefix=prefix,
                                                     extra_volumes=(setup_cache,)), timeout=600)
        m = re.search(r"setup: created federation (\d+) \(compose-demo\); wrote /config/worker-1.json, "
                      r"/config/worker-2.json", proc.stdout)
        assert m, proc.stdout + _quiet(proc.stderr)
        fid = int(m.group(1))

        for name in workers:
            podman("run", "-d", *_compose_args(name, services[name], coordinator_url=url, prefix=prefix))

        import httpx

        headers = {"Authorization": f"Bearer {SECRETS['HILORA_ADMIN_TOKEN']}"}
        deadline = time.monotonic() + 900
        while True:
            state = httpx.get(f"{url}/v1/federations/{fid}", headers=headers, timeout=10).json()["state"]
            if state == "serving":
                break
            for name in workers:
                running = podman("inspect", f"{prefix}-{name}", "--format", "{{.State.Running}}").stdout.strip()
                assert running == "true", podman.logs(f"{prefix}-{name}")
            assert time.monotonic() < deadline, (state, podman.logs(f"{prefix}-worker-1"))
            time.sleep(2)
        served = time.monotonic() - started

        # compose's `exec coordinator hilora admin status`: the three planted groups found
        proc = podman("exec", "-e", f"HILORA_COORDINATOR={url}", f"{prefix}-coordinator", "hilora", "admin",
                      "status", "--federation", str(fid))
        assert re.search(r"state\s+serving", proc.stdout) and "K=3" in proc.stdout, proc.stdout
        assert "15 (15 training" in proc.stdout, proc.stdout

        # a second setup run sees its marker and changes nothing
        proc = podman("run", "--rm", *_compose_args("setup", services["setup"], coordinator_url=url, prefix=prefix,
                                                     extra_volumes=(setup_cache,)), timeout=300)
        assert f"setup: federation {fid} (compose-demo) exists, state serving" in proc.stdout, proc.stdout

        # `docker compose stop`: each worker exits 0 within compose's grace period
        for name in workers:
            podman("stop", "--time", str(grace), f"{prefix}-{name}", timeout=grace + 60)
            code = podman("inspect", f"{prefix}-{name}", "--format", "{{.State.ExitCode}}").stdout.strip()
            assert code == "0", podman.logs(f"{prefix}-{name}")
        print(f"compose demo: serving {served:.0f} s after the coordinator started (build {images})")
    finally:
        for name in ("coordinator", *workers):
            podman("rm", "--force", "--time", "5", f"{prefix}-{name}", check=False)
