"""clustering algorithms: the algorithm of each clustering run, and per-client clustering features
(lsac-paper's EMA of the root-stage B)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 12:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('clustering_runs') as batch:
        batch.add_column(sa.Column('algorithm', sa.String(length=16), nullable=False, server_default='lsac'))
    op.create_table('client_features',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('federation_id', sa.Integer(), nullable=False),
    sa.Column('client_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('blob_sha256', sa.String(length=64), nullable=False),
    sa.Column('rounds', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['blob_sha256'], ['blobs.sha256'], ),
    sa.ForeignKeyConstraint(['client_id'], ['clients.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['federation_id'], ['federations.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('client_id', 'kind', name='uq_client_features_client_kind')
    )
    with op.batch_alter_table('client_features', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_client_features_federation_id'), ['federation_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('client_features', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_client_features_federation_id'))
    op.drop_table('client_features')
    with op.batch_alter_table('clustering_runs') as batch:
        batch.drop_column('algorithm')
