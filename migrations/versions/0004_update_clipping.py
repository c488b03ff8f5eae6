"""robust aggregation recorded on rounds: clipped_clients, update_norms and aggregation_weights

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 12:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('rounds') as batch:
        batch.add_column(sa.Column('clipped_clients', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('update_norms', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('aggregation_weights', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('rounds') as batch:
        batch.drop_column('aggregation_weights')
        batch.drop_column('update_norms')
        batch.drop_column('clipped_clients')
