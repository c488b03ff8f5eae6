"""The command line's refusals: unsafe settings, missing files, bad configs give clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.api


def hilora(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HILORA_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "hilora.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def test_help_lists_the_commands():
    proc = hilora("--help")
    assert proc.returncode == 0
    for command in ("coordinator", "worker", "admin", "demo", "migrate", "pretrain-demo-backbone"):
        assert command in proc.stdout


def test_pretrain_demo_backbone_refuses_an_unknown_dataset(tmp_path):
    proc = hilora("pretrain-demo-backbone", "--dataset", "cifar100", "--cache-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "--dataset must be one of digits, mnist5k, got 'cifar100'" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_coordinator_refuses_the_default_admin_token_outside_dev_mode(tmp_path):
    proc = hilora("coordinator", env={"HILORA_DATABASE_URL": f"sqlite:///{tmp_path}/c.db",
                                      "HILORA_BLOB_DIR": str(tmp_path / "b")})
    assert proc.returncode == 2
    assert "HILORA_ADMIN_TOKEN" in proc.stderr


def test_migrate_builds_the_schema(tmp_path):
    proc = hilora("migrate", env={"HILORA_DATABASE_URL": f"sqlite:///{tmp_path}/m.db"})
    assert proc.returncode == 0, proc.stderr
    assert "schema at head" in proc.stdout
    assert (tmp_path / "m.db").stat().st_size > 0


def test_worker_refuses_a_missing_or_invalid_config(tmp_path):
    proc = hilora("worker", "--coordinator", "http://127.0.0.1:9", "--config", str(tmp_path / "nope.json"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"federation_id": 1, "clients": []}))
    proc = hilora("worker", "--coordinator", "http://127.0.0.1:9", "--config", str(bad))
    assert proc.returncode != 0 and "clients" in proc.stderr


def test_admin_create_needs_a_token_and_a_valid_file(tmp_path):
    proc = hilora("admin", "create", "--config", str(tmp_path / "f.json"))
    assert proc.returncode == 2 and "HILORA_ADMIN_TOKEN" in proc.stderr
    f = tmp_path / "f.json"
    f.write_text(json.dumps({"name": "x", "backbone": {"model": "m", "checkpoint": str(tmp_path / "missing.st")}}))
    proc = hilora("admin", "create", "--config", str(f), env={"HILORA_ADMIN_TOKEN": "t" * 20})
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_worker_says_when_the_coordinator_cannot_be_reached(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "w.json"
    cfg.write_text(json.dumps({"federation_id": 1, "enrollment_secret": "hle_x", "clients": [
        {"name": "a", "data": {"partition": "tiny", "client": "upright-00"}}]}))
    proc = hilora("worker", "--coordinator", f"http://127.0.0.1:{port}", "--config", str(cfg), "--retries", "1",
                  "--state-dir", str(tmp_path / "state"))
    assert proc.returncode == 2 and "cannot reach the coordinator" in proc.stderr


@pytest.mark.parametrize(("value", "message"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "neither a JSON object nor a file"),
    ('{"a": "x"}', "integer cluster label"),
    ("{}", "non-empty JSON object"),
    ("missing.json", "neither a JSON object nor a file"),
])
def test_admin_assign_refuses_a_bad_assignment_before_calling(value, message):
    proc = hilora("admin", "assign", "--federation", "1", "--assignment", value, "--coordinator",
                  "http://127.0.0.1:9", env={"HILORA_ADMIN_TOKEN": "t" * 20})
    assert proc.returncode == 2 and message in proc.stderr
