"""clustering.skip_single_cluster: federations created before the option keep training a single
cluster's rounds when their clustering finds K = 1 (its default, true, would otherwise skip the
cluster stage of their next clustering, a cycle's included); the downgrade removes the key, which
the older configuration model refuses as unknown

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 09:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
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


def _clustering(config):  # noqa: ANN001, ANN202
    """The config's clustering section as a dict ({} when the config names none), or None when the
    config is not a mapping or its clustering section is not one."""
    if not isinstance(config, dict):
        return None
    clustering = config.get('clustering', {})
    return clustering if isinstance(clustering, dict) else None


def _keeping_the_single_cluster(config):  # noqa: ANN001, ANN202
    clustering = _clustering(config)
    if clustering is None or 'skip_single_cluster' in clustering:
        return None
    return {**config, 'clustering': {**clustering, 'skip_single_cluster': False}}


def _without_the_option(config):  # noqa: ANN001, ANN202
    clustering = _clustering(config)
    if clustering is None or 'skip_single_cluster' not in clustering:
        return None
    return {**config, 'clustering': {k: v for k, v in clustering.items() if k != 'skip_single_cluster'}}


def upgrade() -> None:
    _rewrite(_keeping_the_single_cluster)


def downgrade() -> None:
    _rewrite(_without_the_option)
