"""The command line's refusals: unsafe settings, missing files, bad configs give clear errors. And the
``hilora admin`` commands against the in-process app: text by default, JSON with ``--json``, and an
error answer of the coordinator as one line on stderr with exit code 1."""

from __future__ import annotations

import json
import os
import subprocess
import time
import sys

import pytest
from conftest import ADMIN_TOKEN, admin_headers, bearer, create_federation, register, tick
from test_cascade_state_machine import GROUP_OF, group_directions, run_pending
from test_fake_worker import ThroughTestClient
from typer.testing import CliRunner

import worker.client
from hilora.cli import app as cli_app

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
    one_line(proc, 2, f"worker config {bad}: clients:")
    bad.write_text(json.dumps({"federation_id": 1, "clients": [{"name": "a", "data": "x"}]}))
    proc = hilora("worker", "--coordinator", "http://127.0.0.1:9", "--config", str(bad))
    one_line(proc, 2, f"worker config {bad}: clients.0.data: Input should be a valid dictionary")


@pytest.mark.parametrize(("doc", "words"), [
    ({"name": "x", "config": {"rank": 8}}, ["backbone: Field required", "config: Extra inputs are not permitted"]),
    ({"name": "x", "backbone": {"model": "vit_tiny_patch16_224", "checkpoint": "demo"},
      "schedule": {"root_rounds": "many"}}, ["schedule.root_rounds: Input should be a valid integer"]),
])
def test_admin_create_names_the_fields_of_an_invalid_file_in_one_line(tmp_path, doc, words):
    f = tmp_path / "f.json"
    f.write_text(json.dumps(doc))
    proc = hilora("admin", "create", "--config", str(f), "--coordinator", "http://127.0.0.1:9",
                  env={"HILORA_ADMIN_TOKEN": "t" * 20})
    one_line(proc, 2, f"federation file {f}: ", *words)


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


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    proc = hilora("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"hilora {version('hilora')}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_coordinator_is_one_line_after_a_short_wait_and_hilora_coordinator_is_read():
    url = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    proc = hilora("admin", "list", "--admin-token", "t", env={"HILORA_COORDINATOR": url})
    waited = time.monotonic() - started
    assert proc.returncode == 1 and proc.stdout == ""
    # the URL came from HILORA_COORDINATOR; one line says what to do
    assert proc.stderr.count("\n") == 1 and f"cannot reach the coordinator at {url}" in proc.stderr
    assert "HILORA_COORDINATOR" in proc.stderr and "Traceback" not in proc.stderr
    # 4 retries, backoff 0.25..2 s jittered: at most 3.75 s of sleeping, plus start-up
    assert waited < 20, waited


@pytest.mark.parametrize("url", ["htp://127.0.0.1:8700", "127.0.0.1:8700", "http://127.0.0.1:abc", "http://"])
@pytest.mark.parametrize("command", [["admin", "list"], ["admin", "status", "--federation", "1"]])
def test_a_malformed_coordinator_url_is_refused_at_once(url, command):
    started = time.monotonic()
    proc = hilora(*command, "--admin-token", "t", "--coordinator", url)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--coordinator / HILORA_COORDINATOR" in proc.stderr and repr(url) in proc.stderr
    assert time.monotonic() - started < 20   # no retries: nothing was sent


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


# ---------------------------------------------------------------- a coordinator-only install (issue 19)
# The modules of an extra blocked (None in sys.modules: `import torch` fails as where it is not
# installed); tests/integration/test_wheel.py does the same in a clean venv with the built wheel.

def hilora_without(blocked: tuple[str, ...], *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.modules.update({{m: None for m in {blocked!r}}}); "
            "sys.argv = ['hilora'] + sys.argv[1:]; from hilora.cli import main; main()")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HILORA_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env=full_env)


def one_line(proc: subprocess.CompletedProcess, code: int, *words: str) -> None:
    """Exit ``code`` and exactly one line on stderr, naming ``words``, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)


TORCH = ("torch", "timm", "torchvision")


@pytest.mark.parametrize("command", [
    ["worker", "--coordinator", "http://127.0.0.1:9", "--config", "w.json"],
    ["predict", "--model", "m.safetensors", "--images", "."],
    ["demo"], ["bench", "--quick"], ["pretrain-demo-backbone"],
])
def test_commands_that_need_torch_name_the_worker_extra(command):
    proc = hilora_without(TORCH, *command)
    one_line(proc, 2, f"hilora {command[0]} needs torch and timm", 'pip install "hilora[worker]"')
    assert proc.stdout == ""


def test_help_and_the_coordinator_side_work_without_torch(tmp_path):
    proc = hilora_without(TORCH, "worker", "--help")
    assert proc.returncode == 0 and "--config" in proc.stdout, proc.stderr
    proc = hilora_without(TORCH, "migrate", env={"HILORA_DATABASE_URL": f"sqlite:///{tmp_path}/m.db"})
    assert proc.returncode == 0 and "schema at head" in proc.stdout, proc.stderr


def test_a_module_missing_at_run_time_is_one_line_naming_its_extra(monkeypatch):
    from hilora.cli import _one_line_error

    monkeypatch.setattr(sys, "argv", ["hilora", "bench", "--plots", "p"])
    for module, extra in (("torch", "worker"), ("timm.layers", "worker"), ("mlxtend", "demo"),
                          ("matplotlib.pyplot", "bench"), ("psycopg", "postgres")):
        line = _one_line_error(ModuleNotFoundError(f"No module named {module!r}", name=module))
        assert line is not None and line.startswith(f"hilora bench needs {module.split('.')[0]}")
        assert line.endswith(f'pip install "hilora[{extra}]"'), line
    assert _one_line_error(ModuleNotFoundError("No module named 'typo'", name="typo")) is None   # a bug: traceback


@pytest.mark.parametrize("command", [["coordinator"], ["migrate"], ["gc"]])
def test_a_postgres_url_without_the_driver_names_the_postgres_extra(command):
    url = "postgresql+psycopg://hilora:s3cret-pw@127.0.0.1:5/hilora"
    proc = hilora_without(("psycopg",), *command, env={"HILORA_DATABASE_URL": url,
                                                       "HILORA_ADMIN_TOKEN": "a" * 20})
    one_line(proc, 2, "HILORA_DATABASE_URL", 'pip install "hilora[postgres]"', "psycopg")
    assert "s3cret-pw" not in proc.stderr   # the password is not printed


def test_an_unusable_database_url_is_one_line(tmp_path):
    for url in ("mysqlx://u@h/db", "not a url"):
        proc = hilora("migrate", env={"HILORA_DATABASE_URL": url})
        one_line(proc, 2, "HILORA_DATABASE_URL", "is not a database URL", "sqlite:///")


@pytest.mark.parametrize(("variable", "value", "words"), [
    ("HILORA_PORT", "abc", ["HILORA_PORT='abc'", "valid integer"]),
    ("HILORA_PORT", "70000", ["HILORA_PORT='70000'", "65535"]),
    ("HILORA_SCHEDULER_INTERVAL", "-1", ["HILORA_SCHEDULER_INTERVAL='-1'", "greater than 0"]),
    ("HILORA_LOG_FORMAT", "xml", ["HILORA_LOG_FORMAT='xml'", "'text' or 'json'"]),
    ("HILORA_LOG_LEVEL", "loud", ["HILORA_LOG_LEVEL='loud'", "unknown log level", "debug, info"]),
    ("HILORA_ADMIN_TOKEN", "short", ["HILORA_ADMIN_TOKEN must be at least 16 characters"]),
])
@pytest.mark.parametrize("command", ["coordinator", "gc"])
def test_a_bad_setting_is_one_line_naming_the_variable(tmp_path, command, variable, value, words):
    env = {"HILORA_DATABASE_URL": f"sqlite:///{tmp_path}/c.db", "HILORA_BLOB_DIR": str(tmp_path / "b"),
           "HILORA_ADMIN_TOKEN": "a" * 20, variable: value}
    proc = hilora(command, env=env)
    one_line(proc, 2, *words)
    if variable == "HILORA_ADMIN_TOKEN":
        assert value not in proc.stderr.replace("HILORA_", "")   # a secret's value is never echoed


# ---------------------------------------------------------------- admin commands in process
# ``hilora admin ...`` through typer's CliRunner, its CoordinatorClient sending every request
# through the in-process app (the ``api`` fixture of conftest.py).

@pytest.fixture
def admin(api, monkeypatch):
    """``admin("status", "--federation", "1")`` -> (exit code, stdout, stderr) of ``hilora admin ...``
    against the in-process app, with its admin token."""
    class InProcess(worker.client.CoordinatorClient):
        def __init__(self, base_url: str, **kwargs) -> None:
            kwargs.pop("max_retries", None)  # in process: nothing to retry
            super().__init__(base_url, transport=ThroughTestClient(api), max_retries=0, **kwargs)

    monkeypatch.setattr(worker.client, "CoordinatorClient", InProcess)

    def run(*args: str) -> tuple[int, str, str]:
        result = CliRunner().invoke(cli_app, ["admin", *args, "--coordinator", str(api.base_url),
                                              "--admin-token", ADMIN_TOKEN])
        assert "Traceback" not in result.output, result.output
        return result.exit_code, result.stdout, result.stderr

    return run


def one_error_line(code: int, out: str, err: str, *words: str) -> None:
    """An error answer: exit 1, nothing on stdout, one line on stderr naming ``words``."""
    assert code == 1 and out == "", (code, out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    for word in words:
        assert word in err, (word, err)


def test_admin_list_status_pause_resume_and_audit(api, admin):
    fid, secret = create_federation(api, name="alpha")
    beta, _ = create_federation(api, name="beta-federation")
    register(api, fid, secret, "site-a")
    code, out, _ = admin("list")
    assert code == 0, out
    header, first, second = out.strip().splitlines()
    assert header.split() == ["ID", "NAME", "STATE", "CLIENTS", "K", "PAUSED"]
    assert first.split() == [str(fid), "alpha", "enrolling", "1", "-", "no"]
    assert second.split()[1:] == ["beta-federation", "enrolling", "0", "-", "no"]
    assert first.index("enrolling") == second.index("enrolling")  # aligned columns
    code, out, _ = admin("list", "--json")
    rows = json.loads(out)
    assert [(r["federation_id"], r["name"], r["clients_total"]) for r in rows] == [(fid, "alpha", 1),
                                                                                   (beta, "beta-federation", 0)]
    assert all(r["clustering"] is None and r["paused_at"] is None for r in rows)

    code, out, err = admin("pause", "--federation", str(fid), "--reason", "disk maintenance")
    assert code == 0 and out.strip() == f"federation {fid} alpha paused: disk maintenance", (out, err)
    code, out, _ = admin("status", "--federation", str(fid))
    assert code == 0 and out.startswith(f"federation {fid} alpha\n")
    assert "  state " in out and "enrolling" in out and "1 (1 training, 0 onboarding)" in out
    paused_lines = [line for line in out.splitlines() if line.strip().startswith("paused")]
    assert len(paused_lines) == 1 and paused_lines[0].endswith(": disk maintenance")
    assert json.loads(admin("status", "--federation", str(fid), "--json")[1])["paused_reason"] == "disk maintenance"
    assert admin("list")[1].splitlines()[1].split()[-1] == "yes"
    one_error_line(*admin("pause", "--federation", str(fid)), "409", "already_paused")

    code, out, _ = admin("resume", "--federation", str(fid), "--json")
    assert code == 0 and json.loads(out)["paused_at"] is None
    one_error_line(*admin("resume", "--federation", str(fid)), "409", "not_paused")
    assert "paused" not in admin("status", "--federation", str(fid))[1]

    code, out, _ = admin("audit", "--federation", str(fid))
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].split() == ["ID", "AT", "ACTOR", "ACTION", "TARGET", "DETAIL"]
    assert [line.split()[4] for line in lines[1:]] == ["resume", "pause"]  # newest first
    assert '"reason":"disk maintenance"' in lines[2] and f"federation:{fid}" in lines[2]
    code, out, _ = admin("audit", "--federation", str(fid), "--limit", "1", "--json")
    [event] = json.loads(out)
    assert event["action"] == "resume" and set(event) >= {"id", "at", "actor", "target", "detail"}


def test_admin_revoke_by_name_or_id(api, admin):
    fid, secret = create_federation(api)
    a_id, _a_token = register(api, fid, secret, "site-a")
    b_id, b_token = register(api, fid, secret, "site-b")
    code, out, err = admin("revoke", "--federation", str(fid), "--client", "site-b", "--reason", "left")
    assert code == 0, err
    assert out.strip() == f"client {b_id} site-b of federation {fid}: revoked (0 open tasks cancelled)"
    r = api.post(f"/v1/clients/{b_id}/lease", headers=bearer(b_token))
    assert r.status_code == 403 and r.json()["error"] == "revoked"
    code, out, _ = admin("revoke", "--federation", str(fid), "--client", str(a_id), "--json")
    assert code == 0 and json.loads(out) == {"client_id": a_id, "name": "site-a", "status": "revoked",
                                             "tasks_cancelled": 0}
    audit = api.get(f"/v1/federations/{fid}/audit", headers=admin_headers()).json()
    assert audit[-1]["detail"]["reason"] == "left" and audit[-1]["target"] == f"client:{b_id}"

    one_error_line(*admin("revoke", "--federation", str(fid), "--client", "nobody"), "no client named 'nobody'")
    one_error_line(*admin("revoke", "--federation", str(fid), "--client", "77"), "no client named '77'")
    one_error_line(*admin("revoke", "--federation", str(fid), "--client", "site-b"), "409", "already_revoked")


def test_admin_rotate_secret(api, admin):
    fid, old = create_federation(api)
    code, out, err = admin("rotate-secret", "--federation", str(fid), "--reason", "leaked")
    assert code == 0 and "shown only once" in err, (out, err)
    prefix = f"new enrollment secret of federation {fid}: "
    assert out.startswith(prefix) and len(out.strip().splitlines()) == 1
    new = out.strip()[len(prefix):]
    assert new.startswith("hle_") and new != old
    r = api.post(f"/v1/federations/{fid}/clients", json={"name": "x", "num_samples": 1}, headers=bearer(old))
    assert r.status_code == 401
    register(api, fid, new, "x")
    code, out, _ = admin("rotate-secret", "--federation", str(fid), "--json")
    body = json.loads(out)
    assert code == 0 and body["federation_id"] == fid and body["enrollment_secret"] not in (old, new)


def test_admin_recluster(api, app, admin):
    dirs = group_directions()
    fid, secret = create_federation(api, schedule={"min_clients": 6, "root_rounds": 1, "cluster_rounds": 2,
                                                   "leaf_rounds": 1})
    clients = {name: register(api, fid, secret, name) for name in GROUP_OF}
    tick(app)
    one_error_line(*admin("recluster", "--federation", str(fid)), "409", "no_probe_round")
    code, _out, err = admin("recluster", "--federation", str(fid), "--features", "pixels")
    assert code == 2 and "--features must be 'update' or 'subspace'" in err
    run_pending(api, clients, dirs, seed=0)   # root
    run_pending(api, clients, dirs, seed=10)  # probe -> clustering (K=2)

    code, out, err = admin("recluster", "--federation", str(fid), "--force-k", "3", "--knn", "2",
                           "--reason", "finer")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("clustering run ") and ", K=3, " in lines[0] and "by admin" in lines[0]
    assert lines[1] == "clusters kept: 0, 1; created: 2"
    assert lines[2].startswith("moves: ") and lines[3].split() == ["CLIENT", "ID", "FROM", "TO"]
    moved = [line.split() for line in lines[4:-1]]
    assert moved and all(m[0] in GROUP_OF and m[3] == "2" for m in moved)
    assert lines[-1] == f"tasks cancelled: {len(moved)}"
    code, out, _ = admin("recluster", "--federation", str(fid), "--force-k", "2", "--features", "update", "--json")
    body = json.loads(out)
    assert code == 0 and set(body) == {"run", "clusters_kept", "clusters_created", "moves", "tasks_cancelled"}
    assert body["run"]["k"] == 2 and body["run"]["trigger"] == "admin"
    assert "recluster" in admin("audit", "--federation", str(fid))[1]


def test_the_other_admin_commands_print_text_and_json(api, admin):
    fid, secret = create_federation(api, name="gamma")
    ids = {name: register(api, fid, secret, name, num_samples=12)[0] for name in ("a", "b")}
    code, out, _ = admin("report", "--federation", str(fid))
    assert code == 0 and out.startswith(f"federation {fid} gamma\n")
    table = out.splitlines()[out.splitlines().index("clients") + 1:]
    assert table[0].split()[:5] == ["ID", "NAME", "COHORT", "CLUSTER", "SAMPLES"]
    assert [row.split()[:5] for row in table[1:]] == [[str(ids["a"]), "a", "train", "-", "12"],
                                                      [str(ids["b"]), "b", "train", "-", "12"]]
    report = json.loads(admin("report", "--federation", str(fid), "--json")[1])
    assert [c["name"] for c in report["clients"]] == ["a", "b"]

    code, out, err = admin("invite", "--federation", str(fid), "--count", "2", "--note", "sites")
    assert code == 0 and "shown only once" in err
    rows = [line.split() for line in out.strip().splitlines()]
    assert rows[0] == ["ID", "CODE", "EXPIRES"] and len(rows) == 3 and all(r[1].startswith("hli_") for r in rows[1:])
    made = json.loads(admin("invite", "--federation", str(fid), "--json")[1])["invitations"]
    code, out, _ = admin("invitations", "--federation", str(fid), "--revoke", str(made[0]["id"]))
    assert code == 0 and out.strip() == f"invitation {made[0]['id']}: revoked"
    code, out, _ = admin("invitations", "--federation", str(fid))
    assert [line.split()[:2] for line in out.strip().splitlines()] == [
        ["ID", "STATE"], [rows[1][0], "open"], [rows[2][0], "open"], [str(made[0]["id"]), "revoked"]]
    assert "hli_" not in out
    assert [r["state"] for r in json.loads(admin("invitations", "--federation", str(fid), "--json")[1])] == [
        "open", "open", "revoked"]

    code, out, _ = admin("schedule", "--federation", str(fid))
    assert code == 0 and ["root_rounds", "2"] in [line.split() for line in out.splitlines()]
    assert json.loads(admin("schedule", "--federation", str(fid), "--json")[1])["root_rounds"] == 2
    code, out, _ = admin("schedule", "--federation", str(fid), "--set", "root_rounds=3", "--reason", "more")
    assert code == 0 and "  root_rounds: 2 -> 3" in out.splitlines()
    body = json.loads(admin("schedule", "--federation", str(fid), "--set", "root_rounds=4", "--json")[1])
    assert body["changes"] == {"root_rounds": [3, 4]}

    code, out, _ = admin("start", "--federation", str(fid))
    assert code == 0 and out.strip() == f"federation {fid} gamma started: root (2 clients)"
    one_error_line(*admin("start", "--federation", str(fid)), "409", "already_started")

    status = json.loads(admin("status", "--federation", str(fid), "--json")[1])
    rid = next(r["id"] for r in status["rounds"] if r["status"] == "open")
    code, out, _ = admin("deadline", "--round", str(rid), "--extend-minutes", "10")
    assert code == 0 and out.strip() == f"round {rid} (root root #1, open): deadline 2026-01-01 00:10:00Z", out
    code, out, _ = admin("deadline", "--round", str(rid), "--at", "2026-01-02T00:00:00Z", "--json")
    assert code == 0 and json.loads(out)["deadline_at"] == "2026-01-02T00:00:00Z"
    code, _out, err = admin("deadline", "--round", str(rid))
    assert code == 2 and "exactly one of --extend-minutes and --at" in err
    one_error_line(*admin("deadline", "--round", str(rid), "--at", "2025-01-01T00:00:00Z"), "422", "bad_deadline")
    one_error_line(*admin("deadline", "--round", "999", "--extend-minutes", "1"), "404", "round_not_found")

    code, out, _ = admin("delete-client", "--federation", str(fid), "--client", str(ids["b"]))
    assert code == 0 and out.startswith(f"client {ids['b']} b of federation {fid} deleted: 1 tasks"), out
    body = json.loads(admin("delete-client", "--federation", str(fid), "--client", str(ids["a"]), "--json")[1])
    assert body["name"] == "a" and "tasks_deleted" in body


@pytest.mark.parametrize("command", [
    ["status"], ["report"], ["start"], ["pause"], ["resume"], ["recluster"], ["revoke", "--client", "a"],
    ["rotate-secret"], ["audit"], ["invite"], ["invitations"], ["schedule"], ["schedule", "--set", "root_rounds=3"],
    ["assign", "--assignment", '{"a": 0}'], ["delete-client", "--client", "1"], ["export-model", "--out", "m.st"],
])
def test_admin_commands_on_an_unknown_federation_fail_in_one_line(admin, command):
    for as_json in ([], ["--json"]):
        one_error_line(*admin(command[0], "--federation", "999", *command[1:], *as_json), "404", "999")


def test_admin_cycle_and_rollback(api, app, admin):
    fid, secret = create_federation(api, name="cycling", schedule={"min_clients": 6, "root_rounds": 1,
                                                                   "cluster_rounds": 2, "leaf_rounds": 1})
    one_error_line(*admin("cycle", "--federation", str(fid)), "409", "not_started")
    clients = {name: register(api, fid, secret, name) for name in GROUP_OF}
    tick(app)
    dirs = group_directions()
    for seed in range(8):
        if api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()["state"] == "serving":
            break
        run_pending(api, clients, dirs, seed=seed)
    labels = sorted(c["label"] for c in api.get(f"/v1/federations/{fid}", headers=admin_headers()).json()["clusters"])
    code, out, err = admin("rollback", "--federation", str(fid), "--cluster", str(labels[0]), "--version", "1")
    assert code == 0 and out.strip() == f"cluster {labels[0]} serves v1 (pinned; its newest is v2)", (out, err)
    pinned = json.loads(admin("status", "--federation", str(fid), "--json")[1])["clusters"]
    assert [c["pinned_version"] for c in pinned if c["label"] == labels[0]] == [1]
    code, out, _ = admin("rollback", "--federation", str(fid), "--cluster", str(labels[0]), "--unpin", "--json")
    assert code == 0 and json.loads(out)["pinned_version"] is None and json.loads(out)["adapter_version"] == 2
    one_error_line(*admin("rollback", "--federation", str(fid), "--cluster", str(labels[0]), "--version", "9"),
                   "422", "unknown_version")
    code, _, err = admin("rollback", "--federation", str(fid), "--cluster", "0")
    assert code == 2 and "exactly one of --version N and --unpin" in err
    code, out, err = admin("cycle", "--federation", str(fid), "--reason", "new sites")
    assert code == 0 and out.strip() == f"federation {fid} cycling: cycle 1 requested; it starts at the next " \
                                          "scheduler tick", (out, err)
    tick(app)
    status = json.loads(admin("status", "--federation", str(fid), "--json")[1])
    assert status["cycle"] == 1 and status["state"] == "probe"
    assert "probe (cycle 1)" in admin("status", "--federation", str(fid))[1]


def test_admin_delete_needs_the_name(api, admin):
    fid, _ = create_federation(api, name="short-lived")
    one_error_line(*admin("delete", "--federation", str(fid), "--confirm", "wrong"), "409", "confirmation_required")
    code, _, err = admin("delete", "--federation", str(fid))
    assert code == 2 and "--confirm" in err
    code, out, err = admin("delete", "--federation", str(fid), "--confirm", "short-lived")
    assert code == 0 and out.startswith(f"federation {fid} short-lived deleted: 0 clients, 0 rounds, "), (out, err)
    one_error_line(*admin("status", "--federation", str(fid)), "404")


def test_the_worker_refuses_a_malformed_coordinator_url_without_retrying(tmp_path):
    cfg = tmp_path / "w.json"
    cfg.write_text(json.dumps({"federation_id": 1, "enrollment_secret": "hle_x", "clients": [
        {"name": "a", "data": {"partition": "tiny", "client": "upright-00"}}]}))
    proc = hilora("worker", "--config", str(cfg), "--state-dir", str(tmp_path / "state"),
                  env={"HILORA_COORDINATOR": "htp://127.0.0.1:8700"})
    assert proc.returncode == 2 and "is not an http(s) URL" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--log-level", "loud"], {}, "--log-level: unknown log level 'loud'"),
    (["--log-format", "xml"], {}, "--log-format: unknown log format 'xml'"),
    ([], {"HILORA_LOG_FORMAT": "xml"}, "HILORA_LOG_FORMAT: unknown log format 'xml'"),
])
def test_the_worker_names_a_bad_log_setting(tmp_path, args, env, message):
    proc = hilora("worker", "--coordinator", "http://127.0.0.1:8700", "--config", str(tmp_path / "w.json"), *args,
                  env=env)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {message} (one of: " + (
        "debug, info, warning, error, critical)" if "level" in message else "text, json)")
