"""SOP Instance UID conflicts: a study marker, the owner of a UID, pixel fingerprints

A SOP Instance UID is no longer unique across studies: one study owns it (a partial unique
index where ``conflicts_with`` is NULL), and a different film arriving with the same UID
is its own study, marked (``marker``, ``marker_detail``) and pointing at the owner
(``conflicts_with``); ``film_key`` keeps two copies of one such film in one study.
``study_files.pixel_sha256`` keeps a file's decoded-pixel hash once computed.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 09:10:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0007'
down_revision: Union[str, None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

OWNER = sa.text("conflicts_with IS NULL")
CONFLICTING = sa.text("conflicts_with IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('marker', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('marker_detail', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('conflicts_with', sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column('film_key', sa.String(length=64), nullable=True))
        batch_op.drop_constraint('uq_studies_sop_instance_uid', type_='unique')
        batch_op.create_index(batch_op.f('ix_studies_marker'), ['marker'], unique=False)
        batch_op.create_index(batch_op.f('ix_studies_sop_instance_uid'), ['sop_instance_uid'], unique=False)
    op.create_index('uq_studies_sop_instance_uid_owner', 'studies', ['sop_instance_uid'], unique=True,
                    sqlite_where=OWNER, postgresql_where=OWNER)
    op.create_index('uq_studies_sop_instance_uid_film', 'studies', ['sop_instance_uid', 'film_key'], unique=True,
                    sqlite_where=CONFLICTING, postgresql_where=CONFLICTING)
    with op.batch_alter_table('study_files', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pixel_sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    # Conflicting studies keep their rows; their SOP Instance UID is cleared so that the
    # unique constraint of 0006 holds again (the owner keeps it).
    op.execute("UPDATE studies SET sop_instance_uid = NULL WHERE conflicts_with IS NOT NULL")
    with op.batch_alter_table('study_files', schema=None) as batch_op:
        batch_op.drop_column('pixel_sha256')
    op.drop_index('uq_studies_sop_instance_uid_film', table_name='studies')
    op.drop_index('uq_studies_sop_instance_uid_owner', table_name='studies')
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_studies_sop_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_studies_marker'))
        batch_op.create_unique_constraint('uq_studies_sop_instance_uid', ['sop_instance_uid'])
        batch_op.drop_column('film_key')
        batch_op.drop_column('conflicts_with')
        batch_op.drop_column('marker_detail')
        batch_op.drop_column('marker')
