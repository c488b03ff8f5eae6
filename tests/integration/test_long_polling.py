"""Long polling of leases (``POST /v1/clients/{id}/lease?wait=S``) against a real ``hilora
coordinator`` (uvicorn on 127.0.0.1), on SQLite and PostgreSQL: a held request answers as soon as
its client's task opens, a full wait answers empty with ``retry_after`` 0, the wait is capped by
the coordinator, a paused federation answers at once, held requests hold no database connection
and no threadpool thread, and a request whose worker went away keeps no lease."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN_TOKEN, admin_headers, bearer, tiny_checkpoint, tiny_config

from hilora.launcher import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


class Server:
    def __init__(self, tmp_path: Path, database_url: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "coordinator.log"
        full = dict(os.environ)
        full.pop("HILORA_FAULT_AT", None)
        full.update({"HILORA_DATABASE_URL": database_url, "HILORA_BLOB_DIR": str(tmp_path / "blobs"),
                     "HILORA_ADMIN_TOKEN": ADMIN_TOKEN, "HILORA_HOST": "127.0.0.1", "HILORA_PORT": str(self.port),
                     "HILORA_SCHEDULER_INTERVAL": "0.2", "HILORA_LOG_LEVEL": "warning", "HILORA_DEV": "0",
                     "OMP_NUM_THREADS": "1", **env})
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "hilora.cli", "coordinator"], env=full,
                                         stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url + "/v1/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("the coordinator did not start:\n" + self.log.read_text())
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def federation(self, min_clients: int, **schedule) -> tuple[int, str]:
        import hashlib

        data = tiny_checkpoint()
        sha = hashlib.sha256(data).hexdigest()
        self.http.put(f"/v1/blobs/{sha}", content=data, headers=admin_headers()).raise_for_status()
        r = self.http.post("/v1/federations", headers=admin_headers(), json={"config": tiny_config(
            "lp", sha, schedule={"min_clients": min_clients, "retry_after_seconds": 2.0, **schedule})})
        r.raise_for_status()
        return r.json()["federation_id"], r.json()["enrollment_secret"]

    def register(self, fid: int, secret: str, name: str) -> tuple[int, str]:
        r = self.http.post(f"/v1/federations/{fid}/clients", json={"name": name, "num_samples": 10},
                           headers=bearer(secret))
        r.raise_for_status()
        return r.json()["client_id"], r.json()["token"]

    def lease(self, cid: int, token: str, wait: float | None = None, timeout: float = 60) -> tuple[dict, float]:
        t0 = time.monotonic()
        r = self.http.post(f"/v1/clients/{cid}/lease", headers=bearer(token), timeout=timeout,
                           params={} if wait is None else {"wait": wait})
        assert r.status_code == 200, r.text
        return r.json(), time.monotonic() - t0


@pytest.fixture
def server(tmp_path, database_url):
    servers: list[Server] = []

    def start(**env: str) -> Server:
        s = Server(tmp_path, database_url, **env)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def _in_thread(fn, *args):  # noqa: ANN001, ANN202
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_a_held_lease_answers_when_its_task_opens(server):
    s = server()
    fid, secret = s.federation(min_clients=2)
    a = s.register(fid, secret, "a")
    thread, out = _in_thread(s.lease, *a, 30)
    time.sleep(1.5)
    assert thread.is_alive(), "the request was answered although no task exists yet"
    opened = time.monotonic()
    s.register(fid, secret, "b")  # the second client: the scheduler opens the first round
    thread.join(timeout=20)
    assert not thread.is_alive() and "error" not in out, out
    answer, held = out["value"]
    assert answer["task"] is not None and answer["task"]["stage"] == "root"
    latency = time.monotonic() - opened
    # the scheduler ticks every 0.2 s and wakes held requests at once: far below the 30 s wait
    assert latency < 5.0 and held < 25.0, (latency, held)


def test_a_full_wait_answers_empty_with_retry_after_zero_and_the_wait_is_capped(server):
    s = server(HILORA_LONG_POLL_MAX_SECONDS="1.5")
    fid, secret = s.federation(min_clients=3)
    a = s.register(fid, secret, "a")
    answer, held = s.lease(*a, wait=60)  # capped to 1.5 s by the coordinator
    assert answer["task"] is None and answer["client_state"] == "waiting"
    assert answer["retry_after"] == 0.0
    assert 1.4 <= held < 10.0, held
    answer, quick = s.lease(*a)  # no wait: the old protocol, answered at once with the schedule's retry_after
    assert answer["task"] is None and answer["retry_after"] == 2.0
    assert quick < 1.4, quick
    r = s.http.post(f"/v1/clients/{a[0]}/lease", headers=bearer(a[1]), params={"wait": -1})
    assert r.status_code == 422 and "wait" in r.text


def test_long_polling_off_answers_at_once(server):
    s = server(HILORA_LONG_POLL_MAX_SECONDS="0")
    fid, secret = s.federation(min_clients=3)
    a = s.register(fid, secret, "a")
    answer, held = s.lease(*a, wait=20)
    assert answer["task"] is None and answer["retry_after"] == 2.0 and held < 5.0


def test_a_paused_federation_answers_held_requests_at_once(server):
    s = server()
    fid, secret = s.federation(min_clients=3)
    a = s.register(fid, secret, "a")
    s.http.post(f"/v1/federations/{fid}/pause", headers=admin_headers(), json={"reason": "maintenance"}) \
        .raise_for_status()
    answer, held = s.lease(*a, wait=20)
    assert answer["client_state"] == "paused" and answer["task"] is None and answer["retry_after"] >= 5.0
    assert held < 5.0


def test_held_requests_hold_no_connection_and_no_thread(server, database_url):
    """More held requests than the threadpool (40) and the database pool have: the other routes go
    on answering, and every held request gets its task when the round opens."""
    held_n = 60 if database_url.startswith("sqlite") else 45
    s = server(HILORA_LEASE_RATE_PER_SECOND="0", HILORA_REGISTRATION_RATE_PER_SECOND="0")
    fid, secret = s.federation(min_clients=held_n + 1)
    clients = [s.register(fid, secret, f"c{i}") for i in range(held_n)]

    async def scenario() -> tuple[list, list[float]]:
        limits = httpx.Limits(max_connections=held_n + 10, max_keepalive_connections=held_n + 10)
        async with httpx.AsyncClient(base_url=s.url, timeout=90, limits=limits) as http:
            held = [asyncio.create_task(http.post(f"/v1/clients/{cid}/lease", headers=bearer(tok),
                                                  params={"wait": 45})) for cid, tok in clients]
            await asyncio.sleep(2.0)
            assert not any(t.done() for t in held), [t.result().text for t in held if t.done()][:3]
            others = []
            for _ in range(10):  # routes that need a thread and a connection, while all are held
                t0 = time.monotonic()
                r = await http.get(f"/v1/federations/{fid}", headers=admin_headers())
                assert r.status_code == 200, r.text
                others.append(time.monotonic() - t0)
            r = await http.post(f"/v1/federations/{fid}/clients", json={"name": "last", "num_samples": 10},
                                headers=bearer(secret))
            assert r.status_code == 201, r.text
            return [await t for t in held], others

    answers, others = asyncio.run(scenario())
    assert max(others) < 5.0, others
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200][:3]
    assert sum(r.json()["task"] is not None for r in answers) == held_n


def test_a_worker_that_went_away_keeps_no_lease(server):
    import socket

    s = server()
    fid, secret = s.federation(min_clients=2)
    cid, token = s.register(fid, secret, "a")
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    sock.sendall((f"POST /v1/clients/{cid}/lease?wait=20 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  f"Authorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n").encode())
    time.sleep(1.0)
    sock.close()  # the worker stops: its held request's connection closes
    time.sleep(0.5)
    s.register(fid, secret, "b")
    time.sleep(2.0)  # the round opens and the held request (if it were still there) would be woken
    answer, _ = s.lease(cid, token)  # the task is there at once: not held by the request that went away
    assert answer["task"] is not None, answer
