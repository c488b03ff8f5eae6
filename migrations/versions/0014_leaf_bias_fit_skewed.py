"""training.leaf_bias_fit_skewed: federations created before the option keep the leaf they were
created with (its default, 4, would otherwise widen the bias fit's prior for every client whose
labels are not uniform from now on, their unseen clients' included); the downgrade removes the
key, which the older configuration model refuses as unknown

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 16:30:00
"""

from migrations.config_options import keep_value_before_the_option, remove_option

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    keep_value_before_the_option('training', 'leaf_bias_fit_skewed', 0.0)


def downgrade() -> None:
    remove_option('training', 'leaf_bias_fit_skewed')
