"""Store, watcher and CLI behaviour that needs no running services."""

from __future__ import annotations

import json
from pathlib import Path

from celery import Celery
from sqlalchemy import select

from cxr.db.migrate import upgrade
from cxr.db.models import Study
from cxr.db.session import session_scope
from cxr.settings import Settings
from cxr.store import put_file, safe_filename
from tests.imagegen import write_png
from tests.stack import clean_env, cxr
from worker.watcher import InboxWatcher, is_candidate


def test_safe_filename_never_a_path():
    assert safe_filename("../../etc/passwd") == "passwd"
    assert safe_filename("C:\\evil\\..\\x.png") == "x.png"
    assert safe_filename("..") == "unnamed"
    assert safe_filename(None) == "unnamed"


def test_store_is_content_addressed(tmp_path):
    a = write_png(tmp_path / "a.png", seed=1)
    b = tmp_path / "b.png"
    b.write_bytes(a.read_bytes())
    s1, s2 = put_file(tmp_path / "store", a), put_file(tmp_path / "store", b)
    assert s1 == s2 and s1.path.read_bytes() == a.read_bytes()


def test_temporary_names_are_skipped():
    assert is_candidate(Path("film.dcm"))
    assert not any(is_candidate(Path(n)) for n in (".film.dcm", "film.dcm.part", "film.tmp", "film.png~"))


def test_watcher_waits_for_size_to_settle_and_stores_once(tmp_path):
    settings = Settings(home=tmp_path / "var", inbox=tmp_path / "inbox", watch_settle_seconds=1.0,
                        watch_quiet_seconds=1.0)  # no observer here: no close events, the quiet period applies
    settings.ensure_dirs()
    upgrade(settings.database_url)
    # A real filesystem broker: the watcher's enqueue lands in the queue folder.
    celery = Celery(broker="filesystem://")
    qdir = str(settings.broker_dir / "queue")
    celery.conf.broker_transport_options = {"data_folder_in": qdir, "data_folder_out": qdir,
                                            "control_folder": qdir + "-control"}
    w = InboxWatcher(settings, celery)
    growing = settings.inbox / "growing.png"
    growing.write_bytes(b"\x89PNG")  # a copy still in progress
    w.scan()
    assert w.poll(now=0.0) == 0  # first sight: remember the size
    growing.write_bytes(write_png(tmp_path / "full.png").read_bytes())
    assert w.poll(now=0.5) == 0  # size changed: wait again
    assert w.poll(now=1.0) == 0  # not settled long enough
    assert w.poll(now=2.0) == 1
    assert not growing.exists()
    dup = settings.inbox / "again.png"
    dup.write_bytes((tmp_path / "full.png").read_bytes())
    w.scan()
    w.poll(now=3.0)
    assert w.poll(now=5.0) == 1
    with session_scope(settings.database_url) as s:
        studies = s.scalars(select(Study)).all()
    assert [(st.filename, st.source, st.status) for st in studies] == [("growing.png", "watch", "queued")]
    assert len(list((settings.broker_dir / "queue").iterdir())) == 1  # the duplicate was not queued again


def test_predict_bad_file_never_aborts_and_exit_code(tmp_path, tiny_bundle):
    (tmp_path / "in").mkdir()
    good = write_png(tmp_path / "in" / "good.png")
    (tmp_path / "in" / "notes.png").write_text("not an image")
    (tmp_path / "in" / "empty.dcm").write_bytes(b"")
    env = clean_env(CXR_HOME=str(tmp_path / "var"))
    out = cxr("predict", "--format", "json", "--checkpoint", str(tiny_bundle), str(tmp_path / "in"), env=env)
    rows = {Path(r["path"]).name: r for r in json.loads(out.stdout)}
    assert rows[good.name]["status"] == "done"
    assert rows["notes.png"]["status"] == "rejected" and rows["notes.png"]["error"].startswith("not_an_image")
    assert rows["notes.png"]["reject_code"] == "not_an_image"
    assert rows["empty.dcm"]["status"] == "rejected" and rows["empty.dcm"]["reject_code"] == "unreadable"
    assert "empty" in rows["empty.dcm"]["error"]
    assert "not for clinical use" in out.stderr
    only_bad = cxr("predict", "--checkpoint", str(tiny_bundle), str(tmp_path / "in" / "notes.png"), env=env,
                   check=False)
    assert only_bad.returncode == 1 and "rejected" in only_bad.stdout and "not_an_image" in only_bad.stdout
