"""jobs carry their route's priority: workers claim STAT before routine

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

A route may set a priority; a worker claims the queued job of highest priority first, then the oldest.
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('priority', sa.Integer(), nullable=False, server_default='0'))
        batch_op.create_index('ix_jobs_state_priority_id', ['state', 'priority', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_state_priority_id')
        batch_op.drop_column('priority')
