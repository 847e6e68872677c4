"""DICOM identity, study metadata and the quality gate

Adds ``study_files`` (every distinct file received for a study, backfilled with each
existing study's file), the gate's ``reject_code`` and the study metadata columns
(DICOM identity UIDs, acquisition fields, image size, pseudonymised patient key).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 18:21:10.884867
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0002'
down_revision: Union[str, None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('study_files',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('study_id', sa.Uuid(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('stored_path', sa.Text(), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('transfer_syntax', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_study_files_study_id_studies'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_study_files')),
    sa.UniqueConstraint('sha256', name=op.f('uq_study_files_sha256'))
    )
    with op.batch_alter_table('study_files', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_study_files_study_id'), ['study_id'], unique=False)

    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reject_code', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('image_format', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('width', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('height', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('sop_instance_uid', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('study_instance_uid', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('series_instance_uid', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('accession_number', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('modality', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('body_part', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('view_position', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('patient_age', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('patient_sex', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('manufacturer', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('transfer_syntax', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('patient_key', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_studies_patient_key'), ['patient_key'], unique=False)
        batch_op.create_index(batch_op.f('ix_studies_study_instance_uid'), ['study_instance_uid'], unique=False)
        batch_op.create_unique_constraint(batch_op.f('uq_studies_sop_instance_uid'), ['sop_instance_uid'])

    # Every existing study's file becomes its first study_files row.
    op.execute(
        "INSERT INTO study_files (study_id, sha256, stored_path, size_bytes, filename, source, created_at) "
        "SELECT id, sha256, stored_path, size_bytes, filename, source, created_at FROM studies"
    )


def downgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_studies_sop_instance_uid'), type_='unique')
        batch_op.drop_index(batch_op.f('ix_studies_study_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_studies_patient_key'))
        batch_op.drop_column('patient_key')
        batch_op.drop_column('transfer_syntax')
        batch_op.drop_column('manufacturer')
        batch_op.drop_column('patient_sex')
        batch_op.drop_column('patient_age')
        batch_op.drop_column('view_position')
        batch_op.drop_column('body_part')
        batch_op.drop_column('modality')
        batch_op.drop_column('accession_number')
        batch_op.drop_column('series_instance_uid')
        batch_op.drop_column('study_instance_uid')
        batch_op.drop_column('sop_instance_uid')
        batch_op.drop_column('height')
        batch_op.drop_column('width')
        batch_op.drop_column('image_format')
        batch_op.drop_column('reject_code')

    with op.batch_alter_table('study_files', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_study_files_study_id'))

    op.drop_table('study_files')
