"""jobs wait out a transient failure: when to try again, and how many times it was put off

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

A job that could not store its results because the disk was full or the database away is queued
again for later, with backoff, instead of failing for good.
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('retry_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('postponed', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('postponed')
        batch_op.drop_column('retry_at')
