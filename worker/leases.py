"""The worker's side of the lease: a background thread that renews every lease this process holds.

A study in ``processing`` carries its worker (``host:pid``) and a deadline
(``CXR_LEASE_SECONDS`` ahead). While the process lives, this thread pushes the deadline
forward every third of the lease, so a long batch never looks abandoned; when the process
dies, the renewals stop and the reaper re-queues its studies once the deadline passes.
A database outage is logged and retried on the next tick: the leases may expire meanwhile,
and then the first result written wins (results are unique per study and model version).
"""

from __future__ import annotations

import logging
import os
import threading

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
        self.thread = threading.Thread(target=self._run, name="cxr-lease-keeper", daemon=True)

    def _run(self) -> None:
        interval = self.settings.lease_seconds / 3
        while not self.stop.wait(interval):
            self.renew()

    def renew(self) -> int:
        try:
            with session_scope(self.settings.database_url) as session:
                return repo.renew_leases(session, worker=self.worker, lease_seconds=self.settings.lease_seconds)
        except SQLAlchemyError as e:
            log.warning("cannot renew the leases of %s (%s); retrying in %.0f s", self.worker, type(e).__name__,
                        self.settings.lease_seconds / 3)
            return 0


_lock = threading.Lock()
_keeper: LeaseKeeper | None = None
_keeper_pid: int | None = None


def ensure_lease_keeper(settings: Settings) -> str:
    """Start this process's renewal thread once (again in a forked child); returns its worker id."""
    global _keeper, _keeper_pid
    with _lock:
        if _keeper is None or _keeper_pid != os.getpid():
            _keeper = LeaseKeeper(settings, repo.worker_name())
            _keeper_pid = os.getpid()
            _keeper.thread.start()
        return _keeper.worker
