"""The reaper: puts abandoned work back on the queue.

- A study in ``processing`` whose worker is dead (no heartbeat for
  ``CXR_WORKER_DEAD_AFTER_SECONDS``) or whose lease expired (its worker was killed, its host
  died, or it lost the database for longer than the lease) goes back to ``queued`` and its
  screening task is published again.
- A study ``queued`` whose task a now dead worker had taken from the broker (prefetched, not
  started: the worker noted it, see ``worker.leases``) has its task published again at once.
- A study ``queued`` for longer than ``CXR_REQUEUE_QUEUED_AFTER_SECONDS`` while the broker
  queue is empty has lost its task (a Redis restarted without persistence): its task is
  published again.
- A job callback ``sending`` whose delivery lease expired (its worker died mid-attempt or
  while the retry waited, or its task was lost) is published again; a finished job whose
  callback was never published (its worker died first) is published.

Publishing twice is harmless: a task for a study that is done, or that another live worker
holds, does nothing, and a callback is delivered by whichever task takes its lease. The
reaper runs inside the watcher (every ``CXR_REAP_INTERVAL_SECONDS``, so also under ``cxr up``)
and as ``cxr reap``.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import Celery

from cxr.db import repo
from cxr.db.models import utcnow
from cxr.db.session import session_scope
from cxr.queue import PRIORITY_BATCH, callback_publish_grace, enqueue_callback, enqueue_study, fire_callbacks, \
    queue_depth
from cxr.settings import Settings

log = logging.getLogger(__name__)
# Heartbeat rows of workers silent this long, holding nothing, are dropped.
FORGET_WORKERS_AFTER = timedelta(days=1)


def reap(settings: Settings, celery: Celery) -> list[repo.Requeued]:
    """One pass: re-queue the studies of dead workers and expired leases (and lost tasks), then
    publish their tasks; publish again the callbacks whose delivery was abandoned.

    Raises when the database is unreachable; a broker that cannot be reached only skips the
    lost-task check and the publishing (the studies stay ``queued`` and a later pass
    publishes them)."""
    try:
        waiting = queue_depth(celery, settings.queue)
    except Exception as e:  # the broker is down: reap leases all the same, publish later
        log.warning("reaper: cannot read the broker queue (%s: %s); lost tasks are checked on a later pass",
                    type(e).__name__, e)
        waiting = None
    with session_scope(settings.database_url) as session:
        requeued = repo.reap_expired(
            session, stale_queued_after=settings.requeue_queued_after_seconds if waiting == 0 else None,
            dead_after=settings.worker_dead_after_seconds)
        repo.prune_workers(session, older_than=utcnow() - FORGET_WORKERS_AFTER)
    published = 0
    for item in requeued:
        log.warning("reaper: study %s: %s", item.study_id, item.reason)
        try:
            enqueue_study(celery, str(item.study_id), priority=PRIORITY_BATCH)
            published += 1
        except Exception as e:  # the study stays queued; the lost-task check publishes it later
            log.error("reaper: cannot publish the task of study %s (%s: %s); it stays queued", item.study_id,
                      type(e).__name__, e)
    if requeued:
        log.info("reaper: %d studies re-queued, %d tasks published", len(requeued), published)
    reap_callbacks(settings, celery)
    return requeued


def reap_callbacks(settings: Settings, celery: Celery) -> list:
    """Publish again the callbacks whose delivery lease expired, and those of finished jobs never
    published. Returns the job ids published."""
    with session_scope(settings.database_url) as session:
        due = repo.reap_callbacks(session, publish_grace_seconds=callback_publish_grace(settings))
    for jid in due:
        log.warning("reaper: job %s: its callback delivery was abandoned (worker gone or task lost); published again",
                    jid)
        try:
            enqueue_callback(celery, str(jid))
        except Exception as e:  # its lease runs out again and a later pass publishes it
            log.error("reaper: cannot publish the callback of job %s (%s)", jid, type(e).__name__)
    try:
        late = fire_callbacks(celery, settings.database_url)
    except Exception as e:
        log.error("reaper: cannot publish finished jobs' callbacks (%s)", type(e).__name__)
        late = []
    for jid in late:
        log.info("reaper: job %s is finished; its callback is published", jid)
    return list(due) + list(late)
