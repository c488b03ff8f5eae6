"""training.leaf_bias_fit: federations created before the option keep the leaf they were created
with (its default, 1, would otherwise shift the head bias of every leaf they start from now on,
their unseen clients' included); the downgrade removes the key, which the older configuration
model refuses as unknown

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 23:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
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


def _training(config):  # noqa: ANN001, ANN202
    """The config's training section as a dict ({} when the config names none), or None when the
    config is not a mapping or its training section is not one."""
    if not isinstance(config, dict):
        return None
    training = config.get('training', {})
    return training if isinstance(training, dict) else None


def _keeping_the_old_leaf(config):  # noqa: ANN001, ANN202
    training = _training(config)
    if training is None or 'leaf_bias_fit' in training:
        return None
    return {**config, 'training': {**training, 'leaf_bias_fit': 0.0}}


def _without_the_option(config):  # noqa: ANN001, ANN202
    training = _training(config)
    if training is None or 'leaf_bias_fit' not in training:
        return None
    return {**config, 'training': {k: v for k, v in training.items() if k != 'leaf_bias_fit'}}


def upgrade() -> None:
    _rewrite(_keeping_the_old_leaf)


def downgrade() -> None:
    _rewrite(_without_the_option)
