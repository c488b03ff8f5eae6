"""One-machine launcher: a coordinator and worker processes on loopback (used by ``hilora demo``)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from worker.client import CoordinatorClient


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    """A coordinator subprocess on SQLite in ``workdir`` plus worker subprocesses."""

    workdir: Path
    scheduler_interval: float = 0.2
    port: int = field(default_factory=free_port)
    admin_token: str = field(default_factory=lambda: "dev-" + secrets.token_hex(16))
    coordinator: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def coordinator_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "HILORA_DEV": "1",
            "HILORA_DATABASE_URL": f"sqlite:///{self.workdir / 'coordinator.db'}",
            "HILORA_BLOB_DIR": str(self.workdir / "blobs"),
            "HILORA_ADMIN_TOKEN": self.admin_token,
            "HILORA_HOST": "127.0.0.1",
            "HILORA_PORT": str(self.port),
            "HILORA_SCHEDULER_INTERVAL": str(self.scheduler_interval),
            "HILORA_LOG_LEVEL": "warning",
        })
        return env

    def start_coordinator(self, timeout: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "coordinator.log", "wb")  # noqa: SIM115 - closed with the process
        self.coordinator = subprocess.Popen([sys.executable, "-m", "hilora.cli", "coordinator"],
                                            env=self.coordinator_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        with CoordinatorClient(self.url, max_retries=0) as client:
            while time.monotonic() < deadline:
                if self.coordinator.poll() is not None:
                    raise RuntimeError("the coordinator exited at start:\n" + self.tail("coordinator.log"))
                if client.ready():
                    return
                time.sleep(0.2)
        raise RuntimeError(f"the coordinator was not ready within {timeout:.0f}s:\n" + self.tail("coordinator.log"))

    def start_worker(self, name: str, config: dict, threads: int = 1, max_seconds: float = 1800,
                     extra_env: dict[str, str] | None = None, exit_when_idle: bool = True) -> subprocess.Popen:
        """A worker process hosting ``config``'s clients, logging to ``<name>.log``. With
        ``exit_when_idle`` it exits once every client it hosts is ready; without, it keeps polling
        (a living federation's cycles) until stopped or ``max_seconds``."""
        config_path = self.workdir / f"{name}.json"
        config_path.write_text(json.dumps(config, indent=1))
        env = dict(os.environ)
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
        env.update(extra_env or {})
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "hilora.cli", "worker", "--coordinator", self.url, "--config", str(config_path),
             "--state-dir", str(self.workdir / "state"), "--threads", str(threads), "--device", "cpu",
             *(["--exit-when-idle"] if exit_when_idle else []), "--max-seconds", str(max_seconds),
             "--worker-id", name],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        proc.hilora_name = name  # type: ignore[attr-defined]
        self.workers.append(proc)
        return proc

    def check_workers(self) -> None:
        """Raise with the log tail if a worker died with an error."""
        for proc in self.workers:
            code = proc.poll()
            if code not in (None, 0):
                name = proc.hilora_name  # type: ignore[attr-defined]
                raise RuntimeError(f"worker {name} exited with {code}:\n" + self.tail(f"{name}.log"))

    def tail(self, log_name: str, lines: int = 40) -> str:
        path = self.workdir / log_name
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        procs = [p for p in self.workers if p.poll() is None]
        if self.coordinator is not None and self.coordinator.poll() is None:
            procs.append(self.coordinator)
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.5,
             on_tick: Callable[[], None] | None = None) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if on_tick is not None:
            on_tick()
        if predicate():
            return True
        time.sleep(interval)
    return False
