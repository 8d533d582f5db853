"""audit trail forwarding: a mark per audit event, and the forwarder's lease

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

Events recorded before this revision are not marked: a node that forwards its audit trail
sends them too, since nothing of the trail may be lost.
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('forwarded_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(
            'ix_audit_events_unforwarded',
            ['id'],
            unique=False,
            postgresql_where=sa.text('forwarded_at IS NULL'),
            sqlite_where=sa.text('forwarded_at IS NULL'),
        )

    op.create_table('audit_forwarding',
    sa.Column('target', sa.String(length=64), nullable=False),
    sa.Column('leased_by', sa.String(length=128), nullable=True),
    sa.Column('leased_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('forwarded', sa.Integer(), nullable=False),
    sa.Column('last_forwarded_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('failing_since', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('target')
    )


def downgrade() -> None:
    op.drop_table('audit_forwarding')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_events_unforwarded')
        batch_op.drop_column('forwarded_at')
