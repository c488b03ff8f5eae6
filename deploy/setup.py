"""One-shot setup of the compose demo (the ``setup`` service of compose.yaml).

Waits for the coordinator, creates the federation of ``$DEPLOY_DIR/federation.json`` (the same
steps as ``hilora admin create``: upload the backbone checkpoint, send config and manifest) and
writes ``$CONFIG_DIR/worker-N.json`` for every template ``$DEPLOY_DIR/worker-N.json``, filled in
with the new federation's id and enrollment secret. Idempotent: when ``$CONFIG_DIR/federation.json``
exists (a previous run), it only checks that file and exits 0.

Environment: ``HILORA_COORDINATOR`` (default http://coordinator:8700), ``HILORA_ADMIN_TOKEN``
(required), ``DEPLOY_DIR`` (default /deploy), ``CONFIG_DIR`` (default /config),
``SETUP_TIMEOUT`` (seconds to wait for the coordinator, default 300).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def render_worker_configs(deploy_dir: Path, config_dir: Path, federation_id: int, secret: str) -> list[Path]:
    """Fill every ``worker-*.json`` template in with the federation's id and enrollment secret."""
    from worker.daemon import WorkerConfig

    written = []
    for template in sorted(deploy_dir.glob("worker-*.json")):
        doc = json.loads(template.read_text())
        doc.update(federation_id=federation_id, enrollment_secret=secret)
        WorkerConfig.model_validate(doc)  # refuse to write a config the worker would refuse
        written.append(_write_private(config_dir / template.name, json.dumps(doc, indent=2) + "\n"))
    if not written:
        raise SystemExit(f"setup: no worker-*.json template in {deploy_dir}")
    return written


def _write_private(path: Path, text: str) -> Path:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


def main() -> int:
    from hilora.federation_file import build_federation_config, load_federation_file
    from worker.client import CoordinatorClient

    url = os.environ.get("HILORA_COORDINATOR", "http://coordinator:8700")
    token = os.environ.get("HILORA_ADMIN_TOKEN")
    if not token:
        print("setup: HILORA_ADMIN_TOKEN is not set", file=sys.stderr)
        return 2
    deploy_dir = Path(os.environ.get("DEPLOY_DIR", "/deploy"))
    config_dir = Path(os.environ.get("CONFIG_DIR", "/config"))
    marker = config_dir / "federation.json"

    with CoordinatorClient(url, worker_id="hilora-setup") as client:
        deadline = time.monotonic() + float(os.environ.get("SETUP_TIMEOUT", "300"))
        while not client.ready():
            if time.monotonic() > deadline:
                print(f"setup: the coordinator at {url} did not become ready", file=sys.stderr)
                return 1
            time.sleep(2)
        if marker.exists():
            created = json.loads(marker.read_text())
            status = client.federation_status(token, int(created["federation_id"]))
            print(f"setup: federation {status.federation_id} ({status.name}) exists, state {status.state.value}")
            return 0
        fed_config, checkpoint = build_federation_config(load_federation_file(deploy_dir / "federation.json"))
        client.put_blob(token, checkpoint)
        created = client.create_federation(token, fed_config)
    paths = render_worker_configs(deploy_dir, config_dir, created.federation_id, created.enrollment_secret)
    _write_private(marker, json.dumps({"federation_id": created.federation_id, "name": created.name}) + "\n")
    print(f"setup: created federation {created.federation_id} ({created.name}); wrote "
          + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
