"""Injected dependencies: settings, a database session, the Celery client."""

from __future__ import annotations

from collections.abc import Iterator

from celery import Celery
from fastapi import Depends
from sqlalchemy.orm import Session

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
