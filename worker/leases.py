"""The worker's side of leases and liveness: one background thread per worker process.

- **Leases.** A study in ``processing`` carries its worker (``host:pid``) and a deadline
  (``CXR_LEASE_SECONDS`` ahead). While the process lives, the thread pushes the deadline
  forward every third of the lease, so a long batch never looks abandoned.
- **Heartbeat.** Every ``CXR_WORKER_HEARTBEAT_SECONDS`` it writes the process's row in
  ``workers``. The reaper treats a worker silent for ``CXR_WORKER_DEAD_AFTER_SECONDS`` as dead
  and re-queues what it held without waiting for the lease to run out.
- **Deliveries.** Tasks the process has taken from the broker but not started (Celery's
  prefetch, ``task_received``) are noted on their ``queued`` studies (:func:`note_delivery`,
  written in batches by this thread), so the reaper knows which tasks died with a dead worker.

A database outage is logged and retried on the next tick: the leases may expire meanwhile,
and then the first result written wins (results are unique per study and model version).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid

from sqlalchemy.exc import SQLAlchemyError

from cxr.db import repo
from cxr.db.session import session_scope
from cxr.settings import Settings

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, settings: Settings, worker: str) -> None:
        self.settings = settings
        self.worker = worker
        self.stop = threading.Event()
        self.delivered: queue.SimpleQueue[uuid.UUID] = queue.SimpleQueue()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._run, name="cxr-lease-keeper", daemon=True)

    def _run(self) -> None:
        renew_every = self.settings.lease_seconds / 3
        beat_every = self.settings.worker_heartbeat_seconds
        next_beat = time.monotonic() + beat_every  # the first heartbeat was written before the thread started
        next_renew = time.monotonic() + renew_every
        while not self.stop.is_set():
            self.wake.wait(max(0.0, min(next_beat, next_renew) - time.monotonic()))
            self.wake.clear()
            self.flush_deliveries()
            now = time.monotonic()
            if now >= next_beat:
                self.beat()
                next_beat = now + beat_every
            if now >= next_renew:
                self.renew()
                next_renew = now + renew_every

    def beat(self) -> None:
        try:
            with session_scope(self.settings.database_url) as session:
                repo.heartbeat(session, worker=self.worker)
        except SQLAlchemyError as e:
            log.warning("cannot write the heartbeat of %s (%s); retrying in %.0f s", self.worker, type(e).__name__,
                        self.settings.worker_heartbeat_seconds)

    def renew(self) -> int:
        try:
            with session_scope(self.settings.database_url) as session:
                return repo.renew_leases(session, worker=self.worker, lease_seconds=self.settings.lease_seconds)
        except SQLAlchemyError as e:
            log.warning("cannot renew the leases of %s (%s); retrying in %.0f s", self.worker, type(e).__name__,
                        self.settings.lease_seconds / 3)
            return 0

    def flush_deliveries(self) -> int:
        ids: list[uuid.UUID] = []
        while True:
            try:
                ids.append(self.delivered.get_nowait())
            except queue.Empty:
                break
        if not ids:
            return 0
        try:
            with session_scope(self.settings.database_url) as session:
                return repo.mark_delivered(session, worker=self.worker, study_ids=ids)
        except SQLAlchemyError as e:  # the marks are a shortcut for the reaper; without them it waits longer
            log.warning("cannot note %d delivered tasks of %s (%s)", len(ids), self.worker, type(e).__name__)
            return 0


_lock = threading.Lock()
_keeper: LeaseKeeper | None = None
_keeper_pid: int | None = None


def ensure_lease_keeper(settings: Settings) -> str:
    """Start this process's lease/heartbeat thread once (again in a forked child); returns its worker id."""
    global _keeper, _keeper_pid
    with _lock:
        if _keeper is None or _keeper_pid != os.getpid():
            _keeper = LeaseKeeper(settings, repo.worker_name())
            _keeper_pid = os.getpid()
            _keeper.beat()  # alive from now on, before any lease or delivery mark names this worker
            _keeper.thread.start()
        return _keeper.worker


def note_delivery(settings: Settings, study_id: str) -> None:
    """This process took ``study_id``'s task from the broker (not started yet); recorded shortly
    by the keeper thread."""
    ensure_lease_keeper(settings)
    try:
        _keeper.delivered.put(uuid.UUID(study_id))
    except ValueError:
        return
    _keeper.wake.set()
