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


def _move_to(engine, revision: str, down: bool = False) -> None:
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)


def test_federations_from_before_partitions_keep_spectral_partitions(engine):
    """0011: a federation created before clustering.partitions existed keeps the spectral partitions
    it was created with (the new default would otherwise apply at its next clustering); one that
    names the option keeps its choice; the downgrade removes the key (the older model refuses it)."""
    from datetime import datetime, timezone

    from sqlalchemy.orm import Session

    from conftest import tiny_config
    from coordinator.models import Blob, Federation
    from shared.config import FederationConfig
    from shared.states import FederationState

    now = datetime(2026, 12, 6, tzinfo=timezone.utc)

    def add(session, name, clustering):
        config = tiny_config(name, "0" * 64)
        config["clustering"] = clustering
        session.add(Federation(name=name, config=config, state=FederationState.enrolling,
                               enrollment_secret_hash="0" * 64, backbone_sha256="0" * 64, created_at=now,
                               updated_at=now))

    def clusterings(session):
        return {f.name: f.config["clustering"] for f in session.query(Federation).order_by(Federation.id)}

    _move_to(engine, "0010")
    with Session(engine) as session, session.begin():
        session.add(Blob(sha256="0" * 64, size=1, kind="backbone", created_at=now))
        add(session, "old", {"k_max": 4, "probe_loss": "ce"})
    _move_to(engine, "0011")   # (later revisions add their own keys: tested on their own)
    with Session(engine) as session, session.begin():
        assert clusterings(session) == {"old": {"k_max": 4, "probe_loss": "ce", "partitions": "spectral"}}
        add(session, "new", {"partitions": "spectral+linkage"})
    with Session(engine) as session:
        parsed = {f.name: FederationConfig.model_validate(f.config).clustering.partitions
                  for f in session.query(Federation)}
    assert parsed == {"old": "spectral", "new": "spectral+linkage"}
    _move_to(engine, "0010", down=True)
    with Session(engine) as session:
        assert clusterings(session) == {"old": {"k_max": 4, "probe_loss": "ce"}, "new": {}}
    _move_to(engine, "0011")
    with Session(engine) as session:   # back on the new code, both ran spectral partitions meanwhile
        assert clusterings(session) == {"old": {"k_max": 4, "probe_loss": "ce", "partitions": "spectral"},
                                        "new": {"partitions": "spectral"}}


@pytest.mark.parametrize(("revision", "before", "section", "key", "old_value", "chosen", "default", "named"), [
    # 0012: training.leaf_bias_fit (0: no fitted bias; the default 1)
    ("0012", "0011", "training", "leaf_bias_fit", 0.0, 2.0, 1.0, {"lr": 0.01, "leaf_lr_scale": 0.2}),
    # 0013: clustering.skip_single_cluster (false: a single cluster found trains its rounds; the default true)
    ("0013", "0012", "clustering", "skip_single_cluster", False, True, True, {"k_max": 4}),
    # 0014: training.leaf_bias_fit_skewed (0: one prior width for every client; the default 4)
    ("0014", "0013", "training", "leaf_bias_fit_skewed", 0.0, 2.0, 4.0, {"leaf_bias_fit": 2.0}),
    # 0015: training.leaf_mix (1: the leaf as trained; the default 0.5)
    ("0015", "0014", "training", "leaf_mix", 1.0, 0.25, 0.5, {"leaf_bias_fit": 2.0}),
])
def test_federations_from_before_an_option_keep_what_hilora_did_then(engine, revision, before, section, key,
                                                                      old_value, chosen, default, named):
    """A federation created before the option existed keeps the value hilora used then, whether its
    stored config names the option's section or not; one that names the option keeps its choice; one
    created after gets the default; the downgrade removes the key (the older model refuses it)."""
    from datetime import datetime, timezone

    from sqlalchemy.orm import Session

    from conftest import tiny_config
    from coordinator.models import Blob, Federation
    from shared.config import FederationConfig
    from shared.states import FederationState

    now = datetime(2026, 12, 7, tzinfo=timezone.utc)

    def add(session, name, value):
        config = tiny_config(name, "0" * 64)
        config.pop(section, None)
        if value is not None:
            config[section] = value
        session.add(Federation(name=name, config=config, state=FederationState.enrolling,
                               enrollment_secret_hash="0" * 64, backbone_sha256="0" * 64, created_at=now,
                               updated_at=now))

    def sections(session):
        return {f.name: f.config.get(section) for f in session.query(Federation).order_by(Federation.id)}

    _move_to(engine, before)
    with Session(engine) as session, session.begin():
        session.add(Blob(sha256="0" * 64, size=1, kind="backbone", created_at=now))
        add(session, "old", named)
        add(session, "bare", None)
    _move_to(engine, revision)
    with Session(engine) as session, session.begin():
        assert sections(session) == {"old": {**named, key: old_value}, "bare": {key: old_value}}
        add(session, "new", {key: chosen})
        add(session, "default", None)
    with Session(engine) as session:
        parsed = {f.name: getattr(getattr(FederationConfig.model_validate(f.config), section), key)
                  for f in session.query(Federation)}
    assert parsed == {"old": old_value, "bare": old_value, "new": chosen, "default": default}
    _move_to(engine, before, down=True)
    with Session(engine) as session:
        assert sections(session) == {"old": named, "bare": {}, "new": {}, "default": None}
