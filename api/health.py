"""What GET /health answers: the state of the database, the broker and the workers, checked
in a background thread every CXR_HEALTH_INTERVAL_SECONDS with short timeouts.

A health request never waits on the database or the broker and takes neither a thread nor a
pooled connection: any number of probes at once (load balancers, Kubernetes, monitoring)
cost one check per interval. The checks use their own connections (a database engine
without a pool, a Celery app of their own), never the pools requests use.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

from cxr import __version__
from cxr.bundle import BundleError, read_meta
from cxr.registry import resolve_bundle
from cxr.settings import Settings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 2  # database connect / statement, broker connect
PING_TIMEOUT_SECONDS = 1.0  # how long workers have to answer the Celery ping
STALE_CONTROL_SECONDS = 60.0  # filesystem broker: a control message nobody took in this long is for a dead worker


def _probe_engine(database_url: str):
    """An engine without a pool and with short timeouts, for the checks alone."""
    backend = make_url(database_url).get_backend_name()
    if backend == "sqlite":
        args: dict[str, Any] = {"timeout": CONNECT_TIMEOUT_SECONDS}
    elif backend == "postgresql":
        args = {"connect_timeout": CONNECT_TIMEOUT_SECONDS,
                "options": f"-c statement_timeout={CONNECT_TIMEOUT_SECONDS * 1000}"}
    else:
        args = {}
    return create_engine(database_url, poolclass=NullPool, connect_args=args, hide_parameters=True)


class HealthMonitor:
    """Runs the checks in a daemon thread; ``report()`` gives the last result.

    Each round: ``SELECT 1`` on a fresh database connection, a fresh broker connection, the
    active model version (only when the database answered), then a Celery ping on that
    broker connection (workers have PING_TIMEOUT_SECONDS to answer). Database and broker
    states are published before the ping, so they are never held up by it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._state: dict[str, Any] = {}
        self._checked_at: float | None = None  # time.monotonic() of the last finished round
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="cxr-health", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def max_age_seconds(self) -> float:
        """Older than this, the last result is stale (the checking thread is stuck): 503."""
        return 3 * self.settings.health_interval_seconds + 3 * CONNECT_TIMEOUT_SECONDS + PING_TIMEOUT_SECONDS

    def report(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body): 200 when the database and the broker answered the last
        check; 503 when either did not, before the first check ("starting"), or when the
        last check is older than max_age_seconds ("stale")."""
        with self._lock:
            state, checked_at = dict(self._state), self._checked_at
        if checked_at is None:
            return 503, {"status": "starting", "detail": "the first health check has not finished yet",
                         "version": __version__}
        age = time.monotonic() - checked_at
        ok = state.get("database") == "ok" and state.get("broker") == "ok"
        status = "ok" if ok else "degraded"
        if age > self.max_age_seconds:
            ok, status = False, "stale"
        return (200 if ok else 503), {"status": status, **state, "checked_seconds_ago": round(age, 1),
                                      "version": __version__}

    # --- the checking thread -----------------------------------------------------------
    def _run(self) -> None:
        from cxr.queue import make_celery

        engine = _probe_engine(self.settings.database_url)
        celery = make_celery(self.settings)  # its own connection and producer pools
        try:
            while not self._stop.is_set():
                self.check_once(engine, celery)
                self._stop.wait(self.settings.health_interval_seconds)
        finally:
            engine.dispose()

    def check_once(self, engine, celery) -> None:
        """One round of checks; failures are recorded in the state (and logged when a part's
        state changes), never raised."""
        state: dict[str, Any] = {"workers": self._state.get("workers"), "model_version": None}
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            state["database"] = "ok"
        except Exception as e:  # recorded, not raised: reporting what is down is this thread's job
            state["database"] = f"error: {type(e).__name__}"
        conn = celery.connection_for_write()
        try:
            try:
                conn.ensure_connection(max_retries=1, interval_start=0, timeout=CONNECT_TIMEOUT_SECONDS)
                state["broker"] = "ok"
            except Exception as e:  # recorded, not raised
                state["broker"] = f"error: {type(e).__name__}"
                state["workers"] = None
            if state["database"] == "ok":
                try:
                    path = resolve_bundle(self.settings)
                    state["model_version"] = read_meta(path).version if path else None
                    if path is None:
                        state["model_error"] = "no model bundle configured"
                except (BundleError, OSError) as e:
                    state["model_error"] = str(e)
                except Exception as e:  # the registry read failed although SELECT 1 worked: recorded
                    state["model_error"] = f"cannot read the model registry: {type(e).__name__}"
            self._publish(state)
            if state["broker"] == "ok":
                try:
                    state["workers"] = len(celery.control.ping(timeout=PING_TIMEOUT_SECONDS, connection=conn) or [])
                except Exception as e:  # recorded, not raised
                    state["workers"] = None
                    state["workers_error"] = type(e).__name__
                self._publish(state)
                if self.settings.uses_filesystem_broker:
                    prune_dead_pidbox_messages(self.settings.broker_dir / "queue")
        finally:
            conn.release()

    def _publish(self, state: dict[str, Any]) -> None:
        with self._lock:
            before = self._state
            self._state, self._checked_at = dict(state), time.monotonic()
        for part in ("database", "broker"):
            was, now = before.get(part), state.get(part)
            if now != was and now != "ok":
                log.warning("health: the %s is down (%s)", part, now)
            elif now != was and was is not None:
                log.info("health: the %s is back", part)


def prune_dead_pidbox_messages(queue_dir: Path, *, older_than: float = STALE_CONTROL_SECONDS) -> int:
    """Filesystem broker: delete remote-control messages (``<ms>_<uuid>.<worker>.celery.pidbox.msg``)
    older than ``older_than`` seconds; returns how many.

    The ping is broadcast to every worker that ever bound its control queue; a worker that
    was killed never unbinds it, so each ping leaves a file there that nobody will read. A
    live worker takes its control messages within a poll interval (and a ping expires after
    PING_TIMEOUT_SECONDS anyway), so a file this old is addressed to a dead worker."""
    cutoff = time.time() - older_than
    removed = 0
    try:
        entries = list(os.scandir(queue_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not entry.name.endswith(".celery.pidbox.msg"):
            continue
        try:
            if entry.stat().st_mtime < cutoff:
                os.remove(entry.path)
                removed += 1
        except FileNotFoundError:  # taken meanwhile
            continue
    if removed:
        log.debug("health: removed %d control message(s) addressed to workers that are gone", removed)
    return removed


_monitors: dict[int, HealthMonitor] = {}
_monitors_lock = threading.Lock()


def monitor_for(settings: Settings) -> HealthMonitor:
    """The process's monitor for these settings, started when first asked for."""
    with _monitors_lock:
        monitor = _monitors.get(id(settings))
        if monitor is None:
            monitor = _monitors[id(settings)] = HealthMonitor(settings)
            monitor.start()
        return monitor
