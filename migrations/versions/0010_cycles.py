"""cycles: the federation's cycle number (0: the first cascade), a pending admin request, when the
cycle started and since when it serves; the cycle of every round, clustering run and assignment

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 18:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('federations') as batch:
        batch.add_column(sa.Column('cycle', sa.Integer(), nullable=False, server_default='0'))
        batch.add_column(sa.Column('cycle_requested_at', sa.DateTime(), nullable=True))
        batch.add_column(sa.Column('cycle_started_at', sa.DateTime(), nullable=True))
        batch.add_column(sa.Column('serving_since', sa.DateTime(), nullable=True))
    for table in ('rounds', 'clustering_runs', 'assignments'):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column('cycle', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    for table in ('assignments', 'clustering_runs', 'rounds'):
        with op.batch_alter_table(table) as batch:
            batch.drop_column('cycle')
    with op.batch_alter_table('federations') as batch:
        batch.drop_column('serving_since')
        batch.drop_column('cycle_started_at')
        batch.drop_column('cycle_requested_at')
        batch.drop_column('cycle')
