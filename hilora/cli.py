"""The ``hilora`` command line: coordinator, worker, admin, migrate, export, predict, demo,
pretrain-demo-backbone."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hilora import admin_text

app = typer.Typer(no_args_is_help=True,
                  help="hilora: HiLoRA federated learning (coordinator, workers, demo).")
admin_app = typer.Typer(no_args_is_help=True, help="Admin commands against a running coordinator.")
app.add_typer(admin_app, name="admin")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hilora")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"hilora {_version()}")
        raise typer.Exit(0)


# Commands that need an optional extra, checked before they start (a coordinator-only install, `pip
# install hilora`, has no torch): the extra and the modules it brings.
EXTRAS: dict[str, tuple[str, ...]] = {"worker": ("torch", "timm"), "postgres": ("psycopg",), "demo": ("mlxtend",),
                                      "bench": ("matplotlib", "peft", "mlxtend")}
COMMAND_EXTRAS: dict[str, str] = {"worker": "worker", "predict": "worker", "demo": "worker", "bench": "worker",
                                  "pretrain-demo-backbone": "worker"}
# A module missing at run time -> the extra that installs it (main(): one line instead of a traceback).
MODULE_EXTRAS: dict[str, str] = {"torch": "worker", "timm": "worker", "torchvision": "worker",
                                 "psycopg": "postgres", "psycopg_binary": "postgres", "mlxtend": "demo",
                                 "matplotlib": "bench", "peft": "bench"}


def _missing_extra_line(command: str, modules: list[str], extra: str) -> str:
    who = f"hilora {command}" if command else "hilora"
    return (f"{who} needs {' and '.join(modules)}, which {'is' if len(modules) == 1 else 'are'} not installed "
            f"here: pip install \"hilora[{extra}]\"")


@app.callback()
def _main(ctx: typer.Context, show_version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version, help="print hilora's version and exit")] = False) -> None:
    """hilora: HiLoRA federated learning (coordinator, workers, demo)."""
    from importlib.util import find_spec

    command = ctx.invoked_subcommand
    extra = COMMAND_EXTRAS.get(command or "")
    if extra is None or "--help" in sys.argv[1:]:   # `hilora worker --help` works without the extra
        return
    missing = [m for m in EXTRAS[extra] if find_spec(m) is None]
    if missing:
        _fail(_missing_extra_line(command, missing, extra))


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command()
def coordinator(
    host: Annotated[Optional[str], typer.Option(help="bind address (default HILORA_HOST or 127.0.0.1)")] = None,
    port: Annotated[Optional[int], typer.Option(help="port (default HILORA_PORT or 8700)")] = None,
) -> None:
    """Serve the coordinator API (settings from HILORA_* environment variables)."""
    import uvicorn

    from coordinator.app import create_app
    from coordinator.db import DatabaseUrlError
    from coordinator.logs import configure_logging
    from coordinator.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as exc:
        _fail(str(exc))
    configure_logging(settings.log_format, settings.log_level)
    try:
        app_ = create_app(settings)
    except DatabaseUrlError as exc:
        _fail(str(exc))
    # HILORA_LOG_FORMAT=json: uvicorn's loggers go through our JSON handler, not its own config
    log_config = {"log_config": None} if settings.log_format == "json" else {}
    server = uvicorn.Server(uvicorn.Config(
        app_, host=host or settings.host, port=port if port is not None else settings.port,
        log_level=settings.log_level, limit_concurrency=settings.limit_concurrency,
        timeout_keep_alive=settings.timeout_keep_alive, **log_config))
    app_.state.server = server  # held lease requests (long polling) answer as soon as it begins to stop
    server.run()


@app.command()
def migrate() -> None:
    """Bring the database (HILORA_DATABASE_URL) to the newest schema."""
    from coordinator.db import DatabaseUrlError, make_engine
    from coordinator.migrate import upgrade_to_head

    url = os.environ.get("HILORA_DATABASE_URL", "sqlite:///./hilora-state/coordinator.db")
    try:
        engine = make_engine(url)
    except DatabaseUrlError as exc:
        _fail(str(exc))
    upgrade_to_head(engine)
    typer.echo(f"schema at head: {url.split('@')[-1]}")


@app.command()
def gc(dry_run: Annotated[bool, typer.Option(help="report what would be deleted, delete nothing")] = False) -> None:
    """Garbage-collect now: uploads past HILORA_UPLOAD_RETENTION_SECONDS, unreferenced upload blobs,
    orphan and stale temp files of HILORA_BLOB_DIR. The coordinator also does this every
    HILORA_GC_INTERVAL_SECONDS; adapter versions and backbones are never collected."""
    from datetime import datetime, timezone

    from coordinator.blobs import BlobStore
    from coordinator.db import DatabaseUrlError, make_engine, make_session_factory
    from coordinator.migrate import schema_is_at_head
    from coordinator.services.retention import collect_garbage
    from coordinator.settings import SettingsError, load_settings

    try:
        settings = load_settings()
        engine = make_engine(settings.database_url)
    except (SettingsError, DatabaseUrlError) as exc:
        _fail(str(exc))
    if not schema_is_at_head(engine):
        _fail("the database schema is not at the newest migration: run `hilora migrate` first")
    report = collect_garbage(make_session_factory(engine), BlobStore(settings.blob_dir), datetime.now(timezone.utc),
                             retention_seconds=settings.upload_retention_seconds,
                             grace_seconds=settings.gc_grace_seconds, dry_run=dry_run)
    typer.echo(json.dumps(report.as_dict(), indent=2))


@app.command()
def worker(
    coordinator_url: Annotated[str, typer.Option("--coordinator", envvar="HILORA_COORDINATOR",
                                                 help="coordinator base URL (default: HILORA_COORDINATOR)")],
    config: Annotated[Path, typer.Option(help="worker config file (JSON): federation_id and hosted clients")],
    state_dir: Annotated[Path, typer.Option(help="where client tokens, leaves and local factors live")] = Path(
        "./hilora-worker-state"),
    device: Annotated[str, typer.Option(help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..., or a list "
                                             "('cuda:0,cuda:1'): one training process per device, each taking "
                                             "the next task of the hosted clients")] = "auto",
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads for this process")] = 1,
    worker_id: Annotated[Optional[str], typer.Option(help="name reported on leases")] = None,
    exit_when_idle: Annotated[bool, typer.Option(help="exit once every hosted client is ready")] = False,
    max_seconds: Annotated[Optional[float], typer.Option(help="stop after this many seconds")] = None,
    retries: Annotated[int, typer.Option(min=0, help="retries of a failed request (backoff + jitter)")] = 8,
    grace_seconds: Annotated[float, typer.Option(
        min=0, help="on SIGTERM/SIGINT, let a running task finish if it does within this many seconds; "
                    "else (or on a second signal) release its lease and exit")] = 30.0,
    checkpoint_every: Annotated[int, typer.Option(
        min=0, help="optimizer steps between saves of a training task's progress in --state-dir (0: only when it "
                    "is stopped); a task leased again after a pre-emption resumes from it")] = 100,
    data_workers: Annotated[int, typer.Option(
        min=0, max=64, help="processes decoding a client's images on disk while it trains (0: the worker's own); "
                            "memory per hosted client stays a few batches either way")] = 0,
    long_poll: Annotated[float, typer.Option(
        min=0, max=600, help="with nothing to do, hold one lease request per hosted client up to this many seconds: "
                             "the coordinator answers as soon as a task opens (capped by its "
                             "HILORA_LONG_POLL_MAX_SECONDS); 0 polls every retry_after instead")] = 20.0,
    background_reports: Annotated[bool, typer.Option(
        "--background-reports/--no-background-reports",
        help="upload and complete a trained task in a background thread while the next task is leased and "
             "trained (one report in flight at a time), and, once tasks are known to take under a quarter of "
             "their lease, lease the next hosted client's task while one trains; off: report, then lease, "
             "in turn")] = True,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error or critical")] = "info",
    log_format: Annotated[Optional[str], typer.Option(
        help="'text' or 'json' (one JSON object per line, with the task and client of each line); "
             "default: HILORA_LOG_FORMAT, else text")] = None,
) -> None:
    """Run a worker daemon for the clients listed in --config (exit 0 after a clean stop)."""
    from shared.logformat import check_log_settings, json_to_stderr

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    source = "--log-format" if log_format is not None else "HILORA_LOG_FORMAT"
    log_format = log_format if log_format is not None else os.environ.get("HILORA_LOG_FORMAT", "text")
    try:
        check_log_settings(log_format, "info", source)
        check_log_settings("text", log_level, "--log-level")
    except ValueError as exc:
        _fail(str(exc))
    if log_format == "json":
        from worker.daemon import log_fields

        json_to_stderr(log_level, log_fields)
    else:
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import socket

    from worker.client import CoordinatorClient, CoordinatorError, CoordinatorUnavailable
    from worker.daemon import WorkerDaemon, load_worker_config

    try:
        cfg = load_worker_config(config)
    except ValueError as exc:
        _fail(str(exc))

    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    devices = [d.strip() for d in device.split(",")]
    if not all(devices):
        _fail(f"--device {device!r}: an empty entry; give one device ('auto', 'cpu', 'cuda:1') or a list "
              f"('cuda:0,cuda:1')")
    devices = [("cuda" if torch.cuda.is_available() else "cpu") if d == "auto" else d for d in devices]
    wid = worker_id or f"{socket.gethostname()}-{os.getpid()}"
    if len(devices) > 1:
        code = _worker_per_device(devices, coordinator_url, config, state_dir, threads, wid, exit_when_idle,
                                  max_seconds, retries, grace_seconds, checkpoint_every, data_workers, log_level,
                                  log_format, long_poll, background_reports)
        raise typer.Exit(code)
    device = devices[0]
    with CoordinatorClient(_checked_url(coordinator_url), worker_id=wid, max_retries=retries) as client:
        daemon = WorkerDaemon(client, cfg, state_dir, device=device, exit_when_idle=exit_when_idle,
                              max_seconds=max_seconds, grace_seconds=grace_seconds,
                              checkpoint_every=checkpoint_every, data_workers=data_workers, long_poll=long_poll,
                              background_reports=background_reports)

        def _stop(signum, _frame):  # noqa: ANN001
            daemon.request_stop(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        try:
            daemon.setup()
            code = daemon.run()
        except CoordinatorError as exc:
            _fail(f"coordinator refused: {exc}")
        except CoordinatorUnavailable as exc:
            _fail(f"cannot reach the coordinator: {exc}")
        except ValueError as exc:
            _fail(str(exc))
    raise typer.Exit(code)


def _worker_per_device(devices: list[str], coordinator_url: str, config: Path, state_dir: Path, threads: int,
                       wid: str, exit_when_idle: bool, max_seconds: Optional[float], retries: int,
                       grace_seconds: float, checkpoint_every: int, data_workers: int, log_level: str,
                       log_format: str, long_poll: float, background_reports: bool = True) -> int:
    """``--device cuda:0,cuda:1``: one worker process per device, each hosting every client of the
    config and taking whichever of their tasks it leases next (a client's task goes to one lease at
    a time). The clients are registered (and checked) here first, so that no two processes register
    one; SIGTERM and SIGINT go on to every process; the exit code is the first non-zero one."""
    import subprocess

    from worker.client import CoordinatorClient, CoordinatorError, CoordinatorUnavailable
    from worker.daemon import WorkerDaemon, load_worker_config

    with CoordinatorClient(_checked_url(coordinator_url), worker_id=wid, max_retries=retries) as client:
        try:
            WorkerDaemon(client, load_worker_config(config), state_dir, device=devices[0]).setup()
        except CoordinatorError as exc:
            _fail(f"coordinator refused: {exc}")
        except CoordinatorUnavailable as exc:
            _fail(f"cannot reach the coordinator: {exc}")
        except ValueError as exc:
            _fail(str(exc))
    children = []
    for i, one in enumerate(devices):
        args = [sys.executable, "-m", "hilora.cli", "worker", "--coordinator", coordinator_url, "--config", str(config),
                "--state-dir", str(state_dir), "--device", one, "--threads", str(threads),
                "--worker-id", f"{wid}-{i}", "--retries", str(retries), "--grace-seconds", str(grace_seconds),
                "--checkpoint-every", str(checkpoint_every), "--data-workers", str(data_workers),
                "--log-level", log_level, "--log-format", log_format, "--long-poll", str(long_poll),
                "--background-reports" if background_reports else "--no-background-reports"]
        args += (["--exit-when-idle"] if exit_when_idle else []) + (
            ["--max-seconds", str(max_seconds)] if max_seconds is not None else [])
        children.append(subprocess.Popen(args))
    logging.getLogger("hilora.worker").info("%d worker processes, one per device: %s", len(devices),
                                            ", ".join(devices))

    def _forward(signum, _frame):  # noqa: ANN001
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    codes = [child.wait() for child in children]
    return next((c for c in codes if c != 0), 0)


def _robust(value: Optional[float], default: Optional[float], flag: str) -> Optional[float]:
    """A robust-aggregation flag: unset keeps the default, 0 turns the option off, else >= 1."""
    if value is None:
        return default
    if value == 0:
        return None
    if value < 1:
        _fail(f"{flag} must be 0 (off) or at least 1, got {value}")
    return value


def _leaf_mix(value: float) -> float:
    """--leaf-mix: a share of the leaf's change, above 0 (typer has checked it is at most 1)."""
    if not value > 0:
        _fail(f"--leaf-mix must be above 0 (1: the leaf as trained), got {value}")
    return value


def _admin_token(token: Optional[str]) -> str:
    token = token or os.environ.get("HILORA_ADMIN_TOKEN")
    if not token:
        _fail("give --admin-token or set HILORA_ADMIN_TOKEN")
    return token


AdminToken = Annotated[Optional[str], typer.Option(help="admin token (default: HILORA_ADMIN_TOKEN)")]
CoordinatorUrl = Annotated[str, typer.Option("--coordinator", envvar="HILORA_COORDINATOR",
                                             help="coordinator base URL (default: HILORA_COORDINATOR)")]
FederationId = Annotated[int, typer.Option(help="federation id")]
AsJson = Annotated[bool, typer.Option("--json", help="print the coordinator's answer as JSON instead of text")]
Reason = Annotated[str, typer.Option(help="recorded in the audit log")]
DEFAULT_URL = "http://127.0.0.1:8700"


# A command's tries at an unreachable coordinator: about 4 s of backoff in all (0.25, 0.5, 1, 2 s,
# jittered) before it gives up with one line, instead of a worker's patient 8 tries.
CLI_RETRIES = 4


def _checked_url(coordinator_url: str) -> str:
    """The coordinator URL, or one line naming the option and the variable when it is not an
    http(s) URL with a host (a typo is not a network blip: no retries)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(coordinator_url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as exc:
        _fail(f"--coordinator / HILORA_COORDINATOR {coordinator_url!r} is not a URL ({exc}); "
              f"expected e.g. {DEFAULT_URL}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        _fail(f"--coordinator / HILORA_COORDINATOR {coordinator_url!r} is not an http(s) URL with a host; "
              f"expected e.g. {DEFAULT_URL}")
    return coordinator_url


def _unreachable(coordinator_url: str, exc: Exception) -> None:
    _fail(f"cannot reach the coordinator at {coordinator_url} ({' '.join(str(exc).split())}); is it running "
          f"(hilora coordinator)? Point --coordinator or HILORA_COORDINATOR at it", code=1)


def _call(coordinator_url: str, request):  # noqa: ANN001, ANN202
    """``request(http)`` against the coordinator (a ``worker.client.CoordinatorClient``). An error
    answer ends the command with one line on stderr (status, the coordinator's ``error`` code and
    ``detail``) and exit code 1; so does a coordinator that cannot be reached (after ``CLI_RETRIES``
    tries) and, without any try, a URL that is not one."""
    from worker.client import CoordinatorClient, CoordinatorError, CoordinatorUnavailable

    with CoordinatorClient(_checked_url(coordinator_url), max_retries=CLI_RETRIES) as http:
        try:
            return request(http)
        except CoordinatorError as exc:
            _fail(" ".join(str(exc).split()), code=1)
        except CoordinatorUnavailable as exc:
            _unreachable(coordinator_url, exc)


def _show(as_json: bool, json_text: str, text: str) -> None:
    typer.echo(json_text if as_json else text)


def _admin_request(coordinator_url: str, admin_token: Optional[str], as_json: bool, method: str, path: str,
                   render, **kwargs) -> None:  # noqa: ANN001
    """One admin request; its JSON answer printed as is (``--json``) or as ``render(answer)``."""
    token = _admin_token(admin_token)
    answer = _call(coordinator_url, lambda http: http.request(method, path, token=token, **kwargs).json())
    _show(as_json, json.dumps(answer, indent=2), render(answer))


@admin_app.command("create")
def admin_create(
    config: Annotated[Path, typer.Option(help="federation file (JSON); see docs/usage.md")],
    coordinator_url: CoordinatorUrl = DEFAULT_URL,
    admin_token: AdminToken = None,
    as_json: AsJson = False,
) -> None:
    """Create a federation: upload the backbone, send the config and manifest, print the secret."""
    from hilora.federation_file import build_federation_config, load_federation_file

    token = _admin_token(admin_token)
    try:
        fed_config, checkpoint = build_federation_config(load_federation_file(config), f"federation file {config}")
    except ValueError as exc:
        _fail(str(exc))

    def create(http):  # noqa: ANN001, ANN202
        http.put_blob(token, checkpoint)
        return http.create_federation(token, fed_config)

    created = _call(coordinator_url, create)
    body = {"federation_id": created.federation_id, "name": created.name,
            "enrollment_secret": created.enrollment_secret}
    _show(as_json, json.dumps(body, indent=2), admin_text.created(body))
    typer.echo("keep the enrollment secret: it is shown only once", err=True)


@admin_app.command("list")
def admin_list(coordinator_url: CoordinatorUrl = DEFAULT_URL, admin_token: AdminToken = None,
               as_json: AsJson = False) -> None:
    """List the federations: id, name, state, clients, K of the newest clustering, paused."""
    _admin_request(coordinator_url, admin_token, as_json, "GET", "/v1/federations", admin_text.federations)


@admin_app.command("status")
def admin_status(federation: FederationId, coordinator_url: CoordinatorUrl = DEFAULT_URL,
                 admin_token: AdminToken = None, as_json: AsJson = False) -> None:
    """Print a federation's state, clients, clustering, clusters and newest rounds."""
    token = _admin_token(admin_token)
    status = _call(coordinator_url, lambda http: http.federation_status(token, federation))
    _show(as_json, status.model_dump_json(indent=2), admin_text.status(status.model_dump(mode="json")))


@admin_app.command("report")
def admin_report(federation: FederationId, coordinator_url: CoordinatorUrl = DEFAULT_URL,
                 admin_token: AdminToken = None, as_json: AsJson = False) -> None:
    """Print per-client results of a federation."""
    token = _admin_token(admin_token)
    report = _call(coordinator_url, lambda http: http.federation_report(token, federation))
    _show(as_json, report.model_dump_json(indent=2), admin_text.report(report.model_dump(mode="json")))


@admin_app.command("start")
def admin_start(federation: FederationId, coordinator_url: CoordinatorUrl = DEFAULT_URL,
                admin_token: AdminToken = None, as_json: AsJson = False) -> None:
    """Start training now with the clients registered so far (--json: the federation's status)."""
    token = _admin_token(admin_token)
    status = _call(coordinator_url, lambda http: http.start_federation(token, federation))
    _show(as_json, status.model_dump_json(indent=2), admin_text.started(status.model_dump(mode="json")))


@admin_app.command("pause")
def admin_pause(federation: FederationId, reason: Reason = "", coordinator_url: CoordinatorUrl = DEFAULT_URL,
                admin_token: AdminToken = None, as_json: AsJson = False) -> None:
    """Pause a federation: no round opens or closes and no lease is handed out until resumed."""
    _admin_request(coordinator_url, admin_token, as_json, "POST", f"/v1/federations/{federation}/pause",
                   admin_text.paused, json={"reason": reason})


@admin_app.command("resume")
def admin_resume(federation: FederationId, coordinator_url: CoordinatorUrl = DEFAULT_URL,
                 admin_token: AdminToken = None, as_json: AsJson = False) -> None:
    """Resume a paused federation; open rounds' deadlines move back by the paused time."""
    _admin_request(coordinator_url, admin_token, as_json, "POST", f"/v1/federations/{federation}/resume",
                   admin_text.resumed)


@admin_app.command("cycle")
def admin_cycle(federation: FederationId, reason: Reason = "", coordinator_url: CoordinatorUrl = DEFAULT_URL,
                admin_token: AdminToken = None, as_json: AsJson = False) -> None:
    """Ask for the next cycle: reprobe every active client, recluster with stable cluster ids, train the
    clusters, fresh leaves for clients that moved or are new, evaluate everyone (docs/operations.md,
    "Cycles"). It starts once the federation serves and nothing runs."""
    _admin_request(coordinator_url, admin_token, as_json, "POST", f"/v1/federations/{federation}/cycle",
                   admin_text.cycle_requested, json={"reason": reason})


@admin_app.command("rollback")
def admin_rollback(federation: FederationId,
                   cluster: Annotated[int, typer.Option(min=0, help="the cluster's label (hilora admin status)")],
                   version: Annotated[Optional[int], typer.Option(
                       min=0, help="the adapter version the cluster serves from now on")] = None,
                   unpin: Annotated[bool, typer.Option(help="serve the cluster's newest version again")] = False,
                   reason: Reason = "", coordinator_url: CoordinatorUrl = DEFAULT_URL,
                   admin_token: AdminToken = None, as_json: AsJson = False) -> None:
    """Pin the version a cluster serves (or roll back to an older one), or --unpin; what clients get
    follows it, the cluster's training goes on from its newest (docs/operations.md)."""
    if (version is None) == (not unpin):
        _fail("give exactly one of --version N and --unpin")
    _admin_request(coordinator_url, admin_token, as_json, "POST", f"/v1/federations/{federation}/clusters/{cluster}/pin",
                   admin_text.pinned, json={"version": None if unpin else version, "reason": reason})


@admin_app.command("delete")
def admin_delete(federation: FederationId,
                 confirm: Annotated[str, typer.Option(
                     help="the federation's name, repeated: deleting removes its clients, adapters and uploads for "
                          "good")],
                 coordinator_url: CoordinatorUrl = DEFAULT_URL, admin_token: AdminToken = None,
                 as_json: AsJson = False) -> None:
    """Delete a federation and everything it stored (clients, rounds, uploads, adapters, clusters) with
    the blobs only it used; the audit log keeps the deletion."""
    _admin_request(coordinator_url, admin_token, as_json, "DELETE", f"/v1/federations/{federation}",
                   admin_text.federation_deleted, params={"confirm": confirm})


@admin_app.command("deadline")
def admin_deadline(round_id: Annotated[int, typer.Option("--round", help="round id (hilora admin status)")],
                   extend_minutes: Annotated[Optional[float], typer.Option(
                       min=0.0, help="push the deadline (or now, if it has none) back this long")] = None,
                   at: Annotated[Optional[str], typer.Option(
                       help="the new deadline, ISO 8601 with a timezone (2026-12-01T12:00:00Z)")] = None,
                   coordinator_url: CoordinatorUrl = DEFAULT_URL, admin_token: AdminToken = None,
                   as_json: AsJson = False) -> None:
    """Set or extend the deadline of an open round."""
    if (extend_minutes is None) == (at is None):
        _fail("give exactly one of --extend-minutes and --at")
    body = {"extend_seconds": extend_minutes * 60} if extend_minutes is not None else {"deadline_at": at}
    _admin_request(coordinator_url, admin_token, as_json, "POST", f"/v1/rounds/{round_id}/deadline",
                   admin_text.deadline, json=body)


@admin_app.command("recluster")
def admin_recluster(federation: FederationId,
                    force_k: Annotated[Optional[int], typer.Option(
                        min=1, max=1000, help="take this K instead of the federation's K rule")] = None,
                    features: Annotated[Optional[str], typer.Option(
                        help="'update' or 'subspace' (default: the federation's clustering.features)")] = None,
                    knn: Annotated[Optional[int], typer.Option(
                        min=1, max=1000, help="override clustering.knn")] = None,
                    reason: Reason = "",
                    coordinator_url: CoordinatorUrl = DEFAULT_URL, admin_token: AdminToken = None,
                    as_json: AsJson = False) -> None:
    """Rerun the clustering on the newest done probe round (docs/operations.md, Reclustering);
    prints the run, K, the clusters kept and created and every move."""
    if features is not None and features not in ("update", "subspace"):
        _fail(f"--features must be 'update' or 'subspace', got {features!r}")
    body = {k: v for k, v in (("force_k", force_k), ("features", features), ("knn", knn)) if v is not None}
    _admin_request(coordinator_url, admin_token, as_json, "POST", f"/v1/federations/{federation}/recluster",
                   admin_text.recluster, json={**body, "reason": reason})


def _client_id(http, token: str, federation: int, client: str) -> int:  # noqa: ANN001
    """The id of the federation's client named ``client``, else of the client with that id (a
    name wins, as names may be digits); exit 1 when there is none."""
    rows = http.request("GET", f"/v1/federations/{federation}/report", token=token).json()["clients"]
    named = [row["client_id"] for row in rows if row["name"] == client]
    if named:
        return named[0]
    if client.isdigit() and int(client) in {row["client_id"] for row in rows}:
        return int(client)
    _fail(f"federation {federation} has no client named {client!r}"
          + (f" and no client {client}" if client.isdigit() else ""), code=1)


@admin_app.command("revoke")
def admin_revoke(federation: FederationId,
                 client: Annotated[str, typer.Option(help="client id or name")],
                 reason: Reason = "",
                 coordinator_url: CoordinatorUrl = DEFAULT_URL, admin_token: AdminToken = None,
                 as_json: AsJson = False) -> None:
    """Revoke a client: its token is refused from now on and its open tasks are cancelled; what
    it contributed stays."""
    token = _admin_token(admin_token)

    def revoke(http):  # noqa: ANN001, ANN202
        cid = _client_id(http, token, federation, client)
        return http.request("POST", f"/v1/federations/{federation}/clients/{cid}/revoke", token=token,
                            json={"reason": reason}).json()

    result = _call(coordinator_url, revoke)
    _show(as_json, json.dumps(result, indent=2), admin_text.revoked(result, federation))


@admin_app.command("rotate-secret")
def admin_rotate_secret(federation: FederationId, reason: Reason = "",
                        coordinator_url: CoordinatorUrl = DEFAULT_URL, admin_token: AdminToken = None,
                        as_json: AsJson = False) -> None:
    """Replace the federation's enrollment secret (printed once); the old one stops working at once,
    registered clients keep their tokens."""
    _admin_request(coordinator_url, admin_token, as_json, "POST", f"/v1/federations/{federation}/enrollment-secret",
                   admin_text.secret, json={"reason": reason})
    typer.echo("keep the new enrollment secret: it is shown only once; the old one no longer registers clients",
               err=True)


@admin_app.command("audit")
def admin_audit(federation: FederationId,
                limit: Annotated[int, typer.Option(min=1, max=1000, help="the newest this many events")] = 50,
                coordinator_url: CoordinatorUrl = DEFAULT_URL, admin_token: AdminToken = None,
                as_json: AsJson = False) -> None:
    """The federation's audit log (admin actions), newest first."""
    _admin_request(coordinator_url, admin_token, as_json, "GET", f"/v1/federations/{federation}/audit",
                   admin_text.audit, params={"limit": limit})


@admin_app.command("invite")
def admin_invite(federation: FederationId,
                 count: Annotated[int, typer.Option(min=1, max=1000, help="how many codes (one client each)")] = 1,
                 expires_hours: Annotated[float, typer.Option(min=1 / 60, max=90 * 24,
                                                              help="each code is refused after this long")] = 168.0,
                 note: Annotated[str, typer.Option(help="for you: whom the codes are for (200 characters)")] = "",
                 coordinator_url: CoordinatorUrl = DEFAULT_URL, admin_token: AdminToken = None,
                 as_json: AsJson = False) -> None:
    """Create one-time, expiring registration codes (printed once). Hand one to each site: its
    worker config puts it in the client's "enrollment_secret"."""
    token = _admin_token(admin_token)
    made = _call(coordinator_url, lambda http: http.request(
        "POST", f"/v1/federations/{federation}/invitations", token=token,
        json={"count": count, "expires_in_seconds": expires_hours * 3600, "note": note}).json())
    _show(as_json, json.dumps(made, indent=2), admin_text.invitations_created(made))
    typer.echo("keep the codes: they are shown only once", err=True)


@admin_app.command("invitations")
def admin_invitations(federation: FederationId,
                      revoke: Annotated[Optional[int], typer.Option(help="revoke this unused invitation")] = None,
                      coordinator_url: CoordinatorUrl = DEFAULT_URL, admin_token: AdminToken = None,
                      as_json: AsJson = False) -> None:
    """List the federation's invitations and their state (never the codes), or revoke one."""
    token = _admin_token(admin_token)
    if revoke is not None:
        row = _call(coordinator_url, lambda http: http.request(
            "DELETE", f"/v1/federations/{federation}/invitations/{revoke}", token=token).json())
        _show(as_json, json.dumps(row, indent=2), admin_text.invitation(row))
    else:
        rows = _call(coordinator_url, lambda http: http.request(
            "GET", f"/v1/federations/{federation}/invitations", token=token).json())
        _show(as_json, json.dumps(rows, indent=2), admin_text.invitations(rows))


def parse_schedule_sets(items: list[str]) -> dict:
    """``key=value`` pairs of ``hilora admin schedule --set`` as a change document: values are JSON
    where they parse (``0.3``, ``null``, ``true``), else strings (``auto``); a dotted key sets one
    field of a nested object (``clients_per_round.fraction=0.3``)."""
    changes: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")) or key.count(".") > 1:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE or FIELD.SUBFIELD=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if "." in key:
            outer, inner = key.split(".")
            if not isinstance(changes.setdefault(outer, {}), dict):
                raise ValueError(f"--set {item!r}: {outer} is also given as a whole")
            changes[outer][inner] = value
        else:
            if key in changes:
                raise ValueError(f"--set {item!r}: {key} is given twice")
            changes[key] = value
    return changes


@admin_app.command("schedule")
def admin_schedule(federation: FederationId,
                   set_: Annotated[Optional[list[str]], typer.Option(
                       "--set", help="FIELD=VALUE (repeat it); VALUE is JSON where it parses (0.3, null), else a "
                                     "string (auto); clients_per_round.fraction=0.3 sets one part")] = None,
                   reason: Reason = "",
                   coordinator_url: CoordinatorUrl = DEFAULT_URL, admin_token: AdminToken = None,
                   as_json: AsJson = False) -> None:
    """Show a federation's schedule, or change fields of it while it runs (from the next round;
    validated as at creation; docs/operations.md). Prints the changes and the schedule."""
    try:
        changes = parse_schedule_sets(set_ or [])
    except ValueError as exc:
        _fail(str(exc))
    token = _admin_token(admin_token)
    if changes:
        result = _call(coordinator_url, lambda http: http.request(
            "PATCH", f"/v1/federations/{federation}/schedule", token=token,
            json={"changes": changes, "reason": reason}).json())
        _show(as_json, json.dumps(result, indent=2), admin_text.schedule_changed(result))
    else:
        schedule = _call(coordinator_url, lambda http: http.request(
            "GET", f"/v1/federations/{federation}/config", token=token).json()["schedule"])
        _show(as_json, json.dumps(schedule, indent=2), admin_text.schedule(schedule))


@admin_app.command("assign")
def admin_assign(federation: FederationId,
                 assignment: Annotated[str, typer.Option(
                     help="client name -> cluster label, as a JSON object or a JSON file: an existing cluster's "
                          "label moves the client there, a new label makes a new cluster; clients not named stay")],
                 reason: Reason = "",
                 coordinator_url: CoordinatorUrl = DEFAULT_URL, admin_token: AdminToken = None,
                 as_json: AsJson = False) -> None:
    """Assign clients to clusters by hand on a running federation (after its probe round); prints
    the clustering run, the clusters kept and created and every move."""
    text = assignment
    if not assignment.lstrip().startswith("{"):
        path = Path(assignment)
        if not path.is_file():
            _fail(f"--assignment {assignment}: neither a JSON object nor a file")
        text = path.read_text()
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"--assignment is not valid JSON: {exc}")
    if not isinstance(mapping, dict) or not mapping or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in mapping.items()):
        _fail("--assignment must be a non-empty JSON object of client name -> integer cluster label")
    token = _admin_token(admin_token)
    result = _call(coordinator_url, lambda http: http.request(
        "POST", f"/v1/federations/{federation}/recluster", token=token,
        json={"assignment": mapping, "reason": reason}).json())
    _show(as_json, json.dumps(result, indent=2), admin_text.recluster(result))


@admin_app.command("delete-client")
def admin_delete_client(federation: FederationId,
                        client: Annotated[int, typer.Option(help="client id")],
                        coordinator_url: CoordinatorUrl = DEFAULT_URL, admin_token: AdminToken = None,
                        as_json: AsJson = False) -> None:
    """Delete a client: its token, tasks, uploads and task metrics go; aggregates stay."""
    token = _admin_token(admin_token)
    result = _call(coordinator_url, lambda http: http.request(
        "DELETE", f"/v1/federations/{federation}/clients/{client}", token=token).json())
    _show(as_json, json.dumps(result, indent=2), admin_text.deleted(result, federation))


@admin_app.command("export-model")
def admin_export_model(
    federation: FederationId,
    out: Annotated[Path, typer.Option(help="where to write the model (safetensors)")],
    cluster: Annotated[Optional[int], typer.Option(help="cluster label (stable); omit for the root-only model")] = None,
    coordinator_url: CoordinatorUrl = DEFAULT_URL,
    admin_token: AdminToken = None,
    as_json: AsJson = False,
) -> None:
    """Download the merged cluster-level (backbone + root + cluster) or root-only model."""
    import hashlib

    from worker.files import atomic_write

    token = _admin_token(admin_token)
    data = _call(coordinator_url, lambda http: http.merged_model(token, federation, cluster))
    atomic_write(out, data)
    info = {"path": str(out), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _show(as_json, json.dumps(info), admin_text.model_written(info))


@app.command("export")
def export_cmd(
    federation: Annotated[int, typer.Option(help="federation id")],
    client_name: Annotated[str, typer.Option("--client", help="name of a client the worker hosts")],
    out: Annotated[Path, typer.Option(help="where to write the model (safetensors)")],
    coordinator_url: CoordinatorUrl = DEFAULT_URL,
    state_dir: Annotated[Path, typer.Option(help="the worker's state directory (credentials, leaf)")] = Path(
        "./hilora-worker-state"),
    leaf: Annotated[bool, typer.Option("--leaf/--no-leaf", help="merge the client's private leaf")] = True,
) -> None:
    """Write a client's model: backbone + newest root + its cluster + its leaf, merged into one file."""
    from worker.client import CoordinatorClient, CoordinatorError, CoordinatorUnavailable
    from worker.export import export_client_model

    with CoordinatorClient(_checked_url(coordinator_url), max_retries=CLI_RETRIES) as client:
        try:
            result = export_client_model(client, state_dir, federation, client_name, out, include_leaf=leaf)
        except CoordinatorError as exc:
            _fail(f"coordinator refused: {exc}")
        except CoordinatorUnavailable as exc:
            _unreachable(coordinator_url, exc)
        except ValueError as exc:
            _fail(str(exc))
    typer.echo(json.dumps({"path": str(result.path), "sha256": result.sha256, "bytes": result.bytes,
                           "tiers": result.tiers, "versions": result.versions}))


@app.command()
def predict(
    model: Annotated[Path, typer.Option(help="a model file from `hilora export` or `hilora admin export-model`")],
    images: Annotated[Path, typer.Option(help="directory of PNG/JPEG images")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of file<TAB>class<TAB>probability")] = False,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads")] = 1,
) -> None:
    """Classify every image in a directory with a merged model."""
    import torch

    from worker.export import predict_directory

    torch.set_num_threads(threads)
    try:
        rows = predict_directory(model, images)
    except ValueError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
    else:
        for row in rows:
            name = f"{row['name']}\t" if "name" in row else ""
            typer.echo(f"{row['file']}\t{row['class']}\t{name}{row['probability']:.6f}")


@app.command("pretrain-demo-backbone")
def pretrain_demo_backbone_cmd(
    force: Annotated[bool, typer.Option(help="retrain even if cached")] = False,
    cache_dir: Annotated[Optional[Path], typer.Option(help="default: HILORA_CACHE_DIR or ~/.cache/hilora")] = None,
    dataset: Annotated[str, typer.Option(
        help="pretraining pool: 'digits' (the demo's) or 'mnist5k' (for the mnist5k partitions)")] = "digits",
    progress: Annotated[bool, typer.Option(
        "--progress/--no-progress", help="a progress bar with ETA on stderr (only when it is a terminal)")] = True,
) -> None:
    """Pretrain the tiny demo ViT on upright digits or MNIST-5k (cached by a hash of its recipe)."""
    from hilora.progress import Bars, backbone_watcher
    from worker.backbone import DEMO_BACKBONE_DATASETS, pretrain_demo_backbone

    if dataset not in DEMO_BACKBONE_DATASETS:
        _fail(f"--dataset must be one of {', '.join(DEMO_BACKBONE_DATASETS)}, got {dataset!r}")
    with Bars(enabled=None if progress else False) as bars:
        artifact = pretrain_demo_backbone(cache_dir=cache_dir, force=force, progress=backbone_watcher(bars, bars.say),
                                          dataset=dataset)
    typer.echo(json.dumps({"path": str(artifact.path), "sha256": artifact.sha256, "model": artifact.model}))


@app.command()
def demo(
    partition: Annotated[str, typer.Option(help="built-in partition name or a partition file")] = "demo",
    workers: Annotated[int, typer.Option(min=1, help="worker processes for the training clients")] = 3,
    threads: Annotated[int, typer.Option(min=1, help="torch threads per worker process")] = 1,
    root_rounds: Annotated[Optional[int], typer.Option(min=0)] = None,
    cluster_rounds: Annotated[Optional[int], typer.Option(min=0)] = None,
    leaf_rounds: Annotated[Optional[int], typer.Option(min=0)] = None,
    local_epochs: Annotated[Optional[int], typer.Option(min=1)] = None,
    features: Annotated[Optional[str], typer.Option(help="LSAC features: update | subspace")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    report: Annotated[Optional[Path], typer.Option(help="write the numbers as JSON here")] = None,
    workdir: Annotated[Optional[Path], typer.Option(help="keep the coordinator DB, blobs and logs here")] = None,
    timeout: Annotated[float, typer.Option(help="give up after this many seconds")] = 900.0,
    serve: Annotated[bool, typer.Option(help="keep the coordinator running afterwards and print the "
                                             "dashboard URL and admin token (Ctrl-C stops it)")] = False,
    progress: Annotated[bool, typer.Option(
        "--progress/--no-progress", help="progress bars with ETA on stderr (only when it is a terminal)")] = True,
) -> None:
    """Run the whole cascade on one machine over real HTTP and print the results."""
    os.environ["HILORA_DEV"] = "1"
    from hilora.demo import format_table, run_demo, write_report
    from hilora.progress import Bars
    from hilora.options import RunOptions

    opts = RunOptions(partition=partition, workers=workers, threads=threads, seed=seed, timeout=timeout,
                       workdir=str(workdir) if workdir else None)
    for name, value in (("root_rounds", root_rounds), ("cluster_rounds", cluster_rounds),
                        ("leaf_rounds", leaf_rounds), ("local_epochs", local_epochs), ("features", features)):
        if value is not None:
            setattr(opts, name, value)
    if opts.features not in ("update", "subspace"):
        _fail("--features must be 'update' or 'subspace'")
    def show(summary: dict) -> None:
        typer.echo(format_table(summary))
        if report is not None:
            write_report(summary, report)
            typer.echo(f"report written to {report}")

    def serve_dashboard(summary: dict, cluster) -> None:  # noqa: ANN001
        import time

        show(summary)
        typer.echo(f"dashboard:   {cluster.url}/dashboard")
        typer.echo(f"admin token: {cluster.admin_token}")
        typer.echo("the coordinator keeps running; Ctrl-C stops it")

        def _stop(_signum, _frame):  # noqa: ANN001
            raise KeyboardInterrupt

        # a plain `kill`, and Ctrl-C even when started in the background, stop the coordinator with us
        previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while cluster.coordinator is not None and cluster.coordinator.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    try:
        with Bars(enabled=None if progress else False) as bars:
            summary = run_demo(opts, say=bars.sayer(), serve=serve_dashboard if serve else None)
    except (RuntimeError, ValueError) as exc:
        _fail(str(exc), code=1)
    if not serve:
        show(summary)


def _split_values(values: Optional[list[str]]) -> list[str]:
    return [v.strip() for value in values or () for v in value.split(",") if v.strip()]


@app.command()
def bench(
    partition: Annotated[Optional[str], typer.Option(
        help="built-in partition name or a partition file (default: the demo's)")] = None,
    methods: Annotated[Optional[list[str]], typer.Option(
        "--methods", "-m", help="methods to run, comma-separated or repeated (default: all; see docs/usage.md): "
                                "hilora, local, fedit, flexlora, fedsa, ffa, no-cluster, no-ortho, kmeans-flat, "
                                "lsac-subspace, lsac-update, lsac-paper, and oracle (the planted groups as "
                                "clusters; only when named)")] = None,
    rounds: Annotated[Optional[str], typer.Option(
        help="R/C/L: hilora's root/cluster/leaf rounds; flat baselines run R+C+L rounds "
             "(default 2/2/1 with --quick, 20/20/10 with --full)")] = None,
    seed: Annotated[int, typer.Option(help="training, initialisation and clustering seed")] = 0,
    seeds: Annotated[Optional[list[str]], typer.Option(
        help="several seeds (comma-separated or repeated; overrides --seed): numbers are means over seeds")] = None,
    quick: Annotated[Optional[bool], typer.Option(
        "--quick/--full", help="--quick: the demo's training settings, 2/2/1 rounds, minutes on a CPU; --full: "
                               "20/20/10 rounds, 5 unseen leaf rounds. Default: --quick without a CUDA device")] = None,
    standard: Annotated[bool, typer.Option(
        "--standard", help="6/6/3 rounds with the demo's training settings: every tier converged on the demo "
                           "ViT, about a minute per method on one core (between --quick and --full)")] = False,
    family: Annotated[Optional[str], typer.Option(
        help="run a benchmark family (a fixed design of partitions, docs/benchmarks.md) instead of one "
             "partition: 'core' (19 cells) or 'smoke' (2 small cells); needs --out; default methods "
             "hilora, oracle, local, fedit, flexlora, fedsa, ffa")] = None,
    cells: Annotated[Optional[list[str]], typer.Option(
        help="with --family: only these cells (comma-separated or repeated)")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="with --family: the results folder; one file per cell, seed and method as each finishes, and "
             "a run into a folder that has some of them resumes where it stopped")] = None,
    local_epochs: Annotated[Optional[int], typer.Option(min=1, help="local epochs per round, every method")] = None,
    unseen_leaf_rounds: Annotated[Optional[int], typer.Option(min=0, help="leaf rounds of unseen clients")] = None,
    report: Annotated[Optional[Path], typer.Option(help="write the numbers as JSON here")] = None,
    plots: Annotated[Optional[Path], typer.Option(help="write PNG plots into this directory")] = None,
    probe_loss: Annotated[Optional[str], typer.Option(
        help="clustering.probe_loss of every hierarchical method: 'ce' or 'balanced' (cross entropy weighted by "
             "inverse class frequency; the default)")] = None,
    probe_steps: Annotated[Optional[int], typer.Option(
        min=1, help="clustering.probe_steps: the probe's length in optimizer steps (default: 2 probe epochs)")
    ] = None,
    validation_fraction: Annotated[float, typer.Option(
        min=0.0, max=0.5, help="training.validation_fraction: share of each client's training data held out to "
                               "choose its model among root, +cluster and +leaf (hierarchical methods; 0: off)")
    ] = 0.0,
    alone_epochs: Annotated[int, typer.Option(
        min=0, max=100_000, help="training.alone_epochs: with --validation-fraction, each client of a hierarchical "
                                 "method also trains a model alone for this many epochs and chooses among root, "
                                 "+cluster, +leaf and that one (0: off; local's budget is total rounds x local epochs)")
    ] = 0,
    leaf: Annotated[str, typer.Option(
        help="what the leaf tier trains in every hierarchical method: 'all' (a personal LoRA and head) or 'head' "
             "(a personal head on the cluster model: leaf.A and leaf.B frozen)")] = "all",
    leaf_lr_scale: Annotated[Optional[float], typer.Option(
        min=1e-6, max=10.0, help="training.leaf_lr_scale: the leaf tier's learning rates scaled by this "
                                 "(default 0.1)")] = None,
    leaf_bias_fit: Annotated[Optional[float], typer.Option(
        min=0.0, max=100.0, help="training.leaf_bias_fit: a new leaf's head bias starts shifted by the logit shift "
                                 "that fits the client's own labels best, with a Gaussian prior of this standard "
                                 "deviation (default 1; 0: off)")] = None,
    leaf_bias_fit_skewed: Annotated[Optional[float], typer.Option(
        min=0.0, max=100.0, help="training.leaf_bias_fit_skewed: the bias fit's prior standard deviation for a "
                                 "client whose labels a chi-square test rejects as uniform (default 4; 0: "
                                 "--leaf-bias-fit for every client)")] = None,
    leaf_mix: Annotated[Optional[float], typer.Option(
        min=0.0, max=1.0, help="training.leaf_mix: a client whose labels look uniform takes its leaf this fraction "
                               "of the way from root + cluster (its LoRA change and head weight; its head bias "
                               "whole) (default 0.5; 1: the leaf as trained)")] = None,
    clip_relative: Annotated[Optional[float], typer.Option(
        min=0.0, help="root.clip_relative and cluster.clip_relative: each update clipped to this multiple of the "
                      "round's median update norm (default 3; 0: off)")] = None,
    max_weight_ratio: Annotated[Optional[float], typer.Option(
        min=0.0, help="root and cluster max_weight_ratio: aggregation weights capped at this multiple of the "
                      "round's median (default 10; 0: off)")] = None,
    contrast: Annotated[Optional[float], typer.Option(
        min=0.0, help="clustering.contrast: LSAC accepts K > 1 only if the between/within distance ratio reaches "
                      "this (default 1.25)")] = None,
    k_rule: Annotated[Optional[str], typer.Option(
        help="clustering.k_rule: 'silhouette' (default: the K whose partition has the best mean silhouette, if it "
             "reaches --min-silhouette) or 'eigengap' (with the contrast test)")] = None,
    min_silhouette: Annotated[float, typer.Option(
        min=-1.0, max=1.0, help="clustering.min_silhouette (k_rule silhouette)")] = 0.15,
    silhouette_tolerance: Annotated[Optional[float], typer.Option(
        min=0.0, max=1.0, help="clustering.silhouette_tolerance (k_rule silhouette): the smallest K whose mean "
                               "silhouette is at least (1 - this) times the best")] = None,
    partitions: Annotated[Optional[str], typer.Option(
        help="clustering.partitions (k_rule silhouette): the partitions tried for each K: 'spectral+linkage' "
             "(default: spectral and average-linkage clustering, the better silhouette wins) or 'spectral'")] = None,
    head_weight: Annotated[float, typer.Option(
        min=0.0, help="clustering.head_weight: the probe's head delta scaled by this in the update features")
    ] = 1.0,
    classwise_weight: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="clustering.classwise_weight: weight of the class-wise head distance mixed into the "
                               "update distance (0: the update distance alone)")] = 0.5,
    refine_rounds: Annotated[Optional[int], typer.Option(
        min=0, max=100, help="clustering.refine_rounds: after each of the first N cluster rounds, clients report "
                             "every cluster adapter's loss on their training data and move to a clearly better "
                             "cluster, or fit none (capped at the cluster rounds; the oracle never refines)")] = None,
    refine_margin: Annotated[Optional[float], typer.Option(
        min=0.0, max=0.99, help="clustering.refine_margin: a move needs a loss below (1 - this) x the current one "
                                "(default 0.05)")] = None,
    refine_new_cluster: Annotated[Optional[int], typer.Option(
        min=0, help="clustering.refine_new_cluster: at least this many clients that no cluster fits better than "
                    "the root form a new cluster (0: they stay unassigned)")] = None,
    onboard: Annotated[Optional[str], typer.Option(
        help="clustering.onboard: how unseen clients join a cluster: 'probe' (default: probe similarity) or "
             "'loss' (the lowest loss of the cluster adapters on their training data)")] = None,
    skip_single_cluster: Annotated[Optional[bool], typer.Option(
        "--skip-single-cluster/--train-single-cluster",
        help="clustering.skip_single_cluster: when the clustering finds K = 1 (not forced), skip the cluster "
             "stage, whose one adapter starts as the root's model (default), or train its rounds")] = None,
    threads: Annotated[int, typer.Option(
        min=1, help="torch CPU threads (the demo backbone is tiny: on a busy machine more than 1 is much slower)")
                       ] = 1,
    device: Annotated[str, typer.Option(help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")] = "auto",
    paper: Annotated[Optional[str], typer.Option(
        help="a paper-scale set-up instead of --partition: cifar100-scdir, cifar100-gldir, cifar100-patho or "
             "domainnet, over --data-root, on ViT-B/16 with rank 8 (docs/usage.md)")] = None,
    data_root: Annotated[Optional[Path], typer.Option(
        help="the data folder of --paper or of a disk partition (replaces the partition's root)")] = None,
    model: Annotated[Optional[str], typer.Option(
        help="timm model name (default: the demo backbone; with --paper: vit_base_patch16_224.augreg_in21k, ViT-B/16 on ImageNet-21k as in the paper)")] = None,
    model_kwargs: Annotated[Optional[str], typer.Option(
        help="JSON object of extra timm model arguments (num_classes, img_size and in_chans come from the data)")
    ] = None,
    checkpoint: Annotated[Optional[str], typer.Option(
        help="with --model/--paper: a safetensors checkpoint, 'pretrained' (timm's weights, downloaded by "
             "timm) or 'random' (seeded random initialisation, the default: for timing)")] = None,
    rank: Annotated[Optional[int], typer.Option(min=1, help="LoRA rank of every tier (default 4; --paper: 8)")
                    ] = None,
    data_cache_gb: Annotated[float, typer.Option(
        min=0.1, help="client arrays kept in memory, GB (least recently used dropped)")] = 8.0,
    transport: Annotated[str, typer.Option(
        help="'inprocess': the coordinator and one worker in this process (fast, deterministic); 'http': a "
             "coordinator process and --workers worker processes on loopback, as `hilora demo`")] = "inprocess",
    workers: Annotated[int, typer.Option(min=1, help="worker processes with --transport http")] = 3,
    workdir: Annotated[Optional[Path], typer.Option(
        help="keep the coordinator's database, blobs, worker state and logs here (default: a temp folder, "
             "removed afterwards)")] = None,
    resume: Annotated[Optional[Path], typer.Option(
        help="a report an earlier run wrote (--report: rewritten after every method, so it may be partial), made "
             "with the same options: its finished methods and seeds are kept as they are, only the rest run "
             "(default methods and seeds: the report's); the report is rewritten there unless --report says "
             "elsewhere")] = None,
    progress: Annotated[bool, typer.Option(
        "--progress/--no-progress", help="progress bars with ETA on stderr (only when it is a terminal)")] = True,
) -> None:
    """Compare HiLoRA with federated-LoRA baselines and its ablations on one partition: every method is a
    federation that the real coordinator and worker code run, with the same data, backbone, rounds and
    local epochs."""
    from dataclasses import replace

    from hilora.bench import (
        PAPER_PARTITIONS,
        PAPER_RANK,
        check_partition_data,
        default_methods,
        format_table,
        parse_methods,
        parse_rounds,
        preset,
        run_bench,
        write_outputs,
    )

    try:
        chosen = parse_methods(_split_values(methods))
    except ValueError as exc:
        _fail(str(exc))
    seed_values = _split_values(seeds) if seeds else [str(seed)]
    bad = [s for s in seed_values if not s.lstrip("-").isdigit()]
    if bad:
        _fail(f"--seeds must be integers, got {', '.join(map(repr, bad))}")
    seed_list = [int(s) for s in seed_values]
    if len(set(seed_list)) != len(seed_list):
        _fail("--seeds repeats a seed")
    if plots is not None:   # before minutes of training, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            _fail("--plots needs matplotlib: pip install 'hilora[bench]'")
    for path, what in ((report, "--report"), (plots, "--plots")):
        if path is not None and ((what == "--report" and path.is_dir()) or (what == "--plots" and path.is_file())):
            _fail(f"{what} {path}: is a {'directory' if path.is_dir() else 'file'}")
    from hilora.options import TRANSPORTS

    if transport not in TRANSPORTS:
        _fail(f"--transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    if workdir is not None and workdir.exists() and not workdir.is_dir():
        _fail(f"--workdir {workdir}: is a file")
    if workdir is not None and workdir.is_dir() and any(workdir.iterdir()):
        _fail(f"--workdir {workdir}: is not empty (a bench run starts a new coordinator database there)")
    if paper is not None and partition is not None:
        _fail("--paper and --partition exclude each other: --paper names the partition")
    if k_rule is not None and k_rule not in ("eigengap", "silhouette"):
        _fail(f"--k-rule must be 'eigengap' or 'silhouette', got {k_rule!r}")
    if leaf not in ("all", "head"):
        _fail(f"--leaf must be 'all' or 'head', got {leaf!r}")
    from shared.subspace import PARTITIONS

    if partitions is not None and partitions not in PARTITIONS:
        _fail(f"--partitions must be {' or '.join(map(repr, PARTITIONS))}, got {partitions!r}")
    if probe_loss is not None and probe_loss not in ("ce", "balanced"):
        _fail(f"--probe-loss must be 'ce' or 'balanced', got {probe_loss!r}")
    if standard and quick is not None:
        _fail("--standard excludes --quick and --full: each names the rounds")
    from hilora.bench.family import FAMILIES, family_cells

    if family is None and (cells or out is not None):
        _fail("--cells and --out go with --family")
    previous = None
    if resume is not None:
        if family is not None:
            _fail("--family resumes from its --out folder by itself: run the same command again, without --resume")
        if not resume.is_file():
            _fail(f"--resume {resume}: no such file (the --report of an earlier run)")
        try:
            previous = json.loads(resume.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            _fail(f"--resume {resume}: not a JSON report ({exc})")
        if not isinstance(previous, dict) or not isinstance(previous.get("runs"), list):
            _fail(f"--resume {resume}: not a report of `hilora bench --report`")
        if report is None:
            report = resume
        planned = previous.get("planned") if isinstance(previous.get("planned"), dict) else {}
        if not methods and planned.get("methods"):
            try:
                chosen = parse_methods(planned["methods"])
            except ValueError as exc:
                _fail(f"--resume {resume}: {exc}")
        if not seeds and planned.get("seeds") and seed == 0:
            seed_list = [int(s) for s in planned["seeds"]]
    if family is not None:
        if partition is not None or paper is not None:
            _fail("--family excludes --partition and --paper: the family names its partitions")
        if out is None:
            _fail("--family needs --out DIR (where each result is written as it finishes, so a run resumes)")
        if out.exists() and not out.is_dir():
            _fail(f"--out {out}: is a file")
        if workdir is not None:
            _fail("--family runs each cell in its own temporary service: --workdir is for one partition")
        if model is not None or checkpoint is not None or model_kwargs is not None or data_root is not None:
            _fail("--family runs on the demo backbone over the offline mnist5k data: no --model, --checkpoint, "
                  "--model-kwargs or --data-root")
        if family not in FAMILIES:
            _fail(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
        try:
            family_cells(family, _split_values(cells))
        except ValueError as exc:
            _fail(str(exc))
    if paper is not None and paper not in PAPER_PARTITIONS:
        _fail(f"--paper must be one of {', '.join(PAPER_PARTITIONS)}, got {paper!r}")
    if paper is not None and data_root is None:
        _fail(f"--paper {paper} needs --data-root (the folder with the data; docs/partitions.md)")
    extra_kwargs: dict = {}
    if model_kwargs is not None:
        try:
            extra_kwargs = json.loads(model_kwargs)
        except json.JSONDecodeError as exc:
            _fail(f"--model-kwargs is not valid JSON: {exc}")
        if not isinstance(extra_kwargs, dict):
            _fail("--model-kwargs must be a JSON object")
    if (model_kwargs is not None or checkpoint is not None) and model is None and paper is None:
        _fail("--model-kwargs and --checkpoint need --model or --paper (the demo backbone is built in)")
    if checkpoint == "random":
        checkpoint = None
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        _fail(f"--device {device}: no CUDA device is available")
    elif device != "cpu" and not device.startswith("cuda"):
        _fail(f"--device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if quick is None and not standard:
        quick = not device.startswith("cuda")
    level = "standard" if standard else ("quick" if quick else "full")
    opts = preset(level)
    if partition is not None:
        opts = replace(opts, partition=partition)
    opts = replace(opts, paper=paper, data_root=str(data_root) if data_root is not None else None, model=model,
                   model_kwargs=extra_kwargs, checkpoint=checkpoint,
                   rank=rank or (PAPER_RANK if paper is not None else opts.rank),
                   data_cache_bytes=int(data_cache_gb * (1 << 30)), transport=transport, workers=workers,
                   workdir=str(workdir) if workdir is not None else None)
    if onboard is not None and onboard not in ("probe", "loss"):
        _fail(f"--onboard must be 'probe' or 'loss', not {onboard!r}")
    if alone_epochs and validation_fraction <= 0:
        _fail("--alone-epochs needs --validation-fraction > 0: the model trained alone is a candidate each client "
              "chooses on its held-out part")
    try:
        if rounds is not None:
            root_rounds, cluster_rounds, leaf_rounds = parse_rounds(rounds)
            opts = replace(opts, root_rounds=root_rounds, cluster_rounds=cluster_rounds, leaf_rounds=leaf_rounds)
        if family is None:
            check_partition_data(opts.partition, paper, opts.data_root, model, extra_kwargs, checkpoint)
    except ValueError as exc:
        _fail(str(exc))
    opts = replace(opts, device=device, threads=threads, probe_loss=probe_loss or opts.probe_loss,
                   partitions=partitions or opts.partitions, probe_steps=probe_steps,
                   head_weight=head_weight, classwise_weight=classwise_weight,
                   validation_fraction=validation_fraction, alone_epochs=alone_epochs,
                   leaf=leaf,
                   leaf_lr_scale=opts.leaf_lr_scale if leaf_lr_scale is None else leaf_lr_scale,
                   leaf_bias_fit=opts.leaf_bias_fit if leaf_bias_fit is None else leaf_bias_fit,
                   leaf_bias_fit_skewed=opts.leaf_bias_fit_skewed if leaf_bias_fit_skewed is None
                   else leaf_bias_fit_skewed,
                   leaf_mix=opts.leaf_mix if leaf_mix is None else _leaf_mix(leaf_mix),
                   k_rule=k_rule or opts.k_rule, min_silhouette=min_silhouette,
                   silhouette_tolerance=opts.silhouette_tolerance if silhouette_tolerance is None
                   else silhouette_tolerance,
                   clip_relative=_robust(clip_relative, opts.clip_relative, "--clip-relative"),
                   max_weight_ratio=_robust(max_weight_ratio, opts.max_weight_ratio, "--max-weight-ratio"),
                   contrast=opts.contrast if contrast is None else contrast,
                   refine_rounds=opts.refine_rounds if refine_rounds is None else refine_rounds,
                   refine_margin=opts.refine_margin if refine_margin is None else refine_margin,
                   refine_new_cluster=opts.refine_new_cluster if refine_new_cluster is None else refine_new_cluster,
                   onboard=onboard or opts.onboard,
                   skip_single_cluster=opts.skip_single_cluster if skip_single_cluster is None else skip_single_cluster,
                   local_epochs=local_epochs or opts.local_epochs,
                   unseen_leaf_rounds=opts.unseen_leaf_rounds if unseen_leaf_rounds is None else unseen_leaf_rounds)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if family is not None:
        _bench_family(opts, family, _split_values(cells), chosen, seed_list, out, plots, report, level, progress)
        return
    chosen = chosen or default_methods(opts)
    if previous is not None:
        from hilora.bench.report import resumable_runs

        try:
            resumable_runs(previous, opts, chosen, seed_list)
        except ValueError as exc:
            _fail(f"--resume {resume}: {exc}", code=1)
    typer.echo(f"hilora bench ({level}, {device}, {opts.threads} threads, "
               f"{opts.transport}): "
               f"{', '.join(chosen)} on {paper or opts.partition}, seeds {seed_list}"
               + (f", resuming {resume}" if resume is not None else ""))
    from hilora.progress import Bars, RunProgress, backbone_watcher

    def write_partial(partial: dict) -> None:   # after every method: what --resume reads back
        write_outputs(partial, report, None)

    try:
        with Bars(enabled=None if progress else False) as bars:
            result = run_bench(opts, chosen, seed_list, say=backbone_watcher(bars, bars.sayer(err=True)),
                               progress=RunProgress(bars, "bench") if bars.enabled else None, resume=previous,
                               on_report=write_partial if report is not None else None)
    except (ValueError, RuntimeError) as exc:
        _fail(f"--resume {resume}: {exc}" if resume is not None and str(exc).startswith("the report was made")
              else str(exc), code=1)
    typer.echo(format_table(result))
    written = write_outputs(result, report, plots)
    for path in written:
        typer.echo(f"wrote {path}")


def _bench_family(opts, family: str, cells: list[str], methods: list[str], seeds: list[int], out: Path,
                  plots: Optional[Path], report: Optional[Path], level: str, progress: bool = True) -> None:
    """``hilora bench --family``: every cell x seed x method not yet in ``out``, then the family table."""
    from hilora.bench.family import FAMILY_METHODS, format_family, render_heatmap, run_family
    from hilora.progress import Bars, RunProgress, backbone_watcher

    def atomic_write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")   # several processes may share --out
        tmp.write_bytes(data)
        tmp.replace(path)

    methods = methods or list(FAMILY_METHODS)
    typer.echo(f"hilora bench --family {family} ({level}, {opts.device}, {opts.threads} threads): "
               f"{', '.join(methods)}, seeds {seeds}, into {out}")

    def copy_report(partial: dict) -> None:   # --report: the family report, as current as family.json
        atomic_write(report, json.dumps(partial, indent=1).encode())

    try:
        with Bars(enabled=None if progress else False) as bars:
            result = run_family(opts, family, methods, seeds, out, cells or None,
                                say=backbone_watcher(bars, bars.sayer(err=True)),
                                progress=RunProgress(bars, f"family {family}") if bars.enabled else None,
                                on_report=copy_report if report is not None else None)
    except (ValueError, RuntimeError) as exc:
        _fail(str(exc), code=1)
    text = format_family(result)
    typer.echo(text)
    atomic_write(out / "family.md", (text + "\n").encode())
    written = [out / "family.json", out / "family.md"]
    if report is not None:
        atomic_write(report, json.dumps(result, indent=1).encode())
        written.append(report)
    if plots is not None:
        atomic_write(plots / "family_heatmap.png", render_heatmap(result))
        written.append(plots / "family_heatmap.png")
    for path in written:
        typer.echo(f"wrote {path}")


def _one_line_error(exc: BaseException) -> Optional[str]:
    """The one line ``main`` prints for an error a person can fix without reading a traceback (an
    optional extra that is not installed), or None for a bug (its traceback is shown)."""
    if isinstance(exc, ModuleNotFoundError):
        module = (exc.name or "").split(".")[0]
        if module in MODULE_EXTRAS:
            command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
            return _missing_extra_line(command, [module], MODULE_EXTRAS[module])
    return None


def main() -> None:
    """The ``hilora`` script: a module of an optional extra missing at run time (a coordinator-only
    install) is one line naming the pip command and exit code 2, not a traceback."""
    try:
        app()
    except ImportError as exc:
        line = _one_line_error(exc)
        if line is None:
            raise
        typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
