"""client sampling and partial participation: the seed a round's clients were drawn with and how
many were eligible; each client's rounds in a row without its upload, and since when it is inactive

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 13:20:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('rounds') as batch:
        batch.add_column(sa.Column('sample_seed', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('sampled_from', sa.Integer(), nullable=True))
    with op.batch_alter_table('clients') as batch:
        batch.add_column(sa.Column('missed_rounds', sa.Integer(), nullable=False, server_default='0'))
        batch.add_column(sa.Column('inactive_since', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('clients') as batch:
        batch.drop_column('inactive_since')
        batch.drop_column('missed_rounds')
    with op.batch_alter_table('rounds') as batch:
        batch.drop_column('sampled_from')
        batch.drop_column('sample_seed')
