"""Structured logs: one JSON object per line (``HILORA_LOG_FORMAT=json``), with the request id and
the federation, round, task and client ids of what is being done, when known.

The ids live in context variables: ``RequestContextMiddleware`` sets the request id (the caller's
``X-Request-Id`` when it is a sane token, else a new one, echoed in the response) and the ids
named in the request path; the scheduler sets the federation it advances (``log_context``).
Sync routes run in a worker thread with a copy of the request's context, so their logs carry
the ids too.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.logformat import JsonFormatter as SharedJsonFormatter
from shared.logformat import json_to_stderr

REQUEST_ID_HEADER = "X-Request-Id"
CONTEXT_FIELDS = ("request_id", "federation_id", "round_id", "task_id", "client_id")
_vars: dict[str, ContextVar[str | int | None]] = {name: ContextVar(f"hilora_{name}", default=None)
                                                  for name in CONTEXT_FIELDS}
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_PATH_IDS = (
    (re.compile(r"^/v1/federations/(\d+)(?:/|$)"), "federation_id"),
    (re.compile(r"^/v1/rounds/(\d+)(?:/|$)"), "round_id"),
    (re.compile(r"^/v1/tasks/(\d+)(?:/|$)"), "task_id"),
    (re.compile(r"^/v1/clients/(\d+)(?:/|$)"), "client_id"),
    (re.compile(r"^/v1/federations/\d+/clients/(\d+)(?:/|$)"), "client_id"),
)


def current_context() -> dict[str, str | int]:
    """The ids known here and now (only those that are set)."""
    out = {}
    for name, var in _vars.items():
        value = var.get()
        if value is not None:
            out[name] = value
    return out


@contextmanager
def log_context(**ids: str | int | None) -> Iterator[None]:
    """Set some of ``CONTEXT_FIELDS`` for what runs inside."""
    tokens = [(_vars[name], _vars[name].set(value)) for name, value in ids.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class JsonFormatter(SharedJsonFormatter):
    """``{"time", "level", "logger", "message", ...ids, "exception"?}`` on one line, with the ids of
    ``current_context``."""

    def __init__(self) -> None:
        super().__init__(current_context)


def configure_logging(log_format: str, level: str = "info") -> None:
    """``json``: every logger (uvicorn's included) writes JSON lines to stderr through the root
    logger; run uvicorn with ``log_config=None`` so it does not install its own handlers.
    ``text``: leave logging as uvicorn sets it up."""
    if log_format != "json":
        return
    json_to_stderr(level, current_context)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


class RequestContextMiddleware:
    """Gives every HTTP request a request id (echoed as ``X-Request-Id``) and puts it and the ids
    of its path into the logging context."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = None
        for key, value in scope.get("headers", ()):
            if key == b"x-request-id":
                sent = value.decode("latin-1").strip()
                break
        request_id = sent if sent and _SANE_REQUEST_ID.match(sent) else uuid.uuid4().hex
        ids: dict[str, str | int] = {"request_id": request_id}
        path = scope.get("path", "")
        for pattern, name in _PATH_IDS:
            match = pattern.match(path)
            if match:
                ids[name] = int(match.group(1))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        with log_context(**ids):
            await self.app(scope, receive, send_with_id)
