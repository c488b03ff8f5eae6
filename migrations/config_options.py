"""What the revisions that add a federation config option with a new default do (0011, 0012,
0013): federations created before the option keep the value hilora used before it existed, and the
downgrade removes the key, which the older configuration model refuses as unknown. Called from a
revision's ``upgrade``/``downgrade`` (Alembic's ``op`` is bound then)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from alembic import op

_federations = sa.table('federations', sa.column('id', sa.Integer()), sa.column('config', sa.JSON()))


def _rewrite(change: Callable[[Any], dict | None]) -> None:
    """Apply ``change`` (config -> new config, or None for no change) to every federation's config."""
    conn = op.get_bind()
    for fid, config in conn.execute(sa.select(_federations.c.id, _federations.c.config)).all():
        new = change(config)
        if new is not None:
            conn.execute(_federations.update().where(_federations.c.id == fid).values(config=new))


def _section(config: Any, section: str, missing: dict | None) -> dict | None:
    """The config's ``section`` as a dict (``missing`` when the config names none), or None when
    the config is not a mapping or the section is not one."""
    if not isinstance(config, dict):
        return None
    found = config.get(section, missing)
    return found if isinstance(found, dict) else None


def keep_value_before_the_option(section: str, key: str, value: Any, *, without_the_section: bool = True) -> None:
    """Every federation whose ``section`` does not name ``key`` gets ``key: value``. With
    ``without_the_section`` False, a config that names no ``section`` at all is left as it is."""
    def change(config: Any) -> dict | None:
        found = _section(config, section, {} if without_the_section else None)
        if found is None or key in found:
            return None
        return {**config, section: {**found, key: value}}

    _rewrite(change)


def remove_option(section: str, key: str) -> None:
    """Every federation's ``section`` loses ``key``."""
    def change(config: Any) -> dict | None:
        found = _section(config, section, None)
        if found is None or key not in found:
            return None
        return {**config, section: {k: v for k, v in found.items() if k != key}}

    _rewrite(change)
