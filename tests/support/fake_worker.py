"""A deterministic, torch-free fake worker for the coordinator's crash, kill and quorum tests.

It speaks the real protocol through ``worker.client.CoordinatorClient`` (same retries as the real
worker) but replaces training by a pure function: the upload of a task is a set of float32 tensors
with the shapes the manifest gives for the assignment's ``train_tier`` and ``upload`` factors, drawn
from a seed derived from (client name, stage, scope, round number, input root/cluster sha256). So a
task run twice, or by another process, uploads the same bytes, and two runs of one federation that
register the same clients in the same order produce the same adapter versions bit for bit.

Usage as a script (one JSON line per event on stdout)::

    python tests/support/fake_worker.py --coordinator URL --federation ID --secret S --clients a,b \
        [--credentials FILE] [--hang-after-lease] [--max-seconds N] [--work-seconds X]

or in-process: ``FakeWorker(...).run()`` in a thread (events go to ``emit``; ``stop`` ends it;
``transport`` lets it talk to an in-process app).

``--hang-after-lease``: after its first lease the worker goes on leasing for its other hosted
clients (up to 5 s, their tasks may open a moment later), then never uploads or completes: the
test SIGKILLs it mid-lease. ``--work-seconds`` pretends to train that long, heartbeating; SIGTERM
then releases the lease (``POST /v1/tasks/{id}/release``) before exiting.

Events (``event`` key): ``start``, ``registered``, ``credentials`` (reused), ``polling`` (after the
first pass over the hosted clients), ``leased``, ``uploaded``, ``completed``, ``refused`` (a 4xx:
``status`` and ``error`` = the coordinator's code), ``unavailable`` (retries exhausted),
``released``, ``hanging``, ``exit``. Every loop is bounded by
``max_seconds``. Eval tasks (the final evaluation, once the federation serves) are completed with
fake accuracies and no upload, like leaf tasks; refine tasks with fake losses (every cluster better than
the root, so refinement moves at most within noise below its margin). Exit codes: 0 every hosted client is ready
(federation serving, no task left: its eval task done too),
1 max_seconds passed, 2 setup refused (e.g. a name registered elsewhere without saved credentials),
3 stopped while hanging, 4 stopped (SIGTERM / ``stop``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if __name__ == "__main__":  # run as a script from anywhere: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shared.config import FederationConfig
from shared.schemas import TaskAssignment
from shared.tensors import pack_tensors
from worker.client import CoordinatorClient, CoordinatorError, CoordinatorUnavailable

Emit = Callable[[dict[str, Any]], None]
HANG_GRACE_S = 5.0


# ---------------------------------------------------------------------------- determinism

def _seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def client_num_samples(name: str) -> int:
    """The fixed number of samples a fake client reports (10..109, from its name)."""
    return 10 + _seed("num_samples", name) % 100


def task_seed(client: str, task: TaskAssignment) -> int:
    """The seed of ``client``'s upload for ``task``. The scope enters by its kind only ('cluster',
    not 'cluster:7'): the input adapters' sha256 already say which cluster, and a cluster's row id
    may differ between two runs that decide the same (a PostgreSQL sequence keeps the ids a crashed
    transaction used)."""
    return _seed(client, task.stage, task.scope.split(":")[0], task.round_number,
                 task.root.sha256 if task.root else "-", task.cluster.sha256 if task.cluster else "-")


def deterministic_upload(manifest, client: str, task: TaskAssignment) -> dict[str, np.ndarray]:
    """The tensors ``client`` uploads for ``task``: the manifest's shapes for the task's
    ``train_tier`` and ``upload`` factors (the probe uploads the whole root tier), values from
    ``task_seed``. Small B and head values keep every aggregate well inside float32."""
    shapes = manifest.tier_shapes(task.train_tier, tuple(task.upload))
    rng = np.random.default_rng(task_seed(client, task))
    out: dict[str, np.ndarray] = {}
    for name in sorted(shapes):
        scale = 0.1 if name.endswith("lora_B") or name.startswith("head.") else 1.0
        out[name] = (scale * rng.standard_normal(size=shapes[name])).astype(np.float32)
    return out


def deterministic_body(manifest, client: str, task: TaskAssignment) -> bytes:
    return pack_tensors(deterministic_upload(manifest, client, task))


def deterministic_metrics(client: str, task: TaskAssignment, has_leaf: bool = False) -> dict[str, float]:
    """What ``client`` reports for ``task``. ``has_leaf``: the client trained a leaf before (an eval
    task then reports root + cluster + leaf too, as the real worker does with its saved leaf)."""
    rng = np.random.default_rng(task_seed(client, task) ^ 0x5EED)
    acc = sorted(float(x) for x in rng.uniform(0.3, 0.95, size=3))
    # a training task's time of its phases, as worker.daemon reports them (made up, from the seed:
    # 10 to 109 ms of "compute")
    compute = 0.01 + (task_seed(client, task) % 100) / 1000
    if task.stage == "leaf":
        return {"acc_root": acc[0], "acc_cluster": acc[1], "acc_leaf": acc[2], "time_compute": compute}
    if task.stage == "probe":
        return {"loss": round(1.0 - acc[1], 6), "time_compute": compute}
    if task.stage == "refine":  # losses of the root and of each candidate cluster; no upload
        metrics = {"refine_loss_root": 2.0}
        for c in task.candidates:  # within 4 % of each other: below the default margin, nobody moves
            metrics[f"refine_loss_c{c.cluster_id}"] = 1.0 + (_seed(client, "refine", c.cluster_id) % 400) / 10_000
        return metrics
    if task.stage == "eval":  # the final evaluation: forward passes only, no loss, no upload
        metrics = {"acc_root": acc[0]}
        if task.cluster is not None:
            metrics["acc_cluster"] = acc[1]
        if has_leaf:
            metrics["acc_leaf"] = acc[2]
        return metrics
    # like worker.daemon: root and cluster tasks evaluate the adapters they received
    metrics = {"loss": round(1.0 - acc[1], 6), "acc_root": acc[0], "time_compute": compute}
    if task.stage == "cluster":
        metrics["acc_cluster"] = acc[1]
    return metrics


# ---------------------------------------------------------------------------- credentials

@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``<path>.lock``: fake workers in other processes share the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _key(federation_id: int, name: str) -> str:
    return f"{federation_id}/{name}"


def load_credentials(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None or not Path(path).exists():
        return {}
    text = Path(path).read_text()
    return json.loads(text) if text.strip() else {}


def save_credential(path: Path, federation_id: int, name: str, client_id: int, token: str) -> None:
    path = Path(path)
    with _locked(path):
        data = load_credentials(path)
        data[_key(federation_id, name)] = {"client_id": client_id, "token": token}
        tmp = path.with_name(path.name + f".tmp{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)


def credential(path: Path, federation_id: int, name: str) -> tuple[int, str] | None:
    with _locked(Path(path)):
        entry = load_credentials(path).get(_key(federation_id, name))
    return (int(entry["client_id"]), str(entry["token"])) if entry else None


def register_clients(coordinator: str, federation_id: int, secret: str, names: Iterable[str],
                     credentials: Path) -> dict[str, tuple[int, str]]:
    """Register ``names`` one after another (so their client ids follow this order) and save their
    tokens in ``credentials``. Tests use it to make client ids the same across runs."""
    out: dict[str, tuple[int, str]] = {}
    with CoordinatorClient(coordinator, worker_id="fake-register", timeout=10, max_retries=3) as client:
        for name in names:
            reg = client.register(federation_id, secret, name, client_num_samples(name))
            save_credential(credentials, federation_id, name, reg.client_id, reg.token)
            out[name] = (reg.client_id, reg.token)
    return out


# ---------------------------------------------------------------------------- the worker

@dataclass
class _Hosted:
    name: str
    client_id: int
    token: str
    task: TaskAssignment | None = None  # in flight: leased, not yet completed
    uploaded: bool = False
    has_leaf: bool = False  # a leaf task of this client completed in this process


@dataclass
class FakeWorker:
    coordinator: str
    federation_id: int
    secret: str
    clients: list[str]
    credentials: Path | None = None
    hang_after_lease: bool = False
    max_seconds: float = 120.0
    work_seconds: float = 0.0
    poll_interval: float = 0.1
    worker_id: str | None = None
    emit: Emit | None = None
    max_retries: int = 30
    max_backoff: float = 1.0
    transport: Any = None  # an httpx transport (e.g. a TestClient's, to run in-process over ASGI)
    stop_event: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.worker_id = self.worker_id or f"fake-{os.getpid()}-{threading.get_ident() % 100000}"
        self._deadline = time.monotonic() + self.max_seconds
        self._hosted: list[_Hosted] = []
        self._cfg: FederationConfig | None = None
        self._lock = threading.Lock()

    # -- events -----------------------------------------------------------------------------
    def _event(self, event: str, **fields: Any) -> None:
        record = {"event": event, "worker": self.worker_id, "t": round(time.time(), 3), **fields}
        if self.emit is not None:
            self.emit(record)
        else:
            with self._lock:
                sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
                sys.stdout.flush()

    def _task_fields(self, hosted: _Hosted, task: TaskAssignment) -> dict[str, Any]:
        return {"client": hosted.name, "client_id": hosted.client_id, "task_id": task.task_id,
                "lease_id": task.lease_id, "attempt": task.attempt, "stage": str(task.stage), "scope": task.scope,
                "round": task.round_number}

    def _time_left(self) -> float:
        return self._deadline - time.monotonic()

    def stop(self) -> None:
        self.stop_event.set()

    def _sleep(self, seconds: float) -> None:
        # short slices of time.sleep, not Event.wait: a signal handler calling ``stop`` must never
        # find the main thread inside the event's lock
        end = time.monotonic() + max(0.0, min(seconds, self._time_left()))
        while not self.stop_event.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.05, left))

    # -- setup ------------------------------------------------------------------------------
    def _setup(self, http: CoordinatorClient) -> bool:
        for name in self.clients:
            saved = credential(self.credentials, self.federation_id, name) if self.credentials else None
            if saved is not None:
                self._hosted.append(_Hosted(name, *saved))
                self._event("credentials", client=name, client_id=saved[0])
                continue
            try:
                reg = http.register(self.federation_id, self.secret, name, client_num_samples(name))
            except CoordinatorError as exc:
                self._event("refused", what="register", client=name, status=exc.status, error=exc.code)
                return False
            if self.credentials:
                save_credential(self.credentials, self.federation_id, name, reg.client_id, reg.token)
            self._hosted.append(_Hosted(name, reg.client_id, reg.token))
            self._event("registered", client=name, client_id=reg.client_id)
        try:
            self._cfg = http.federation_config(self.federation_id, self._hosted[0].token)
        except CoordinatorError as exc:
            self._event("refused", what="config", status=exc.status, error=exc.code)
            return False
        return True

    # -- one task -----------------------------------------------------------------------------
    def _work(self, http: CoordinatorClient, hosted: _Hosted) -> None:
        """Pretend to train for ``work_seconds``, heartbeating at a third of the lease."""
        task = hosted.task
        end = time.monotonic() + self.work_seconds
        beat = max(0.2, task.lease_seconds / 3)
        while not self.stop_event.is_set() and time.monotonic() < end and self._time_left() > 0:
            self._sleep(min(beat, end - time.monotonic()))
            if time.monotonic() < end and not self.stop_event.is_set():
                http.heartbeat(task.task_id, hosted.token, task.lease_id)

    def _advance(self, http: CoordinatorClient, hosted: _Hosted) -> None:
        """Upload (if the task takes one) and complete the in-flight task of ``hosted``. A 4xx
        drops the task (its lease is gone); a transport failure keeps it for the next pass."""
        task = hosted.task
        fields = self._task_fields(hosted, task)
        what = "upload"
        try:
            if task.upload and not hosted.uploaded:
                if self.work_seconds > 0:
                    what = "heartbeat"
                    self._work(http, hosted)
                    if self.stop_event.is_set():
                        return
                    what = "upload"
                body = deterministic_body(self._cfg.manifest, hosted.name, task)
                ack = http.upload(task.task_id, hosted.token, task.lease_id, body)
                hosted.uploaded = True
                self._event("uploaded", sha256=ack.sha256, bytes=ack.bytes, **fields)
            what = "complete"
            done = http.complete(task.task_id, hosted.token, task.lease_id, client_num_samples(hosted.name),
                                 deterministic_metrics(hosted.name, task, hosted.has_leaf))
            hosted.has_leaf = hosted.has_leaf or task.stage == "leaf"
            self._event("completed", status=done.status.value, num_samples=client_num_samples(hosted.name),
                        **fields)
            hosted.task, hosted.uploaded = None, False
        except CoordinatorError as exc:
            self._event("refused", what=what, status=exc.status, error=exc.code, **fields)
            hosted.task, hosted.uploaded = None, False
        except CoordinatorUnavailable as exc:
            self._event("unavailable", what=what, detail=str(exc)[:300], **fields)

    def _release_all(self, http: CoordinatorClient) -> None:
        for hosted in self._hosted:
            task = hosted.task
            if task is None:
                continue
            try:
                http.request("POST", f"/v1/tasks/{task.task_id}/release", token=hosted.token,
                             json={"lease_id": task.lease_id})
                self._event("released", **self._task_fields(hosted, task))
            except (CoordinatorError, CoordinatorUnavailable) as exc:
                self._event("refused", what="release", status=getattr(exc, "status", 0),
                            error=getattr(exc, "code", "unavailable"), **self._task_fields(hosted, task))
            hosted.task = None

    # -- main loop ----------------------------------------------------------------------------
    def run(self) -> int:
        self._event("start", clients=self.clients, hang_after_lease=self.hang_after_lease)
        with CoordinatorClient(self.coordinator, worker_id=self.worker_id, timeout=10,
                               max_retries=self.max_retries, max_backoff=self.max_backoff,
                               transport=self.transport) as http:
            try:
                if not self._setup(http):
                    self._event("exit", code=2, reason="setup refused")
                    return 2
            except CoordinatorUnavailable as exc:
                self._event("unavailable", what="setup", detail=str(exc)[:300])
                self._event("exit", code=1, reason="coordinator unavailable at setup")
                return 1
            code, reason = self._loop(http)
            if self.stop_event.is_set() and code == 4:
                self._release_all(http)
            self._event("exit", code=code, reason=reason)
            return code

    def _loop(self, http: CoordinatorClient) -> tuple[int, str]:
        first_pass = True
        hang_since: float | None = None
        while self._time_left() > 0:
            if self.stop_event.is_set():
                return 4, "stopped"
            all_ready = True
            for hosted in self._hosted:
                if self.stop_event.is_set():
                    break
                if hosted.task is not None:  # a task carried over an outage, or held to hang
                    all_ready = False
                    if not self.hang_after_lease:
                        self._advance(http, hosted)
                    continue
                try:
                    resp = http.lease(hosted.client_id, hosted.token)
                except CoordinatorError as exc:
                    all_ready = False
                    self._event("refused", what="lease", client=hosted.name, status=exc.status, error=exc.code)
                    continue
                except CoordinatorUnavailable as exc:
                    all_ready = False
                    self._event("unavailable", what="lease", client=hosted.name, detail=str(exc)[:300])
                    continue
                if resp.task is None:
                    if resp.client_state != "ready":
                        all_ready = False
                    continue
                all_ready = False
                hosted.task, hosted.uploaded = resp.task, False
                self._event("leased", upload=list(resp.task.upload), train_tier=resp.task.train_tier,
                            root_sha256=resp.task.root.sha256 if resp.task.root else None,
                            cluster_sha256=resp.task.cluster.sha256 if resp.task.cluster else None,
                            **self._task_fields(hosted, resp.task))
                if not self.hang_after_lease:
                    self._advance(http, hosted)
            held = [h for h in self._hosted if h.task is not None]
            if self.hang_after_lease and held:
                # after the first lease, go on leasing for the other hosted clients (their tasks
                # may open a moment later) for up to HANG_GRACE_S; then never upload
                hang_since = hang_since if hang_since is not None else time.monotonic()
                if len(held) == len(self._hosted) or time.monotonic() - hang_since >= HANG_GRACE_S:
                    self._event("hanging", tasks=[h.task.task_id for h in held])
                    while self._time_left() > 0 and not self.stop_event.is_set():
                        self._sleep(0.5)
                    return (3, "stopped while hanging") if self.stop_event.is_set() else (1, "max_seconds")
            if first_pass:
                self._event("polling")  # every hosted client asked for work once
                first_pass = False
            if all_ready and not self.stop_event.is_set():
                return 0, "every hosted client is ready"
            self._sleep(self.poll_interval)
        return 1, "max_seconds"


# ---------------------------------------------------------------------------- helpers for tests

def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON events a script-mode fake worker wrote to ``path`` (partial last line ignored)."""
    if not Path(path).exists():
        return []
    events = []
    for line in Path(path).read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return events


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--coordinator", required=True)
    p.add_argument("--federation", type=int, required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--clients", required=True, help="comma-separated client names")
    p.add_argument("--credentials", type=Path, default=None, help="JSON file of saved client tokens (shared)")
    p.add_argument("--hang-after-lease", action="store_true",
                   help="after the first lease, lease a task for each other hosted client too (for up "
                        "to 5 s), then never upload or complete (to be killed)")
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--work-seconds", type=float, default=0.0, help="pretend training time per upload task")
    p.add_argument("--poll-interval", type=float, default=0.1)
    p.add_argument("--worker-id", default=None)
    args = p.parse_args(argv)
    worker = FakeWorker(coordinator=args.coordinator, federation_id=args.federation, secret=args.secret,
                        clients=[c for c in args.clients.split(",") if c], credentials=args.credentials,
                        hang_after_lease=args.hang_after_lease, max_seconds=args.max_seconds,
                        work_seconds=args.work_seconds, poll_interval=args.poll_interval,
                        worker_id=args.worker_id)

    def _stop(_signum, _frame):
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
