"""training.leaf_bias_fit: federations created before the option keep the leaf they were created
with (its default, 1, would otherwise shift the head bias of every leaf they start from now on,
their unseen clients' included); the downgrade removes the key, which the older configuration
model refuses as unknown

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 23:30:00
"""

from migrations.config_options import keep_value_before_the_option, remove_option

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    keep_value_before_the_option('training', 'leaf_bias_fit', 0.0)


def downgrade() -> None:
    remove_option('training', 'leaf_bias_fit')
