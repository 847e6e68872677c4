"""Alembic environment: the URL comes from cxr's Settings, the target from the ORM models."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool

from cxr.db.models import Base
from cxr.db.session import make_engine
from cxr.settings import get_settings

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    return config.attributes.get("database_url") or get_settings().database_url


def run_migrations_offline() -> None:
    url = database_url()
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = database_url()
    engine = make_engine(url)
    with engine.connect() as connection:
        if url.startswith("sqlite"):
            # Batch migrations rebuild a SQLite table (copy, DROP, rename). With foreign keys
            # enforced, dropping `studies` would first delete every row that references it
            # (results, files, events: ON DELETE CASCADE). Off for the migration only; the
            # pragma has no effect inside a transaction, so it is committed before.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=url.startswith("sqlite"))
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
