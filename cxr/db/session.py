"""Engine and session factory built from the settings' database URL.

Operational problems (no database yet, a schema at another Alembic revision, a server that
cannot be reached) are told as one sentence that says what to run: :class:`DatabaseNotReady`,
raised by the engines that sessions use, and :func:`database_problem`, which turns any such
error into one. The CLI maps it to exit code 2 and the API to 503, each in one place.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)


class DatabaseNotReady(SQLAlchemyError):
    """The database cannot be used as it is, and the message (one sentence, passwords hidden)
    says why and what to run: no database file yet, no schema yet (or a migration still
    running), a schema at an older or unknown Alembic revision, a server that cannot be
    reached. A ``SQLAlchemyError``, so code that already copes with database trouble copes
    with this too."""


def describe_url(database_url: str) -> str:
    """The database URL for people: the password hidden (``***``); for SQLite the file."""
    try:
        url = make_url(database_url)
    except ArgumentError:
        return "the configured CXR_DATABASE_URL (not a valid URL)"
    if url.get_backend_name() == "sqlite":
        return str(Path(url.database).resolve()) if url.database and url.database != ":memory:" else "memory"
    return url.render_as_string(hide_password=True)


#: SQLite's errors for a file that is not a database, or a damaged one (SQLITE_NOTADB, SQLITE_CORRUPT).
SQLITE_DAMAGED = frozenset({"file is not a database", "database disk image is malformed"})


def _reason(error: BaseException) -> str:
    """The first line of a driver's error, for a sentence (never a traceback)."""
    orig = getattr(error, "orig", None) or error
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(orig).__name__


def database_problem(database_url: str, error: BaseException) -> DatabaseNotReady | None:
    """``error`` as a :class:`DatabaseNotReady` sentence when it is operational (the database is
    missing, unreachable, locked, at the wrong revision, or a SQLite file that is not a database
    or is damaged), else None (a bug: let it show).

    ``DatabaseNotReady`` comes back as it is; any ``OperationalError`` (connecting, a lost
    connection, a locked SQLite file) becomes "cannot reach Postgres at host:port (why): ...".
    """
    if isinstance(error, DatabaseNotReady):
        return error
    if (isinstance(error, DatabaseError) and database_url.startswith("sqlite")
            and _reason(error) in SQLITE_DAMAGED):  # a file that is not (or no longer) a database
        return DatabaseNotReady(
            f"the database file {describe_url(database_url)} is not a SQLite database or is damaged "
            f"({_reason(error)}): restore it from a backup, or move it aside and run `cxr db upgrade` or `cxr up` "
            "to start a new one")
    if not isinstance(error, OperationalError) and not (isinstance(error, DBAPIError) and error.connection_invalidated):
        return None
    where, reason = describe_url(database_url), _reason(error)
    try:
        url = make_url(database_url)
    except ArgumentError:
        return DatabaseNotReady(f"cannot use the database at {where} ({reason}): check CXR_DATABASE_URL")
    backend = url.get_backend_name()
    if backend == "sqlite":
        return DatabaseNotReady(f"cannot use the database at {where} ({reason}): check that the file and its "
                                "folder are readable and writable, and that no process holds it locked")
    name = {"postgresql": "Postgres", "mysql": "MySQL", "mariadb": "MariaDB"}.get(backend, backend)
    host = f"{url.host or 'localhost'}:{url.port or {'postgresql': 5432}.get(backend, '?')}"
    if "does not exist" in reason and url.database and f'"{url.database}"' in reason:
        return DatabaseNotReady(f"no database {url.database} on {name} at {host}: create it (createdb "
                                f"{url.database}), then run `cxr db upgrade` or `cxr up`")
    why = reason.rsplit(" failed: ", 1)[-1]  # libpq: 'connection to server at "h", port p failed: <why>'
    return DatabaseNotReady(f"cannot reach {name} at {host} ({why}): start it, or check CXR_DATABASE_URL "
                            f"({where})")


@lru_cache
def _code_revisions() -> tuple[frozenset[str], frozenset[str]]:
    """(head revisions, every revision) of the migrations shipped with this code."""
    from alembic.script import ScriptDirectory

    from cxr.db.migrate import alembic_config

    script = ScriptDirectory.from_config(alembic_config(""))
    return frozenset(script.get_heads()), frozenset(r.revision for r in script.walk_revisions())


def schema_problem(found: set[str] | None, *, where: str) -> str | None:
    """Why a database whose ``alembic_version`` holds ``found`` (None: no such table) cannot be
    used by this code, as a sentence; None when it is at this code's head."""
    heads, known = _code_revisions()
    need = ", ".join(sorted(heads))
    if not found:
        return (f"the database {where} has no schema yet: run `cxr db upgrade` or `cxr up` (if one of them is "
                "migrating it right now, wait for it to finish)")
    if found == set(heads):
        return None
    at = ", ".join(sorted(found))
    if found <= known:
        return (f"database at revision {at}, this code needs {need}: run `cxr db upgrade` ({where}; if a "
                "migration is running right now, wait for it to finish)")
    return (f"database at revision {at}, which this code does not know (it needs {need}): it was migrated by a "
            f"newer cxr-screen; run that version, or update this one ({where})")


def _install_readiness_checks(engine: Engine, database_url: str) -> None:
    """Make ``engine`` refuse, with a :class:`DatabaseNotReady` sentence, a SQLite file that
    does not exist (instead of creating an empty one) and, on its first good connection, a
    schema that is not at this code's Alembic head. A failed check is made again on the next
    connection, so a process waiting for `cxr db upgrade` carries on once it has run."""
    where = describe_url(database_url)
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:" \
            and not url.database.startswith("file:"):
        path = Path(url.database)

        @event.listens_for(engine, "do_connect")
        def _exists(dialect, conn_rec, cargs, cparams):
            if not path.exists():
                raise DatabaseNotReady(f"no database at {path.resolve()}: run `cxr db upgrade` or `cxr up`")

    dbapi_error = engine.dialect.loaded_dbapi.Error

    @event.listens_for(engine, "first_connect")
    def _at_head(dbapi_conn, conn_rec):
        cur = dbapi_conn.cursor()
        try:
            cur.execute("SELECT version_num FROM alembic_version")
            found: set[str] | None = {row[0] for row in cur.fetchall()}
        except dbapi_error as e:
            if "alembic_version" not in str(e):
                raise
            found = None
        finally:
            cur.close()
            dbapi_conn.rollback()
        problem = schema_problem(found, where=where)
        if problem is not None:
            raise DatabaseNotReady(problem)


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
    # A failed statement's error message would quote its parameters (file names, accession
    # numbers) and reach a log or a 503 sentence: SQLAlchemy leaves them out with hide_parameters.
    pool["hide_parameters"] = True
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
    engine = make_engine(database_url)
    _install_readiness_checks(engine, database_url)
    return sessionmaker(engine, expire_on_commit=False)


def session_factory(database_url: str) -> sessionmaker[Session]:
    """One engine and session factory per URL per process.

    Its sessions raise :class:`DatabaseNotReady` (on their first query) when the SQLite file
    does not exist or the schema is not at this code's Alembic head; migrations use their
    own engine (``make_engine``), without these checks."""
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
