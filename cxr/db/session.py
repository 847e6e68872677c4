"""Engine and session factory built from the settings' database URL."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker


def make_engine(database_url: str, *, pool_size: int | None = None) -> Engine:
    """An engine for ``database_url``. ``pool_size``: connections its pool keeps (default
    CXR_DB_POOL_SIZE); as many again are opened under peaks (and closed once returned). An
    in-memory SQLite database keeps one per thread instead."""
    if pool_size is None:
        from cxr.settings import get_settings

        pool_size = get_settings().db_pool_size
    url = make_url(database_url)
    in_memory = url.get_backend_name() == "sqlite" and (url.database in (None, "", ":memory:")
                                                        or url.query.get("mode") == "memory")
    pool = {} if in_memory else {"pool_size": pool_size, "max_overflow": pool_size}
    if database_url.startswith("sqlite"):
        # Several processes (API, watcher, workers) share one SQLite file: WAL lets
        # readers run beside the writer, and busy_timeout waits instead of failing.
        engine = create_engine(database_url, connect_args={"timeout": 30}, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(database_url, pool_pre_ping=True, **pool)


@lru_cache
def _sessionmaker(database_url: str) -> sessionmaker[Session]:
    return sessionmaker(make_engine(database_url), expire_on_commit=False)


def session_factory(database_url: str) -> sessionmaker[Session]:
    """One engine and session factory per URL per process."""
    return _sessionmaker(database_url)


@lru_cache
def _sqlite_turns(database_url: str) -> threading.RLock:
    return threading.RLock()


@contextmanager
def session_scope(database_url: str) -> Iterator[Session]:
    """A short unit of work: a session that commits on success and rolls back on error.

    On SQLite, one such session at a time per process: SQLite has a single writer, and
    threads that find it busy sleep in its busy handler (1, 2, 5, 10... ms), so a worker's
    threads queued on one another through SQLite rather than taking turns; a lock here hands
    the database over at once. (Other processes still wait through busy_timeout.)"""
    turn = _sqlite_turns(database_url) if database_url.startswith("sqlite") else contextlib.nullcontext()
    with turn:
        session = session_factory(database_url)()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()
