"""The worker daemon: poll -> lease -> fetch adapters -> train -> heartbeat -> upload -> complete.

One process hosts several clients (their data, tokens, leaves and local factors). Tokens and
leaves live under ``--state-dir/<federation>/<client>/``; nothing a client keeps local is ever
uploaded.

Shutdown (``request_stop``, called on SIGTERM/SIGINT): no new task is taken; a running task may
finish within ``grace_seconds``, otherwise (or on a second signal) its training stops between two
mini-batches, its lease is released (the coordinator hands the task out again at once, without
counting an attempt) and ``run`` returns 0. If the process dies instead, the lease expires and the
coordinator requeues the task.

Failures while reporting a result: a 4xx answer (404 task gone, 409 stale/expired lease, task
finished or cancelled, ...) drops the result with one log line; an unreachable coordinator
(connection errors, 5xx, after the client's own retries) is retried for ``report_timeout`` seconds
and then the result is dropped. Either way the daemon goes on polling. A heartbeat refused with a
4xx means the lease is lost: training of that task stops at the next mini-batch.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.config import FederationConfig
from shared.merge import leaf_file_metadata, leaf_file_mix
from shared.schemas import TaskAssignment, TaskStatus, refine_metric
from shared.tensors import pack_tensors, unpack_tensors
from shared.validation import describe_validation_error
from worker.client import CoordinatorClient, CoordinatorError, CoordinatorUnavailable, inline_adapter
from worker.files import atomic_write
from worker.model_policy import ModelRefused, check_remote_model
from worker.state import ClientFiles

log = logging.getLogger("hilora.worker")


class DataSpec(BaseModel):
    """Where a client's data comes from: a client of a partition file (built-in name or path),
    ``{"partition": P, "client": C}``, or one folder of its own, ``{"imagefolder": DIR}`` with
    ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (optional ``image_size``, ``channels``)."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = Field(default=None, min_length=1)
    client: str | None = Field(default=None, min_length=1)
    imagefolder: str | None = Field(default=None, min_length=1)
    image_size: int | None = Field(default=None, ge=1, le=4096)
    channels: Literal[1, 3] = 3

    @model_validator(mode="after")
    def _check(self) -> "DataSpec":
        if self.imagefolder is not None:
            if self.partition is not None or self.client is not None:
                raise ValueError("give either {\"imagefolder\": DIR} or {\"partition\": ..., \"client\": ...}, "
                                 "not both")
        elif self.partition is None or self.client is None:
            raise ValueError("a client's data is {\"partition\": FILE_OR_NAME, \"client\": NAME} or "
                             "{\"imagefolder\": DIR}")
        elif self.image_size is not None or self.channels != 3:
            raise ValueError("image_size and channels go with \"imagefolder\"; a partition file sets its own")
        return self

    def load_spec(self) -> Any:
        """The partition spec, or the one-folder spec (``worker.partition_spec.FolderClientSpec``)."""
        from worker.data import FolderClientSpec, load_partition

        if self.imagefolder is not None:
            return FolderClientSpec(folder=self.imagefolder, image_size=self.image_size, channels=self.channels)
        return load_partition(self.partition)

    @property
    def client_name(self) -> str:
        """The client's name in its partition (the folder's name for a one-folder spec)."""
        return self.client if self.client is not None else Path(self.imagefolder).name


class HostedClient(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")
    data: DataSpec
    token: str | None = None
    client_id: int | None = None
    enrollment_secret: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "HostedClient":
        if self.token is not None and self.client_id is None:
            raise ValueError(f"client {self.name}: a token needs its client_id")
        return self


class WorkerConfig(BaseModel):
    """The ``--config`` file of ``hilora worker`` (JSON)."""

    model_config = ConfigDict(extra="forbid")

    federation_id: int = Field(ge=1)
    enrollment_secret: str | None = None
    clients: list[HostedClient] = Field(min_length=1)
    allow_model_kwargs: list[str] = Field(
        default_factory=list, description="model_kwargs keys beyond the architecture settings "
        "(worker.backbone.ARCHITECTURE_KWARGS) this worker lets the coordinator pass to timm")
    allow_hub_models: bool = Field(
        default=False, description="build a backbone named by a hub or local-directory reference "
        "(hf-hub:..., local-dir:...) if the coordinator asks for one")

    @model_validator(mode="after")
    def _check(self) -> "WorkerConfig":
        names = [c.name for c in self.clients]
        if len(set(names)) != len(names):
            raise ValueError("client names in a worker config must be unique")
        return self


def load_worker_config(path: str | Path) -> WorkerConfig:
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ValueError(f"worker config {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"worker config {path} is not valid JSON: {exc}") from exc
    try:
        return WorkerConfig.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc, f"worker config {path}")) from None


@dataclass
class ClientSlot:
    spec: HostedClient
    client_id: int
    token: str
    files: ClientFiles
    data: Any = None   # the client's arrays; None when the daemon was given a ``data`` mapping
    last_state: str = "waiting"


_task_context: ContextVar[dict[str, object]] = ContextVar("hilora_worker_task", default={})


def log_fields() -> dict[str, object]:
    """The task being run in this thread (federation, task, client ids, client name, stage): the
    context of the worker's JSON log lines (``hilora worker --log-format json``)."""
    return dict(_task_context.get())


class PhaseTimer:
    """Seconds a task spends per phase, reported with its metrics as ``time_<phase>``: ``data`` (the
    client's arrays and validation split), ``fetch`` (adapters downloaded and loaded), ``compute``
    (training: forward and backward passes), ``eval`` (evaluations and refine losses), ``upload``
    (the upload request). The dashboard's workers table shows their medians per worker."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time_{phase}": seconds for phase, seconds in self.seconds.items()}


def _lease_left(task: TaskAssignment) -> float:
    """Seconds left of the task's lease, by this machine's clock."""
    expires = task.lease_expires_at
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=timezone.utc)
    return (expires - datetime.now(timezone.utc)).total_seconds()


def task_seed(base: int, *parts: object) -> int:
    """The seed of one piece of training work: sha256 of its parts, first 4 bytes."""
    digest = hashlib.sha256("/".join(str(p) for p in (base, *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def validation_fraction(cfg: Any) -> float:
    """The share of a client's training data held out to choose its model
    (``training.validation_fraction``); 0 for a federation with a root tier only (one model:
    nothing to choose)."""
    fraction = float(cfg.training.validation_fraction)
    if fraction <= 0:
        return 0.0
    return fraction if cfg.cluster.enabled or cfg.schedule.leaf_rounds > 0 else 0.0


class Heartbeater:
    """Extends a lease every lease/3 seconds while a task trains."""

    def __init__(self, client: CoordinatorClient, token: str, task: TaskAssignment) -> None:
        self._client, self._token, self._task = client, token, task
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{task.task_id}")
        self.lost: str | None = None
        self.handed_off = False   # the task's report runs in the background and ends the heartbeats

    def __enter__(self) -> "Heartbeater":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        # a heartbeat stuck in its retries (coordinator away) must not hold up the next task: the
        # thread is a daemon and ends after that request
        self._thread.join(timeout=1)

    def _run(self) -> None:
        interval = max(0.5, self._task.lease_seconds / 3)
        while not self._stop.wait(interval):
            try:
                self._client.heartbeat(self._task.task_id, self._token, self._task.lease_id)
            except CoordinatorError as exc:  # the lease is gone: the upload will be refused too
                self.lost = str(exc)
                return
            except Exception as exc:  # noqa: BLE001 - network trouble: keep trying until the lease ends
                log.warning("heartbeat for task %s failed: %s", self._task.task_id, exc)


class WorkerDaemon:
    report_pause = 1.0  # seconds between report attempts (each one already retries with backoff)

    def __init__(self, client: CoordinatorClient, config: WorkerConfig, state_dir: Path, device: str = "cpu",
                 exit_when_idle: bool = False, max_seconds: float | None = None, grace_seconds: float = 30.0,
                 report_timeout: float = 300.0, data: Mapping[str, Any] | None = None,
                 checkpoint_every: int = 100, data_workers: int = 0, long_poll: float = 20.0,
                 background_reports: bool = True) -> None:
        """``data``: the hosted clients' arrays by client name, looked up at every task (e.g. a bounded
        cache, so that many hosted clients need not all be in memory); by default each client's
        partition is read once at ``setup`` and kept. ``checkpoint_every``: optimizer steps between
        saves of a training task's progress in the client's state directory (0: only when the
        task is stopped, by a lost lease or a shutdown); a task leased again resumes from it.
        ``data_workers``: processes decoding a client's images on disk while it trains (0: this one).
        ``long_poll``: with no task for any hosted client, hold a lease request per client up to this
        many seconds (the coordinator answers as soon as a task opens); 0 sleeps ``retry_after``.
        ``background_reports``: a training task's upload and completion run in a background thread
        while the daemon leases and trains the next task (at most one report in flight: the next
        one waits for it; its heartbeats go on until it is reported); False reports before leasing
        again."""
        self.client = client
        client.interrupted = self.interrupted  # requests stop retrying once the daemon is stopping
        self.config = config
        self.state_dir = Path(state_dir)
        self.device = device
        self.exit_when_idle = exit_when_idle
        self.max_seconds = max_seconds
        self.grace_seconds = grace_seconds
        self.report_timeout = report_timeout
        self.stop_event = threading.Event()  # no new tasks
        self.abort_event = threading.Event()  # give up the running task now
        self._stop_deadline: float | None = None
        self._busy = False
        self.slots: list[ClientSlot] = []
        self._runtime: tuple[FederationConfig, Any] | None = None
        self._config_cache: FederationConfig | None = None
        self._adapter_cache: dict[int, dict] = {}
        self._data = data
        self.checkpoint_every = checkpoint_every
        self.data_workers = data_workers
        self.long_poll = long_poll
        self._hold_off_until = 0.0  # a coordinator that does not hold lease requests: plain polling a while
        self.background_reports = background_reports
        self._reporter: concurrent.futures.ThreadPoolExecutor | None = None
        self._report_in_flight: concurrent.futures.Future | None = None
        self._leaser: concurrent.futures.ThreadPoolExecutor | None = None  # the next slot's lease (_lease_ahead)
        self._holder: concurrent.futures.ThreadPoolExecutor | None = None  # the held requests (_hold)
        self._holder_size = 0
        self._last_task_seconds: float | None = None

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Load or create every hosted client's credentials (registering with the secret once)."""
        self.client.version()
        self.add_clients(self.config.clients)

    def add_clients(self, specs: Sequence[HostedClient]) -> None:
        """Host more clients from now on (registering each with the secret unless it has credentials),
        e.g. clients that join a federation that is already serving."""
        from worker.data import client_arrays

        hosted = {slot.spec.name for slot in self.slots}
        for spec in specs:
            if spec.name in hosted:
                raise ValueError(f"client {spec.name} is already hosted by this worker")
            files = ClientFiles.of(self.state_dir, self.config.federation_id, spec.name)
            files.dir.mkdir(parents=True, exist_ok=True)
            partition, data = None, None
            if self._data is not None:  # arrays given in process: as the federation takes them
                data = self._data[spec.name]
            else:
                partition = spec.data.load_spec()
            if spec.token is not None:
                client_id, token = spec.client_id, spec.token
            elif files.credentials.exists():
                client_id, token = files.read_credentials()
            else:
                secret = spec.enrollment_secret or self.config.enrollment_secret
                if not secret:
                    raise ValueError(f"client {spec.name} has no token and no enrollment secret to register with")
                if data is None:  # its size, for the registration (images on disk: their headers only)
                    data = client_arrays(partition, spec.data.client_name, lazy=True)
                reg = self.client.register(self.config.federation_id, secret, spec.name, len(data.y_train))
                client_id, token = reg.client_id, reg.token
                files.write_credentials(client_id, token, spec.name)
                log.info("registered client %s as id %s", spec.name, client_id)
            if partition is not None:  # before any task: as the federation's backbone and label space want it
                data = self._prepared_data(partition, spec, self._federation_config(token), data)
            self._check_precision(token)
            self.slots.append(ClientSlot(spec=spec, client_id=client_id, token=token, files=files,
                                         data=None if self._data is not None else data))
            hosted.add(spec.name)

    def _prepared_data(self, partition: Any, spec: HostedClient, cfg: FederationConfig, loaded: Any) -> Any:
        """A client's data as the federation takes them: images on disk streamed (decoded batch by
        batch in ``data_workers`` processes, ``worker.stream``) through its preprocessing (the
        built-in datasets' arrays must already have its input size), labels mapped to its classes.

        Raises:
            ValueError: arrays of another size than the model's input, or a label-space error
                (``worker.labels``).
        """
        from worker.data import PartitionSpec, client_arrays
        from worker.labels import partition_class_names, to_federation_labels

        pipeline = cfg.preprocessing
        if isinstance(partition, PartitionSpec):
            data = loaded if loaded is not None else client_arrays(partition, spec.data.client_name)
            if pipeline is not None and tuple(data.x_train.shape[1:]) != tuple(pipeline.input_size):
                raise ValueError(f"client {spec.name}: its images are {'x'.join(map(str, data.x_train.shape[1:]))} "
                                 f"but the federation's backbone takes {'x'.join(map(str, pipeline.input_size))} "
                                 f"(preprocessing.input_size): built-in datasets are for the demo backbone")
        else:
            data = client_arrays(partition, spec.data.client_name, pipeline, lazy=True, workers=self.data_workers)
        return to_federation_labels(data, partition_class_names(partition), cfg.classes, partition, spec.name)

    def client_data(self, slot: ClientSlot) -> Any:
        """The slot's arrays (from the ``data`` mapping when the daemon was given one)."""
        return self._data[slot.spec.name] if self._data is not None else slot.data

    def _check_precision(self, token: str) -> None:
        """Refuse to start on a device that cannot train in the federation's precision (fp16 on a
        CPU), before any task is leased."""
        from worker.train import resolve_precision

        resolve_precision(self._federation_config(token).training.precision, self.device)

    def _federation_config(self, token: str):  # noqa: ANN202
        """The federation's config, fetched once per process."""
        if self._config_cache is None:
            self._config_cache = self.client.federation_config(self.config.federation_id, token)
        return self._config_cache

    def _model(self, token: str):  # noqa: ANN202
        """The federation's model, built once per process and reused by every hosted client."""
        if self._runtime is None:
            from worker.backbone import build_backbone
            from worker.lora import TieredLoRAModel, check_manifest_matches

            cfg = self._federation_config(token)
            check_remote_model(cfg.backbone.model, cfg.backbone.model_kwargs,
                               allow_kwargs=self.config.allow_model_kwargs, allow_hub=self.config.allow_hub_models)
            checkpoint = self.client.backbone(self.config.federation_id, token, cfg.backbone.sha256)
            backbone = build_backbone(cfg.backbone.model, cfg.backbone.model_kwargs, checkpoint)
            check_manifest_matches(backbone, cfg.manifest)
            model = TieredLoRAModel(backbone, cfg.manifest).to(self.device)
            if cfg.preprocessing is not None:  # the backbone's own normalisation, inside the model
                model.set_input_normalization(cfg.preprocessing.mean, cfg.preprocessing.std)
            self._runtime = (cfg, model)
        return self._runtime

    def _adapter(self, ref, token: str, task: TaskAssignment | None = None) -> dict:  # noqa: ANN001
        """An adapter version's tensors: kept from an earlier task, come inline with ``task``'s lease
        answer, or downloaded (each checked against the reference's sha256)."""
        if ref.id not in self._adapter_cache:
            if len(self._adapter_cache) > 64:
                self._adapter_cache.clear()
            data = inline_adapter(task, ref) if task is not None else None
            if data is None:
                data = self.client.adapter(ref.id, token, ref.sha256)
            self._adapter_cache[ref.id] = unpack_tensors(data)
        return self._adapter_cache[ref.id]

    def _have(self) -> list[int]:
        """The adapter versions this worker holds: a lease answer sends the task's others inline when
        small (``TaskAssignment.inline_adapters``)."""
        return list(self._adapter_cache)

    # ------------------------------------------------------------------ stopping

    def request_stop(self, reason: str = "stop requested") -> None:
        """First call: take no new task; a running one gets ``grace_seconds`` to finish. Second
        call: give the running task up now. Safe to call from a signal handler."""
        if not self.stop_event.is_set():
            self._stop_deadline = time.monotonic() + self.grace_seconds
            self.stop_event.set()
            log.info("%s: taking no new task; a running task has %.0fs to finish, else its lease is released",
                     reason, self.grace_seconds)
        elif not self.abort_event.is_set():
            self.abort_event.set()
            log.info("%s again: releasing the running task's lease and exiting", reason)

    def past_grace(self) -> bool:
        """True once a running task must be given up: second stop request, or the grace is over."""
        if self.abort_event.is_set():
            return True
        deadline = self._stop_deadline
        return self.stop_event.is_set() and deadline is not None and time.monotonic() >= deadline

    def interrupted(self) -> bool:
        """For the client: stop retrying requests (stopping while idle, or past the grace)."""
        return (self.stop_event.is_set() and not self._busy and not self._reporting()) or self.past_grace()

    # ------------------------------------------------------------------ background reports

    def _reporting(self) -> bool:
        pending = self._report_in_flight
        return pending is not None and not pending.done()

    def _defer_report(self, job: Callable[[], None]) -> None:
        """Run ``job`` (a task's upload and completion) in the reporter thread, after the report
        before it: at most one is in flight, so a slow coordinator slows training down instead of
        queueing results without bound."""
        self.drain_reports()
        if self._reporter is None:
            self._reporter = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hilora-report")
        self._report_in_flight = self._reporter.submit(contextvars.copy_context().run, job)

    def drain_reports(self) -> None:
        """Wait for the report in flight, if any (it ends within ``report_timeout``, or at once past
        the shutdown grace)."""
        pending = self._report_in_flight
        if pending is not None:
            try:
                pending.result()   # still in flight meanwhile: requests keep retrying (interrupted())
            except Exception:  # noqa: BLE001 - the job logs its own failures; never take the daemon down
                log.exception("a background report failed")
            finally:
                self._report_in_flight = None

    def close_reporter(self) -> None:
        self.drain_reports()
        if self._reporter is not None:
            self._reporter.shutdown(wait=True)
            self._reporter = None

    # ------------------------------------------------------------------ loop

    def run(self) -> int:
        """Poll until stopped (or, with exit_when_idle, until every hosted client is ready)."""
        try:
            return self._poll()
        finally:
            for pool in (self._leaser, self._holder):
                if pool is not None:
                    pool.shutdown(wait=True)
            self._leaser = self._holder = None
            self.close_reporter()   # the last task's report goes out before the daemon ends

    def _poll(self) -> int:
        started = time.monotonic()
        held = False   # the last held requests answered: hold again without a round of plain leases
        while not self.stop_event.is_set():
            if self.max_seconds is not None and time.monotonic() - started > self.max_seconds:
                log.warning("stopping after --max-seconds=%s", self.max_seconds)
                return 3
            worked = False
            wait = 5.0
            ahead: tuple[ClientSlot, concurrent.futures.Future] | None = None  # the next slot's lease, in flight
            try:
                polled = self._to_poll(held)
                for i, slot in enumerate(self.slots):
                    if self.stop_event.is_set():
                        break
                    if slot.last_state == "revoked" or i not in polled:
                        continue
                    prefetched = ahead is not None and ahead[0] is slot
                    try:
                        if prefetched:
                            response = ahead[1].result()
                            ahead = None
                        else:
                            response = self.client.lease(slot.client_id, slot.token, have=self._have())
                    except CoordinatorUnavailable as exc:  # keep polling: the coordinator may come back
                        ahead = None
                        if not self.stop_event.is_set():
                            log.warning("coordinator unavailable (%s); polling again", exc)
                        break
                    except CoordinatorError as exc:
                        ahead = None
                        self._drop_refused(slot, exc)
                        continue
                    slot.last_state = response.client_state
                    if response.task is not None:
                        if self.stop_event.is_set():  # leased while the stop came in: give it straight back
                            self._release(slot, response.task, "the worker is stopping")
                            break
                        if prefetched and _lease_left(response.task) < response.task.lease_seconds / 2:
                            self._release(slot, response.task, "it waited while another task ran")
                            continue
                        ahead = None if held else self._lease_ahead(i, response.task)   # (a full sweep only)
                        self._run_task(slot, response.task)
                        worked = True
                    else:
                        wait = min(wait, response.retry_after)
            finally:
                if ahead is not None:  # the loop ended before the next slot's turn: give its task back
                    self._give_back_ahead(*ahead)
            if not worked:  # nothing to train: the last report lands before deciding what to do next
                self.drain_reports()
            if all(s.last_state == "revoked" for s in self.slots):
                log.error("every hosted client was revoked or deleted: nothing left to do")
                return 2
            if self.exit_when_idle and not worked and all(
                    s.last_state in ("ready", "revoked") for s in self.slots):
                log.info("every hosted client is ready: exiting")
                return 0
            if held and self.exit_when_idle and not worked and any(s.last_state == "ready" for s in self.slots):
                held = False   # one client polled is ready: poll them all (to exit) before holding
                continue
            held = False
            if not worked:
                held = self.long_poll > 0 and self._hold()
                if not held:
                    # nothing held (long polling off, paused, or the held requests failed): sleep
                    self.stop_event.wait(wait if self.long_poll <= 0 else min(wait, 1.0))
        return 0

    def _to_poll(self, held: bool) -> range | list[int]:
        """The clients (indices) to poll with plain leases before holding requests again. After held
        requests that answered, none: a held request answers at once for a client with a task waiting, as a
        plain lease would, so polling every client first would only cost a request per client and
        delay the next hold (each worker's, at every round's end). With ``exit_when_idle``, one: its
        state says whether the federation is serving (the others are then polled too, to exit)."""
        if not held:
            return range(len(self.slots))
        if not self.exit_when_idle:
            return []
        return [i for i, s in enumerate(self.slots) if s.last_state != "revoked"][:1]

    def _lease_ahead(self, index: int, task: TaskAssignment) -> tuple[ClientSlot, concurrent.futures.Future] | None:
        """With background reports, the lease of the next hosted client goes out while this task
        trains, so that the next task starts without waiting for the coordinator's answer. Only
        once this worker's tasks are known to take under a quarter of a lease (the task waits
        leased, without heartbeats, while this one trains; one that has waited past half its lease
        is given back, as a held lease's is)."""
        if not self.background_reports or self._last_task_seconds is None \
                or self._last_task_seconds >= task.lease_seconds / 4:
            return None
        following = next((s for s in self.slots[index + 1:] if s.last_state != "revoked"), None)
        if following is None:
            return None
        if self._leaser is None:
            self._leaser = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hilora-lease")
        future = self._leaser.submit(contextvars.copy_context().run, self.client.lease, following.client_id,
                                     following.token, self._have())
        return following, future

    def _give_back_ahead(self, slot: ClientSlot, future: concurrent.futures.Future) -> None:
        try:
            response = future.result()
        except (CoordinatorUnavailable, CoordinatorError) as exc:
            log.debug("lease ahead for client %s ended: %s", slot.spec.name, exc)
            return
        slot.last_state = response.client_state
        if response.task is not None:
            self._release(slot, response.task, "the worker stopped polling before its turn")

    @staticmethod
    def _drop_refused(slot: ClientSlot, exc: CoordinatorError) -> None:
        """A lease refused with 401/403 (revoked or deleted by the admin): this client is done, the
        others go on. Any other refusal is raised: the worker stops loudly."""
        if exc.status not in (401, 403):
            raise exc
        log.error("client %s: the coordinator no longer accepts its token (%s); not polling for it any more",
                  slot.spec.name, exc)
        slot.last_state = "revoked"

    def _hold(self) -> bool:
        """Long poll: one held lease request per hosted client at once (``CoordinatorClient.hold_lease``).
        Tasks are run as they come; one that comes while another runs is run next if at least half
        its lease is left, else given back (a release costs no attempt). Returns whether any held
        request answered (a task, or an empty answer after its full wait): then the loop polls again
        at once; False (nothing answered: transport errors, a paused federation) makes it sleep."""
        slots = [s for s in self.slots if s.last_state not in ("revoked", "paused")]
        if not slots or self.stop_event.is_set() or time.monotonic() < self._hold_off_until:
            return False
        answered = False
        if self._holder is None or self._holder_size < len(slots):
            # kept from one hold to the next: threads started once, not at every round's end
            if self._holder is not None:
                self._holder.shutdown(wait=False)
            self._holder = concurrent.futures.ThreadPoolExecutor(max_workers=len(slots),
                                                                 thread_name_prefix="hilora-hold")
            self._holder_size = len(slots)
        pool = self._holder
        have = self._have()
        pending = {pool.submit(self.client.hold_lease, s.client_id, s.token, self.long_poll, have): s for s in slots}
        while pending:
            done, _ = concurrent.futures.wait(pending, timeout=0.2,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            if self.stop_event.is_set():
                self.client.abort_held()  # the held requests end now; a task they got is given back below
            for future in done:
                slot = pending.pop(future)
                try:
                    response = future.result()
                except CoordinatorError as exc:
                    self._drop_refused(slot, exc)
                    continue
                if response is None:
                    continue
                slot.last_state = response.client_state
                task = response.task
                if task is None:
                    if response.retry_after > 0:  # not held (a coordinator without long polling)
                        self._hold_off_until = time.monotonic() + 60.0
                    else:
                        answered = True
                    continue
                answered = True
                if self.stop_event.is_set():
                    self._release(slot, task, "the worker is stopping")
                elif _lease_left(task) < task.lease_seconds / 2:
                    self._release(slot, task, "it waited while another task ran")
                else:
                    self._run_task(slot, task)
        return answered

    def _run_task(self, slot: ClientSlot, task: TaskAssignment) -> None:
        """``execute`` that never takes the daemon down for a coordinator failure: the task is
        dropped (its lease expires and the coordinator requeues it) and polling goes on."""
        self._busy = True
        started = time.monotonic()
        try:
            self.execute(slot, task, defer_report=self.background_reports)
            self._last_task_seconds = time.monotonic() - started
        except CoordinatorUnavailable as exc:
            log.warning("task %s (client %s): dropped, the coordinator is unreachable (%s); its lease expires "
                        "and the coordinator requeues it", task.task_id, slot.spec.name, exc)
        except CoordinatorError as exc:
            log.error("task %s (client %s): dropped, the coordinator refused a request: %s",
                      task.task_id, slot.spec.name, exc)
        except ModelRefused as exc:  # this worker can never run the federation: give the task back, stop
            self._release(slot, task, "this worker refuses the federation's model")
            raise
        finally:
            self._busy = False

    def execute(self, slot: ClientSlot, task: TaskAssignment, defer_report: bool = False) -> dict[str, float]:
        """Run one task for one hosted client and report it. Returns its metrics ({} when the
        task was given up or its result dropped). With ``defer_report`` a trained task's upload and
        completion go to the reporter thread (``_defer_report``; its heartbeats go on until then) and
        its metrics are returned before they are reported."""
        token = _task_context.set({"federation_id": self.config.federation_id, "task_id": task.task_id,
                                   "client_id": slot.client_id, "client": slot.spec.name, "stage": task.stage})
        hb = Heartbeater(self.client, slot.token, task).__enter__()
        try:
            return self._execute(slot, task, hb, defer_report)
        finally:
            if not hb.handed_off:
                hb.__exit__()
            _task_context.reset(token)

    def _execute(self, slot: ClientSlot, task: TaskAssignment, hb: Heartbeater,
                 defer_report: bool = False) -> dict[str, float]:
        from worker.train import (
            Checkpointing,
            TrainingStopped,
            add_alone_candidate,
            autocast,
            client_leaf_mix,
            evaluate_with_selection,
            fit_leaf_bias,
            leaf_as_served,
            mean_loss,
            resolve_precision,
            split_validation,
            train_tier,
        )

        cfg, model = self._model(slot.token)
        precision = resolve_precision(task.training.precision, self.device)

        timer = PhaseTimer()

        @contextlib.contextmanager
        def evaluating() -> Iterator[None]:  # forward passes only (training autocasts inside train_tier)
            with timer("eval"), autocast(self.device, precision):
                yield

        t0 = time.monotonic()
        with timer("data"):
            split = split_validation(self.client_data(slot), validation_fraction(cfg),
                                     task_seed(cfg.training.seed, "validation", slot.spec.name))
            data = split.fit if split is not None else self.client_data(slot)
        tier = task.train_tier
        tiers = ["root"] + (["cluster"] if task.cluster is not None else [])
        with timer("fetch"):
            model.load_tier("root", self._adapter(task.root, slot.token, task))
            if task.cluster is not None:
                model.load_tier("cluster", self._adapter(task.cluster, slot.token, task))
            if task.stage != "probe":
                # Factors a tier keeps local (e.g. FedSA's B) are this client's own: lay them over the
                # coordinator's version for every tier in use, as export does. A probe starts from the
                # federation's root alone, so that every client's probe has the same starting point.
                for used in tiers:
                    local_file = slot.files.local(used)
                    if local_file.exists():
                        model.load_tier(used, unpack_tensors(local_file.read_bytes()), partial=True)
        if task.stage == "refine":
            # the loss of the root and of root + each candidate cluster adapter on this client's
            # training data: forward passes only, nothing trained or uploaded
            with evaluating():
                losses = {refine_metric(None): mean_loss(model, data.x_train, data.y_train, ("root",), self.device)}
            for candidate in task.candidates:
                with timer("fetch"):
                    model.load_tier("cluster", self._adapter(candidate.adapter, slot.token))
                with evaluating():
                    losses[refine_metric(candidate.cluster_id)] = mean_loss(
                        model, data.x_train, data.y_train, ("root", "cluster"), self.device)
            losses["refine_seconds"] = time.monotonic() - t0
            losses.update(timer.metrics())
            if not self.report(slot, task, None, losses, num_samples=len(data.y_train)):
                return {}
            log.info("client %s: refinement %s done (%d clusters)", slot.spec.name, task.round_number,
                     len(task.candidates))
            return losses
        if task.stage == "eval":
            # the federation's final versions as this client uses them, with its leaf if it has one:
            # forward passes only, nothing trained or uploaded
            served_mix = 1.0
            if slot.files.leaf.exists():
                with timer("fetch"):
                    leaf_bytes = slot.files.leaf.read_bytes()
                    model.load_tier("leaf", unpack_tensors(leaf_bytes))
                    served_mix = leaf_file_mix(leaf_bytes)   # decided when the leaf trained
                tiers.append("leaf")
            with evaluating(), leaf_as_served(model, tiers, served_mix):
                evaluated = evaluate_with_selection(model, data, tuple(tiers), split, self.device)
            if slot.files.alone.exists() and split is not None:  # trained at its first leaf task
                model.load_tier("root", unpack_tensors(slot.files.alone.read_bytes()))
                with evaluating():
                    add_alone_candidate(evaluated, model, data, split, self.device)
            evaluated["eval_seconds"] = time.monotonic() - t0
            evaluated.update(timer.metrics())
            if not self.report(slot, task, None, evaluated, num_samples=len(data.y_train)):
                return {}
            log.info("client %s: evaluation done %s", slot.spec.name,
                     {k: round(v, 4) for k, v in evaluated.items() if k.startswith("acc")})
            return evaluated
        if tier == "leaf":
            if task.reset_leaf or not slot.files.leaf.exists():
                head_from = "cluster" if task.cluster is not None else "root"
                model.init_tier("leaf", seed=task_seed(cfg.training.seed, "leaf", slot.spec.name),
                                head_from=head_from)
                if task.training.leaf_bias_fit > 0:
                    # the client's label proportions, fitted as a logit shift of the model the leaf
                    # starts from (forward passes only)
                    with evaluating():
                        fit_leaf_bias(model, data, tuple(tiers), task.training.leaf_bias_fit, self.device,
                                      skewed_prior_std=task.training.leaf_bias_fit_skewed)
            else:
                model.load_tier("leaf", unpack_tensors(slot.files.leaf.read_bytes()))
            tiers.append("leaf")
        metrics: dict[str, float] = {}
        if tier in ("root", "cluster") and task.stage != "probe" and task.evaluate:
            # accuracy of the adapter as received: the federation's model on this client's data
            # (schedule.evaluate_every: not every round)
            with evaluating():
                metrics.update(evaluate_with_selection(model, data, tuple(tiers), split, self.device))
        log.info("client %s: training task %s (%s round %s, %s, %s)", slot.spec.name, task.task_id, task.stage,
                 task.round_number, f"{task.steps} steps" if task.steps else f"{task.epochs} epochs", precision)
        scale = task.training.leaf_lr_scale if tier == "leaf" else 1.0
        seed = task_seed(task.training.seed, task.stage, task.round_number, slot.spec.name)
        # this task's progress: a lease lost or a shutdown mid-training keeps it, and the same task
        # leased again (same inputs) resumes from it, ending with the bytes of an uninterrupted run
        checkpoint = Checkpointing(path=slot.files.checkpoint, every=self.checkpoint_every, key=":".join(
            str(part) for part in (task.task_id, tier, task.root.sha256, task.cluster.sha256 if task.cluster else "-",
                                   seed, task.steps, task.epochs, precision, bool(task.reset_leaf))))
        try:
            with timer("compute"):
                train_metrics = train_tier(
                    model, tier, data, epochs=task.epochs, lr=task.training.lr * scale,
                    head_lr=task.training.head_lr * scale,
                    batch_size=task.training.batch_size, weight_decay=task.training.weight_decay,
                    gamma_c=task.training.gamma_c, gamma_l=task.training.gamma_l,
                    seed=seed, trainable=tuple(task.trainable), device=self.device,
                    should_stop=lambda: hb.lost is not None or self.past_grace(),
                    steps=task.steps, class_balanced=task.loss == "balanced", precision=precision,
                    checkpoint=checkpoint, augment=task.training.augment if task.stage != "probe" else "none")
        except TrainingStopped:
            self._stopped(slot, task, hb)
            return {}
        if hb.lost:
            log.warning("task %s lost its lease while training (%s); not uploading", task.task_id, hb.lost)
            return {}
        metrics.update({k: float(v) for k, v in train_metrics.items()})
        if tier == "leaf":
            # training.leaf_mix: the share of its leaf this client's model takes (its labels decide)
            served_mix = client_leaf_mix(model, data, task.training.leaf_mix)
            with evaluating(), leaf_as_served(model, tiers, served_mix):
                metrics.update(evaluate_with_selection(model, data, tuple(tiers), split, self.device))
            atomic_write(slot.files.leaf, pack_tensors(model.export_tier("leaf"),
                                                       metadata=leaf_file_metadata(served_mix)))
            if cfg.training.alone_epochs and split is not None:
                try:
                    self._alone_candidate(slot, cfg, model, data, split, metrics, hb, precision, timer)
                except TrainingStopped:
                    self._stopped(slot, task, hb)
                    return {}
        elif task.local:
            atomic_write(slot.files.local(tier), pack_tensors(model.export_tier(tier, factors=tuple(task.local))))
        metrics["train_seconds"] = time.monotonic() - t0
        metrics.update(timer.metrics())
        body = pack_tensors(model.export_tier(tier, factors=tuple(task.upload))) if task.upload else None
        num_samples = len(data.y_train)

        def finish() -> bool:
            try:
                reported = self.report(slot, task, body, metrics, num_samples=num_samples)
            finally:
                if hb.handed_off:
                    hb.__exit__()
            slot.files.checkpoint.unlink(missing_ok=True)   # trained: nothing left to resume
            if reported:
                log.info("client %s: %s round %s done in %.2fs %s", slot.spec.name, task.stage, task.round_number,
                         time.monotonic() - t0, {k: round(v, 4) for k, v in metrics.items() if k.startswith("acc")})
            return reported

        if defer_report:
            hb.handed_off = True   # the reporter ends its heartbeats once the task is reported
            try:
                self._defer_report(finish)
            except BaseException:
                hb.handed_off = False
                raise
            return metrics
        return metrics if finish() else {}

    def _stopped(self, slot: ClientSlot, task: TaskAssignment, hb: Heartbeater) -> None:
        """Training stopped between batches: the lease was lost (nothing is reported), or the
        worker is stopping past its grace (the lease is released)."""
        if hb.lost:
            log.warning("task %s lost its lease while training (%s); training stopped, nothing uploaded",
                        task.task_id, hb.lost)
        else:
            self._release(slot, task, "stopping: it did not finish within the grace period")

    def _alone_candidate(self, slot: ClientSlot, cfg: Any, model: Any, data: Any, split: Any,
                         metrics: dict[str, float], hb: Heartbeater, precision: str = "fp32",
                         timer: PhaseTimer | None = None) -> None:
        """``training.alone_epochs``: the model this client trains by itself (a fresh root-shaped LoRA
        and head on its fit part, trained once, at its first leaf task, and kept in its state
        directory) joins the candidates it chooses from on its validation part. It is loaded into
        the model's root slot, which every task loads afresh from the coordinator's version."""
        from worker.train import add_alone_candidate, autocast, train_tier

        timer = timer if timer is not None else PhaseTimer()
        if slot.files.alone.exists():
            model.load_tier("root", unpack_tensors(slot.files.alone.read_bytes()))
        else:
            t0 = time.monotonic()
            model.init_tier("root", seed=task_seed(cfg.training.seed, "alone", slot.spec.name), head_from=None)
            with timer("compute"):
                train_tier(model, "root", data, epochs=cfg.training.alone_epochs, lr=cfg.training.lr,
                           head_lr=cfg.training.head_lr, batch_size=cfg.training.batch_size,
                           weight_decay=cfg.training.weight_decay, gamma_c=0.0, gamma_l=0.0,
                           seed=task_seed(cfg.training.seed, "alone-train", slot.spec.name),
                           trainable=("A", "B", "head"), device=self.device,
                           should_stop=lambda: hb.lost is not None or self.past_grace(), precision=precision)
            atomic_write(slot.files.alone, pack_tensors(model.export_tier("root")))
            metrics["alone_train_seconds"] = time.monotonic() - t0
        with timer("eval"), autocast(self.device, precision):
            add_alone_candidate(metrics, model, data, split, self.device)

    def report(self, slot: ClientSlot, task: TaskAssignment, body: bytes | None, metrics: dict[str, float],
               num_samples: int | None = None) -> bool:
        """Upload ``body`` (if any) and complete the task with ``num_samples`` (the samples it trained
        on; default: all of the client's training samples). True when the coordinator took it;
        False when the result was dropped (a 4xx answer, or unreachable for ``report_timeout``
        seconds, or the daemon is past its shutdown grace). Never raises for coordinator trouble."""
        deadline = time.monotonic() + self.report_timeout
        uploaded = body is None
        if num_samples is None:
            num_samples = len(self.client_data(slot).y_train)
        while True:
            try:
                if not uploaded:
                    # one request: the upload carries the completion (its time_upload is then the
                    # coordinator's); a coordinator that did not complete the task answers no status
                    started = time.perf_counter()
                    ack = self.client.upload(task.task_id, slot.token, task.lease_id, body,
                                             complete=(num_samples, metrics))
                    if ack.status == TaskStatus.done:
                        return True
                    metrics = {**metrics, "time_upload": time.perf_counter() - started}
                    uploaded = True
                self.client.complete(task.task_id, slot.token, task.lease_id, num_samples, metrics)
                return True
            except CoordinatorError as exc:
                level = logging.WARNING if exc.status in (404, 409, 410) else logging.ERROR
                log.log(level, "task %s (client %s, %s round %s): result dropped, the coordinator answered %s %s: %s",
                        task.task_id, slot.spec.name, task.stage, task.round_number, exc.status, exc.code,
                        _DROP_REASONS.get(exc.code, exc.detail))
                return False
            except CoordinatorUnavailable as exc:
                if self.past_grace():
                    log.warning("task %s: result dropped, stopping while the coordinator is unreachable (%s)",
                                task.task_id, exc)
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("task %s (client %s): result dropped, the coordinator stayed unreachable for %.0fs "
                                "(%s)", task.task_id, slot.spec.name, self.report_timeout, exc)
                    return False
                log.warning("task %s: coordinator unreachable (%s); retrying the report for up to %.0fs more",
                            task.task_id, exc, left)
                self.abort_event.wait(min(self.report_pause, left))

    def _release(self, slot: ClientSlot, task: TaskAssignment, why: str) -> None:
        """Give the task's lease back so the coordinator can hand the task out again at once."""
        try:
            self.client.release(task.task_id, slot.token, task.lease_id)
            log.info("task %s (client %s): lease released (%s)", task.task_id, slot.spec.name, why)
        except CoordinatorError as exc:
            log.warning("task %s: release refused (%s); nothing to give back", task.task_id, exc)
        except CoordinatorUnavailable as exc:
            log.warning("task %s: could not release the lease (%s); it expires within %.0fs and the task is "
                        "requeued", task.task_id, exc, task.lease_seconds)


_DROP_REASONS = {
    "task_not_found": "the task no longer exists",
    "stale_lease": "this lease is no longer the task's current one (it was requeued, finished or cancelled)",
    "lease_expired": "the lease expired (the coordinator requeues the task)",
    "task_finished": "the task is already finished",
}
