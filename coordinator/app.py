"""The FastAPI application factory and its background scheduler."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Annotated

from fastapi import FastAPI, Header, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from coordinator import faults
from coordinator.blobs import BlobStore, InlineAdapters
from coordinator.db import (
    make_engine,
    make_lease_session_factory,
    make_read_session_factory,
    make_session_factory,
)
from coordinator.errors import ServiceError
from coordinator.limits import (
    COMMON_RESPONSES,
    BodyBudget,
    BodyLimitMiddleware,
    LeaseRateLimiter,
    UploadSlots,
    retry_after_header,
)
from coordinator.logs import RequestContextMiddleware
from coordinator.longpoll import LeaseWaiters
from coordinator.metrics import Metrics, MetricsMiddleware, observing
from coordinator.migrate import upgrade_to_head
from coordinator.routes import router
from coordinator.routes_admin import router as admin_router
from coordinator.routes_models import router as models_router
from coordinator.security import constant_time_equals
from coordinator.services import tasks
from coordinator.services.retention import collect_garbage
from coordinator import api_docs
from coordinator.services.scheduling import MAX_TRANSITIONS_PER_CALL, scheduler_tick
from coordinator.settings import Settings
from shared import __version__

log = logging.getLogger("hilora.coordinator")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Scheduler:
    """Runs ``scheduler_tick`` every ``interval`` seconds, or at once when woken (after an upload
    completes). One thread; every tick is a few short transactions."""

    def __init__(self, session_factory, blobs: BlobStore, clock: Clock, interval: float,  # noqa: ANN001
                 metrics: Metrics | None = None, settings: Settings | None = None,
                 on_change: Callable[[set[int]], None] | None = None) -> None:
        self._metrics = metrics
        # after a tick (or a federation's job) that changed something, with the clients it made a
        # task leasable for: the held lease requests lease for them
        self._on_change = on_change
        self._settings = settings
        self._last_gc: float | None = None
        self._session_factory = session_factory
        self._blobs = blobs
        self._clock = clock
        self._interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # federations advanced as jobs on a pool (PostgreSQL); None: one after the other in the tick
        jobs = settings.scheduler_jobs if settings is not None else 1
        sqlite = session_factory.kw["bind"].dialect.name == "sqlite"
        self._pool = (concurrent.futures.ThreadPoolExecutor(jobs, thread_name_prefix="hilora-federation")
                      if jobs > 1 and not sqlite else None)
        self._running: set[int] = set()
        self._running_lock = threading.Lock()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hilora-scheduler", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._pool is not None:  # running advances finish (each is one transaction); queued ones are dropped
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, fid: int, advance: Callable[..., int], started: list | None = None) -> None:
        """Run a federation's advance (``scheduling.advance_one``, its arguments bound but
        ``leasable``) as a job, unless its previous one is still running."""
        with self._running_lock:
            if fid in self._running or self._stop.is_set():
                return
            self._running.add(fid)
        metrics = self._metrics
        leasable: set[int] = set()   # the clients the job opened tasks for, once it committed

        def job() -> int:
            with observing(metrics):
                return advance(leasable=leasable)

        def done(future: concurrent.futures.Future) -> None:
            with self._running_lock:
                self._running.discard(fid)
            if not future.cancelled() and future.exception() is None and future.result() > 0:
                if self._on_change is not None:
                    self._on_change(leasable)
                self.wake()  # what it changed may let the next tick go on at once

        try:
            future = self._pool.submit(job)
            future.add_done_callback(done)
            if started is not None:
                started.append(future)
        except RuntimeError:  # shutting down
            with self._running_lock:
                self._running.discard(fid)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                # Again at once only when a tick may have stopped short: it advances every federation
                # until nothing is due (at most MAX_TRANSITIONS_PER_CALL steps each). A second tick
                # after every change found nothing, and took the write lock and the GIL just when
                # the held lease requests were woken to take the tasks it had opened.
                while self.tick(wait=False) >= MAX_TRANSITIONS_PER_CALL and not self._stop.is_set():
                    pass
                self.collect_garbage_if_due()
            except Exception:  # keep the loop alive; the failure is logged with its traceback
                if self._metrics is not None:
                    self._metrics.ticks.labels("failed").inc()
                log.exception("scheduler tick failed")

    def collect_garbage_if_due(self) -> None:
        if self._settings is None:
            return
        now = time.monotonic()
        if self._last_gc is not None and now - self._last_gc < self._settings.gc_interval_seconds:
            return
        self._last_gc = now
        report = collect_garbage(self._session_factory, self._blobs, self._clock(),
                                 retention_seconds=self._settings.upload_retention_seconds,
                                 grace_seconds=self._settings.gc_grace_seconds)
        if report.blobs_deleted or report.orphan_files_deleted or report.temp_files_deleted:
            log.info("garbage collection: %s", report.as_dict())

    def tick(self, wait: bool = True) -> int:
        """One tick. With the job pool, ``wait`` waits for the advances it started and counts their
        changes (the background loop does not wait: a finished job wakes it)."""
        started: list[concurrent.futures.Future] = []
        # the clients it made a task leasable for, which the held lease requests are told (with jobs,
        # its lease expiries here; each job tells those it opened tasks for when it is done)
        leasable: set[int] = set()
        with observing(self._metrics):
            changes = scheduler_tick(self._session_factory, self._blobs, self._clock(),
                                     submit=(lambda fid, advance: self._submit(fid, advance, started))
                                     if self._pool is not None else None, leasable=leasable)
        if wait and started:
            changes += sum(f.result() for f in concurrent.futures.as_completed(started) if not f.cancelled())
        if self._metrics is not None:
            self._metrics.ticks.labels("ok" if changes >= 0 else "skipped").inc()
        if changes > 0 and self._on_change is not None:
            self._on_change(leasable)
        return max(changes, 0)


def create_app(settings: Settings | None = None, clock: Clock | None = None) -> FastAPI:
    """Build the coordinator from settings (default: environment variables ``HILORA_*``)."""
    settings = settings or Settings()
    clock = clock or utc_now
    faults.configure(settings.fault_at)
    engine = make_engine(settings.database_url)
    if settings.migrate_on_start:
        upgrade_to_head(engine)
    session_factory = make_session_factory(engine)
    blobs = BlobStore(settings.blob_dir)
    metrics = Metrics(session_factory, clock)
    # held lease requests end when uvicorn begins to shut down (cli.py puts its Server on app.state)
    def lease_many(wanted: dict[int, str]) -> dict:
        with session_factory() as session, session.begin():
            return tasks.lease_many(session, wanted, clock())

    lease_waiters = LeaseWaiters(session_factory, settings.long_poll_interval_seconds,
                                 closing=lambda: bool(getattr(getattr(app.state, "server", None), "should_exit", False)),
                                 grant=lease_many)
    scheduler = Scheduler(session_factory, blobs, clock, settings.scheduler_interval, metrics, settings,
                          on_change=lease_waiters.poke)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        lease_waiters.start()
        if settings.run_scheduler:
            scheduler.start()
        try:
            yield
        finally:
            await lease_waiters.stop()
            scheduler.stop()
            engine.dispose()

    # Every route may answer 413 (coordinator.limits) and 426 (the protocol check): say so once here.
    app = FastAPI(title="hilora coordinator", version=__version__, lifespan=lifespan, responses=COMMON_RESPONSES,
                  description="HiLoRA federated learning: registration, tasks, adapters, clustering.",
                  docs_url=None, redoc_url=None)  # their pages load CDN scripts: our /docs has none
    api_docs.install(app)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = session_factory
    app.state.read_session_factory = make_read_session_factory(engine)
    app.state.lease_session_factory = make_lease_session_factory(engine)
    app.state.blobs = blobs
    app.state.inline_adapters = InlineAdapters(blobs, settings.inline_adapter_max_bytes)
    app.state.clock = clock
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.lease_waiters = lease_waiters
    app.state.lease_limiter = LeaseRateLimiter(settings.lease_rate_per_second, settings.lease_burst)
    app.state.registration_limiter = LeaseRateLimiter(settings.registration_rate_per_second,
                                                      settings.registration_burst)
    app.state.upload_slots = UploadSlots(settings.max_uploads_in_flight_per_client, settings.max_uploads_in_flight,
                                         settings.max_uploads_in_flight_per_federation)
    app.state.body_budget = BodyBudget(settings.max_buffered_body_bytes)
    app.add_middleware(BodyLimitMiddleware, limit_of=lambda: settings.max_json_body_bytes,
                       budget=app.state.body_budget, timeout_of=lambda: settings.body_read_timeout_seconds)
    app.add_middleware(MetricsMiddleware, metrics_of=lambda: metrics)
    app.add_middleware(RequestContextMiddleware)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics(authorization: Annotated[str | None, Header()] = None) -> Response:
        """Prometheus exposition. Open unless HILORA_METRICS_TOKEN is set (then Bearer it)."""
        want = settings.metrics_token
        if want and not (authorization and authorization.startswith("Bearer ")
                         and constant_time_equals(authorization[7:].strip(), want)):
            return JSONResponse(status_code=401, content={"error": "bad_metrics_token",
                                                          "detail": "this /metrics needs HILORA_METRICS_TOKEN as a Bearer token"})
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        headers = ({"Retry-After": retry_after_header(getattr(exc, "retry_after", 1.0))}
                   if exc.status_code in (429, 503) else None)
        if exc.status_code in (408, 413):  # stop reading the rest of a refused body: close the connection
            headers = {"Connection": "close"}
        return JSONResponse(status_code=exc.status_code, content={"error": exc.code, "detail": exc.detail},
                            headers=headers)

    @app.exception_handler(DataError)
    async def _data_error(request: Request, exc: DataError) -> JSONResponse:
        # The database refused a value that got past validation (e.g. an id over 2^31-1 in a route
        # that does not bound it): the caller's data, not a server fault. Logged to find the route.
        log.warning("database refused a value on %s %s: %s", request.method, request.url.path,
                    str(exc.orig).splitlines()[0] if exc.orig else exc)
        return JSONResponse(status_code=422, content={
            "error": "invalid_value", "detail": "a value is out of the range the database can store"})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not decode the body
            return JSONResponse(status_code=422, content={
                "error": "invalid_request",
                "detail": f"the request body cannot be parsed ({type(exc.__cause__).__name__})"})
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:10]:
            loc = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{loc}: {err.get('msg')}")
        return JSONResponse(status_code=422, content={"error": "invalid_request", "detail": "; ".join(parts)})

    app.include_router(router)
    app.include_router(models_router)
    app.include_router(admin_router)
    return app
