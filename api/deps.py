"""Injected dependencies: settings, a database session, the Celery client, the API key check."""

from __future__ import annotations

from collections.abc import Iterator

from celery import Celery
from fastapi import HTTPException, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from sqlalchemy.orm import Session

from api.auth import CHECKED
from cxr.db.session import session_factory
from cxr.queue import get_celery
from cxr.settings import Settings, get_settings

RETRY_AFTER_SECONDS = 5


async def settings_dep() -> Settings:  # async: no thread for a cached value
    return get_settings()


def session_dep() -> Iterator[Session]:
    """A session for one request. Used through main.SessionDep, which lets at most
    CXR_DB_POOL_SIZE requests hold one at a time (FastAPI's ``max_concurrency``; the others
    wait without a thread) and closes it, returning its connection, as soon as the
    endpoint returns, so no request ever waits on the pool."""
    session = session_factory(get_settings().database_url)()
    try:
        yield session
    finally:
        session.close()


async def celery_dep() -> Celery:
    return get_celery()


api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="Required on every endpoint except /health and /metrics "
                                          "(see CXR_AUTH).")


async def require_api_key(request: Request, key: str | None = Security(api_key_header)) -> None:
    """401 unless the ApiKeyAuth middleware (api/auth.py) accepted this request; the header
    parameter documents the key in the OpenAPI schema. The middleware answers first, before
    the body is read; this only keeps a route closed should the middleware be missing."""
    if not request.scope.get(CHECKED):
        raise HTTPException(401, "missing or invalid X-API-Key", headers={"WWW-Authenticate": "APIKey"})


async def pool_exhausted(request: Request, exc: Exception) -> JSONResponse:
    """503 with Retry-After when no database connection came free in time (SQLAlchemy's
    pool TimeoutError): a client retries later instead of seeing a 500."""
    return JSONResponse({"detail": "the API is busy: no database connection came free in time; retry later"},
                        status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
