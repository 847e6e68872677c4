"""The watched folder never takes in a file that is still being written, nor loses one.

Writers are real processes (the script below, written by the test) that pause mid-file the
way stalling SMB/NFS copies and slow C-STORE writers do, under the final name or a
temporary one renamed at the end. The watcher runs with a quiet period shorter than the
pauses, so only close-after-write events and the completeness check keep partial files out.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from celery import Celery
from sqlalchemy import select

from cxr.completeness import incomplete
from cxr.db.migrate import upgrade
from cxr.db.models import Study, StudyFile
from cxr.db.session import session_scope
from cxr.intake import Intaken
from cxr.settings import Settings
from tests.badfiles import jpeg_bytes, png_bytes
from tests.dicomgen import chest_dataset, encode, structured_report, to_bytes
from tests.imagegen import chest_like
from tests.stack import Stack, clean_env, cxr, wait_until
from worker.watcher import REASON_SUFFIX, InboxWatcher, is_candidate

WRITER = r'''
"""Write SRC to DEST: pause at the given byte offsets, optionally in small chunks, then rename."""
import json, os, sys, time
src, dest, plan = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
data = open(src, "rb").read()
pauses = {int(p[0]): p[1:] for p in plan.get("pauses", [])}  # offset -> (seconds[, go-file to wait for])
chunk = int(plan.get("chunk", 0)) or len(data) or 1
chunk_pause = float(plan.get("chunk_pause", 0))
cuts = sorted(set(pauses) | set(range(0, len(data), chunk)) | {len(data)})
out = {"renamed": None}
with open(dest, "wb") as f:
    pos = 0
    for cut in cuts:
        if cut > pos:
            f.write(data[pos:cut]); f.flush(); os.fsync(f.fileno()); pos = cut
        if cut in pauses:
            print(f"paused at {cut}", flush=True)
            time.sleep(float(pauses[cut][0]))
            while len(pauses[cut]) > 1 and not os.path.exists(pauses[cut][1]):
                time.sleep(0.05)
        elif chunk_pause and cut < len(data):
            time.sleep(chunk_pause)
if plan.get("rename"):
    try:
        os.rename(dest, plan["rename"]); out["renamed"] = True
    except OSError as e:
        out["renamed"] = f"{type(e).__name__}: {e}"
print(json.dumps(out), flush=True)
'''


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def film(kind: str, seed: int) -> bytes:
    """A distinct good film of the kind (distinct bytes, so each case is its own study)."""
    if kind == "png":
        return png_bytes(chest_like(320, seed=seed))
    if kind == "jpeg":
        return jpeg_bytes(chest_like(320, seed=seed))
    if kind == "dicom":
        return to_bytes(chest_dataset(320, seed=seed))
    return encode(chest_dataset(320, seed=seed), kind)  # "j2k", "rle", "jpeg_ls", "deflated", ...


def start_writer(tmp_path: Path, data: bytes, dest: Path, **plan) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    if not script.exists():
        script.write_text(WRITER)
    src = tmp_path / "sources" / f"{sha(data)[:16]}"
    src.parent.mkdir(exist_ok=True)
    src.write_bytes(data)
    plan = {k: (str(v) if isinstance(v, Path) else v) for k, v in plan.items()}
    return subprocess.Popen([sys.executable, str(script), str(src), str(dest), json.dumps(plan)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def studies(db_url: str) -> list[Study]:
    with session_scope(db_url) as s:
        rows = s.scalars(select(Study)).all()
        s.expunge_all()
    return rows


def in_inbox(inbox: Path, errors: Path) -> list[Path]:
    return [p for p in inbox.iterdir() if p != errors]


def stored_files(db_url: str) -> dict[str, object]:
    """sha256 -> study id of every file recorded (a study may hold several copies)."""
    with session_scope(db_url) as s:
        return dict(s.execute(select(StudyFile.sha256, StudyFile.study_id)).all())


# Unit: names and completeness ----------------------------------------------------------


def test_temporary_names_of_every_common_convention_are_ignored(monkeypatch):
    temp = ["film.dcm.filepart", "film.dcm.part", "FILM.DCM.PART", "film.partial", "film.png.crdownload",
            "film.tmp", "film.dcm~", ".film.dcm", ".film.dcm.Xy12Ab", ".~lock.film.dcm#", "film.dcm.sb-1a2b-Cd3",
            "film.download", "~$film.dcm", "film.swp", "film.temp"]
    assert not [n for n in temp if is_candidate(Path(n))]
    assert all(is_candidate(Path(n)) for n in ("film.dcm", "IM000001", "chest.png", "part.dcm", "tmp.jpg"))
    monkeypatch.setenv("CXR_WATCH_IGNORE", "*.uploading, INCOMING_*")
    extra = Settings().watch_ignore
    assert extra == ["*.uploading", "INCOMING_*"]
    assert not is_candidate(Path("film.dcm.uploading"), extra) and not is_candidate(Path("incoming_1.dcm"), extra)
    assert is_candidate(Path("film.dcm"), extra)


def test_files_inside_temporary_or_hidden_folders_are_ignored(tmp_path, monkeypatch):
    """A browser or safe-save writes inside a folder with a temporary name (Safari's
    "film.dcm.download/film.dcm", macOS "*.sb-*", a ".tmp" staging folder) and moves the
    file out when done: nothing in such a folder is taken in, by events or by the scan."""
    monkeypatch.setenv("CXR_WATCH_IGNORE", "staging_*")
    settings, w = make_watcher(tmp_path)
    inbox = settings.inbox
    inside = ["film.dcm.download/film.dcm", "upload.tmp/a.png", "folder.sb-1a2b-Cd3/film.dcm", ".sync/film.dcm",
              "site/film.partial/IM0001", "staging_01/film.dcm"]
    outside = ["film.dcm", "site/ward 3/IM0001", "download/film.png", "tmp/film.jpg"]
    for rel in inside + outside:
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(b"x")
    assert [r for r in inside if w.wanted(inbox / r)] == []
    assert [r for r in outside if not w.wanted(inbox / r)] == []
    w.scan()
    assert sorted(str(p.relative_to(inbox)) for p in w._pending) == sorted(outside)


@pytest.mark.parametrize("kind", ["png", "jpeg", "dicom", "j2k", "rle", "jpeg_ls", "deflated", "implicit",
                                  "big_endian"])
def test_completeness_finds_every_cut(kind):
    data = film(kind, seed=7)
    assert incomplete(io.BytesIO(data), len(data)) is None
    cuts = sorted({*range(0, 300), *np.linspace(300, len(data) - 1, 200).astype(int), *range(len(data) - 300,
                                                                                              len(data))})
    # Deflated: the byte after the deflate stream only pads the file to an even length; without it
    # the data set is whole.
    padding = {len(data) - 1} if kind == "deflated" else set()
    missed = [n for n in cuts if incomplete(io.BytesIO(data[:n]), n) is None and n not in padding]
    assert missed == [], f"{kind}: cuts at {missed[:10]} look complete"


@pytest.mark.parametrize("kind", ["dicom", "j2k", "rle", "implicit", "big_endian"])
@pytest.mark.parametrize("trailer", [b"\0", b"\0\0\0", b"\r\n", b"trailer", b"-- end of file --\n", b"\0" * 513],
                         ids=["odd_zero", "three_zeros", "crlf", "7_bytes_text", "text_line", "513_zeros"])
def test_bytes_after_the_pixel_data_do_not_make_a_dicom_look_cut(kind, trailer):
    """Writers and transfer tools that append a stray byte, a line end or sector padding after
    the data set leave a film the worker screens: it must not wait CXR_WATCH_STALLED_SECONDS
    and end in the errors folder as 'cut short'. A cut inside the Pixel Data still shows."""
    from worker.screening.pipeline import gated_pixels

    data = film(kind, seed=9) + trailer
    assert incomplete(io.BytesIO(data), len(data)) is None
    gated_pixels(data)  # and the worker does screen it
    cut = film(kind, seed=9)[:-3]
    assert incomplete(io.BytesIO(cut), len(cut)) is not None


@pytest.mark.parametrize("implicit", [True, False])
def test_completeness_finds_cuts_of_a_bare_data_set(implicit):
    """A bare DICOM data set (no preamble, 'DICM' or file meta) is taken in by the watcher like
    any DICOM, so a stalled copy of one must look cut too (it was called complete, taken in
    truncated and deleted from the inbox while its writer still held it)."""
    from tests.test_dicom_readers import bare

    data = bare(chest_dataset(128, seed=3), implicit=implicit)
    assert incomplete(io.BytesIO(data), len(data)) is None
    assert incomplete(io.BytesIO(data + b"\0"), len(data) + 1) is None
    cuts = sorted({*range(256, 700), *np.linspace(700, len(data) - 1, 300).astype(int),
                   *range(len(data) - 300, len(data))})
    missed = [n for n in cuts if incomplete(io.BytesIO(data[:n]), n) is None]
    # Only a cut exactly between two header elements before Rows cannot be told from a whole
    # object without pixels (an SR, say): a handful of byte positions in the first few hundred.
    assert len(missed) <= 8 and all(n < 600 for n in missed), missed


@pytest.mark.parametrize("preamble", [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"PK\x03\x04", b"II*\x00"],
                         ids=["png", "jpeg", "zip", "tiff"])
def test_completeness_checks_dicm_before_other_signatures(preamble):
    """A Part 10 preamble may start with any signature (dual-personality files): the DICM marker
    decides, as in the sniffer, or a whole DICOM is walked as a PNG and held as 'cut'."""
    data = to_bytes(chest_dataset(128, seed=2))
    data = preamble + data[len(preamble):]
    assert incomplete(io.BytesIO(data), len(data)) is None
    cut = data[:-5]
    assert "DICOM" in (incomplete(io.BytesIO(cut), len(cut)) or "")


def test_completeness_of_other_content():
    ds = chest_dataset(320, seed=8)
    del ds.PixelData
    no_pixels = to_bytes(ds)  # an image header cut exactly before its Pixel Data element
    assert "before its Pixel Data" in incomplete(io.BytesIO(no_pixels), len(no_pixels))
    report = structured_report()  # no Rows, no pixels: whole
    assert incomplete(io.BytesIO(report), len(report)) is None
    text = b"just some notes, not an image\n" * 10
    assert incomplete(io.BytesIO(text), len(text)) is None  # not an image: the worker says so
    for short in (b"", b"\0" * 100, b"\x89PN", b"\xff\xd8"):
        assert incomplete(io.BytesIO(short), len(short)) is not None


# In-process watcher with a real inotify observer ---------------------------------------


def make_watcher(tmp_path: Path, **overrides) -> tuple[Settings, InboxWatcher]:
    opts = dict(home=tmp_path / "var", inbox=tmp_path / "inbox", watch_settle_seconds=0.2, watch_quiet_seconds=0.5,
                watch_stalled_seconds=60)
    opts.update(overrides)
    settings = Settings(**opts)
    settings.ensure_dirs()
    upgrade(settings.database_url)
    celery = Celery(broker="filesystem://")
    qdir = str(settings.broker_dir / "queue")
    celery.conf.broker_transport_options = {"data_folder_in": qdir, "data_folder_out": qdir,
                                            "control_folder": qdir + "-control"}
    return settings, InboxWatcher(settings, celery)


class Running:
    def __init__(self, watcher: InboxWatcher) -> None:
        self.watcher, self.stop = watcher, threading.Event()
        self.thread = threading.Thread(target=watcher.run, args=(self.stop,), kwargs={"tick": 0.05}, daemon=True)

    def __enter__(self) -> "Running":
        self.thread.start()
        wait_until(lambda: self.watcher.close_events, timeout=10)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "the watcher did not stop"


def test_fifo_socket_links_and_oversized_files_never_block_intake(tmp_path, caplog):
    settings, w = make_watcher(tmp_path, max_upload_mb=0.2)
    inbox, outside = settings.inbox, tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(film("png", 1))
    os.mkfifo(inbox / "pipe_DOE_JOHN.dcm")  # a FIFO nobody writes: opening it for reading would block
    os.mkfifo(inbox / "pipe2.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(inbox / "socket_DOE.dcm"))
    (inbox / "link_DOE.png").symlink_to(outside / "secret.png")
    try:  # a device node needs CAP_MKNOD: a member of the kind where the test may create one
        os.mknod(inbox / "device.dcm", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        devices = ["device.dcm"]
    except PermissionError:
        devices = []
    (inbox / "dangling.png").symlink_to(outside / "missing.png")
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (600, 600), dtype=np.uint8))
    assert len(big) > settings.max_upload_bytes
    (inbox / "big_DOE_JOHN.png").write_bytes(big)
    good = {f"good{i}.{ext}": film(kind, 10 + i) for i, (kind, ext) in enumerate([("png", "png"), ("dicom", "dcm"),
                                                                                 ("jpeg", "jpg")])}
    for name, data in good.items():
        (inbox / name).write_bytes(data)
    try:
        with caplog.at_level(logging.INFO, logger="worker.watcher"), Running(w):
            wait_until(lambda: len(studies(settings.database_url)) == 3, timeout=30)
            late = film("png", 20)
            (inbox / "late.png").write_bytes(late)  # intake goes on
            wait_until(lambda: len(studies(settings.database_url)) == 4, timeout=30)
            wait_until(lambda: (settings.inbox.parent / "errors" / "big_DOE_JOHN.png").exists(), timeout=30)
            time.sleep(1.0)  # many more polls: still logged once
    finally:
        sock.close()
    got = {st.filename: st.sha256 for st in studies(settings.database_url)}
    assert got == {**{n: sha(d) for n, d in good.items()}, "late.png": sha(late)}
    left = sorted(p.name for p in inbox.iterdir())
    assert left == sorted(["dangling.png", "link_DOE.png", "pipe2.png", "pipe_DOE_JOHN.dcm", "socket_DOE.dcm",
                           *devices])
    assert (outside / "secret.png").exists()
    errors = settings.inbox.parent / "errors"
    assert (errors / "big_DOE_JOHN.png").read_bytes() == big
    reason = (errors / f"big_DOE_JOHN.png{REASON_SUFFIX}").read_text()
    assert "CXR_MAX_UPLOAD_MB" in reason
    log = caplog.text
    assert log.count("is a FIFO") == 2 and log.count("is a socket") == 1 and log.count("is a symbolic link") == 2
    assert log.count("is a character device") == len(devices)
    assert "DOE" not in log and "pipe" not in log and "good" not in log


@pytest.mark.parametrize("inside", [False, True], ids=["errors_beside_the_inbox", "errors_inside_the_inbox"])
def test_truncated_file_is_held_then_kept_in_errors_and_taken_again_when_it_changes(tmp_path, inside):
    errors = tmp_path / "inbox" / "errors" if inside else tmp_path / "errors"  # inside: as docker-compose.yml sets it
    settings, w = make_watcher(tmp_path, watch_stalled_seconds=2.0, **({"watch_errors": errors} if inside else {}))
    inbox = settings.inbox
    whole = {"cut.png": film("png", 30), "cut.dcm": film("dicom", 31), "cut.jpg": film("jpeg", 32)}
    resumed = film("rle", 33)
    with Running(w):
        for name, data in whole.items():
            (inbox / name).write_bytes(data[: len(data) // 2])  # closed, but cut short
        (inbox / "resumed.dcm").write_bytes(resumed[:1000])  # an upload that resumes after a pause
        time.sleep(1.0)
        assert studies(settings.database_url) == []  # held: not taken in, nothing partial recorded
        with open(inbox / "resumed.dcm", "ab") as f:
            f.write(resumed[1000:])
        wait_until(lambda: len(studies(settings.database_url)) == 4, timeout=30)
        wait_until(lambda: not in_inbox(inbox, errors), timeout=30)
        rows = {st.filename: st for st in studies(settings.database_url)}
        assert rows["resumed.dcm"].sha256 == sha(resumed)
        for name, data in whole.items():
            kept = errors / name
            assert kept.read_bytes() == data[: len(data) // 2] == Path(rows[name].stored_path).read_bytes()
            reason = (errors / f"{name}{REASON_SUFFIX}").read_text()
            assert str(rows[name].id) in reason and "ends" in reason
        # The rest arrives (or someone puts the complete file in its place): taken in again.
        for name, data in whole.items():
            with open(errors / name, "ab") as f:
                f.write(data[len(data) // 2:])
        assert w.recheck_errors() == 3
        wait_until(lambda: len(stored_files(settings.database_url)) == 7, timeout=30)
        wait_until(lambda: not in_inbox(inbox, errors), timeout=30)
    files = stored_files(settings.database_url)
    assert {sha(d) for d in whole.values()} <= set(files)
    # The complete DICOM has the SOP Instance UID of its cut copy: it joins that study (cxr.intake),
    # which the worker screens from it once the cut copy is rejected.
    assert files[sha(whole["cut.dcm"])] == rows["cut.dcm"].id
    assert len(studies(settings.database_url)) == 6
    assert list(errors.iterdir()) == []


def test_an_open_writer_is_waited_for_however_long_it_is_quiet(tmp_path):
    """Content the completeness check cannot judge (it looks whole at the pause): only the
    close-after-write event keeps the watcher from taking the first part (quiet period 0.5 s,
    pauses 2.5 s)."""
    settings, w = make_watcher(tmp_path)
    png = film("png", 45)
    cases = {
        "notes.txt": (b"not an image, but a file all the same\n" * 400, 2000),
        "trailer.png": (png + b"\0" * 5000, len(png)),  # a whole PNG at the pause, more bytes after it
        "many_pauses.bin": (bytes(range(256)) * 200, 500),
    }
    with Running(w):
        writers = {name: start_writer(tmp_path, data, settings.inbox / name, pauses=[(at, 2.5)])
                   for name, (data, at) in cases.items()}
        for p in writers.values():
            finish(p)
        wait_until(lambda: len(studies(settings.database_url)) == len(cases)
                   and not any(settings.inbox.iterdir()), timeout=30)
        time.sleep(0.5)
    got = {st.filename: st.sha256 for st in studies(settings.database_url)}
    assert got == {name: sha(data) for name, (data, _) in cases.items()}


def test_a_file_that_must_be_kept_stays_in_place_when_the_errors_folder_is_unusable(tmp_path, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    settings, w = make_watcher(tmp_path, watch_stalled_seconds=0.5, watch_errors=blocker / "errors")
    data = film("png", 40)[:5000]
    (settings.inbox / "cut.png").write_bytes(data)
    with caplog.at_level(logging.ERROR, logger="worker.watcher"), Running(w):
        wait_until(lambda: len(studies(settings.database_url)) == 1, timeout=30)
        time.sleep(1.5)
    assert (settings.inbox / "cut.png").read_bytes() == data  # never deleted
    assert len(studies(settings.database_url)) == 1 and caplog.text.count("cannot be moved") == 1


def test_a_file_changed_after_it_was_stored_is_not_deleted(tmp_path):
    settings, w = make_watcher(tmp_path, watch_quiet_seconds=0)
    path = settings.inbox / "film.png"
    first, second = film("png", 50), film("png", 51)
    path.write_bytes(first)
    w.scan()
    w.poll(now=0.0)
    st = w._pending[path]
    stored_sig = st.sig
    path.write_bytes(second)  # a writer reopened it after the copy was made
    w._release(path, st, Intaken(study_id=uuid.uuid4(), filename="film.png", status="queued", created=True))
    assert path.read_bytes() == second and st.sig != stored_sig
    assert w.poll(now=1.0) == 0 and w.poll(now=2.0) == 1  # taken in again, as it is now
    assert [s.sha256 for s in studies(settings.database_url)] == [sha(second)]


# Real processes: slow writers through `cxr watch` and `cxr worker` ---------------------


def test_stalled_copies_and_temporary_names_end_done_from_their_complete_bytes(tmp_path, tiny_bundle):
    """A dozen writers of the kind: pauses (3 s, several, inside the first bytes, before the
    first byte), many small chunks, temporary names renamed at the end, a file renamed in from
    outside, a copy already under way when the watcher starts. The quiet period (1 s) is
    shorter than every pause. Each ends `done` from its complete bytes, every rename
    succeeds, no partial study exists, nothing is left in the inbox or the errors folder."""
    home, inbox, outside, logs = tmp_path / "var", tmp_path / "inbox", tmp_path / "outside", tmp_path / "logs"
    for d in (inbox, outside, logs):
        d.mkdir()
    env = clean_env(CXR_HOME=str(home), CXR_INBOX=str(inbox), CXR_CHECKPOINT=str(tiny_bundle),
                    CXR_WATCH_SETTLE_SECONDS="0.3", CXR_WATCH_QUIET_SECONDS="1", CXR_WATCH_STALLED_SECONDS="120",
                    CXR_WATCH_IGNORE="*.uploading")
    cxr("db", "upgrade", env=env)
    cases: dict[str, tuple[bytes, dict]] = {}  # final name -> (bytes, writer plan)

    def case(name: str, data: bytes, temp: str | None = None, folder: Path = inbox, **plan) -> None:
        cases[name] = (data, {"dest": folder / (temp or name), "rename": inbox / name if temp or folder != inbox
                              else None, **plan})

    half = lambda d: len(d) // 2  # noqa: E731
    d = film("png", 60); case("pause_half.png", d, pauses=[(half(d), 3)])
    d = film("dicom", 61); case("two_pauses.dcm", d, pauses=[(len(d) // 10, 1.5), (len(d) * 9 // 10, 2)])
    d = film("jpeg", 62); case("pause_early.jpg", d, pauses=[(100, 3)])
    d = film("j2k", 63); case("pause_preamble.dcm", d, pauses=[(60, 3)])
    d = film("rle", 64); case("pause_empty.dcm", d, pauses=[(0, 3)])
    d = film("png", 65); case("chunks.png", d, chunk=4096, chunk_pause=0.1, pauses=[(half(d), 2)])
    d = film("dicom", 66); case("upload.dcm", d, temp="upload.dcm.filepart", pauses=[(half(d), 3)])
    temps = ["{}.part", "{}.crdownload", "{}.tmp", "{}~", ".{}.Ab12Cd", "{}.sb-12ab-Cd", "{}.uploading", "{}.partial"]
    for i, temp in enumerate(temps):  # the last but one: CXR_WATCH_IGNORE
        d = film("png", 70 + i); case(f"temp{i}.png", d, temp=temp.format(f"temp{i}.png"), pauses=[(half(d), 1.5)])
    d = film("jpeg", 80); case("renamed_in.jpg", d, folder=outside, pauses=[(half(d), 1.5)])
    go = tmp_path / "go"  # the copy under way at start-up resumes when this exists
    d = film("dicom", 81); case("before_start.dcm", d, pauses=[(half(d), 0, str(go))])

    stack = Stack(log_dir=logs, env=env)
    writers: dict[str, subprocess.Popen] = {}
    try:
        data, plan = cases["before_start.dcm"]  # under way before the watcher starts
        writers["before_start.dcm"] = start_writer(tmp_path, data, **plan)
        assert writers["before_start.dcm"].stdout.readline().startswith("paused")
        stack.start("watcher", "watch")
        stack.start("worker", "worker")
        wait_until(lambda: "watching" in (logs / "watcher.log").read_text(), timeout=60, describe=stack.logs)
        assert "close events on" in (logs / "watcher.log").read_text()
        time.sleep(3)  # the start-up scan has seen the half-written file for longer than the quiet period
        go.touch()
        for name, (data, plan) in cases.items():
            if name not in writers:
                writers[name] = start_writer(tmp_path, data, **plan)
        outcomes = {name: finish(p) for name, p in writers.items()}
        db_url = f"sqlite:///{home / 'cxr.db'}"

        def all_done():
            stack.assert_running()
            rows = studies(db_url)
            return rows if len(rows) >= len(cases) and all(r.status in ("done", "rejected", "failed")
                                                           for r in rows) else None

        rows = wait_until(all_done, timeout=180, interval=1.0, describe=stack.logs)
        wait_until(lambda: not any(inbox.iterdir()), timeout=30, describe=stack.logs)
    finally:
        stack.stop()
        for p in writers.values():
            if p.poll() is None:
                p.kill()
    for name, (data, plan) in cases.items():
        if plan["rename"]:
            assert outcomes[name]["renamed"] is True, (name, outcomes[name])
    got = {r.filename: r for r in rows}
    assert sorted(got) == sorted(cases) and len(rows) == len(cases), "a partial or extra study exists"
    for name, (data, _) in cases.items():
        st = got[name]
        assert (st.status, st.sha256) == ("done", sha(data)), (name, st.status, st.error)
        assert sha(Path(st.stored_path).read_bytes()) == sha(data)
    assert not (tmp_path / "errors").exists() or list((tmp_path / "errors").iterdir()) == []
    watcher_log = (logs / "watcher.log").read_text()
    assert not [n for n in cases if n in watcher_log]
