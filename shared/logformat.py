"""One JSON object per log line, for the coordinator (``HILORA_LOG_FORMAT=json``) and the worker
(``hilora worker --log-format json``): ``{"time", "level", "logger", "message", ...context,
"exception"?}``, where the context is whatever ids the process knows at that moment (the
coordinator's request, federation, round, task and client; the worker's task and client)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timezone

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class JsonFormatter(logging.Formatter):
    """A record as one JSON line, with ``context()``'s fields (when given) after the message."""

    def __init__(self, context: Callable[[], Mapping[str, object]] | None = None) -> None:
        super().__init__()
        self._context = context

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._context is not None:
            entry.update(self._context())
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def check_log_settings(log_format: str, level: str, source: str) -> None:
    """Raise ValueError naming ``source`` (the option or variable) for an unknown format or level."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"{source}: unknown log format {log_format!r} (one of: {', '.join(LOG_FORMATS)})")
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"{source}: unknown log level {level!r} (one of: {', '.join(LOG_LEVELS)})")


def json_to_stderr(level: str, context: Callable[[], Mapping[str, object]] | None = None) -> None:
    """Every logger writes JSON lines to stderr through the root logger, at ``level``."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(context))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
