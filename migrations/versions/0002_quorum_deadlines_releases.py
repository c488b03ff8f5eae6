"""quorum, deadlines, failure reasons and aggregation time on rounds; voluntary lease releases on tasks

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 09:10:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('rounds') as batch:
        batch.add_column(sa.Column('quorum', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('aggregation_seconds', sa.Float(), nullable=True))
        batch.add_column(sa.Column('deadline_at', sa.DateTime(), nullable=True))
        batch.add_column(sa.Column('failure', sa.Text(), nullable=True))
    with op.batch_alter_table('tasks') as batch:
        batch.add_column(sa.Column('releases', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('tasks') as batch:
        batch.drop_column('releases')
    with op.batch_alter_table('rounds') as batch:
        batch.drop_column('failure')
        batch.drop_column('deadline_at')
        batch.drop_column('aggregation_seconds')
        batch.drop_column('quorum')
