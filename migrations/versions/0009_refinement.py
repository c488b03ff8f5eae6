"""refinement after clustering and pinned cluster versions: an assignment may name no cluster (the
client fits none; it is served the root and its own leaf); a cluster may serve a pinned version
(an admin's pin or rollback) instead of its newest. Refine rounds and runs need no new column: a
round's stage and a clustering run's algorithm are text ('refine').

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 17:40:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('assignments') as batch:
        batch.alter_column('cluster_id', existing_type=sa.Integer(), nullable=True)
    with op.batch_alter_table('clusters') as batch:
        batch.add_column(sa.Column('pinned_version_id', sa.Integer(), nullable=True))
        batch.create_foreign_key('fk_clusters_pinned_version', 'adapter_versions', ['pinned_version_id'], ['id'],
                                 ondelete='SET NULL')


def downgrade() -> None:
    with op.batch_alter_table('clusters') as batch:
        batch.drop_constraint('fk_clusters_pinned_version', type_='foreignkey')
        batch.drop_column('pinned_version_id')
    # the older schema cannot say "no cluster": those history rows go (the clients' cluster_id
    # column, which is what serving reads, already allowed null)
    op.execute("DELETE FROM assignments WHERE cluster_id IS NULL")
    with op.batch_alter_table('assignments') as batch:
        batch.alter_column('cluster_id', existing_type=sa.Integer(), nullable=False)
