"""paused federations and the audit table of admin actions

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 09:15:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('federations') as batch:
        batch.add_column(sa.Column('paused_at', sa.DateTime(), nullable=True))
    op.create_table('audit_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.Column('actor', sa.String(length=64), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('federation_id', sa.Integer(), nullable=True),
    sa.Column('target', sa.String(length=200), nullable=True),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_audit_events_federation_id'), 'audit_events', ['federation_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_audit_events_federation_id'), table_name='audit_events')
    op.drop_table('audit_events')
    with op.batch_alter_table('federations') as batch:
        batch.drop_column('paused_at')
