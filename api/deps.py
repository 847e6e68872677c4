"""Injected dependencies: settings, a database session, the Celery client, the API key check."""

from __future__ import annotations

import hmac
from collections.abc import Iterator

from celery import Celery
from fastapi import Depends, HTTPException, Security
from fastapi.security import APIKeyHeader
from sqlalchemy.orm import Session

from cxr import apikeys
from cxr.db import repo
from cxr.db.session import session_factory
from cxr.queue import get_celery
from cxr.settings import Settings, get_settings


def settings_dep() -> Settings:
    return get_settings()


def session_dep(settings: Settings = Depends(settings_dep)) -> Iterator[Session]:
    session = session_factory(settings.database_url)()
    try:
        yield session
    finally:
        session.close()


def celery_dep() -> Celery:
    return get_celery()


api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="Required on every endpoint except /health when API keys are configured.")


def require_api_key(
    settings: Settings = Depends(settings_dep),
    session: Session = Depends(session_dep),
    key: str | None = Security(api_key_header),
) -> None:
    """401 unless X-API-Key is one of CXR_API_KEYS or an active key stored in the database
    (`cxr apikey create`). Open only when no key is configured either way."""
    if key and any(hmac.compare_digest(key.encode(), k.get_secret_value().encode()) for k in settings.api_keys):
        return
    any_stored, stored_match = repo.api_key_status(session, key_sha256=apikeys.digest(key) if key else None)
    if stored_match or not (settings.api_keys or any_stored):
        return
    raise HTTPException(401, "missing or invalid X-API-Key", headers={"WWW-Authenticate": "APIKey"})
