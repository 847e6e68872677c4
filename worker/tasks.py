"""Celery tasks: thin adapters that take study ids, never pixels."""

from __future__ import annotations

import logging
import uuid

from celery.signals import worker_process_init, worker_ready

from cxr.queue import SCREEN_TASK, get_celery
from cxr.settings import get_settings
from worker.service import fail_study, get_screener, process_study

log = logging.getLogger(__name__)
app = get_celery()


@app.task(name=SCREEN_TASK, acks_late=True, ignore_result=True)
def screen_study(study_id: str) -> str:
    settings = get_settings()
    sid = uuid.UUID(study_id)
    try:
        return process_study(settings, sid)
    except Exception as e:  # recorded on the study and logged with its traceback, then re-raised
        log.exception("study %s: unexpected error", study_id)
        fail_study(settings, sid, f"internal_error: {type(e).__name__}: {e}")
        raise


def warm_up() -> None:
    """Load the model in the process that will use it, so the first study does not wait.

    Runs after the fork (prefork children) or in the solo worker itself: never at import
    time, never in a parent that forks afterwards (so no CUDA before a fork)."""
    get_screener(get_settings())


@worker_process_init.connect  # sent in each prefork child, and once by the solo pool
def _warm(**_: object) -> None:
    warm_up()


@worker_ready.connect  # the threads pool sends no worker_process_init; it never forks
def _warm_threads(sender=None, **_: object) -> None:
    pool_cls = getattr(getattr(sender, "controller", None), "pool_cls", None)
    if pool_cls is not None and getattr(pool_cls, "__module__", "") == "celery.concurrency.thread":
        warm_up()

