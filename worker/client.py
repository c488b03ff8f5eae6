"""Typed httpx client of the coordinator API, with retries (backoff + jitter) on transient failures.

Transient: connection errors, timeouts, 5xx, 429 (honouring Retry-After). Everything else is a
``CoordinatorError`` carrying the coordinator's JSON error code and detail. This module imports no
torch, so the admin CLI and the demo launcher use it too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from shared import PROTOCOL_VERSION, __version__
from shared.config import FederationConfig
from shared.schemas import (
    COMPLETE_HEADER,
    HAVE_ADAPTERS_HEADER,
    PROTOCOL_HEADER,
    SHA256_HEADER,
    WORKER_ID_HEADER,
    AdapterRef,
    ClientAdapters,
    ClientRegistered,
    FederationCreated,
    FederationReport,
    FederationStatus,
    LeaseResponse,
    TaskAssignment,
    TaskCompleted,
    UploadAck,
    VersionInfo,
    format_have_adapters,
)

# a completion rides on its upload's request when its JSON is at most this long (HTTP servers limit
# a request's headers to 8-16 KB in all); a longer one (hundreds of metrics) goes to /complete
COMPLETE_HEADER_MAX_BYTES = 4096

log = logging.getLogger("hilora.client")


class CoordinatorError(RuntimeError):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


class CoordinatorUnavailable(RuntimeError):
    """The coordinator could not be reached (or kept failing) within the retry budget."""


class CoordinatorClient:
    def __init__(self, base_url: str, worker_id: str = "hilora-cli", timeout: float = 60.0,
                 max_retries: int = 8, max_backoff: float = 10.0, transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.max_backoff = max_backoff
        # When set and true, requests stop retrying (one try each): the worker is shutting down.
        self.interrupted: Callable[[], bool] | None = None
        self._timeout, self._transport = timeout, transport
        self._headers = {PROTOCOL_HEADER: str(PROTOCOL_VERSION), WORKER_ID_HEADER: worker_id,
                         "User-Agent": f"hilora/{__version__}"}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport, headers=self._headers)
        # held lease requests (long polling) go through their own connections, which ``abort_held``
        # closes to end them at once (the worker stopping) without touching the main client
        self._held: httpx.Client | None = None
        self._held_lock = threading.Lock()

    def close(self) -> None:
        self.abort_held()
        self._http.close()

    def __enter__(self) -> "CoordinatorClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transport

    def request(self, method: str, path: str, token: str | None = None, *, max_retries: int | None = None,
                **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        retries = self.max_retries if max_retries is None else max_retries
        last: Exception | None = None
        tries = 0
        for attempt in range(retries + 1):
            if attempt > 0 and self.interrupted is not None and self.interrupted():
                break
            tries += 1
            try:
                response = self._http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                last = exc
                self._retry_note(method, path, attempt, retries, exc)
                self._sleep_backoff(attempt, None, retries)
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last = CoordinatorError(response.status_code, *self._error_of(response))
                self._retry_note(method, path, attempt, retries, last)
                self._sleep_backoff(attempt, response.headers.get("Retry-After"), retries)
                continue
            if response.status_code >= 400:
                raise CoordinatorError(response.status_code, *self._error_of(response))
            return response
        raise CoordinatorUnavailable(f"{method} {self.base_url}{path} failed {tries} times: {last}")

    @staticmethod
    def _retry_note(method: str, path: str, attempt: int, retries: int, error: Exception) -> None:
        if attempt < retries:
            log.info("%s %s failed (%s: %s); retry %d/%d", method, path, type(error).__name__, error,
                     attempt + 1, retries)

    def _sleep_backoff(self, attempt: int, retry_after: str | None, retries: int | None = None) -> None:
        if attempt >= (self.max_retries if retries is None else retries):
            return
        delay = min(self.max_backoff, 0.25 * 2**attempt) * (0.5 + random.random() / 2)
        if retry_after is not None:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        # sleep in short steps so that a shutdown (``interrupted``) cuts the wait short
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            if self.interrupted is not None and self.interrupted():
                return
            time.sleep(min(left, 0.2))

    @staticmethod
    def _error_of(response: httpx.Response) -> tuple[str, str]:
        try:
            body = response.json()
            return str(body.get("error", "error")), str(body.get("detail", body))
        except ValueError:
            return "error", response.text[:500]

    # ------------------------------------------------------------------ public routes

    def version(self) -> VersionInfo:
        info = VersionInfo.model_validate(self.request("GET", "/v1/version").json())
        if info.protocol != PROTOCOL_VERSION:
            raise CoordinatorError(426, "protocol_mismatch",
                                   f"coordinator speaks protocol {info.protocol} (hilora {info.version}); "
                                   f"this worker speaks {PROTOCOL_VERSION} (hilora {__version__})")
        return info

    def ready(self) -> bool:
        try:
            return self._http.get("/v1/readyz").status_code == 200
        except httpx.TransportError:
            return False

    # ------------------------------------------------------------------ client routes

    def register(self, federation_id: int, enrollment_secret: str, name: str, num_samples: int) -> ClientRegistered:
        r = self.request("POST", f"/v1/federations/{federation_id}/clients", token=enrollment_secret,
                         json={"name": name, "num_samples": num_samples})
        return ClientRegistered.model_validate(r.json())

    def federation_config(self, federation_id: int, token: str) -> FederationConfig:
        return FederationConfig.model_validate(
            self.request("GET", f"/v1/federations/{federation_id}/config", token=token).json())

    def backbone(self, federation_id: int, token: str, expected_sha256: str) -> bytes:
        data = self.request("GET", f"/v1/federations/{federation_id}/backbone", token=token).content
        _verify(data, expected_sha256, "backbone")
        return data

    def adapter(self, version_id: int, token: str, expected_sha256: str) -> bytes:
        data = self.request("GET", f"/v1/adapters/{version_id}", token=token).content
        _verify(data, expected_sha256, f"adapter version {version_id}")
        return data

    def client_adapters(self, client_id: int, token: str) -> ClientAdapters:
        """The newest root version and the newest version of the client's cluster (or null)."""
        return ClientAdapters.model_validate(
            self.request("GET", f"/v1/clients/{client_id}/adapters", token=token).json())

    def lease(self, client_id: int, token: str, have: Iterable[int] | None = None) -> LeaseResponse:
        """The client's next task, or none. ``have``: the adapter version ids this worker holds (its
        task's other input versions then come inline when small; None: never inline)."""
        return LeaseResponse.model_validate(self.request("POST", f"/v1/clients/{client_id}/lease", token=token,
                                                         headers=_have_header(have)).json())

    def hold_lease(self, client_id: int, token: str, wait: float,
                   have: Iterable[int] | None = None) -> LeaseResponse | None:
        """A long poll: the coordinator holds the request up to ``wait`` seconds and answers as soon
        as a task opens for the client. One try: None when it failed in transport or was aborted
        (``abort_held``); the caller polls again. A 4xx raises ``CoordinatorError`` as ``lease`` does;
        a 429/5xx is None (the caller's next plain ``lease`` retries with backoff)."""
        with self._held_lock:
            if self._held is None:
                self._held = httpx.Client(base_url=self.base_url, transport=self._transport, headers=self._headers,
                                          timeout=httpx.Timeout(self._timeout, read=wait + self._timeout),
                                          limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
            http = self._held
        try:
            response = http.post(f"/v1/clients/{client_id}/lease", params={"wait": f"{wait:g}"},
                                 headers={"Authorization": f"Bearer {token}", **_have_header(have)})
        except (httpx.TransportError, RuntimeError) as exc:  # RuntimeError: the client was closed meanwhile
            log.debug("held lease of client %s ended: %s", client_id, exc)
            return None
        if response.status_code == 429 or response.status_code >= 500:
            return None
        if response.status_code >= 400:
            raise CoordinatorError(response.status_code, *self._error_of(response))
        return LeaseResponse.model_validate(response.json())

    def abort_held(self) -> None:
        """End every held lease request now (their callers get None)."""
        with self._held_lock:
            held, self._held = self._held, None
        if held is not None:
            held.close()

    def heartbeat(self, task_id: int, token: str, lease_id: str) -> None:
        self.request("POST", f"/v1/tasks/{task_id}/heartbeat", token=token, json={"lease_id": lease_id})

    def release(self, task_id: int, token: str, lease_id: str, max_retries: int | None = 2) -> None:
        """Give a leased task back (shutdown, pre-emption): it is pending again at once and the
        release does not count as an attempt. 409 ``stale_lease``/``lease_expired`` when the
        lease is no longer current."""
        self.request("POST", f"/v1/tasks/{task_id}/release", token=token, json={"lease_id": lease_id},
                     max_retries=max_retries)

    def upload(self, task_id: int, token: str, lease_id: str, body: bytes,
               complete: tuple[int, dict[str, float]] | None = None) -> UploadAck:
        """PUT the task's tensors. With ``complete`` (num_samples, metrics) the same request also
        completes the task (``X-Hilora-Complete``) when its JSON fits ``COMPLETE_HEADER_MAX_BYTES``;
        the answer's ``status`` is ``done`` then, and None when the caller must still ``complete``."""
        sha = hashlib.sha256(body).hexdigest()
        headers = {SHA256_HEADER: sha, "Content-Type": "application/octet-stream"}
        if complete is not None:
            value = json.dumps({"num_samples": complete[0], "metrics": complete[1]}, separators=(",", ":"))
            if len(value) <= COMPLETE_HEADER_MAX_BYTES:
                headers[COMPLETE_HEADER] = value
        r = self.request("PUT", f"/v1/tasks/{task_id}/upload", token=token, params={"lease_id": lease_id},
                         content=body, headers=headers)
        return UploadAck.model_validate(r.json())

    def complete(self, task_id: int, token: str, lease_id: str, num_samples: int,
                 metrics: dict[str, float]) -> TaskCompleted:
        r = self.request("POST", f"/v1/tasks/{task_id}/complete", token=token,
                         json={"lease_id": lease_id, "num_samples": num_samples, "metrics": metrics})
        return TaskCompleted.model_validate(r.json())

    # ------------------------------------------------------------------ admin routes

    def put_blob(self, admin_token: str, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.request("PUT", f"/v1/blobs/{sha}", token=admin_token, content=data,
                     headers={"Content-Type": "application/octet-stream"})
        return sha

    def create_federation(self, admin_token: str, config: FederationConfig) -> FederationCreated:
        r = self.request("POST", "/v1/federations", token=admin_token,
                         json={"config": config.model_dump(mode="json")})
        return FederationCreated.model_validate(r.json())

    def federation_status(self, admin_token: str, federation_id: int) -> FederationStatus:
        return FederationStatus.model_validate(
            self.request("GET", f"/v1/federations/{federation_id}", token=admin_token).json())

    def federation_report(self, admin_token: str, federation_id: int) -> FederationReport:
        return FederationReport.model_validate(
            self.request("GET", f"/v1/federations/{federation_id}/report", token=admin_token).json())

    def merged_model(self, admin_token: str, federation_id: int, cluster_label: int | None = None) -> bytes:
        """The merged root-only (no label) or cluster-level model as safetensors bytes, checked
        against the coordinator's X-Hilora-Sha256."""
        path = (f"/v1/federations/{federation_id}/root/model" if cluster_label is None
                else f"/v1/federations/{federation_id}/clusters/{cluster_label}/model")
        response = self.request("GET", path, token=admin_token)
        expected = response.headers.get(SHA256_HEADER)
        if expected is None:
            raise CoordinatorError(0, "sha256_missing", f"GET {path}: the response has no {SHA256_HEADER} header")
        _verify(response.content, expected, "merged model")
        return response.content

    def start_federation(self, admin_token: str, federation_id: int) -> FederationStatus:
        return FederationStatus.model_validate(
            self.request("POST", f"/v1/federations/{federation_id}/start", token=admin_token).json())


def _have_header(have: Iterable[int] | None) -> dict[str, str]:
    return {} if have is None else {HAVE_ADAPTERS_HEADER: format_have_adapters(have)}


def inline_adapter(task: TaskAssignment, ref: AdapterRef) -> bytes | None:
    """The bytes of an input version that came inline with ``task`` (checked against the reference's
    sha256), or None: not sent, or not as referenced (then it is downloaded, and checked, as before)."""
    text = task.inline_adapters.get(ref.id)
    if text is None:
        return None
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        log.warning("task %s: adapter version %s came inline but is not base64; downloading it", task.task_id, ref.id)
        return None
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        log.warning("task %s: adapter version %s came inline with bytes that do not hash to %s; downloading it",
                    task.task_id, ref.id, ref.sha256)
        return None
    return data


def _verify(data: bytes, expected: str, what: str) -> None:
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise CoordinatorError(0, "sha256_mismatch", f"{what}: received bytes hash to {got}, expected {expected}")
