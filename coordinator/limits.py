"""Per-replica limits against hostile or broken callers (docs/security.md, "Limits").

- ``BodyLimitMiddleware``: every request body is at most ``max_json_body_bytes`` (default 1 MiB),
  except the two streaming routes, which enforce their own limit while streaming (a task upload:
  the largest valid upload for that task; a backbone blob: 4 GiB, admin only). The body is read by
  this middleware up to the limit and refused (413 ``body_too_large``) as soon as it passes it, so
  FastAPI never buffers a larger JSON body (FastAPI reads a JSON body *before* it checks the
  credentials).
- ``LeaseRateLimiter``: a token bucket per authenticated client (``lease_rate_per_second``,
  ``lease_burst``): 429 ``rate_limited`` with ``Retry-After``. It is keyed by the client the token
  authenticates, never by the client id in the path, so nobody can spend another client's bucket.
- ``UploadSlots``: concurrent in-flight uploads per client (429 ``too_many_uploads``), per
  federation and on the whole replica (503 ``uploads_busy``), all with ``Retry-After``, so one
  federation's slow bodies cannot hold every slot of the replica.
- ``BodyBudget``: the bytes every JSON body being read holds at once, across requests (the body is
  read before anyone is authenticated): past ``max_buffered_body_bytes``, 503 ``busy``.
- Body read timeouts (``body_read_timeout_seconds``): a body whose next chunk does not arrive in
  time is refused with 408 ``body_timeout`` and its connection closed, in the middleware (JSON
  bodies) and in the upload stream, so a stalled body holds neither memory nor an upload slot.

All of it is in memory, per replica: N replicas behind a load balancer allow up to N times the
configured rates in total (the limits bound the work of each process, which is what they protect).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator.errors import ServiceUnavailable, TooManyRequests

# Routes that stream their body to disk and enforce their own, larger limit while streaming.
STREAMING_ROUTES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("PUT", re.compile(r"^/v1/tasks/[^/]+/upload/?$")),
    ("PUT", re.compile(r"^/v1/blobs/[^/]+/?$")),
)


def _error_body(description: str) -> dict:
    from shared.schemas import ErrorBody

    return {"model": ErrorBody, "description": description}


# Answers any route may give, documented on every operation of the schema (FastAPI(responses=...)).
COMMON_RESPONSES = {
    413: _error_body("the request body is over its limit (body_too_large, too_large)"),
    426: _error_body("the caller's X-Hilora-Protocol is not this coordinator's (protocol_mismatch)"),
}


def retry_after_header(seconds: float) -> str:
    """Retry-After is whole seconds; never below 1 (a worker honours it as a floor)."""
    return str(max(1, math.ceil(seconds)))


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit`` bytes with 413 before the application sees them.

    A declared ``Content-Length`` over the limit is refused without reading anything; otherwise the
    body is read (at most ``limit`` bytes are ever held) and replayed to the application."""

    def __init__(self, app: ASGIApp, limit_of: Callable[[], int], budget: "BodyBudget | None" = None,
                 timeout_of: Callable[[], float | None] = lambda: None) -> None:
        self.app = app
        self.limit_of = limit_of
        self.budget = budget or BodyBudget(None)
        self.timeout_of = timeout_of

    @staticmethod
    def _streaming(scope: Scope) -> bool:
        method, path = scope.get("method", ""), scope.get("path", "")
        return any(method == m and pattern.match(path) for m, pattern in STREAMING_ROUTES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._streaming(scope):
            await self.app(scope, receive, send)
            return
        limit = self.limit_of()
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                declared = value.decode("latin-1").strip()
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _refuse(send, limit, f"the body is {declared} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        timeout = self.timeout_of()
        try:
            while True:
                try:
                    message = await asyncio.wait_for(receive(), timeout)
                except asyncio.TimeoutError:
                    await _answer(send, 408, "body_timeout", f"no part of the body arrived for {timeout:g} s "
                                  f"(HILORA_BODY_READ_TIMEOUT_SECONDS)")
                    return
                if message["type"] != "http.request":  # http.disconnect: nobody is left to answer
                    await _answer(send, 400, "client_disconnected", "the client went away mid-body")
                    return
                body = message.get("body", b"")
                size += len(body)
                if size > limit:
                    await _refuse(send, limit, f"the body passed {limit} bytes")
                    return
                if not self.budget.take(len(body)):
                    await _answer(send, 503, "busy", "this coordinator holds too many request bodies being "
                                  "received (HILORA_MAX_BUFFERED_BODY_BYTES); retry shortly", retry_after=1)
                    return
                chunks.append(body)
                if not message.get("more_body", False):
                    break
        finally:
            self.budget.give(sum(len(c) for c in chunks))
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Message:
            if replay:
                return replay.pop(0)
            return await receive()

        await self.app(scope, replayed, send)


async def _refuse(send: Send, limit: int, what: str) -> None:
    await _answer(send, 413, "body_too_large",
                  f"{what}; request bodies are limited to {limit} bytes (HILORA_MAX_JSON_BODY_BYTES)")


async def _answer(send: Send, status: int, error: str, detail: str, retry_after: float | None = None) -> None:
    body = json.dumps({"error": error, "detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    if retry_after is not None:
        headers.append((b"retry-after", retry_after_header(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyBudget:
    """Bytes of request bodies held in memory at once by ``BodyLimitMiddleware``, across requests:
    ``take`` fails once ``limit`` would be passed (None: no limit). Event-loop only, no lock."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        if self.limit is not None and self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held = max(0, self.held - n)


class LeaseRateLimiter:
    """A token bucket per key: ``burst`` tokens, refilled at ``rate`` per second. At most
    ``max_keys`` buckets are kept (least recently used first out; a forgotten bucket is full)."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[object, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def acquire(self, key: object) -> float:
        """Take one token: 0.0 when granted, else the seconds until the next token."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                wait, tokens = 0.0, tokens - 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return wait

    def check(self, key: object, what: str = "lease requests", per: str = "client") -> None:
        """Take one token or raise 429 ``rate_limited`` with the wait as Retry-After."""
        wait = self.acquire(key)
        if wait > 0:
            raise TooManyRequests(
                f"too many {what}: at most {self.rate:g} per second per {per} (burst {self.burst:g}); "
                f"retry after {wait:.2f} s", code="rate_limited", retry_after=wait)


class UploadSlots:
    """Counts uploads in flight (from the first byte read to the answer) per client, per federation
    and in total."""

    def __init__(self, per_client: int, total: int, per_federation: int | None = None) -> None:
        self.per_client = per_client
        self.total = total
        self.per_federation = per_federation if per_federation is not None else total
        self._by_client: dict[int, int] = {}
        self._by_federation: dict[int, int] = {}
        self._in_flight = 0
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def in_flight_for(self, client_id: int) -> int:
        return self._by_client.get(client_id, 0)

    def in_flight_in(self, federation_id: int) -> int:
        return self._by_federation.get(federation_id, 0)

    @contextmanager
    def slot(self, client_id: int, federation_id: int = 0) -> Iterator[None]:
        with self._lock:
            if self._by_client.get(client_id, 0) >= self.per_client:
                raise TooManyRequests(
                    f"client {client_id} already has {self.per_client} uploads in flight "
                    f"(HILORA_MAX_UPLOADS_IN_FLIGHT_PER_CLIENT)", code="too_many_uploads", retry_after=1.0)
            if self._by_federation.get(federation_id, 0) >= self.per_federation:
                raise ServiceUnavailable(
                    f"federation {federation_id} has {self.per_federation} uploads in flight on this coordinator "
                    f"(HILORA_MAX_UPLOADS_IN_FLIGHT_PER_FEDERATION); retry shortly", code="uploads_busy",
                    retry_after=1.0)
            if self._in_flight >= self.total:
                raise ServiceUnavailable(
                    f"this coordinator has {self.total} uploads in flight (HILORA_MAX_UPLOADS_IN_FLIGHT); "
                    f"retry shortly", code="uploads_busy", retry_after=1.0)
            self._by_client[client_id] = self._by_client.get(client_id, 0) + 1
            self._by_federation[federation_id] = self._by_federation.get(federation_id, 0) + 1
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                for counts, key in ((self._by_client, client_id), (self._by_federation, federation_id)):
                    left = counts.get(key, 1) - 1
                    if left:
                        counts[key] = left
                    else:
                        counts.pop(key, None)
                self._in_flight -= 1
