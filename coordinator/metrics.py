"""Prometheus metrics of the coordinator: one registry per app (``app.state.metrics``).

Two kinds:
- process counters (this replica): HTTP requests by route template and status, leases granted or
  empty, uploads accepted and rejected by reason, scheduler ticks and their failures;
- database gauges, computed at scrape time from the shared database, so every replica reports the
  same numbers: rounds by stage and status, tasks by status, federations by state, clients by
  status, and aggregation time (a summary built from ``rounds.aggregation_seconds``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator.models import Client, Federation, Round, Task


class DatabaseCollector(Collector):
    """Gauges read from the database on each scrape (a handful of GROUP BY queries)."""

    def __init__(self, session_factory) -> None:  # noqa: ANN001
        self._session_factory = session_factory

    def collect(self):  # noqa: ANN201
        rounds = GaugeMetricFamily("hilora_rounds", "Rounds by stage and status", labels=["stage", "status"])
        tasks = GaugeMetricFamily("hilora_tasks", "Tasks by status", labels=["status"])
        feds = GaugeMetricFamily("hilora_federations", "Federations by state", labels=["state"])
        clients = GaugeMetricFamily("hilora_clients", "Clients by status", labels=["status"])
        agg = SummaryMetricFamily("hilora_aggregation_seconds",
                                  "Time spent aggregating a round's uploads into a new adapter version",
                                  labels=["stage"])
        up = GaugeMetricFamily("hilora_database_up", "1 when the last scrape could read the database")
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
            up.add_metric([], 1)
        except Exception:  # a scrape must not fail because the database is down: say so instead
            up.add_metric([], 0)
            yield up
            return
        yield from (rounds, tasks, feds, clients, agg, up)


class Metrics:
    def __init__(self, session_factory) -> None:  # noqa: ANN001
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
        self.registry.register(DatabaseCollector(session_factory))


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

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            metrics = self.metrics_of()
            metrics.requests.labels(scope.get("method", "?"), template, str(status["code"])).inc()
            metrics.request_seconds.labels(template).observe(time.perf_counter() - start)
