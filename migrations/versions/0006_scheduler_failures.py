"""scheduler failures: why a federation is paused, and the scheduler's record of ticks that failed
to advance it (a federation that keeps failing is paused instead of retried every tick), and the
quarantine of a done task whose upload aggregation could not combine; the count of distinct bodies
each task received (one stored body per task, a quota per task)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 09:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('federations') as batch:
        batch.add_column(sa.Column('paused_reason', sa.Text(), nullable=True))
        batch.add_column(sa.Column('failure_count', sa.Integer(), nullable=False, server_default='0'))
        batch.add_column(sa.Column('last_failure', sa.Text(), nullable=True))
        batch.add_column(sa.Column('last_failure_at', sa.DateTime(), nullable=True))
    with op.batch_alter_table('tasks') as batch:
        batch.add_column(sa.Column('quarantined_at', sa.DateTime(), nullable=True))
        batch.add_column(sa.Column('upload_count', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('tasks') as batch:
        batch.drop_column('upload_count')
        batch.drop_column('quarantined_at')
    with op.batch_alter_table('federations') as batch:
        batch.drop_column('last_failure_at')
        batch.drop_column('last_failure')
        batch.drop_column('failure_count')
        batch.drop_column('paused_reason')
