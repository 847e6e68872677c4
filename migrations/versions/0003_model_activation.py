"""model activation

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 18:41:32.946645
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0003'
down_revision: Union[str, None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('path', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('active', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('activated_at', sa.DateTime(timezone=True), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_column('activated_at')
        batch_op.drop_column('active')
        batch_op.drop_column('path')

