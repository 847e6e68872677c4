"""The reaper: puts abandoned studies back on the queue.

- A study in ``processing`` whose lease expired (its worker was killed, its host died, or
  it lost the database for longer than the lease) goes back to ``queued`` and its
  screening task is published again.
- A study ``queued`` for longer than ``CXR_REQUEUE_QUEUED_AFTER_SECONDS`` while the broker
  queue is empty has lost its task (a Redis restarted without persistence, a
  filesystem-broker worker killed holding it): its task is published again.

Publishing twice is harmless: a task for a study that is done, or that another live worker
holds, does nothing. The reaper runs inside the watcher (every
``CXR_REAP_INTERVAL_SECONDS``, so also under ``cxr up``) and as ``cxr reap``.
"""

from __future__ import annotations

import logging

from celery import Celery

from cxr.db import repo
from cxr.db.session import session_scope
from cxr.queue import PRIORITY_BATCH, enqueue_study, queue_depth
from cxr.settings import Settings

log = logging.getLogger(__name__)


def reap(settings: Settings, celery: Celery) -> list[repo.Requeued]:
    """One pass: re-queue expired leases (and lost tasks), then publish their tasks.

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
            session, stale_queued_after=settings.requeue_queued_after_seconds if waiting == 0 else None)
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
    return requeued
