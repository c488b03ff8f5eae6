"""The coordinator and the admin CLI never import torch (the drift test is in test_migrations.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.api


def test_the_coordinator_and_admin_cli_never_import_torch():
    code = ("import sys; import coordinator.app, coordinator.services.scheduling, hilora.federation_file, "
            "worker.client, worker.daemon; bad = [m for m in ('torch', 'timm') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
