"""clustering.partitions: federations created before the option keep the spectral partitions they
were created with (its default, 'spectral+linkage', would otherwise apply to them on their next
clustering, recluster or late onboarding); the downgrade removes the key, which the older
configuration model refuses as unknown

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 21:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

_federations = sa.table('federations', sa.column('id', sa.Integer()), sa.column('config', sa.JSON()))


def _rewrite(change) -> None:  # noqa: ANN001
    """Apply ``change`` (config -> new config, or None for no change) to every federation's config."""
    conn = op.get_bind()
    for fid, config in conn.execute(sa.select(_federations.c.id, _federations.c.config)).all():
        new = change(config)
        if new is not None:
            conn.execute(_federations.update().where(_federations.c.id == fid).values(config=new))


def _with_spectral(config):  # noqa: ANN001, ANN202
    clustering = config.get('clustering') if isinstance(config, dict) else None
    if not isinstance(clustering, dict) or 'partitions' in clustering:
        return None
    return {**config, 'clustering': {**clustering, 'partitions': 'spectral'}}


def _without_partitions(config):  # noqa: ANN001, ANN202
    clustering = config.get('clustering') if isinstance(config, dict) else None
    if not isinstance(clustering, dict) or 'partitions' not in clustering:
        return None
    return {**config, 'clustering': {k: v for k, v in clustering.items() if k != 'partitions'}}


def upgrade() -> None:
    _rewrite(_with_spectral)


def downgrade() -> None:
    _rewrite(_without_partitions)
