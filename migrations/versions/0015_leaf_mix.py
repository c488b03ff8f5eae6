"""training.leaf_mix: federations created before the option keep the leaf as trained (its default,
0.5, would otherwise take the model of every client whose labels look uniform only half the way to
its leaf from now on); the downgrade removes the key, which the older configuration model refuses
as unknown

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 19:30:00
"""

from migrations.config_options import keep_value_before_the_option, remove_option

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    keep_value_before_the_option('training', 'leaf_mix', 1.0)


def downgrade() -> None:
    remove_option('training', 'leaf_mix')
