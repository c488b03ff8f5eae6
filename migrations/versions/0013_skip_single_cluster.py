"""clustering.skip_single_cluster: federations created before the option keep training a single
cluster's rounds when their clustering finds K = 1 (its default, true, would otherwise skip the
cluster stage of their next clustering, a cycle's included); the downgrade removes the key, which
the older configuration model refuses as unknown

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 09:00:00
"""

from migrations.config_options import keep_value_before_the_option, remove_option

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    keep_value_before_the_option('clustering', 'skip_single_cluster', False)


def downgrade() -> None:
    remove_option('clustering', 'skip_single_cluster')
