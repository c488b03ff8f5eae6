"""clustering.partitions: federations created before the option keep the spectral partitions they
were created with (its default, 'spectral+linkage', would otherwise apply to them on their next
clustering, recluster or late onboarding); the downgrade removes the key, which the older
configuration model refuses as unknown

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 21:00:00
"""

from migrations.config_options import keep_value_before_the_option, remove_option

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    keep_value_before_the_option('clustering', 'partitions', 'spectral', without_the_section=False)


def downgrade() -> None:
    remove_option('clustering', 'partitions')
