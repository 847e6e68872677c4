"""callback outbox (attempts, holder, lease, last error) and worker liveness rows

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 09:00:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0008'
down_revision: Union[str, None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('callback_attempts', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('callback_holder', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('callback_lease_expires_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('callback_error', sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_callback_state'), ['callback_state'], unique=False)
    op.create_table(
        'workers',
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('name', name=op.f('pk_workers')),
    )
    op.create_index(op.f('ix_workers_heartbeat_at'), 'workers', ['heartbeat_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_workers_heartbeat_at'), table_name='workers')
    op.drop_table('workers')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_callback_state'))
        batch_op.drop_column('callback_error')
        batch_op.drop_column('callback_lease_expires_at')
        batch_op.drop_column('callback_holder')
        batch_op.drop_column('callback_attempts')
