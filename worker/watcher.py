"""Folder watcher: files dropped into the inbox become queued studies.

watchdog reports new and changed files; a file is taken in only once its size and
modification time have stayed the same for ``watch_settle_seconds`` (so a copy still in
progress is never read half-written). Temporary names are skipped. A periodic rescan
catches events a network filesystem may not deliver, and files already in the inbox at
start-up are taken in too (catch-up after downtime).

After intake a file leaves the inbox: it is deleted, or moved into ``CXR_WATCH_ARCHIVE``
when set, only after the stored copy is durable and the study row is committed. So a
restart never skips a file (anything still in the inbox is taken in) and never screens one
twice (a file whose row was committed just before a crash is recognised by its sha256 and
not queued again). While the database or the broker is down, or the disk is below
``CXR_MIN_FREE_MB``, files stay in the inbox and intake retries with doubling delays.

The watcher also runs the reaper (``cxr.reaper``) every ``CXR_REAP_INTERVAL_SECONDS``.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from celery import Celery
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from cxr.intake import DiskFullError, check_free_space, register
from cxr.reaper import reap
from cxr.settings import Settings
from cxr.store import put_file

log = logging.getLogger(__name__)

TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", ".download", "~")
RESCAN_SECONDS = 10.0


def is_candidate(path: Path) -> bool:
    name = path.name
    return not (name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES))


@dataclass
class _Pending:
    size: int
    mtime: float
    stable_since: float
    retry_at: float = 0.0
    failures: int = 0


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: "InboxWatcher") -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        path = getattr(event, "dest_path", None) or event.src_path
        self.watcher.notice(Path(path))


class InboxWatcher:
    def __init__(self, settings: Settings, celery: Celery, *, inbox: Path | None = None) -> None:
        self.settings = settings
        self.celery = celery
        self.inbox = (inbox or settings.inbox).resolve()
        self._pending: dict[Path, _Pending | None] = {}
        self._lock = threading.Lock()

    def notice(self, path: Path) -> None:
        if is_candidate(path):
            with self._lock:
                self._pending.setdefault(path, None)

    def scan(self) -> None:
        for p in self.inbox.rglob("*"):
            if p.is_file():
                self.notice(p)

    def poll(self, now: float | None = None) -> int:
        """Take in every pending file whose size has settled. Returns how many were taken in."""
        now = time.monotonic() if now is None else now
        with self._lock:
            items = list(self._pending.items())
        taken = 0
        for path, state in items:
            try:
                st = path.stat()
            except FileNotFoundError:
                with self._lock:
                    self._pending.pop(path, None)
                continue
            if state is None or (st.st_size, st.st_mtime) != (state.size, state.mtime):
                with self._lock:
                    self._pending[path] = _Pending(size=st.st_size, mtime=st.st_mtime, stable_since=now)
                continue
            if now - state.stable_since < self.settings.watch_settle_seconds or now < state.retry_at:
                continue
            if self._intake(path, state, now):
                taken += 1
        return taken

    def _intake(self, path: Path, state: _Pending, now: float) -> bool:
        try:
            check_free_space(self.settings, state.size)
            stored = put_file(self.settings.store_dir, path)
            register(self.settings, self.celery, stored=stored, filename=path.name, source="watch")
        except Exception as e:  # database or broker down, disk full: keep the file, retry with backoff
            state.failures += 1
            delay = min(60.0, 2.0**state.failures)
            state.retry_at = now + delay
            what = str(e) if isinstance(e, DiskFullError) else f"{type(e).__name__}: {e}"
            log.error("intake of a file failed (%s); it stays in the inbox, retry in %.0f s", what, delay)
            return False
        self._release(path)
        with self._lock:
            self._pending.pop(path, None)
        return True

    def _release(self, path: Path) -> None:
        """Take a file whose study row is committed out of the inbox: archive or delete it."""
        archive = self.settings.watch_archive
        if archive is None:
            path.unlink(missing_ok=True)
            return
        day = archive / datetime.now(timezone.utc).strftime("%Y-%m-%d")
        day.mkdir(parents=True, exist_ok=True)
        dest = day / path.name
        n = 1
        while dest.exists():
            dest = day / f"{path.stem}.{n}{path.suffix}"
            n += 1
        shutil.move(str(path), dest)

    def _reap_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.reap()
            stop.wait(self.settings.reap_interval_seconds)

    def reap(self) -> None:
        """One reaper pass; a database outage is logged and the next pass tries again."""
        try:
            reap(self.settings, self.celery)
        except Exception as e:
            log.error("reaper pass failed (%s: %s); retrying in %.0f s", type(e).__name__, e,
                      self.settings.reap_interval_seconds)

    def run(self, stop: threading.Event, *, tick: float = 0.2) -> None:
        self.inbox.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        observer.schedule(_Handler(self), str(self.inbox), recursive=True)
        observer.start()
        log.info("watching %s (settle %.1f s)", self.inbox, self.settings.watch_settle_seconds)
        # Its own thread: a broker or database that hangs must not hold up intake.
        reaper = threading.Thread(target=self._reap_loop, args=(stop,), name="cxr-reaper", daemon=True)
        reaper.start()
        try:
            self.scan()
            last_scan = time.monotonic()
            while not stop.is_set():
                self.poll()
                if time.monotonic() - last_scan > RESCAN_SECONDS:
                    self.scan()
                    last_scan = time.monotonic()
                stop.wait(tick)
        finally:
            observer.stop()
            observer.join(timeout=5)
            reaper.join(timeout=10)
            log.info("watcher stopped")
