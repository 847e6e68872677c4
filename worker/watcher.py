"""Folder watcher: files dropped into the inbox become queued studies.

When is a file ready? Only when nobody is writing it:

- On Linux the watcher gets inotify events (watchdog's ``InotifyObserver``). A file that
  was created or written (``IN_CREATE``/``IN_MODIFY``) and not yet closed by its writer
  (``IN_CLOSE_WRITE``) is not ready, however long it has been quiet. After the close (or
  after it was renamed into the inbox whole), it must keep its size and modification time
  for ``CXR_WATCH_SETTLE_SECONDS``.
- A file for which no close was seen (found by the start-up scan or the periodic rescan,
  written from another host over NFS/SMB, a platform without inotify) must stay unchanged
  for the longer ``CXR_WATCH_QUIET_SECONDS``.
- Before anything is stored the content is checked for completeness
  (``cxr.completeness``: PNG IEND, JPEG EOI, DICOM elements to the end). A file that ends
  early waits until it has not changed for ``CXR_WATCH_STALLED_SECONDS``. Only then is it
  taken in (its study is rejected ``unreadable`` by the worker, with its reason) and the
  file itself is moved to the errors folder with a ``.reason.txt``, never deleted.
- A writer that stays open without writing is waited for the same way (no close event for
  ``CXR_WATCH_STALLED_SECONDS``: a lost event or a dead writer).

Temporary names (``.part``, ``.filepart``, ``.crdownload``, ``.tmp``, ``~``, dot-files,
``.~lock.*``, ``*.sb-*``, ...) and ``CXR_WATCH_IGNORE`` globs are never taken in, nor is
anything inside a folder with such a name (Safari downloads into ``film.dcm.download/``). Only
regular files are: a FIFO, socket, device or symbolic link is logged once and left alone;
a file over ``CXR_MAX_UPLOAD_MB`` is moved to the errors folder with its reason.

After intake a file leaves the inbox (deleted, or moved into ``CXR_WATCH_ARCHIVE``) only
when the stored copy is durable, the study row is committed, and the file still has the
inode, size and modification time it had while it was copied. So a restart never skips a
file and never screens one twice (a file whose row was committed just before a crash is
recognised by its sha256). While the database or the broker is down, or the disk is below
``CXR_MIN_FREE_MB``, files stay in the inbox and intake retries with doubling delays.

A file in the errors folder whose size or modification time changes (its writer resumed,
or someone put a complete copy in its place) is moved back into the inbox and taken in
again. Logs never name a file (README "Privacy"): studies by id and hash prefix, other
inbox entries by a tag, the first 10 hex digits of the sha256 of their path in the inbox.

The watcher also runs the reaper (``cxr.reaper``) every ``CXR_REAP_INTERVAL_SECONDS``.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import logging
import os
import shutil
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from celery import Celery
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from cxr.completeness import incomplete
from cxr.intake import DiskFullError, Intaken, check_free_space, register
from cxr.reaper import reap
from cxr.settings import Settings
from cxr.store import put_stream

log = logging.getLogger(__name__)

# Names writers use while a file is not finished: partial downloads and uploads (browsers,
# WinSCP, FileZilla, rsync, curl/wget), editors' swap and lock files, macOS safe-save.
TEMP_PATTERNS = (
    ".*", "*~", "~$*", "*.tmp", "*.temp", "*.part", "*.partial", "*.filepart", "*.crdownload", "*.download",
    "*.swp", "*.sb-*", "*.!ut",
)
REASON_SUFFIX = ".reason.txt"
RESCAN_SECONDS = 10.0

Sig = tuple[int, int, int]  # (inode, size in bytes, mtime in ns)


def is_candidate(path: Path, extra: Iterable[str] = ()) -> bool:
    """False for a temporary or hidden name (``TEMP_PATTERNS`` and ``extra`` globs, case-insensitive)."""
    name = path.name.lower()
    return not any(fnmatch.fnmatchcase(name, p.lower()) for p in (*TEMP_PATTERNS, *extra))


def _sig(st: os.stat_result) -> Sig:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _lsig(path: Path) -> Sig | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return _sig(st) if stat.S_ISREG(st.st_mode) else None


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFLNK: "a symbolic link"}


@dataclass
class _Pending:
    sig: Sig | None = None  # what the last poll saw
    stable_since: float = 0.0  # monotonic time since which ``sig`` has not changed
    writing: bool = False  # created or written, and no close-after-write since
    closed_sig: Sig | None = None  # the file as it was when its writer closed it (or it was renamed in)
    held: Sig | None = None  # the content was found cut short while the file looked like this
    refused: Sig | None = None  # kept in place (the errors folder could not take it) while unchanged
    retry_at: float = 0.0
    failures: int = 0
    noted: set[str] = field(default_factory=set)  # what has been logged once for this file


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: "InboxWatcher") -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.watcher.on_event(event)


class InboxWatcher:
    def __init__(self, settings: Settings, celery: Celery, *, inbox: Path | None = None) -> None:
        self.settings = settings
        self.celery = celery
        self.inbox = (inbox or settings.inbox).resolve()
        self.errors = settings.watch_errors or self.inbox.parent / "errors"
        self._excluded = [p for p in (self.errors, settings.watch_archive) if p is not None]
        self._pending: dict[Path, _Pending] = {}
        self._lock = threading.Lock()
        self.close_events = False  # True once an inotify observer runs: close-after-write is reported

    # Which paths -----------------------------------------------------------------------

    def wanted(self, path: Path) -> bool:
        """A path the watcher may take in: inside the inbox, not under the errors folder or the
        archive, and neither its name nor any folder between it and the inbox a hidden or
        temporary name (:func:`is_candidate`)."""
        try:
            rel = path.relative_to(self.inbox)
        except ValueError:
            return False
        if any(path == d or d in path.parents for d in self._excluded):
            return False
        if not all(is_candidate(Path(part), self.settings.watch_ignore) for part in rel.parts[:-1]):
            return False  # under a hidden or temporary folder (a browser's "film.dcm.download/", ".sb-*")
        return bool(rel.parts) and is_candidate(path, self.settings.watch_ignore)

    def tag(self, path: Path) -> str:
        """How logs name an inbox entry that is not a study: a hash of its path, never its name."""
        try:
            rel = path.relative_to(self.inbox)
        except ValueError:
            rel = path
        return hashlib.sha256(str(rel).encode("utf-8", "surrogateescape")).hexdigest()[:10]

    # Events (observer thread) ----------------------------------------------------------

    def on_event(self, event: FileSystemEvent) -> None:
        """Record what a watchdog event says about a file's writer."""
        if event.is_directory:
            return
        kind = event.event_type
        src = Path(os.fsdecode(event.src_path)) if event.src_path else None
        if kind in ("deleted", "moved"):
            if src is not None:
                self.forget(src)
            dest = getattr(event, "dest_path", "")
            if kind == "moved" and dest:
                self._event(Path(os.fsdecode(dest)), closed=True)  # renamed in whole
            return
        if src is None:
            return
        if kind in ("created", "modified"):
            self._event(src, writing=True)
        elif kind == "closed":
            self._event(src, closed=True)
        elif kind == "attrib":
            self._event(src, attrib=True)
        # opened / closed_no_write: readers (the watcher itself among them) change nothing

    def _event(self, path: Path, *, writing: bool = False, closed: bool = False, attrib: bool = False) -> None:
        if not self.wanted(path):
            return
        with self._lock:
            st = self._pending.setdefault(path, _Pending())
            if not self.close_events:
                return  # no close events on this platform: every file waits for the quiet period
            if writing:
                st.writing, st.closed_sig = True, None
            elif closed:
                st.writing, st.closed_sig = False, _lsig(path)
            elif attrib and not st.writing and st.closed_sig is not None:
                st.closed_sig = _lsig(path)  # chmod/utime after the close (cp -p): still closed

    def notice(self, path: Path) -> None:
        """Consider a path found by a scan (no event: the quiet period applies)."""
        if self.wanted(path):
            with self._lock:
                self._pending.setdefault(path, _Pending())

    def forget(self, path: Path) -> None:
        with self._lock:
            self._pending.pop(path, None)

    def scan(self) -> None:
        """Notice every entry in the inbox (hidden and temporary folders, the errors folder and the
        archive skipped)."""
        for root, dirs, files in os.walk(self.inbox):
            here = Path(root)
            dirs[:] = [d for d in dirs if is_candidate(Path(d), self.settings.watch_ignore)
                       and here / d not in self._excluded]
            for name in files:
                self.notice(here / name)

    # Intake (main thread) --------------------------------------------------------------

    def poll(self, now: float | None = None) -> int:
        """Take in every pending file that is ready. Returns how many were taken in."""
        now = time.monotonic() if now is None else now
        s = self.settings
        with self._lock:
            items = list(self._pending.items())
        taken = 0
        for path, st in items:
            try:
                ls = os.lstat(path)
            except FileNotFoundError:
                self.forget(path)
                continue
            except OSError as e:
                self._once(st, "lstat", logging.WARNING, "cannot look at inbox entry %s (%s); it is left alone",
                           self.tag(path), type(e).__name__)
                continue
            if stat.S_ISDIR(ls.st_mode):
                self.forget(path)
                continue
            if not stat.S_ISREG(ls.st_mode):
                kind = _KINDS.get(stat.S_IFMT(ls.st_mode), "not a regular file")
                self._once(st, "special", logging.WARNING, "inbox entry %s is %s, not a regular file: it is not "
                           "taken in and left alone (only regular files are screened)", self.tag(path), kind)
                continue
            sig = _sig(ls)
            if sig != st.sig:
                st.sig, st.stable_since = sig, now
                continue
            quiet_for = now - st.stable_since
            if now < st.retry_at or st.refused == sig:
                continue
            if st.writing:
                if quiet_for < s.watch_stalled_seconds:
                    if quiet_for >= s.watch_quiet_seconds:
                        self._once(st, "open", logging.INFO, "inbox entry %s is still open for writing and has "
                                   "not changed for %.0f s; waiting for its writer to close it", self.tag(path),
                                   quiet_for)
                    continue
                self._once(st, "stalled", logging.WARNING, "inbox entry %s has been open for writing without a "
                           "change for %.0f s (CXR_WATCH_STALLED_SECONDS); taking it in as it is",
                           self.tag(path), quiet_for)
            elif st.closed_sig == sig:
                if quiet_for < s.watch_settle_seconds:
                    continue
            elif quiet_for < s.watch_quiet_seconds:
                continue
            if ls.st_size > s.max_upload_bytes:
                self._keep(path, st, f"the file has {ls.st_size / 1048576:.1f} MB, over the "
                           f"CXR_MAX_UPLOAD_MB={s.max_upload_mb:g} MB limit; it was not taken in. Split or "
                           "compress it, or raise CXR_MAX_UPLOAD_MB, then put it in the inbox again", None)
                continue
            if st.held == sig and quiet_for < s.watch_stalled_seconds:
                continue
            if self._intake(path, st, now, quiet_for):
                taken += 1
        return taken

    def _intake(self, path: Path, st: _Pending, now: float, quiet_for: float) -> bool:
        s = self.settings
        try:  # never block (a FIFO swapped in since the lstat) and never follow a link
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            self.forget(path)
            return False
        except OSError as e:
            st.sig = None  # look again
            self._once(st, "open-failed", logging.WARNING, "cannot open inbox entry %s (%s); it is left alone",
                       self.tag(path), type(e).__name__)
            return False
        with os.fdopen(fd, "rb") as f:
            fst = os.fstat(f.fileno())
            if not stat.S_ISREG(fst.st_mode) or _sig(fst) != st.sig:
                st.sig = None
                return False
            problem = incomplete(f, fst.st_size)
            if problem and quiet_for < s.watch_stalled_seconds:
                st.held = st.sig
                self._once(st, f"held:{st.sig}", logging.INFO, "inbox entry %s looks unfinished (%s); it is not "
                           "taken in until it has not changed for %.0f s (CXR_WATCH_STALLED_SECONDS)",
                           self.tag(path), problem, s.watch_stalled_seconds)
                return False
            try:
                check_free_space(s, fst.st_size)
                f.seek(0)
                stored = put_stream(s.store_dir, f, max_bytes=s.max_upload_bytes)
                if _sig(os.fstat(f.fileno())) != st.sig:
                    st.sig = None
                    log.warning("inbox entry %s changed while it was copied; it is copied again once it is ready",
                                self.tag(path))
                    return False
                res = register(s, self.celery, stored=stored, filename=path.name, source="watch")
            except Exception as e:  # database or broker down, disk full: keep the file, retry with backoff
                st.failures += 1
                delay = min(60.0, 2.0**st.failures)
                st.retry_at = now + delay
                what = str(e) if isinstance(e, DiskFullError) else f"{type(e).__name__}: {e}"
                log.error("intake of a file failed (%s); it stays in the inbox, retry in %.0f s", what, delay)
                return False
        if problem:
            self._keep(path, st, f"{problem}. It was taken in as it is after it had not changed for "
                       f"{quiet_for:.0f} s; its study is rejected as unreadable", res)
        else:
            self._release(path, st, res)
        return True

    def _release(self, path: Path, st: _Pending, res: Intaken) -> None:
        """Take a file whose study row is committed out of the inbox: archive or delete it, but
        only if it is still exactly the file that was stored."""
        if _lsig(path) != st.sig:
            st.sig = None
            log.warning("study %s: the inbox file changed after it was stored; it stays in the inbox and is "
                        "taken in again once it is ready", res.study_id)
            return
        archive = self.settings.watch_archive
        if archive is None:
            path.unlink(missing_ok=True)
        else:
            day = archive / datetime.now(timezone.utc).strftime("%Y-%m-%d")
            day.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), _free_name(day / path.name))
        self.forget(path)

    def _keep(self, path: Path, st: _Pending, reason: str, res: Intaken | None) -> None:
        """Move a file that must not be deleted into the errors folder, with ``<name>.reason.txt``.
        If that fails it stays in the inbox, untouched until it changes."""
        sig = st.sig
        rel = path.relative_to(self.inbox)
        try:
            if _lsig(path) != sig:
                st.sig = None
                return
            folder = self.errors / rel.parent
            folder.mkdir(parents=True, exist_ok=True)
            dest = _free_name(folder / rel.name)
            _move(path, dest)
            moved = _lsig(dest)
            lines = [
                f"{rel.name}: not deleted from the inbox by the cxr-screen watcher.",
                f"Reason: {reason}.",
                *([f"Study: {res.study_id}"] if res else []),
                "What to do: if the copy was still in progress, or you have the complete file, put the complete "
                "file in place of this one (or into the inbox again): the watcher takes it in again when it "
                "changes. Otherwise delete both files.",
                f"Log tag: {self.tag(path)}",
                f"size: {moved[1] if moved else ''}",
                f"mtime_ns: {moved[2] if moved else ''}",
            ]
            _write_text(dest.with_name(dest.name + REASON_SUFFIX), "\n".join(lines) + "\n")
        except OSError as e:
            st.refused = sig
            self._once(st, "keep-failed", logging.ERROR, "inbox entry %s must be kept (%s) but cannot be moved to "
                       "%s (%s: %s); it stays in the inbox and is not taken in again until it changes",
                       self.tag(path), reason, self.errors, type(e).__name__, e)
            return
        self.forget(path)
        log.warning("inbox entry %s moved to the errors folder %s%s: %s", self.tag(path), self.errors,
                    f" (study {res.study_id})" if res else "", reason)

    def recheck_errors(self) -> int:
        """Move back into the inbox every errors-folder file that changed since it was put there
        (its size or modification time differs from its ``.reason.txt``). Returns how many."""
        if not self.errors.is_dir():
            return 0
        moved = 0
        for reason in self.errors.rglob("*" + REASON_SUFFIX):
            kept = reason.with_name(reason.name[: -len(REASON_SUFFIX)])
            recorded = _recorded(reason)
            now = _lsig(kept)
            if recorded is None or now is None or (now[1], now[2]) == recorded:
                continue
            rel = kept.relative_to(self.errors)
            try:
                (self.inbox / rel.parent).mkdir(parents=True, exist_ok=True)
                dest = _free_name(self.inbox / rel)
                _move(kept, dest)
                reason.unlink(missing_ok=True)
            except OSError as e:
                log.error("cannot move a changed file from the errors folder back into the inbox (%s: %s)",
                          type(e).__name__, e)
                continue
            moved += 1
            log.info("a file in the errors folder changed; moved back into the inbox as entry %s", self.tag(dest))
            self.notice(dest)
        return moved

    def _once(self, st: _Pending, key: str, level: int, msg: str, *args: object) -> None:
        if key not in st.noted:
            st.noted.add(key)
            log.log(level, msg, *args)

    # Running ---------------------------------------------------------------------------

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

    def start_observer(self) -> BaseObserver:
        """Start watching the inbox: inotify on Linux (with close-after-write events), watchdog's
        default elsewhere, polling when inotify is out of instances or watches."""
        handler = _Handler(self)
        if sys.platform.startswith("linux"):
            try:
                from watchdog.observers.inotify import InotifyObserver

                observer: BaseObserver = InotifyObserver(generate_full_events=True)
                observer.schedule(handler, str(self.inbox), recursive=True)
                self.close_events = True  # before the first event is handled
                observer.start()
                return observer
            except OSError as e:
                self.close_events = False
                log.warning("inotify is not available (%s); watching by polling, without close events: every "
                            "file waits CXR_WATCH_QUIET_SECONDS", e)
                observer = PollingObserver()
        else:
            observer = Observer()
        observer.schedule(handler, str(self.inbox), recursive=True)
        observer.start()
        return observer

    def run(self, stop: threading.Event, *, tick: float = 0.2) -> None:
        self.inbox.mkdir(parents=True, exist_ok=True)
        observer = self.start_observer()
        s = self.settings
        log.info("watching %s (settle %.1f s after a close, quiet %.1f s without one, close events %s; errors "
                 "folder %s)", self.inbox, s.watch_settle_seconds, s.watch_quiet_seconds,
                 "on" if self.close_events else "off", self.errors)
        # Its own thread: a broker or database that hangs must not hold up intake.
        reaper = threading.Thread(target=self._reap_loop, args=(stop,), name="cxr-reaper", daemon=True)
        reaper.start()
        try:
            self.scan()
            self.recheck_errors()
            last_scan = time.monotonic()
            while not stop.is_set():
                self.poll()
                if time.monotonic() - last_scan > RESCAN_SECONDS:
                    self.scan()
                    self.recheck_errors()
                    last_scan = time.monotonic()
                stop.wait(tick)
        finally:
            observer.stop()
            observer.join(timeout=5)
            reaper.join(timeout=10)
            log.info("watcher stopped")


def _free_name(dest: Path) -> Path:
    """``dest``, or ``stem.N.suffix`` for the first N that neither it nor its reason file uses."""
    n, out = 1, dest
    while out.exists() or out.is_symlink() or out.with_name(out.name + REASON_SUFFIX).exists():
        out = dest.with_name(f"{dest.stem}.{n}{dest.suffix}")
        n += 1
    return out


def _move(src: Path, dest: Path) -> None:
    """Rename (same filesystem: a writer still holding the file keeps writing into it), else copy
    with fsync, then remove the source."""
    try:
        os.rename(src, dest)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    tmp = dest.with_name(f".{dest.name}.cxr-tmp")
    shutil.copy2(src, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    src.unlink()


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.cxr-tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _recorded(reason: Path) -> tuple[int, int] | None:
    """(size, mtime_ns) a reason file recorded for its file, or None."""
    try:
        fields = dict(line.split(": ", 1) for line in reason.read_text("utf-8").splitlines() if ": " in line)
        return int(fields["size"]), int(fields["mtime_ns"])
    except (OSError, KeyError, ValueError):
        return None
