"""Migration drift, on SQLite and on PostgreSQL: ``alembic upgrade head`` on an empty database builds
exactly the models' schema, and the migrations go down to base and up again."""

from __future__ import annotations

import ast
import inspect
import textwrap
from pprint import pformat

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect as sa_inspect

from coordinator.db import make_engine
from coordinator.migrate import alembic_config, schema_is_at_head, upgrade_to_head
from coordinator.models import Base

pytestmark = pytest.mark.api


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _drift(engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def _assert_no_drift(engine) -> None:
    diff = _drift(engine)
    assert diff == [], f"the migrations and coordinator.models differ on {engine.dialect.name}:\n{pformat(diff)}"


def _downgrade_to_base(engine) -> None:
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")


def _is_noop(fn) -> bool:  # noqa: ANN001
    """True if a migration function's body is only a docstring, comments, ``pass``/``...`` and
    ``raise`` statements (e.g. ``raise NotImplementedError``): it changes nothing."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    body = tree.body[0].body
    return all(isinstance(s, (ast.Pass, ast.Raise)) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
               for s in body)


def _revisions(url: str) -> list:
    return list(ScriptDirectory.from_config(alembic_config(url)).walk_revisions())


def _missing_downgrades(revisions) -> list[str]:  # noqa: ANN001
    """Revisions whose ``downgrade`` is absent or does nothing."""
    return [r.revision for r in revisions
            if not callable(getattr(r.module, "downgrade", None)) or _is_noop(r.module.downgrade)]


def _user_tables(engine) -> set[str]:
    return set(sa_inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_head_on_an_empty_database_builds_exactly_the_models(engine):
    assert not schema_is_at_head(engine)
    upgrade_to_head(engine)
    assert schema_is_at_head(engine)
    _assert_no_drift(engine)
    assert _user_tables(engine) == set(Base.metadata.tables)
    upgrade_to_head(engine)  # idempotent
    assert schema_is_at_head(engine)


def test_every_migration_has_a_downgrade():
    """A missing downgrade is a defect (an operator could not roll a release back): fail, never skip."""
    revisions = _revisions("sqlite://")
    assert len(revisions) >= 5, [r.revision for r in revisions]   # 0001..0005 when this was written
    missing = _missing_downgrades(revisions)
    assert not missing, f"migrations without a downgrade (write one): {missing}"


def test_downgrade_to_base_then_upgrade_again(engine):
    revisions = _revisions(engine.url.render_as_string(hide_password=False))
    missing = _missing_downgrades(revisions)
    assert not missing, f"migrations without a downgrade (write one): {missing}"
    upgrade_to_head(engine)
    _downgrade_to_base(engine)
    assert not schema_is_at_head(engine)
    assert _user_tables(engine) == set()
    upgrade_to_head(engine)
    assert schema_is_at_head(engine)
    _assert_no_drift(engine)
