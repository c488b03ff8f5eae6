"""The schema is exactly the migrations' (drift test), and the coordinator never imports torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from coordinator.db import make_engine
from coordinator.migrate import schema_is_at_head, upgrade_to_head
from coordinator.models import Base

pytestmark = pytest.mark.api


def test_migrations_build_exactly_the_models(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'drift.db'}")
    assert not schema_is_at_head(engine)
    upgrade_to_head(engine)
    assert schema_is_at_head(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    upgrade_to_head(engine)  # idempotent
    assert schema_is_at_head(engine)


def test_the_coordinator_and_admin_cli_never_import_torch():
    code = ("import sys; import coordinator.app, coordinator.services.scheduling, hilora.federation_file, "
            "worker.client, worker.daemon; bad = [m for m in ('torch', 'timm') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
