"""study leases and the audit trail

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 20:30:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0006'
down_revision: Union[str, None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('worker_id', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f('ix_studies_lease_expires_at'), ['lease_expires_at'], unique=False)
    op.create_table(
        'study_events',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('study_id', sa.Uuid(), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('actor', sa.String(length=255), nullable=False),
        sa.Column('detail', sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_study_events_study_id_studies'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_study_events')),
    )
    op.create_index(op.f('ix_study_events_study_id'), 'study_events', ['study_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_study_events_study_id'), table_name='study_events')
    op.drop_table('study_events')
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_studies_lease_expires_at'))
        batch_op.drop_column('lease_expires_at')
        batch_op.drop_column('worker_id')
