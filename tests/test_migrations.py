"""Alembic migrations build the schema from empty, and agree with the ORM models."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from cxr.db.migrate import upgrade
from cxr.db.models import Base

TABLES = {"jobs", "studies", "job_studies", "results", "model_versions", "alembic_version"}


def check(url: str) -> None:
    upgrade(url)
    engine = create_engine(url)
    try:
        assert TABLES <= set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"ORM models and migrations disagree: {diff}"
        upgrade(url)  # idempotent at head
    finally:
        engine.dispose()


def test_sqlite_upgrade_from_empty(tmp_path):
    check(f"sqlite:///{tmp_path / 'm.db'}")


@pytest.mark.distributed
def test_postgres_upgrade_from_empty(postgres_url):
    check(postgres_url)
