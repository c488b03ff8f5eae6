"""The worker daemon against a fake coordinator client: results dropped on 404/409, bounded retries
when the coordinator is away, shutdown with a grace period and a lease release, training stopped
when the heartbeat says the lease is lost. No server, no subprocess."""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from shared.config import Training
from shared.schemas import COMPLETE_HEADER, FederationState, LeaseResponse, TaskAssignment, TaskStatus, UploadAck
from shared.tensors import pack_tensors, unpack_tensors
from worker.client import COMPLETE_HEADER_MAX_BYTES, CoordinatorClient, CoordinatorError, CoordinatorUnavailable
from worker.daemon import ClientSlot, HostedClient, WorkerConfig, WorkerDaemon
from worker.data import ClientData
from worker.state import ClientFiles

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def _task(task_id: int = 7, stage: str = "root", upload: tuple[str, ...] = ("A", "B", "head"), epochs: int = 1,
          lease_seconds: float = 60.0, root=None) -> TaskAssignment:
    return TaskAssignment(
        task_id=task_id, lease_id=f"lease-{task_id}", attempt=1, lease_expires_at=datetime.now(timezone.utc),
        lease_seconds=lease_seconds, federation_id=1, client_id=3, stage=stage, round_number=1, scope="all",
        root=root, cluster=None, train_tier="root", epochs=epochs, trainable=["A", "B", "head"],
        upload=list(upload), local=[], training=Training(batch_size=4))


def _data(n: int = 16) -> ClientData:
    rng = np.random.default_rng(0)
    x = rng.random((n, 1, 16, 16)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int64)
    return ClientData(x_train=x, y_train=y, x_test=x[:8], y_test=y[:8], train_indices=np.arange(n),
                      test_indices=np.arange(8))


def _lease(task: TaskAssignment | None) -> LeaseResponse:
    return LeaseResponse(task=task, retry_after=0.01, federation_state=FederationState.root,
                         client_state="training")


class FakeClient:
    """Records calls; each route answers from a script: a list of values or exceptions (the last
    entry repeats), or a callable."""

    def __init__(self, **scripts) -> None:
        self.scripts = scripts
        self.calls: list[tuple] = []
        self.completes: list[tuple] = []
        self.haves: list[tuple] = []   # (route, client id, the adapter versions the lease said it holds)
        self.interrupted = None

    def _answer(self, route: str, *args):
        self.calls.append((route, *args))
        script = self.scripts.get(route)
        if callable(script):
            return script(*args)
        if not script:
            return None
        entry = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(entry, BaseException):
            raise entry
        return entry

    def routes(self) -> list[str]:
        return [c[0] for c in self.calls]

    def lease(self, client_id, token, have=None):
        self.haves.append(("lease", client_id, have))
        return self._answer("lease", client_id)

    def heartbeat(self, task_id, token, lease_id):
        return self._answer("heartbeat", task_id, lease_id)

    def upload(self, task_id, token, lease_id, body, complete=None):
        """A scripted None answers as a coordinator that stored the body without completing the task
        (no status: the daemon then completes it apart); ``completes`` records what rode along."""
        if complete is not None:
            self.completes.append((task_id, complete))
        answer = self._answer("upload", task_id, lease_id)
        return UploadAck(task_id=task_id, sha256="0" * 64, bytes=len(body)) if answer is None else answer

    def complete(self, task_id, token, lease_id, num_samples, metrics):
        return self._answer("complete", task_id, lease_id)

    def release(self, task_id, token, lease_id):
        return self._answer("release", task_id, lease_id)

    def adapter(self, version_id, token, sha):
        return self._answer("adapter", version_id)

    def hold_lease(self, client_id, token, wait, have=None):
        self.haves.append(("hold_lease", client_id, have))
        return self._answer("hold_lease", client_id, wait)

    def abort_held(self):
        self.calls.append(("abort_held",))


def _daemon(client: FakeClient, tmp_path: Path, **kw) -> tuple[WorkerDaemon, ClientSlot]:
    spec = HostedClient(name="site-a", data={"partition": "tiny", "client": "upright-00"}, client_id=3, token="t")
    daemon = WorkerDaemon(client, WorkerConfig(federation_id=1, clients=[spec]), tmp_path, **kw)  # type: ignore[arg-type]
    daemon.report_pause = 0.01
    slot = ClientSlot(spec=spec, client_id=3, token="t", files=ClientFiles(tmp_path), data=_data())
    daemon.slots.append(slot)
    return daemon, slot


def conflict(code: str) -> CoordinatorError:
    return CoordinatorError(409, code, f"the coordinator says {code}")


# ---------------------------------------------------------------- reporting a result

@pytest.mark.parametrize("failing, error", [
    ("upload", conflict("stale_lease")),
    ("upload", conflict("lease_expired")),
    ("upload", CoordinatorError(404, "task_not_found", "task 7 does not exist")),
    ("complete", conflict("task_finished")),
    ("complete", conflict("stale_lease")),
    ("complete", CoordinatorError(404, "task_not_found", "task 7 does not exist")),
])
def test_a_refused_result_is_dropped_with_one_line_and_never_retried(tmp_path, caplog, failing, error):
    client = FakeClient(**{failing: [error]})
    daemon, slot = _daemon(client, tmp_path)
    with caplog.at_level(logging.WARNING, logger="hilora.worker"):
        assert daemon.report(slot, _task(), b"body", {"acc_root": 0.5}) is False
    assert client.routes().count(failing) == 1
    if failing == "upload":
        assert "complete" not in client.routes()
    dropped = [r for r in caplog.records if "result dropped" in r.getMessage()]
    assert len(dropped) == 1 and str(error.status) in dropped[0].getMessage()
    assert error.code in dropped[0].getMessage()


def test_an_unreachable_coordinator_is_retried_then_the_report_goes_through(tmp_path):
    down = CoordinatorUnavailable("connection refused")
    client = FakeClient(upload=[down, down, None], complete=[down, {"ok": 1}])
    daemon, slot = _daemon(client, tmp_path, report_timeout=30)
    assert daemon.report(slot, _task(), b"body", {}) is True
    # the upload is not repeated once it went through; complete is retried on its own
    assert client.routes() == ["upload", "upload", "upload", "complete", "complete"]


def test_a_coordinator_that_stays_away_drops_the_result_after_the_report_timeout(tmp_path, caplog):
    client = FakeClient(upload=[CoordinatorUnavailable("connection refused")])
    daemon, slot = _daemon(client, tmp_path, report_timeout=0.3)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="hilora.worker"):
        assert daemon.report(slot, _task(), b"body", {}) is False
    assert time.monotonic() - t0 < 5
    assert "complete" not in client.routes()
    assert any("stayed unreachable" in r.getMessage() for r in caplog.records)


def test_a_result_is_one_request_when_the_coordinator_completes_it_with_the_upload(tmp_path):
    done = UploadAck(task_id=7, sha256="0" * 64, bytes=4, status=TaskStatus.done)
    client = FakeClient(upload=[done])
    daemon, slot = _daemon(client, tmp_path)
    assert daemon.report(slot, _task(), b"body", {"acc_root": 0.5}, num_samples=12) is True
    assert client.routes() == ["upload"]
    assert client.completes == [(7, (12, {"acc_root": 0.5}))]   # time_upload is the coordinator's then
    # unreachable, then through: the retry carries the completion again (a replay is idempotent)
    client = FakeClient(upload=[CoordinatorUnavailable("connection refused"), done])
    daemon, slot = _daemon(client, tmp_path, report_timeout=30)
    assert daemon.report(slot, _task(), b"body", {}, num_samples=12) is True
    assert client.routes() == ["upload", "upload"] and [c[0] for c in client.completes] == [7, 7]


def test_a_coordinator_that_only_stores_the_upload_gets_the_completion_apart(tmp_path):
    """An upload answered without status (a coordinator that ignores X-Hilora-Complete, or a
    completion too long for a header): the completion follows, with the worker's time_upload."""
    seen = []
    client = FakeClient(upload=[None])
    client.complete = lambda task_id, token, lease_id, num_samples, metrics: (  # type: ignore[method-assign]
        seen.append((task_id, num_samples, sorted(metrics))), client.calls.append(("complete", task_id)))
    daemon, slot = _daemon(client, tmp_path)
    assert daemon.report(slot, _task(), b"body", {"acc_root": 0.5}, num_samples=12) is True
    assert client.routes() == ["upload", "complete"]
    assert seen == [(7, 12, ["acc_root", "time_upload"])]


def test_the_client_sends_the_completion_in_a_header_only_when_it_fits():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get(COMPLETE_HEADER))
        status = "done" if COMPLETE_HEADER in request.headers else None
        return httpx.Response(200, json={"task_id": 7, "sha256": "0" * 64, "bytes": 4,
                                         **({"status": status} if status else {})})

    client = CoordinatorClient("http://coord", transport=httpx.MockTransport(handler))
    ack = client.upload(7, "tok", "lease-7", b"body", complete=(12, {"acc_root": 0.5, "time_compute": 1.25}))
    assert ack.status == TaskStatus.done
    assert json.loads(seen[0]) == {"num_samples": 12, "metrics": {"acc_root": 0.5, "time_compute": 1.25}}
    many = {f"metric_{i:03d}_{'x' * 40}": float(i) for i in range(120)}   # about 7 KB of JSON
    assert len(json.dumps(many)) > COMPLETE_HEADER_MAX_BYTES
    ack = client.upload(7, "tok", "lease-7", b"body", complete=(12, many))
    assert seen[1] is None and ack.status is None   # too long for a header: the caller completes apart
    assert client.upload(7, "tok", "lease-7", b"body").status is None and seen[2] is None


def test_a_leaf_task_completes_without_upload(tmp_path):
    client = FakeClient(complete=[{"ok": 1}])
    daemon, slot = _daemon(client, tmp_path)
    assert daemon.report(slot, _task(stage="leaf", upload=()), None, {"acc_leaf": 1.0}) is True
    assert client.routes() == ["complete"]


# ---------------------------------------------------------------- the polling loop

def test_the_loop_survives_a_task_whose_coordinator_vanished_and_keeps_polling(tmp_path):
    leases = [_lease(_task(1)), _lease(None), _lease(_task(2)), _lease(None)]
    daemon: WorkerDaemon

    def lease(_client_id):
        if not leases:
            daemon.request_stop("test")
            return _lease(None)
        return leases.pop(0)

    client = FakeClient(lease=lease)
    daemon, _slot = _daemon(client, tmp_path)
    seen = []

    def execute(slot, task, defer_report=False):
        seen.append(task.task_id)
        if task.task_id == 1:
            raise CoordinatorUnavailable("GET /v1/adapters/1 failed 9 times")
        raise CoordinatorError(404, "adapter_not_found", "adapter version 9 does not exist")

    daemon.execute = execute  # type: ignore[method-assign]
    assert daemon.run() == 0
    assert seen == [1, 2] and client.routes().count("lease") == 5


def test_a_revoked_client_is_dropped_and_the_other_hosted_clients_go_on(tmp_path, caplog):
    polled: list[int] = []
    daemon: WorkerDaemon

    def lease(client_id):
        polled.append(client_id)
        if client_id == 3:
            raise CoordinatorError(403, "revoked", "this client has been revoked")
        if polled.count(4) >= 3:
            daemon.request_stop("test")
        return _lease(None)

    client = FakeClient(lease=lease)
    daemon, _slot = _daemon(client, tmp_path)
    other = HostedClient(name="site-b", data={"partition": "tiny", "client": "upright-00"}, client_id=4, token="u")
    daemon.slots.append(ClientSlot(spec=other, client_id=4, token="u", files=ClientFiles(tmp_path), data=_data()))
    with caplog.at_level(logging.ERROR, logger="hilora.worker"):
        assert daemon.run() == 0
    assert polled.count(3) == 1 and polled.count(4) == 3
    assert sum("no longer accepts its token" in r.message for r in caplog.records) == 1


def test_a_worker_whose_clients_are_all_revoked_exits_2(tmp_path):
    client = FakeClient(lease=[CoordinatorError(401, "bad_token", "unknown client token")])
    daemon, _slot = _daemon(client, tmp_path)
    assert daemon.run() == 2
    assert client.routes() == ["lease"]


def test_an_unexpected_refusal_of_a_lease_stops_the_worker_loudly(tmp_path):
    client = FakeClient(lease=[CoordinatorError(400, "bad_request", "odd")])
    daemon, _slot = _daemon(client, tmp_path)
    with pytest.raises(CoordinatorError):
        daemon.run()


def test_polling_through_an_outage_and_stopping_while_idle(tmp_path):
    client = FakeClient(lease=[CoordinatorUnavailable("connection refused"), _lease(None)])
    daemon, _slot = _daemon(client, tmp_path)
    threading.Timer(0.5, daemon.request_stop, args=("SIGTERM",)).start()
    t0 = time.monotonic()
    assert daemon.run() == 0
    assert time.monotonic() - t0 < 5


def test_a_task_leased_as_the_stop_arrives_is_given_straight_back(tmp_path):
    daemon: WorkerDaemon

    def lease(_client_id):
        daemon.request_stop("SIGTERM")
        return _lease(_task(5))

    client = FakeClient(lease=lease, release=[None])
    daemon, _slot = _daemon(client, tmp_path)
    daemon.execute = lambda *a: pytest.fail("a stopping worker must not start a task")  # type: ignore[method-assign]
    assert daemon.run() == 0
    assert ("release", 5, "lease-5") in client.calls


def test_stop_requests_grace_then_abort(tmp_path):
    daemon, _slot = _daemon(FakeClient(), tmp_path, grace_seconds=30)
    assert not daemon.past_grace() and not daemon.interrupted()
    daemon.request_stop("SIGTERM")
    assert daemon.stop_event.is_set() and not daemon.past_grace()
    assert daemon.interrupted()  # idle: requests stop retrying at once
    daemon._busy = True
    assert not daemon.interrupted()  # a running task's requests keep retrying within the grace
    daemon.request_stop("SIGTERM")
    assert daemon.past_grace() and daemon.interrupted()

    daemon2, _ = _daemon(FakeClient(), tmp_path, grace_seconds=0.2)
    daemon2.request_stop("SIGINT")
    assert not daemon2.past_grace()
    time.sleep(0.3)
    assert daemon2.past_grace()


def test_release_failures_are_logged_not_raised(tmp_path, caplog):
    for error in (conflict("stale_lease"), CoordinatorUnavailable("down"),
                  CoordinatorError(404, "error", "Not Found")):
        client = FakeClient(release=[error])
        daemon, slot = _daemon(client, tmp_path)
        with caplog.at_level(logging.WARNING, logger="hilora.worker"):
            daemon._release(slot, _task(), "test")
        assert client.routes() == ["release"]


# ---------------------------------------------------------------- heartbeats

def test_heartbeats_keep_going_through_errors_and_stop_on_a_lost_lease(tmp_path):
    from worker.daemon import Heartbeater

    client = FakeClient(heartbeat=[CoordinatorUnavailable("down"), None, conflict("lease_expired")])
    task = _task(lease_seconds=0.3)  # a heartbeat every 0.5 s
    with Heartbeater(client, "t", task) as hb:  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        while hb.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
    assert hb.lost is not None and "lease_expired" in hb.lost
    assert client.routes() == ["heartbeat"] * 3


# ---------------------------------------------------------------- execute with a real (small) model

@pytest.fixture
def small_runtime():
    import torch

    from shared.manifest import TIERS
    from worker.backbone import (
        DEMO_BACKBONE_KWARGS,
        DEMO_BACKBONE_MODEL,
        create_model,
        manifest_for_model,
    )
    from worker.lora import TieredLoRAModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    backbone = create_model(DEMO_BACKBONE_MODEL, dict(DEMO_BACKBONE_KWARGS, embed_dim=16, depth=2, num_heads=2))
    model = TieredLoRAModel(backbone.eval(), manifest_for_model(backbone, rank=2))
    for i, tier in enumerate(TIERS):
        model.init_tier(tier, seed=100 + i)
    return model


def _long_root_task(lease_seconds: float) -> TaskAssignment:
    from shared.schemas import AdapterRef

    return _task(epochs=100_000, lease_seconds=lease_seconds,
                 root=AdapterRef(id=1, tier="root", version=1, sha256="0" * 64))


def test_a_lost_lease_stops_training_early_and_uploads_nothing(tmp_path, small_runtime, caplog):
    from types import SimpleNamespace

    from shared.tensors import pack_tensors

    client = FakeClient(adapter=[pack_tensors(small_runtime.export_tier("root"))],
                        heartbeat=[conflict("stale_lease")])
    daemon, slot = _daemon(client, tmp_path)
    daemon._runtime = (SimpleNamespace(training=Training()), small_runtime)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="hilora.worker"):
        assert daemon.execute(slot, _long_root_task(lease_seconds=0.3)) == {}
    assert time.monotonic() - t0 < 20
    assert "upload" not in client.routes() and "complete" not in client.routes()
    assert any("lost its lease" in r.getMessage() for r in caplog.records)


def test_a_task_past_the_grace_stops_training_and_releases_its_lease(tmp_path, small_runtime):
    from types import SimpleNamespace

    from shared.tensors import pack_tensors

    daemon: WorkerDaemon
    client = FakeClient(adapter=[pack_tensors(small_runtime.export_tier("root"))],
                        heartbeat=lambda *a: daemon.request_stop("SIGTERM"), release=[None])
    daemon, slot = _daemon(client, tmp_path, grace_seconds=0.5)
    daemon._runtime = (SimpleNamespace(training=Training()), small_runtime)
    t0 = time.monotonic()
    assert daemon.execute(slot, _long_root_task(lease_seconds=0.3)) == {}
    assert time.monotonic() - t0 < 20
    assert ("release", 7, "lease-7") in client.calls
    assert "upload" not in client.routes() and "complete" not in client.routes()


# ---------------------------------------------------------------- the real client's retry loop

def test_client_release_route_and_interrupted_retries():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, request.content))
        if request.url.path.endswith("/release"):
            return httpx.Response(200, json={"task_id": 7, "status": "pending"})
        return httpx.Response(503, json={"error": "unavailable", "detail": "restarting"})

    client = CoordinatorClient("http://coord", transport=httpx.MockTransport(handler), max_retries=8)
    client.release(7, "tok", "lease-7")
    assert [(m, p, json.loads(c)) for m, p, c in seen] == [("POST", "/v1/tasks/7/release", {"lease_id": "lease-7"})]
    # a shutdown cuts the backoff short: one try, then CoordinatorUnavailable
    client.interrupted = lambda: True
    t0 = time.monotonic()
    with pytest.raises(CoordinatorUnavailable, match="1 times"):
        client.heartbeat(7, "tok", "lease-7")
    assert time.monotonic() - t0 < 1


def test_client_release_conflict_is_a_coordinator_error():
    transport = httpx.MockTransport(lambda r: httpx.Response(409, json={"error": "stale_lease", "detail": "no"}))
    client = CoordinatorClient("http://coord", transport=transport)
    with pytest.raises(CoordinatorError) as info:
        client.release(7, "tok", "lease-7")
    assert info.value.status == 409 and info.value.code == "stale_lease"


def _run_one_task(tmp_path, small_runtime, monkeypatch, trainer, upload=("A", "B", "head"), **update):
    """One task of a root-only federation through ``WorkerDaemon.execute``, with ``trainer``
    standing in for ``train_tier`` and the task's fields ``update``d. Returns (metrics, the fake client)."""
    from types import SimpleNamespace

    import worker.train as train
    from shared.schemas import AdapterRef
    from shared.tensors import pack_tensors

    monkeypatch.setattr(train, "train_tier", trainer)
    client = FakeClient(adapter=[pack_tensors(small_runtime.export_tier("root"))], complete=[None])
    daemon, slot = _daemon(client, tmp_path)
    cfg = SimpleNamespace(training=Training(seed=0), cluster=SimpleNamespace(enabled=False),
                          schedule=SimpleNamespace(leaf_rounds=1))
    daemon._runtime = (cfg, small_runtime)
    task = _task(upload=upload, root=AdapterRef(id=1, tier="root", version=1, sha256="0" * 64)).model_copy(
        update=update)
    return daemon.execute(slot, task), client


@pytest.mark.parametrize(("tier", "expected"), [("root", (1e-3, 1e-2)), ("leaf", (1e-4, 1e-3))])
def test_only_the_leaf_trains_at_the_scaled_learning_rates(tmp_path, small_runtime, monkeypatch, tier, expected):
    seen = {}

    def spy(model, tier_, data, **kw):
        seen.update(tier=tier_, lr=kw["lr"], head_lr=kw["head_lr"])
        return {"train_loss": 0.0, "steps": 1}

    _run_one_task(tmp_path, small_runtime, monkeypatch, spy, upload=() if tier == "leaf" else ("A", "B", "head"),
                  stage=tier, train_tier=tier, training=Training(lr=1e-3, head_lr=1e-2, leaf_lr_scale=0.1))
    assert seen["tier"] == tier and (seen["lr"], seen["head_lr"]) == pytest.approx(expected)


@pytest.mark.parametrize(("prior_std", "skewed", "p_value", "width"), [
    (0.0, 4.0, 0.01, None),   # no fit at all
    (2.0, 0.0, 0.01, 2.0),    # one width for every client
    (2.0, 4.0, 0.5, 2.0),     # labels that look uniform: leaf_bias_fit's width
    (2.0, 4.0, 0.01, 4.0),    # labels that do not: leaf_bias_fit_skewed's
])
def test_a_new_leaf_starts_with_its_bias_fitted_to_the_clients_labels_only_when_asked(
        tmp_path, small_runtime, monkeypatch, prior_std, skewed, p_value, width):
    """training.leaf_bias_fit: the fresh leaf's head is the model's below it plus, when asked, the
    logit shift fitted to the client's training labels (shared.calibration), before it trains;
    training.leaf_bias_fit_skewed: with a wider prior when the client's labels are not uniform
    (the test's p-value is set here: the tiny client's 16 labels)."""
    import torch

    import shared.calibration as calibration
    import worker.train as train
    from shared.calibration import fit_logit_shift

    monkeypatch.setattr(calibration, "uniform_labels_p_value", lambda labels, classes, draws=4000: p_value)

    seen = {}

    def spy(model, tier_, data, **kw):
        seen.update(bias=model.heads["leaf"].bias.detach().clone(), weight=model.heads["leaf"].weight.detach().clone(),
                    logits=train.logits_of(model, data.x_train, ("root",)), labels=np.asarray(data.y_train))
        return {"train_loss": 0.0, "steps": 1}

    _run_one_task(tmp_path, small_runtime, monkeypatch, spy, upload=(), stage="leaf", train_tier="leaf",
                  training=Training(leaf_bias_fit=prior_std, leaf_bias_fit_skewed=skewed))
    root_head = small_runtime.heads["root"]
    assert torch.equal(seen["weight"], root_head.weight)
    shift = (seen["bias"] - root_head.bias).numpy()
    if width is None:
        assert not shift.any()
    else:
        expected = fit_logit_shift(seen["logits"], seen["labels"], width)
        other = fit_logit_shift(seen["logits"], seen["labels"], 6.0 - width)   # the width not chosen
        assert np.abs(expected - other).max() > 1e-3
        np.testing.assert_allclose(shift, expected, rtol=1e-4, atol=1e-5)
        assert np.abs(expected).max() > 0.05   # the tiny client's labels do move it


@pytest.mark.parametrize(("mix", "p_value", "served"), [
    (0.5, 0.5, 0.5),     # labels that look uniform: the client's model takes half its leaf's change
    (0.5, 0.01, 1.0),    # labels with a mix of their own: the leaf as trained
    (1.0, 0.5, 1.0),     # leaf_mix 1: the leaf as trained for everyone
])
def test_a_leaf_is_scored_as_the_client_uses_it_and_kept_as_trained(tmp_path, small_runtime, monkeypatch, mix,
                                                                   p_value, served):
    """training.leaf_mix: the leaf task's accuracy is the model with the served leaf (its change
    ``served`` of the way from the root's head and LoRA; shared.merge.served_leaf), ``mix`` for a
    client whose labels look uniform (the test's p-value is set here), 1 for the others; the leaf's
    file keeps the leaf as trained (the next leaf round continues from it) and records the mix,
    which the final evaluation then uses whatever the labels' test would say."""
    import shared.calibration as calibration
    import worker.train as train
    from shared.merge import leaf_file_mix, served_leaf
    from shared.tensors import unpack_tensors

    monkeypatch.setattr(calibration, "uniform_labels_p_value", lambda labels, classes, draws=4000: p_value)
    seen = {}

    def trainer(model, tier_, data, **kw):   # "training": a leaf far from the model below it
        rng = np.random.default_rng(11)
        model.load_tier("leaf", {name: (3.0 * rng.normal(size=shape)).astype(np.float32)
                                 for name, shape in model.manifest.tier_shapes("leaf").items()})
        seen.update(trained=model.export_tier("leaf"), data=data)
        return {"train_loss": 0.0, "steps": 1}

    metrics, _ = _run_one_task(tmp_path, small_runtime, monkeypatch, trainer, upload=(), stage="leaf",
                               train_tier="leaf", training=Training(leaf_bias_fit=0.0, leaf_mix=mix))
    trained, data = seen["trained"], seen["data"]
    assert all(np.array_equal(small_runtime.export_tier("leaf")[k], v) for k, v in trained.items())
    (leaf_file,) = tmp_path.rglob("leaf.safetensors")
    stored = unpack_tensors(leaf_file.read_bytes())
    assert all(np.array_equal(stored[k], v) for k, v in trained.items())
    assert leaf_file_mix(leaf_file.read_bytes()) == served

    def accuracy(leaf):
        small_runtime.load_tier("leaf", leaf)
        try:
            return train.evaluate(small_runtime, data.x_test, data.y_test, ("root", "leaf"))
        finally:
            small_runtime.load_tier("leaf", trained)

    expected = accuracy(served_leaf(trained, small_runtime.export_tier("root", ("head",)), served))
    assert metrics["acc_leaf"] == expected
    if served < 1:
        assert accuracy(trained) != expected   # the mix does change this leaf's predictions

    # the final evaluation: the mix the leaf's file records, not the labels' test or the option now
    monkeypatch.setattr(calibration, "uniform_labels_p_value", lambda labels, classes, draws=4000: 0.5 - p_value)

    def no_training(*a, **kw):
        raise AssertionError("an evaluation trains nothing")

    final, _ = _run_one_task(tmp_path, small_runtime, monkeypatch, no_training, upload=(), stage="eval",
                             training=Training(leaf_bias_fit=0.0, leaf_mix=0.25))
    assert final["acc_leaf"] == expected and final["acc_root"] == metrics["acc_root"]


@pytest.mark.parametrize("evaluate", [True, False])
def test_a_root_task_evaluates_what_it_received_only_when_told(tmp_path, small_runtime, monkeypatch, evaluate):
    """schedule.evaluate_every: the task's ``evaluate`` decides whether the received root is scored
    on the client's data before training (acc_root and the eval phase's time in the metrics)."""
    metrics, client = _run_one_task(tmp_path, small_runtime, monkeypatch,
                                    lambda model, tier_, data, **kw: {"train_loss": 0.0, "steps": 1},
                                    evaluate=evaluate)
    assert metrics["train_loss"] == 0.0 and client.routes()[-2:] == ["upload", "complete"]
    assert ("acc_root" in metrics) is evaluate and ("time_eval" in metrics) is evaluate, metrics
    if evaluate:
        assert 0.0 <= metrics["acc_root"] <= 1.0


# ---------------------------------------------------------------- a model this worker refuses

@pytest.mark.parametrize("backbone", [
    {"model": "vit_tiny_patch16_224", "model_kwargs": {"checkpoint_path": "/etc/passwd"}},
    {"model": "hf-hub:someone/model", "model_kwargs": {}},
])
def test_a_refused_model_gives_the_lease_back_and_stops_the_worker(tmp_path, backbone):
    from conftest import tiny_config

    from shared.config import FederationConfig
    from worker.model_policy import ModelRefused

    cfg = tiny_config("refused")
    cfg["backbone"].update(backbone)
    client = FakeClient(lease=[_lease(_task())], release=[None])
    client.federation_config = lambda fid, token: FederationConfig.model_validate(cfg)  # type: ignore[attr-defined]
    daemon, _slot = _daemon(client, tmp_path)
    with pytest.raises(ModelRefused, match="allow_"):
        daemon.run()
    assert client.routes() == ["lease", "release"]  # nothing trained, nothing uploaded, lease given back


# ---------------------------------------------------------------- long polling

def _fresh(task: TaskAssignment, seconds_left: float) -> TaskAssignment:
    return task.model_copy(update={"lease_expires_at": datetime.now(timezone.utc) + timedelta(seconds=seconds_left)})


def _second_slot(daemon: WorkerDaemon, tmp_path: Path) -> None:
    other = HostedClient(name="site-b", data={"partition": "tiny", "client": "upright-00"}, client_id=4, token="u")
    daemon.slots.append(ClientSlot(spec=other, client_id=4, token="u", files=ClientFiles(tmp_path / "b"),
                                   data=_data()))


def test_with_nothing_to_do_the_worker_holds_a_lease_and_runs_the_task_it_gets(tmp_path):
    daemon: WorkerDaemon
    held = [_lease(_fresh(_task(9), 60.0))]

    def hold(client_id, wait):
        if held:
            return held.pop(0)
        daemon.request_stop("test")
        return None

    client = FakeClient(lease=[_lease(None)], hold_lease=hold)
    daemon, _slot = _daemon(client, tmp_path, long_poll=15.0)
    seen = []
    daemon.execute = lambda slot, task, defer_report=False: seen.append((slot.client_id, task.task_id)) or {}  # type: ignore[method-assign]
    assert daemon.run() == 0
    assert seen == [(3, 9)]
    assert ("hold_lease", 3, 15.0) in client.calls


def test_after_held_requests_answered_the_worker_holds_again_without_plain_leases(tmp_path):
    """Two rounds come through held requests: between them the worker asks for no plain lease (a
    held request answers at once when a task waits), so its only plain leases are the first sweep."""
    daemon: WorkerDaemon
    answers = {3: [_lease(_fresh(_task(1), 60.0)), _lease(_fresh(_task(3), 60.0))],
               4: [_lease(_fresh(_task(2), 60.0)), _lease(_fresh(_task(4), 60.0))]}

    def hold(client_id, wait):
        if answers[client_id]:
            return answers[client_id].pop(0)
        daemon.request_stop("test")
        return None

    client = FakeClient(lease=[_lease(None)], hold_lease=hold)
    daemon, _slot = _daemon(client, tmp_path, long_poll=15.0)
    _second_slot(daemon, tmp_path)
    seen = []
    daemon.execute = lambda slot, task, defer_report=False: seen.append(task.task_id) or {}  # type: ignore[method-assign]
    assert daemon.run() == 0
    assert sorted(seen) == [1, 2, 3, 4]
    routes = client.routes()
    assert routes[:2] == ["lease", "lease"]          # the first sweep, one per hosted client
    assert routes[2:].count("lease") == 0 and routes.count("hold_lease") == 6
    assert daemon._holder is None                      # the held requests' threads end with the daemon


def test_exit_when_idle_after_held_requests_polls_one_client_then_all_to_exit(tmp_path):
    """With --exit-when-idle, after held requests answered the worker polls one client; once it is
    ready it polls every client and exits when all are, without holding again."""
    answers = {3: [_lease(_fresh(_task(1), 60.0))], 4: [_lease(_fresh(_task(2), 60.0))]}
    leases: list[int] = []

    def hold(client_id, wait):
        return answers[client_id].pop(0)   # a second hold would fail the test (pop from empty)

    def lease(client_id):
        leases.append(client_id)
        state = "training" if len(leases) <= 2 else "ready"   # the first sweep, then the federation serves
        return LeaseResponse(task=None, retry_after=0.01, federation_state=FederationState.root,
                             client_state=state)

    client = FakeClient(lease=lease, hold_lease=hold)
    daemon, _slot = _daemon(client, tmp_path, long_poll=15.0, exit_when_idle=True)
    _second_slot(daemon, tmp_path)
    seen = []
    daemon.execute = lambda slot, task, defer_report=False: seen.append(task.task_id) or {}  # type: ignore[method-assign]
    assert daemon.run() == 0
    assert sorted(seen) == [1, 2]
    assert leases == [3, 4, 3, 3, 4]   # sweep; one client after the hold (ready); every client, all ready
    assert client.routes().count("hold_lease") == 2


def test_a_held_task_that_waited_past_half_its_lease_is_given_back(tmp_path):
    """Two hosted clients' held requests both get a task: the first runs; the second, whose lease
    has less than half left once the first is done, is released (no attempt lost), not run."""
    daemon: WorkerDaemon
    answers = {3: [_lease(_fresh(_task(1), 60.0))], 4: [_lease(_fresh(_task(2), 20.0))]}

    def hold(client_id, wait):
        if answers[client_id]:
            return answers[client_id].pop(0)
        daemon.request_stop("test")
        return None

    client = FakeClient(lease=[_lease(None)], hold_lease=hold, release=[None])
    daemon, _slot = _daemon(client, tmp_path, long_poll=15.0)
    _second_slot(daemon, tmp_path)
    seen = []
    daemon.execute = lambda slot, task, defer_report=False: seen.append(task.task_id) or {}  # type: ignore[method-assign]
    assert daemon.run() == 0
    assert seen == [1]
    assert [c for c in client.calls if c[0] == "release"] == [("release", 2, "lease-2")]


def _two_clients_leasing(tmp_path, answers: dict[int, list], on_lease=None, **kw):
    """A daemon hosting clients 3 and 4 whose plain leases answer from ``answers`` (then nothing,
    and a stop); ``execute`` records each task it is given."""
    daemon: WorkerDaemon
    lock = threading.Lock()

    def lease(client_id):
        with lock:
            if on_lease is not None:
                on_lease(client_id)
            if answers[client_id]:
                return answers[client_id].pop(0)
            if not any(answers.values()):
                daemon.request_stop("test")
            return _lease(None)

    client = FakeClient(lease=lease, release=[None])
    daemon, _slot = _daemon(client, tmp_path, long_poll=0, **kw)
    _second_slot(daemon, tmp_path)
    return daemon, client


def test_with_short_tasks_the_next_clients_lease_goes_out_while_a_task_runs(tmp_path):
    """Two hosted clients, two passes: in the first the worker knows nothing of its tasks' length
    and leases in turn; once a task ran in far less than a quarter of its lease, the next client's
    lease is in flight while the current task runs."""
    answers = {3: [_lease(_fresh(_task(1), 60)), _lease(_fresh(_task(3), 60))],
               4: [_lease(_fresh(_task(2), 60)), _lease(_fresh(_task(4), 60))]}
    leases_of_4 = []
    second_lease_of_4 = threading.Event()

    def on_lease(client_id):
        if client_id == 4:
            leases_of_4.append(client_id)
            if len(leases_of_4) == 2:
                second_lease_of_4.set()

    daemon, client = _two_clients_leasing(tmp_path, answers, on_lease)
    seen = []

    def execute(slot, task, defer_report=False):
        # task 3 runs while client 4's lease is in flight: it waits for it (bounded), never the reverse
        ahead = second_lease_of_4.wait(10) if task.task_id == 3 else len(leases_of_4)
        seen.append((task.task_id, ahead))
        return {}

    daemon.execute = execute  # type: ignore[method-assign]
    assert daemon.run() == 0
    assert seen == [(1, 0), (2, 1), (3, True), (4, 2)]
    assert "release" not in client.routes()
    assert daemon._leaser is None   # shut down with the loop


def test_without_background_reports_leases_go_out_in_turn(tmp_path):
    answers = {3: [_lease(_fresh(_task(1), 60)), _lease(_fresh(_task(3), 60))],
               4: [_lease(_fresh(_task(2), 60)), _lease(_fresh(_task(4), 60))]}
    leases_of_4 = []
    daemon, client = _two_clients_leasing(tmp_path, answers, lambda cid: cid == 4 and leases_of_4.append(cid),
                                          background_reports=False)
    seen = []
    daemon.execute = lambda slot, task, defer_report=False: seen.append((task.task_id, len(leases_of_4))) or {}  # type: ignore[method-assign]
    assert daemon.run() == 0
    assert seen == [(1, 0), (2, 1), (3, 1), (4, 2)]


def test_a_task_leased_ahead_that_waited_past_half_its_lease_is_given_back(tmp_path):
    answers = {3: [_lease(_fresh(_task(1), 60)), _lease(_fresh(_task(3), 60))],
               4: [_lease(_fresh(_task(2), 60)), _lease(_fresh(_task(4), 20))]}   # 20 s of 60 left
    daemon, client = _two_clients_leasing(tmp_path, answers)
    seen = []
    daemon.execute = lambda slot, task, defer_report=False: seen.append(task.task_id) or {}  # type: ignore[method-assign]
    assert daemon.run() == 0
    assert seen == [1, 2, 3]
    assert [c for c in client.calls if c[0] == "release"] == [("release", 4, "lease-4")]


def test_stopping_while_a_lease_is_ahead_gives_its_task_back(tmp_path):
    answers = {3: [_lease(_fresh(_task(1), 60)), _lease(_fresh(_task(3), 60))],
               4: [_lease(_fresh(_task(2), 60)), _lease(_fresh(_task(4), 60))]}
    daemon, client = _two_clients_leasing(tmp_path, answers)
    seen = []

    def execute(slot, task, defer_report=False):
        seen.append(task.task_id)
        if task.task_id == 3:
            daemon.request_stop("test")
        return {}

    daemon.execute = execute  # type: ignore[method-assign]
    assert daemon.run() == 0
    assert seen == [1, 2, 3]
    assert [c for c in client.calls if c[0] == "release"] == [("release", 4, "lease-4")]


def test_long_tasks_are_not_leased_ahead(tmp_path):
    """A task that took a quarter of its lease or more: the next lease waits for it."""
    answers = {3: [_lease(_fresh(_task(1, lease_seconds=0.2), 60)), _lease(_fresh(_task(3, lease_seconds=0.2), 60))],
               4: [_lease(_fresh(_task(2, lease_seconds=0.2), 60)), _lease(_fresh(_task(4, lease_seconds=0.2), 60))]}
    leases_of_4 = []
    daemon, client = _two_clients_leasing(tmp_path, answers, lambda cid: cid == 4 and leases_of_4.append(cid))
    seen = []

    def execute(slot, task, defer_report=False):
        seen.append((task.task_id, len(leases_of_4)))
        time.sleep(0.06)   # over a quarter of the 0.2 s lease
        return {}

    daemon.execute = execute  # type: ignore[method-assign]
    assert daemon.run() == 0
    assert seen == [(1, 0), (2, 1), (3, 1), (4, 2)]
    assert daemon._leaser is None


def test_a_coordinator_that_does_not_hold_leases_is_polled_plainly(tmp_path):
    """An empty held answer with retry_after > 0 (an old coordinator, or long polling off) turns
    holding off for a while: the loop goes back to plain polling and sleeps retry_after."""
    daemon: WorkerDaemon
    plain = []

    def lease(client_id):
        plain.append(client_id)
        if len(plain) >= 5:
            daemon.request_stop("test")
        return _lease(None)

    client = FakeClient(lease=lease, hold_lease=[_lease(None)])
    daemon, _slot = _daemon(client, tmp_path, long_poll=15.0)
    assert daemon.run() == 0
    assert client.routes().count("hold_lease") == 1 and len(plain) == 5


def test_stopping_while_a_lease_is_held_aborts_it_and_gives_back_what_it_got(tmp_path):
    aborted = threading.Event()
    daemon: WorkerDaemon

    def hold(client_id, wait):
        threading.Timer(0.3, daemon.request_stop, args=("test",)).start()
        assert aborted.wait(10), "the held request was never aborted"
        return _lease(_fresh(_task(5), 60.0))  # it got a task just as it was aborted

    client = FakeClient(lease=[_lease(None)], hold_lease=hold, release=[None])
    client.abort_held = lambda: (client.calls.append(("abort_held",)), aborted.set())  # type: ignore[method-assign]
    daemon, _slot = _daemon(client, tmp_path, long_poll=15.0)
    daemon.execute = lambda slot, task, defer_report=False: pytest.fail("a task was run while stopping")  # type: ignore[method-assign]
    started = time.monotonic()
    assert daemon.run() == 0
    assert time.monotonic() - started < 5.0
    assert ("abort_held",) in client.calls and ("release", 5, "lease-5") in client.calls


def test_the_client_holds_a_lease_with_wait_and_abort_ends_it(tmp_path):
    """``CoordinatorClient.hold_lease`` sends ?wait=S with a read timeout past it; ``abort_held``
    ends a request in flight (None, not an exception)."""
    seen: list[httpx.Request] = []
    release = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.params.get("wait") == "7":
            return httpx.Response(200, json=_lease(None).model_dump(mode="json") | {"retry_after": 0.0})
        release.wait(10)
        raise httpx.ReadError("connection closed")

    client = CoordinatorClient("http://coord", max_retries=0, transport=httpx.MockTransport(handler))
    answer = client.hold_lease(3, "tok", 7)
    assert answer is not None and answer.retry_after == 0.0 and answer.task is None
    assert seen[0].url.path == "/v1/clients/3/lease" and seen[0].headers["Authorization"] == "Bearer tok"
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("answer", client.hold_lease(3, "tok", 9)))
    thread.start()
    time.sleep(0.2)
    client.abort_held()
    release.set()
    thread.join(10)
    assert not thread.is_alive() and out["answer"] is None
    client.close()


# ---------------------------------------------------------------- reports in the background

def _fast_training(monkeypatch):
    import worker.train as train

    monkeypatch.setattr(train, "train_tier", lambda model, tier, data, **kw: {"train_loss": 0.5, "steps": 1})


def _pipelined(tmp_path, small_runtime, monkeypatch, client_scripts, lease_seconds=60.0, **kw):
    """A daemon whose leases hand out tasks 1 and 2 (then nothing, and a stop), with a real small model
    and training replaced by a no-op."""
    from types import SimpleNamespace

    from shared.schemas import AdapterRef
    from shared.tensors import pack_tensors

    _fast_training(monkeypatch)
    root = AdapterRef(id=1, tier="root", version=1, sha256="0" * 64)
    tasks = [_task(1, lease_seconds=lease_seconds, root=root), _task(2, lease_seconds=lease_seconds, root=root)]
    daemon: WorkerDaemon

    def lease(_client_id):
        if tasks:
            return _lease(tasks.pop(0))
        daemon.request_stop("test")
        return _lease(None)

    client = FakeClient(lease=lease, adapter=[pack_tensors(small_runtime.export_tier("root"))], **client_scripts)
    daemon, slot = _daemon(client, tmp_path, long_poll=0, **kw)
    cfg = SimpleNamespace(training=Training(seed=0), cluster=SimpleNamespace(enabled=False),
                          schedule=SimpleNamespace(leaf_rounds=0))
    daemon._runtime = (cfg, small_runtime)
    return daemon, client


def test_a_task_is_reported_in_the_background_while_the_next_one_is_leased(tmp_path, small_runtime, monkeypatch):
    leased_again = threading.Event()
    seen: dict[str, object] = {}
    daemon: WorkerDaemon

    def upload(task_id, _lease_id):
        if task_id == 1:   # the first task's upload holds until the daemon has leased its next task
            seen["leased while reporting"] = leased_again.wait(20)
        else:              # the last one is still in flight when the daemon is told to stop
            seen["stopping"] = daemon.stop_event.wait(20)
            seen["interrupted"] = daemon.interrupted()

    daemon, client = _pipelined(tmp_path, small_runtime, monkeypatch, {"upload": upload, "complete": [None]})
    original = client.lease
    client.lease = lambda cid, token, have=None: (leased_again.set() if client.routes().count("lease") >= 1 else None,
                                                  original(cid, token, have))[1]
    assert daemon.run() == 0
    assert seen == {"leased while reporting": True, "stopping": True, "interrupted": False}
    routes = [c[:2] for c in client.calls if c[0] in ("lease", "upload", "complete")]
    # task 1's report overlaps the next lease; task 2's waits for task 1's to end (one in flight);
    # the last one lands before run() returns
    assert routes.index(("complete", 1)) < routes.index(("upload", 2))
    assert [r for r in routes if r[0] == "complete"] == [("complete", 1), ("complete", 2)]
    assert daemon._report_in_flight is None and daemon._reporter is None


def test_without_background_reports_a_task_is_reported_before_the_next_lease(tmp_path, small_runtime, monkeypatch):
    daemon, client = _pipelined(tmp_path, small_runtime, monkeypatch, {"upload": [None], "complete": [None]},
                                background_reports=False)
    assert daemon.run() == 0
    routes = [c[:2] for c in client.calls if c[0] in ("lease", "upload", "complete")]
    assert routes[:6] == [("lease", 3), ("upload", 1), ("complete", 1), ("lease", 3), ("upload", 2), ("complete", 2)]
    assert daemon._reporter is None


def test_heartbeats_go_on_while_a_task_is_reported_in_the_background(tmp_path, small_runtime, monkeypatch):
    beat_while_reporting = threading.Event()
    reporting = threading.Event()

    def heartbeat(task_id, _lease_id):
        if task_id == 1 and reporting.is_set():
            beat_while_reporting.set()

    def upload(task_id, _lease_id):
        if task_id == 1:
            reporting.set()
            assert beat_while_reporting.wait(20), "no heartbeat while the report was in flight"

    daemon, client = _pipelined(tmp_path, small_runtime, monkeypatch,
                                {"upload": upload, "complete": [None], "heartbeat": heartbeat}, lease_seconds=0.3)
    assert daemon.run() == 0
    assert beat_while_reporting.is_set()
    assert [c[:2] for c in client.calls if c[0] == "complete"] == [("complete", 1), ("complete", 2)]
    # once reported, the task's heartbeats stop
    last_complete = max(i for i, c in enumerate(client.calls) if c[:2] == ("complete", 1))
    time.sleep(1.2)   # two heartbeat intervals (lease 0.3 s: every 0.5 s)
    assert not [c for c in client.calls[last_complete + 1:] if c[:2] == ("heartbeat", 1)][1:]


def test_a_background_report_that_fails_is_dropped_and_polling_goes_on(tmp_path, small_runtime, monkeypatch, caplog):
    daemon, client = _pipelined(tmp_path, small_runtime, monkeypatch,
                                {"upload": [conflict("stale_lease"), None], "complete": [None]})
    with caplog.at_level(logging.WARNING, logger="hilora.worker"):
        assert daemon.run() == 0
    assert [c[:2] for c in client.calls if c[0] in ("upload", "complete")] == [
        ("upload", 1), ("upload", 2), ("complete", 2)]
    assert sum("result dropped" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("intact", [True, False])
def test_an_input_version_that_came_inline_is_used_without_a_download(tmp_path, small_runtime, monkeypatch, intact):
    """A lease answer that carried the task's root inline (base64, ``inline_adapters``): the worker
    loads it, checked against the reference's sha256, and downloads nothing; inline bytes that do
    not hash to the reference are ignored and the version is downloaded as before. The version is
    then held: the next lease says so."""
    import base64
    import hashlib

    from shared.schemas import AdapterRef

    root = small_runtime.export_tier("root")
    body = pack_tensors({k: v + 0.5 if k.startswith("head.") else v for k, v in root.items()})
    sent = body if intact else body[:-4] + b"\x00\x00\x80\x3f"   # the last float changed: another hash
    loaded = {}

    def spy(model, tier_, data, **kw):
        loaded.update(model.export_tier("root"))
        return {"train_loss": 0.0, "steps": 1}

    import worker.train as train

    monkeypatch.setattr(train, "train_tier", spy)
    client = FakeClient(adapter=[body], complete=[None])
    daemon, slot = _daemon(client, tmp_path)
    daemon._runtime = (SimpleNamespace(training=Training(seed=0), cluster=SimpleNamespace(enabled=False),
                                       schedule=SimpleNamespace(leaf_rounds=1)), small_runtime)
    ref = AdapterRef(id=12, tier="root", version=3, sha256=hashlib.sha256(body).hexdigest())
    task = _task(root=ref).model_copy(update={"inline_adapters": {12: base64.b64encode(sent).decode()}})
    daemon.execute(slot, task)
    assert client.routes().count("adapter") == (0 if intact else 1)
    expected = unpack_tensors(body)
    assert set(loaded) == set(expected) and all(np.array_equal(loaded[k], expected[k]) for k in expected)
    assert daemon._have() == [12]


def test_an_inline_version_that_is_not_base64_is_downloaded(tmp_path, small_runtime, monkeypatch):
    import hashlib

    from shared.schemas import AdapterRef

    body = pack_tensors(small_runtime.export_tier("root"))
    ref = AdapterRef(id=5, tier="root", version=1, sha256=hashlib.sha256(body).hexdigest())
    metrics, client = _run_one_task(tmp_path, small_runtime, monkeypatch,
                                    lambda *a, **k: {"train_loss": 0.0, "steps": 1},
                                    root=ref, inline_adapters={5: "not base64 at all!"})
    assert client.routes().count("adapter") == 1 and metrics


def test_every_lease_names_the_adapter_versions_the_worker_holds(tmp_path):
    """Plain and held leases send the ids of the versions in the worker's cache (none at first), so
    that the coordinator inlines only what the worker lacks."""
    daemon: WorkerDaemon

    def hold(client_id, wait):
        daemon.request_stop("test")
        return None

    client = FakeClient(lease=[_lease(None)], hold_lease=hold)
    daemon, _slot = _daemon(client, tmp_path, long_poll=15.0)
    daemon._adapter_cache.update({4: {}, 9: {}})
    assert daemon.run() == 0
    assert client.haves[0] == ("lease", 3, [4, 9]) and ("hold_lease", 3, [4, 9]) in client.haves
