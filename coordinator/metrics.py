"""Prometheus metrics of the coordinator: one registry per app (``app.state.metrics``).

Two kinds:
- process counters (this replica): HTTP requests by route template and status, leases granted or
  empty, uploads accepted and rejected by reason, scheduler ticks and their failures;
- database gauges, computed at scrape time from the shared database, so every replica reports the
  same numbers: rounds by stage and status, tasks by status, federations by state, clients by
  status, and aggregation time (a summary built from ``rounds.aggregation_seconds``); per
  federation: clients online, K of the newest clustering run, accuracy per tier (newest round).

Services deep in a call (clustering, run by the scheduler thread or by an admin request) observe
durations through ``observe_clustering_seconds``: the app's ``Metrics`` is made current per request
(``MetricsMiddleware``) and per scheduler tick (``observing``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timedelta, timezone

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator.models import Client, ClusteringRun, Federation, Round, Task

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class DatabaseCollector(Collector):
    """Gauges read from the database on each scrape (a handful of GROUP BY queries, and per
    federation a look at its newest clustering run and its newest round with accuracies)."""

    def __init__(self, session_factory, clock: Clock | None = None) -> None:  # noqa: ANN001
        self._session_factory = session_factory
        self._clock = clock or _utc_now

    def collect(self):  # noqa: ANN201
        rounds = GaugeMetricFamily("hilora_rounds", "Rounds by stage and status", labels=["stage", "status"])
        tasks = GaugeMetricFamily("hilora_tasks", "Tasks by status", labels=["status"])
        feds = GaugeMetricFamily("hilora_federations", "Federations by state", labels=["state"])
        clients = GaugeMetricFamily("hilora_clients", "Clients by status", labels=["status"])
        agg = SummaryMetricFamily("hilora_aggregation_seconds",
                                  "Time spent aggregating a round's uploads into a new adapter version",
                                  labels=["stage"])
        up = GaugeMetricFamily("hilora_database_up", "1 when the last scrape could read the database")
        online = GaugeMetricFamily("hilora_clients_online", "Clients seen within 2 x lease_seconds, per federation",
                                   labels=["federation"])
        current_k = GaugeMetricFamily("hilora_clusters_k", "K of the newest clustering run, per federation",
                                      labels=["federation"])
        accuracy = GaugeMetricFamily("hilora_accuracy", "Mean test accuracy the workers reported in the newest "
                                     "training or final-evaluation round that reports the tier, per federation and tier",
                                     labels=["federation", "tier"])
        try:
            with self._session_factory() as session:
                for stage, status, n in session.execute(
                        select(Round.stage, Round.status, func.count()).group_by(Round.stage, Round.status)):
                    rounds.add_metric([stage, status], n)
                for status, n in session.execute(select(Task.status, func.count()).group_by(Task.status)):
                    tasks.add_metric([status], n)
                for state, n in session.execute(select(Federation.state, func.count()).group_by(Federation.state)):
                    feds.add_metric([state], n)
                for status, n in session.execute(select(Client.status, func.count()).group_by(Client.status)):
                    clients.add_metric([status], n)
                for stage, n, total in session.execute(
                        select(Round.stage, func.count(), func.sum(Round.aggregation_seconds))
                        .where(Round.aggregation_seconds.is_not(None)).group_by(Round.stage)):
                    agg.add_metric([stage], count_value=n, sum_value=float(total or 0.0))
                self._collect_federations(session, online, current_k, accuracy)
            up.add_metric([], 1)
        except Exception:  # a scrape must not fail because the database is down: say so instead
            up.add_metric([], 0)
            yield up
            return
        yield from (rounds, tasks, feds, clients, agg, online, current_k, accuracy, up)

    def _collect_federations(self, session, online: GaugeMetricFamily, current_k: GaugeMetricFamily,  # noqa: ANN001
                             accuracy: GaugeMetricFamily) -> None:
        from coordinator.services.admin_views import latest_accuracy, online_window_seconds  # no import cycle

        now = self._clock()
        for fed in session.scalars(select(Federation).order_by(Federation.id)):
            label = str(fed.id)
            since = now - timedelta(seconds=online_window_seconds(fed))
            online.add_metric([label], session.scalar(select(func.count()).select_from(Client).where(
                Client.federation_id == fed.id, Client.last_seen_at >= since)) or 0)
            k = session.scalar(select(ClusteringRun.k).where(ClusteringRun.federation_id == fed.id)
                               .order_by(ClusteringRun.id.desc()).limit(1))
            if k is not None:
                current_k.add_metric([label], k)
            for tier, stats in latest_accuracy(session, fed.id).items():
                if stats.mean is not None:
                    accuracy.add_metric([label, tier], stats.mean)


class Metrics:
    def __init__(self, session_factory, clock: Clock | None = None) -> None:  # noqa: ANN001
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hilora_http_requests", "HTTP requests by route template and status",
                                ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram("hilora_http_request_seconds", "HTTP request duration by route",
                                         ["route"], registry=r,
                                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.leases = Counter("hilora_leases", "Lease requests: granted a task or answered empty",
                              ["outcome"], registry=r)
        self.uploads = Counter("hilora_uploads", "Uploads accepted, or rejected by reason",
                               ["result", "reason"], registry=r)
        self.upload_bytes = Counter("hilora_upload_bytes", "Bytes of accepted uploads", registry=r)
        self.ticks = Counter("hilora_scheduler_ticks", "Scheduler ticks by outcome (ok, failed, skipped: "
                             "another replica held the lock)", ["outcome"], registry=r)
        self.scheduler_failures = Counter(
            "hilora_scheduler_failures", "Failed attempts to advance one federation, by the stage it was in "
            "(the tick went on with the other federations; see the federation's last_failure)",
            ["stage"], registry=r)
        self.lease_seconds = Histogram("hilora_lease_seconds", "Time to answer a lease request, by outcome",
                                       ["outcome"], registry=r,
                                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.held_lease_seconds = Histogram(
            "hilora_held_lease_seconds", "Long polling: from the moment this replica noticed the change that "
            "opened a held request's task (its scheduler's tick or a released lease; the periodic check for "
            "another replica's) to the granted answer", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 1, 2.5, 5))
        self.clustering_seconds = Histogram("hilora_clustering_seconds", "Time of one LSAC run on probe uploads "
                                            "(distances, affinity, spectral clustering), by features",
                                            ["features"], registry=r,
                                            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.registry.register(DatabaseCollector(session_factory, clock))


_current: ContextVar[Metrics | None] = ContextVar("hilora_current_metrics", default=None)


@contextmanager
def observing(metrics: Metrics | None) -> Iterator[None]:
    """Make ``metrics`` current for what runs inside (in this thread or task)."""
    token = _current.set(metrics)
    try:
        yield
    finally:
        _current.reset(token)


def observe_clustering_seconds(seconds: float, features: str) -> None:
    """Record one clustering run's duration on the current app's metrics (none: nothing)."""
    metrics = _current.get()
    if metrics is not None:
        metrics.clustering_seconds.labels(features).observe(seconds)


def observe_scheduler_failure(stage: str) -> None:
    """Count one failed attempt to advance a federation on the current app's metrics."""
    metrics = _current.get()
    if metrics is not None:
        metrics.scheduler_failures.labels(stage).inc()


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class MetricsMiddleware:
    """Counts every HTTP request by its route template (``/v1/tasks/{task_id}/upload``, never the
    concrete path, so label cardinality stays bounded) and response status."""

    def __init__(self, app: ASGIApp, metrics_of: Callable[[], Metrics]) -> None:
        self.app = app
        self.metrics_of = metrics_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        metrics = self.metrics_of()
        token = _current.set(metrics)
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            _current.reset(token)
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            method = method if method in HTTP_METHODS else "other"  # a made-up method is no new series
            metrics.requests.labels(method, template, str(status["code"])).inc()
            metrics.request_seconds.labels(template).observe(time.perf_counter() - start)
