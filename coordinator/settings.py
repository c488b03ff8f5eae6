"""The coordinator's settings: one pydantic-settings class, environment prefix ``HILORA_``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.logformat import LOG_LEVELS
from shared.validation import error_message

DEFAULT_ADMIN_TOKEN = "hilora-dev-admin"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HILORA_", extra="ignore")

    database_url: str = Field(default="sqlite:///./hilora-state/coordinator.db")
    blob_dir: Path = Field(default=Path("./hilora-state/blobs"))
    admin_token: str = Field(default=DEFAULT_ADMIN_TOKEN)
    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=0, le=65535)
    dev: bool = Field(default=False, description="development mode: allows the default admin token")
    scheduler_interval: float = Field(default=0.5, gt=0, description="seconds between scheduler ticks")
    run_scheduler: bool = True
    scheduler_jobs: int = Field(default=4, ge=1, le=64, description="federations the scheduler advances at once, "
                                "each in its own thread and transaction (PostgreSQL; SQLite, with one writer, "
                                "advances them one after the other), so that one federation's long clustering or "
                                "aggregation does not hold up the others")
    migrate_on_start: bool = True
    log_level: str = Field(default="info", description="debug, info, warning, error or critical")
    log_format: Literal["text", "json"] = Field(default="text", description="'json': one JSON object per log "
                                                "line with the request id and federation/round/task ids")
    upload_retention_seconds: float | None = Field(
        default=7 * 86400, ge=0, description="uploads of rounds closed longer ago are deleted (the newest "
        "probe round of each scope is kept); 'never' keeps every upload")
    gc_interval_seconds: float = Field(default=3600.0, gt=0, description="seconds between garbage collections")
    gc_grace_seconds: float = Field(default=3600.0, ge=0, description="blob-store files without a row are "
                                    "deleted only once this old (uploads in flight are younger)")
    metrics_token: str | None = Field(default=None, description="if set, /metrics needs it as a Bearer token")
    fault_at: str | None = Field(default=None, description="test only: '<point>[:<n>]' kills the process "
                                 "at the n-th hit of a fault point (coordinator.faults)")
    # Limits against hostile or broken callers (coordinator.limits, docs/security.md), per replica.
    max_json_body_bytes: int = Field(default=1 << 20, ge=1024, description="largest request body of every "
                                     "route but the two streaming ones (task upload, backbone blob): 413")
    lease_rate_per_second: float = Field(default=10.0, ge=0, description="lease requests per second per "
                                         "client (token bucket; 0 = unlimited): 429 with Retry-After")
    lease_burst: float = Field(default=30.0, ge=1, description="token bucket size of the lease rate limit")
    registration_rate_per_second: float = Field(default=2.0, ge=0, description="registrations per second per "
                                                "federation (token bucket; 0 = unlimited): 429 with Retry-After")
    registration_burst: float = Field(default=200.0, ge=1, description="token bucket size of the registration "
                                      "rate limit (a consortium's clients joining at once)")
    max_uploads_in_flight_per_client: int = Field(default=2, ge=1, description="concurrent uploads of one "
                                                  "client: 429 with Retry-After")
    max_uploads_in_flight_per_federation: int = Field(default=16, ge=1, description="concurrent uploads of "
                                                      "one federation on this replica: 503 with Retry-After")
    body_read_timeout_seconds: float = Field(default=30.0, gt=0, le=3600, description="a request body whose next "
                                             "chunk takes longer is refused (408 body_timeout) and its "
                                             "connection closed")
    max_buffered_body_bytes: int = Field(default=64 << 20, ge=1 << 20, description="bytes of JSON request "
                                         "bodies this replica holds at once while receiving them (before "
                                         "anyone is authenticated): 503 busy past it")
    limit_concurrency: int = Field(default=2048, ge=16, description="uvicorn: connections and tasks at once; "
                                   "more are answered 503 (room for long-polling workers)")
    timeout_keep_alive: float = Field(default=5.0, gt=0, le=600, description="uvicorn: seconds an idle "
                                      "keep-alive connection is held")
    max_uploads_per_task: int = Field(default=16, ge=1, le=10_000, description="distinct bodies one task "
                                      "may receive under its leases (a new one replaces the stored one, whose "
                                      "blob is freed at once; the same body again is free): 409 upload_quota")
    long_poll_max_seconds: float = Field(default=30.0, ge=0, le=600, description="longest a lease request "
                                         "with ?wait=S is held waiting for a task (S is capped to it; 0 turns "
                                         "long polling off: every lease answers at once)")
    long_poll_interval_seconds: float = Field(default=0.5, gt=0, le=60, description="how often held lease "
                                              "requests look for tasks opened by another replica (this "
                                              "replica's own changes wake them at once)")
    inline_adapter_max_bytes: int = Field(default=256 << 10, ge=0, le=16 << 20, description="a lease answer "
                                          "carries the task's input adapter versions up to this size inline "
                                          "(base64) for a worker that says which versions it holds, so the "
                                          "task starts without a download; 0: never inline")
    max_uploads_in_flight: int = Field(default=64, ge=1, description="concurrent uploads of this replica: "
                                       "503 with Retry-After")

    @field_validator("upload_retention_seconds", mode="before")
    @classmethod
    def _never(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("", "none", "null", "never"):
            return None
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"unknown log level {value!r} (one of: {', '.join(LOG_LEVELS)})")
        return value.lower()

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> "Settings":
        if not self.dev and self.admin_token == DEFAULT_ADMIN_TOKEN:
            raise ValueError(
                "HILORA_ADMIN_TOKEN is the built-in default; set a secret admin token "
                "(or HILORA_DEV=1 for a local development run)"
            )
        if self.admin_token == DEFAULT_ADMIN_TOKEN and self.host not in LOOPBACK_HOSTS:
            raise ValueError(
                f"the built-in default admin token is public: HILORA_DEV=1 allows it only on a loopback "
                f"host ({', '.join(sorted(LOOPBACK_HOSTS))}), not on HILORA_HOST={self.host}; set "
                f"HILORA_ADMIN_TOKEN to a secret to listen there")
        from coordinator.faults import parse

        parse(self.fault_at)
        if len(self.admin_token) < 16:
            raise ValueError("HILORA_ADMIN_TOKEN must be at least 16 characters")
        return self


class SettingsError(ValueError):
    """The HILORA_* environment does not make valid settings; ``str()`` is one line naming each
    variable and what is wrong with it."""


# Settings whose values may be secrets: an error names the variable, never echoes what it holds.
_SECRET_PARTS = ("token", "secret", "password", "url")


def describe_settings_errors(exc: ValidationError) -> str:
    """One line for a ValidationError of ``Settings``: ``HILORA_PORT='abc': Input should be a valid
    integer, ...`` per field (the value left out for secrets and URLs, which may hold passwords),
    and the cross-field checks' own messages."""
    parts = []
    for error in exc.errors():
        message = error_message(error)
        loc = error.get("loc") or ()
        if not loc:
            parts.append(message)
            continue
        field = str(loc[0])
        variable = f"HILORA_{field.upper()}"
        if any(part in field for part in _SECRET_PARTS) or "input" not in error or isinstance(error["input"], dict):
            parts.append(f"{variable}: {message}")
        else:
            parts.append(f"{variable}={' '.join(str(error['input']).split())[:80]!r}: {message}")
    return "; ".join(parts)


def load_settings(**values: object) -> Settings:
    """``Settings(**values)`` from the environment, or a SettingsError of one line (the CLI prints it
    and exits 2) instead of pydantic's multi-line report."""
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise SettingsError(describe_settings_errors(exc)) from None
