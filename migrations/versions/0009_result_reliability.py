"""results: out-of-distribution score, uncertainty and the uncertain flag

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 09:20:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0009'
down_revision: Union[str, None] = '0008'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.add_column(sa.Column('ood_score', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('uncertainty', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('uncertain', sa.Boolean(), nullable=True))
        batch_op.create_index(batch_op.f('ix_results_uncertain'), ['uncertain'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_results_uncertain'))
        batch_op.drop_column('uncertain')
        batch_op.drop_column('uncertainty')
        batch_op.drop_column('ood_score')
