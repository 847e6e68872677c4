"""Operational database errors are one sentence that says what to run: exit code 2 for every
CLI command, 503 with the same sentence for every API route. Real databases in real states:
no SQLite file, an empty file (no schema yet: a migration just started), an alembic_version
table still empty (the first migration running), an older revision (a migration part way),
an unknown newer revision, and a Postgres that cannot be reached (a closed port)."""

from __future__ import annotations

import io
import os
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from cxr.db.migrate import upgrade
from cxr.settings import get_settings
from tests.badfiles import png_bytes
from tests.imagegen import chest_like
from tests.stack import clean_env, cxr, free_port

PASSWORD = "s3cret-pw-4471"


def _sql(url: str, *statements: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as c:
            for s in statements:
                c.execute(text(s))
    finally:
        engine.dispose()


def make_state(kind: str, tmp_path, request) -> tuple[str, str]:
    """(CXR_DATABASE_URL, a phrase the sentence must hold) for a database in state ``kind``."""
    if kind.startswith("postgres_"):  # a fresh, empty Postgres database of the test's own
        url = request.getfixturevalue("postgres_url")
        if kind == "postgres_no_schema":
            return url, "has no schema yet: run `cxr db upgrade` or `cxr up`"
        upgrade(url, "0006")
        return url, "database at revision 0006, this code needs "
    path = tmp_path / "var" / "cxr.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{path}"
    if kind == "missing":
        return url, f"no database at {path}: run `cxr db upgrade` or `cxr up`"
    if kind == "empty_file":  # `cxr up` has just created the file
        path.write_bytes(b"")
        return url, "has no schema yet: run `cxr db upgrade` or `cxr up`"
    if kind in ("not_a_database", "damaged"):  # another file in its place, or a database cut short
        if kind == "not_a_database":
            path.write_bytes(bytes(range(256)) * 20)
        else:
            upgrade(url)
            data = path.read_bytes()
            path.write_bytes(data[:100] + b"\xff" * (len(data) - 100))  # header kept, pages overwritten
        return url, "is not a SQLite database or is damaged"
    if kind == "first_migration_running":  # alembic made its version table, no revision yet
        _sql(url, "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
        return url, "has no schema yet"
    if kind == "older_revision":  # an old database, or a migration part way through
        upgrade(url, "0005")
        return url, "database at revision 0005, this code needs "
    if kind == "newer_revision":
        upgrade(url)
        _sql(url, "UPDATE alembic_version SET version_num = '0999'")
        return url, "database at revision 0999, which this code does not know"
    if kind == "unreachable_postgres":
        port = free_port()  # nothing listens there
        return (f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:{port}/cxr",
                f"cannot reach Postgres at 127.0.0.1:{port} (")
    raise KeyError(kind)


KINDS = ["missing", "empty_file", "not_a_database", "damaged", "first_migration_running", "older_revision", "newer_revision",
         "unreachable_postgres", pytest.param("postgres_no_schema", marks=pytest.mark.distributed),
         pytest.param("postgres_older_revision", marks=pytest.mark.distributed)]

COMMANDS = [
    ["worklist"],
    ["worklist", "--format", "html"],
    ["report", "summary", "--out", "{tmp}/summary"],
    ["study", "show", str(uuid.uuid4())],
    ["model", "list"],
    ["apikey", "list"],
    ["apikey", "create"],
    ["worker"],  # stops before loading any model
]


@pytest.fixture
def state(request, tmp_path, monkeypatch):
    url, phrase = make_state(request.param, tmp_path, request)
    for k in [k for k in os.environ if k.startswith("CXR_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("CXR_HOME", str(tmp_path / "var"))
    monkeypatch.setenv("CXR_DATABASE_URL", url)
    get_settings.cache_clear()
    yield url, phrase
    get_settings.cache_clear()


def _one_line_no_secret(message: str, phrase: str) -> None:
    lines = [ln for ln in message.splitlines() if ln.strip()]
    assert len(lines) == 1, message
    assert phrase in lines[0], message
    assert "Traceback" not in message and PASSWORD not in message and "sqlalchemy" not in message.lower()


@pytest.mark.parametrize("state", KINDS, indirect=True)
def test_every_cli_command_says_what_to_run_and_exits_2(state, tmp_path):
    from cxr.cli import app

    url, phrase = state
    runner = CliRunner()
    for command in COMMANDS:
        args = [a.format(tmp=tmp_path) for a in command]
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output, result.exception)
        _one_line_no_secret(result.stderr, phrase)
        assert result.stdout == "", (args, result.stdout)
    assert not (tmp_path / "summary").exists()
    if url.startswith("sqlite") and "missing" in phrase:
        assert not (tmp_path / "var" / "cxr.db").exists()  # nothing was created by asking


@pytest.mark.parametrize("state", KINDS, indirect=True)
def test_every_api_route_answers_503_with_the_sentence(state):
    import api.main

    _, phrase = state
    client = TestClient(api.main.app, raise_server_exceptions=False)
    sid = uuid.uuid4()
    film = png_bytes(chest_like(300, seed=5))
    calls = [("GET", "/worklist", {}), ("GET", f"/studies/{sid}", {}), ("GET", f"/jobs/{sid}", {}),
             ("GET", f"/studies/{sid}/heatmap", {}),
             ("POST", "/jobs", {"files": [("files", ("film.png", io.BytesIO(film), "image/png"))]})]
    for method, path, kwargs in calls:
        r = client.request(method, path, **kwargs)  # the key check itself needs the database
        assert r.status_code == 503, (path, r.status_code, r.text)
        _one_line_no_secret(r.json()["detail"], phrase)


@pytest.mark.parametrize("state", ["older_revision", "unreachable_postgres"], indirect=True)
def test_api_routes_past_the_key_check_answer_503_too(state, monkeypatch):
    import api.main

    _, phrase = state
    monkeypatch.setenv("CXR_API_KEYS", "k-123")
    get_settings.cache_clear()
    client = TestClient(api.main.app, raise_server_exceptions=False, headers={"X-API-Key": "k-123"})
    film = png_bytes(chest_like(300, seed=6))
    for method, path, kwargs in [("GET", "/worklist", {}), ("GET", f"/studies/{uuid.uuid4()}", {}),
                                 ("POST", "/predict", {"files": [("file", ("f.png", io.BytesIO(film), "image/png"))]}),
                                 ("POST", "/jobs", {"files": [("files", ("f.png", io.BytesIO(film), "image/png"))]})]:
        r = client.request(method, path, **kwargs)
        assert r.status_code == 503, (path, r.status_code, r.text)
        _one_line_no_secret(r.json()["detail"], phrase)


def test_the_cxr_program_itself_prints_the_sentence(tmp_path):
    """Through `python -m cxr` (the real entry point), then working once migrated."""
    env = clean_env(CXR_HOME=str(tmp_path / "var"))
    for args in (["worklist"], ["study", "show", str(uuid.uuid4())]):
        out = cxr(*args, env=env, check=False)
        assert out.returncode == 2, out.stderr
        _one_line_no_secret(out.stderr, f"no database at {tmp_path / 'var' / 'cxr.db'}")
    cxr("db", "upgrade", env=env)
    assert cxr("worklist", env=env).returncode == 0


def test_a_process_that_started_too_early_carries_on_once_migrated(tmp_path):
    """A failed readiness check is made again: the same engine works after `cxr db upgrade`."""
    from cxr.db.session import DatabaseNotReady, session_scope

    url = f"sqlite:///{tmp_path / 'late.db'}"
    with pytest.raises(DatabaseNotReady, match="no database at"):
        with session_scope(url) as s:
            s.execute(text("SELECT 1"))
    upgrade(url, "0004")
    with pytest.raises(DatabaseNotReady, match="database at revision 0004, this code needs"):
        with session_scope(url) as s:
            s.execute(text("SELECT 1"))
    upgrade(url)
    with session_scope(url) as s:
        assert s.execute(text("SELECT count(*) FROM studies")).scalar() == 0
