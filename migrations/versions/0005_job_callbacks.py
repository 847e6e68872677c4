"""job callbacks

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 19:35:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0005'
down_revision: Union[str, None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('callback_url', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('callback_state', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('callback_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('callback_at')
        batch_op.drop_column('callback_state')
        batch_op.drop_column('callback_url')
