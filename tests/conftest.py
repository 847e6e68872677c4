"""Shared fixtures. Real services only: SQLite files, a real Postgres, a real Redis.

Postgres and Redis come from CXR_TEST_POSTGRES_URL (an admin URL; each test gets a fresh
database created there) and CXR_TEST_REDIS_URL. Where they are unreachable the
distributed tests skip with a reason, except under CI=true, where they fail.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from cxr import CLASS_NAMES_DEFAULT
from cxr.bundle import BundleMeta

PG_ADMIN_URL = os.environ.get("CXR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("CXR_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(what: str, error: Exception, how: str) -> None:
    msg = f"{what} is not reachable ({type(error).__name__}: {error}). {how}"
    if IN_CI:
        pytest.fail(f"CI=true requires {what}: {msg}")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A small bundle with random weights, written through the same save function the trainer uses."""
    import torch

    from worker.screening.model import build_model, save_bundle

    torch.manual_seed(0)
    meta = BundleMeta(architecture="efficientnet_b0", classes=list(CLASS_NAMES_DEFAULT), input_size=64,
                      version="test-random")
    model = build_model(meta)
    return save_bundle(tmp_path_factory.mktemp("bundle") / "tiny.safetensors", model, meta)


def _fresh_postgres():
    """A fresh, empty Postgres database, dropped afterwards."""
    admin = make_url(PG_ADMIN_URL)
    try:
        engine = create_engine(admin, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with engine.connect() as c:
            c.execute(text("SELECT 1"))
    except Exception as e:
        unavailable("Postgres", e, "Start it or set CXR_TEST_POSTGRES_URL=postgresql+psycopg://user@host:port/postgres.")
    name = f"cxr_test_{uuid.uuid4().hex[:12]}"
    with engine.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


@pytest.fixture
def postgres_url() -> str:
    """A fresh, empty Postgres database for one test, dropped afterwards."""
    yield from _fresh_postgres()


@pytest.fixture(scope="module")
def module_postgres_url() -> str:
    """A fresh, empty Postgres database shared by one test module (one running stack per module)."""
    yield from _fresh_postgres()


def _redis() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as e:
        unavailable("Redis", e, "Start it or set CXR_TEST_REDIS_URL=redis://host:port/db.")
    return REDIS_URL


@pytest.fixture(scope="module")
def module_redis_url() -> str:
    return _redis()


@pytest.fixture
def redis_url() -> str:
    return _redis()
