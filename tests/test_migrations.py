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


def check_0002_backfill_and_downgrade(url: str) -> None:
    import uuid
    from datetime import datetime, timezone

    from alembic import command
    from sqlalchemy import text

    from cxr.db.migrate import alembic_config

    cfg = alembic_config(url)
    command.upgrade(cfg, "0001")
    engine = create_engine(url)
    sid = uuid.uuid4()
    now = datetime.now(timezone.utc)
    try:
        with engine.begin() as c:
            c.execute(text(
                "INSERT INTO studies (id, sha256, filename, source, stored_path, size_bytes, status, created_at, "
                "updated_at) VALUES (:id, :sha, 'old.png', 'watch', '/store/ab', 12, 'done', :now, :now)"),
                {"id": sid.hex if url.startswith("sqlite") else sid, "sha": "ab" * 32, "now": now})
        command.upgrade(cfg, "head")
        with engine.connect() as c:
            files = c.execute(text("SELECT sha256, stored_path, size_bytes, filename, source FROM study_files")).all()
        assert [tuple(f) for f in files] == [("ab" * 32, "/store/ab", 12, "old.png", "watch")]
        command.downgrade(cfg, "0001")
        assert "study_files" not in inspect(engine).get_table_names()
        command.upgrade(cfg, "head")
    finally:
        engine.dispose()


def test_0002_backfills_study_files_and_downgrades_sqlite(tmp_path):
    check_0002_backfill_and_downgrade(f"sqlite:///{tmp_path / 'b.db'}")


@pytest.mark.distributed
def test_0002_backfills_study_files_and_downgrades_postgres(postgres_url):
    check_0002_backfill_and_downgrade(postgres_url)
