"""Celery tasks: thin adapters that take study ids, never pixels."""

from __future__ import annotations

import logging
import uuid

from celery.signals import task_received, worker_process_init, worker_ready

from sqlalchemy.exc import DBAPIError, OperationalError

from cxr.db.session import DatabaseNotReady
from cxr.logsafe import from_dicom_code
from cxr.queue import SCREEN_TASK, fire_callbacks, get_celery
from cxr.settings import get_settings
from worker.callbacks import job_callback  # noqa: F401 - registers the task (legacy messages on the main queue)
from worker.leases import ensure_lease_keeper, note_delivery
from worker.service import fail_study, get_screener, process_study

log = logging.getLogger(__name__)
app = get_celery()


def database_unreachable(e: BaseException) -> bool:
    """The database is down, the connection was lost, or it is not migrated yet (not a bad
    query or a bad file)."""
    return isinstance(e, (OperationalError, DatabaseNotReady)) or (
        isinstance(e, DBAPIError) and e.connection_invalidated)


@app.task(name=SCREEN_TASK, bind=True, acks_late=True, ignore_result=True, max_retries=None)
def screen_study(self, study_id: str, scores_first: bool = False) -> str:
    """Screen one study. Redelivery is safe: a study already done for the active model is
    left alone, and one another live worker holds is not taken (see repo.claim_study).

    With the database unreachable the task is retried with doubling delays (up to a minute)
    until it comes back; the worker's connection pool reconnects by itself."""
    settings = get_settings()
    sid = uuid.UUID(study_id)
    try:
        outcome = process_study(settings, sid, scores_first=scores_first)
    except Exception as e:
        if database_unreachable(e):
            delay = min(60.0, 2.0 ** min(self.request.retries, 6))
            log.warning("study %s: the database is unreachable (%s); retry %d in %.0f s", study_id,
                        type(e).__name__, self.request.retries + 1, delay)
            raise self.retry(countdown=delay, exc=e)
        # Recorded on the study and logged with its traceback, then re-raised.
        log.exception("study %s: unexpected error", study_id)
        # The text of an exception raised through DICOM code may quote a header value: not stored.
        why = f"{type(e).__name__} (details in the worker log)" if from_dicom_code(e) else f"{type(e).__name__}: {e}"
        fail_study(settings, sid, f"internal_error: {why}")
        fire_callbacks(app, settings.database_url, study_id=sid)
        raise
    fire_callbacks(app, settings.database_url, study_id=sid)
    return outcome


def warm_up() -> None:
    """Load the model in the process that will use it, so the first study does not wait.

    Runs after the fork (prefork children) or in the solo worker itself: never at import
    time, never in a parent that forks afterwards (so no CUDA before a fork)."""
    get_screener(get_settings())


@worker_process_init.connect  # sent in each prefork child, and once by the solo pool
def _warm(**_: object) -> None:
    warm_up()


@worker_ready.connect
def _alive(**_: object) -> None:
    """The consumer process (the one that takes tasks from the broker) writes heartbeats from now on."""
    ensure_lease_keeper(get_settings())


@task_received.connect  # in the consumer process, as soon as a task is taken (prefetched), before it runs
def _delivered(request=None, **_: object) -> None:
    if request is not None and request.name == SCREEN_TASK and request.args:
        note_delivery(get_settings(), str(request.args[0]))


@worker_ready.connect  # the threads pool sends no worker_process_init; it never forks
def _warm_threads(sender=None, **_: object) -> None:
    pool_cls = getattr(getattr(sender, "controller", None), "pool_cls", None)
    if pool_cls is not None and getattr(pool_cls, "__module__", "") == "celery.concurrency.thread":
        warm_up()

