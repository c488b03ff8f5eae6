"""A throwaway PostgreSQL server for the tests.

``PostgresServer.start()`` runs ``initdb`` into a fresh temporary directory, starts the server on a
free port of 127.0.0.1 (its unix socket stays in that directory) with test-speed settings, and
``stop()`` kills it (``pg_ctl -m immediate``) and removes the directory. Each test gets its own
database from ``create_database()``. Binaries: ``$HILORA_PG_BIN``, else the newest
``/usr/lib/postgresql/*/bin`` holding ``initdb``. Run as root, the server runs as user ``postgres``.
Every wait is bounded.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SUPERUSER = "postgres"
START_TIMEOUT_S = 60
CMD_TIMEOUT_S = 120

SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "400",
    "shared_buffers": "'128MB'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "autovacuum": "off",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",
    "timezone": "'UTC'",
}


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries were found on this machine."""


def find_pg_bin() -> Path | None:
    """``$HILORA_PG_BIN`` if set (it must hold initdb), else the newest /usr/lib/postgresql/*/bin."""
    env = os.environ.get("HILORA_PG_BIN")
    if env:
        return Path(env) if (Path(env) / "initdb").is_file() else None

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", Path(path).parent.parent.name)) or (0,)

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bin_dir: Path | None = None) -> None:
        bin_dir = bin_dir or find_pg_bin()
        if bin_dir is None:
            raise PostgresUnavailable(
                "no PostgreSQL binaries: set HILORA_PG_BIN or install postgresql "
                "(/usr/lib/postgresql/*/bin/initdb)")
        self.bin_dir = Path(bin_dir)
        self.as_root = os.geteuid() == 0
        if self.as_root:
            try:
                pwd.getpwnam(SUPERUSER)
            except KeyError:
                raise PostgresUnavailable(f"running as root, PostgreSQL needs a '{SUPERUSER}' user "
                                          f"to run as, and there is none") from None
        self.root: Path | None = None
        self.data: Path | None = None
        self.port: int | None = None
        self._admin = None

    # -- process control -------------------------------------------------------------------------
    def _cmd(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bin_dir / tool), *args]
        return ["runuser", "-u", SUPERUSER, "--", *cmd] if self.as_root else cmd

    def _run(self, tool: str, *args: str, timeout: float = CMD_TIMEOUT_S) -> subprocess.CompletedProcess:
        proc = subprocess.run(self._cmd(tool, *args), capture_output=True, text=True, timeout=timeout,
                              cwd=self.root)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({proc.returncode}):\n"
                               f"{proc.stdout}\n{proc.stderr}\n{self._log_tail()}")
        return proc

    def _log_tail(self) -> str:
        log = self.root / "server.log" if self.root else None
        if log is None or not log.exists():
            return ""
        return "server log:\n" + log.read_text(errors="replace")[-4000:]

    def start(self) -> "PostgresServer":
        self.root = Path(tempfile.mkdtemp(prefix="hilora-pg-"))
        try:
            if self.as_root:
                shutil.chown(self.root, user=SUPERUSER, group=None)
            self.data = self.root / "data"
            self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                      "--locale=C", "--no-sync", "--no-instructions")
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write("\n# hilora tests\n")
                for key, value in SETTINGS.items():
                    conf.write(f"{key} = {value}\n")
                conf.write(f"unix_socket_directories = '{self.root}'\n")
            last: Exception | None = None
            for _ in range(3):  # the free port can be taken between probing and binding it
                self.port = _free_port()
                try:
                    self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
                              "-o", f"-p {self.port}", "-w", "-t", str(START_TIMEOUT_S), "start",
                              timeout=START_TIMEOUT_S + 30)
                    break
                except RuntimeError as exc:
                    last = exc
            else:
                raise RuntimeError(f"PostgreSQL did not start: {last}")
            self._admin = self._connect("postgres")
            return self
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._admin is not None:
            try:
                self._admin.close()
            except Exception:  # noqa: BLE001 - the server is going away anyway
                pass
            self._admin = None
        if self.root is None:
            return
        try:
            if self.data is not None and (self.data / "postmaster.pid").exists():
                subprocess.run(self._cmd("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30",
                                         "stop"), capture_output=True, timeout=60)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = self.data = None

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self.stop()

    # -- databases -------------------------------------------------------------------------------
    def _connect(self, dbname: str):  # noqa: ANN202
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname=dbname,
                               autocommit=True, connect_timeout=10)

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """Create a fresh, empty database and return its SQLAlchemy URL."""
        name = f"t_{secrets.token_hex(8)}"
        self._admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name_or_url: str) -> None:
        """Drop a database made by ``create_database`` (by name or URL), closing its connections."""
        name = name_or_url.rsplit("/", 1)[-1]
        if not re.fullmatch(r"t_[0-9a-f]+", name):
            raise ValueError(f"not a test database: {name!r}")
        deadline = time.monotonic() + 30
        while True:
            try:
                self._admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                return
            except Exception:  # noqa: BLE001 - e.g. a connection still starting up; retry briefly
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
