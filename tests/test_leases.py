"""Leases, the reaper, the audit trail and intake on a full disk, on real databases (SQLite
and Postgres) and a real filesystem broker; the CLI commands that show them."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from cxr.db import repo
from cxr.db.migrate import upgrade
from cxr.db.models import Result, Study, StudyStatus, utcnow
from cxr.db.session import session_scope
from cxr.settings import Settings
from tests.imagegen import write_png
from tests.stack import clean_env, cxr


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.distributed)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'l.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    upgrade(url)
    return url


def new_study(url: str, name: str = "a.png", *, source: str = "api") -> uuid.UUID:
    with session_scope(url) as s:
        return repo.intake_file(s, sha256=uuid.uuid4().hex * 2, filename=name, source=source,
                                stored_path=f"/store/{name}", size_bytes=10).study.id


def events(url: str, sid: uuid.UUID) -> list[tuple[str, str, str | None]]:
    with session_scope(url) as s:
        return [(e.status, e.actor, e.detail) for e in repo.study_events(s, study_id=sid)]


def test_a_lease_is_held_renewed_and_reaped_once(db_url):
    sid = new_study(db_url)
    with session_scope(db_url) as s:
        assert repo.claim_study(s, study_id=sid, worker="hostA:1", lease_seconds=60)
    with session_scope(db_url) as s:
        study = s.get(Study, sid)
        assert study.status == "processing" and study.worker_id == "hostA:1" and study.lease_expires_at is not None
        # Another worker may not take a study whose lease is live; its own worker may (a redelivery).
        assert not repo.claim_study(s, study_id=sid, worker="hostB:2", lease_seconds=60)
        assert repo.claim_study(s, study_id=sid, worker="hostA:1", lease_seconds=60)
    with session_scope(db_url) as s:
        assert repo.renew_leases(s, worker="hostA:1", lease_seconds=60) == 1
        assert repo.renew_leases(s, worker="hostB:2", lease_seconds=60) == 0
        assert repo.reap_expired(s) == []  # live lease
    later = utcnow() + timedelta(seconds=120)
    with session_scope(db_url) as s:
        reaped = repo.reap_expired(s, now=later, actor="reaper@test:9")
        assert [r.study_id for r in reaped] == [sid] and "hostA:1" in reaped[0].reason
    with session_scope(db_url) as s:
        assert repo.reap_expired(s, now=later) == []  # compare-and-set: re-queued once
        study = s.get(Study, sid)
        assert (study.status, study.worker_id, study.lease_expires_at) == ("queued", None, None)
        assert repo.claim_study(s, study_id=sid, worker="hostB:2", lease_seconds=60)
    trail = events(db_url, sid)
    assert [t[0] for t in trail] == ["queued", "processing", "processing", "queued", "processing"]
    assert trail[0][1].startswith("api@") and trail[1][1] == "worker@hostA:1"
    assert trail[3][1] == "reaper@test:9" and "expired" in trail[3][2]
    assert trail[4][1] == "worker@hostB:2"


def test_an_expired_lease_lets_another_worker_claim(db_url):
    sid = new_study(db_url)
    with session_scope(db_url) as s:
        assert repo.claim_study(s, study_id=sid, worker="hostA:1", lease_seconds=60)
        s.execute(update(Study).where(Study.id == sid).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    with session_scope(db_url) as s:
        assert repo.claim_study(s, study_id=sid, worker="hostB:2", lease_seconds=60)
        assert s.get(Study, sid).worker_id == "hostB:2"


def test_stale_queued_studies_are_published_again_only_when_asked(db_url):
    sid = new_study(db_url)
    later = utcnow() + timedelta(seconds=100)
    with session_scope(db_url) as s:
        assert repo.reap_expired(s, now=later) == []  # the broker queue was not known to be empty
        assert [r.study_id for r in repo.reap_expired(s, now=later, stale_queued_after=50)] == [sid]
    with session_scope(db_url) as s:
        assert repo.reap_expired(s, now=later, stale_queued_after=50) == []  # updated_at was bumped
    assert "task published again" in events(db_url, sid)[-1][2]


def test_results_are_upserts_and_finishing_releases_the_lease(db_url):
    sid = new_study(db_url)
    with session_scope(db_url) as s:
        mv = repo.ensure_model_version(s, checkpoint_sha256="c" * 64, architecture="a", class_names=["N", "P"],
                                       version="v")
        assert repo.claim_study(s, study_id=sid, worker="hostA:1", lease_seconds=60)
    probs = {"N": 0.7, "P": 0.3}
    for heatmap in (None, "/h.png", "/other.png"):
        with session_scope(db_url) as s:
            repo.record_result(s, study_id=sid, model_version_id=mv.id, probabilities=probs, predicted_class="N",
                               risk=0.3, flagged=False, heatmap_path=heatmap, timings_ms={}, final=heatmap is not None)
    with session_scope(db_url) as s:
        rows = list(s.scalars(select(Result).where(Result.study_id == sid)))
        assert len(rows) == 1 and rows[0].heatmap_path == "/h.png"  # the first heatmap written wins
        study = s.get(Study, sid)
        assert (study.status, study.worker_id, study.lease_expires_at) == ("done", None, None)
    assert [t[0] for t in events(db_url, sid)] == ["queued", "processing", "done"]  # one 'done', not two


def test_failed_and_rejected_changes_carry_their_reason(db_url):
    sid = new_study(db_url, source="watch")
    with session_scope(db_url) as s:
        repo.mark_study(s, study_id=sid, status=StudyStatus.rejected, error="unreadable: truncated",
                        reject_code="unreadable", actor="worker@h:1")
        repo.mark_study(s, study_id=sid, status=StudyStatus.rejected, error="unreadable: truncated",
                        reject_code="unreadable", actor="worker@h:1")
    trail = events(db_url, sid)
    assert trail[0][1].startswith("watcher@")
    assert trail[1:] == [("rejected", "worker@h:1", "unreadable: truncated")]


def test_cxr_study_show_and_cxr_reap(tmp_path):
    env = clean_env(CXR_HOME=str(tmp_path / "var"), CXR_LEASE_SECONDS="60")
    cxr("db", "upgrade", env=env)
    url = f"sqlite:///{tmp_path / 'var' / 'cxr.db'}"
    sid = new_study(url, "film.png")
    with session_scope(url) as s:
        assert repo.claim_study(s, study_id=sid, worker="deadhost:42", lease_seconds=60)
        s.execute(update(Study).where(Study.id == sid).values(lease_expires_at=utcnow() - timedelta(seconds=5)))

    help_text = cxr("reap", "--help", env=env).stdout
    assert "lease" in help_text and "CXR_LEASE_SECONDS" in help_text
    out = cxr("reap", env=env)
    assert "re-queued 1 studies" in out.stderr

    from cxr.queue import make_celery, queue_depth

    settings = Settings(home=tmp_path / "var")
    assert queue_depth(make_celery(settings), settings.queue) == 1  # its task was published again

    table = cxr("study", "show", str(sid), env=env)
    assert "film.png" in table.stdout and "History" in table.stdout
    assert "worker@deadhost:42" in table.stdout and "reaper@" in table.stdout
    assert "not for clinical use" in table.stderr
    body = json.loads(cxr("study", "show", str(sid), "--format", "json", env=env).stdout)
    assert body["status"] == "queued" and body["study_id"] == str(sid)
    assert [h["status"] for h in body["history"]] == ["queued", "processing", "queued"]
    assert "expired" in body["history"][-1]["detail"]

    missing = cxr("study", "show", str(uuid.uuid4()), env=env, check=False)
    assert missing.returncode == 1 and "no study" in missing.stderr
    bad = cxr("study", "show", "not-a-uuid", env=env, check=False)
    assert bad.returncode == 2 and "not a study id" in bad.stderr


# Intake on a full disk ------------------------------------------------------------------------

def _watcher(home: Path, inbox: Path, **settings):
    from cxr.queue import make_celery
    from worker.watcher import InboxWatcher

    s = Settings(home=home, inbox=inbox, watch_settle_seconds=0, watch_quiet_seconds=0, **settings)
    s.ensure_dirs()
    upgrade(s.database_url)
    return s, InboxWatcher(s, make_celery(s))


def _count_studies(url: str) -> int:
    with session_scope(url) as s:
        return s.scalar(select(func.count()).select_from(Study))


def test_intake_waits_while_free_space_is_below_the_minimum(tmp_path, caplog):
    """The threshold set above the disk's real free space: nothing is taken in, the file
    stays in the inbox, and the log says why."""
    inbox = tmp_path / "inbox"
    s, watcher = _watcher(tmp_path / "var", inbox, min_free_mb=shutil.disk_usage(tmp_path).free / 1048576 + 1024)
    f = write_png(inbox / "film.png", size=64)
    with caplog.at_level(logging.ERROR, logger="worker.watcher"):
        watcher.scan()
        watcher.poll(now=0.0)
        assert watcher.poll(now=1.0) == 0
    assert f.exists() and _count_studies(s.database_url) == 0
    assert "disk full" in caplog.text and "CXR_MIN_FREE_MB" in caplog.text and "stays in the inbox" in caplog.text


def test_a_full_tmpfs_pauses_intake_and_loses_nothing(tmp_path, caplog):
    """CXR_HOME on a real 8 MB tmpfs, filled until less than CXR_MIN_FREE_MB is free: new
    files wait in the inbox; once space is freed they are taken in. What was accepted before
    is untouched."""
    home = tmp_path / "var"
    home.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(home)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        inbox = tmp_path / "inbox"
        s, watcher = _watcher(home, inbox, min_free_mb=2)
        write_png(inbox / "before.png", size=64, seed=1)
        watcher.scan()
        watcher.poll(now=0.0)
        assert watcher.poll(now=1.0) == 1 and _count_studies(s.database_url) == 1
        free = shutil.disk_usage(home).free
        filler = home / "filler"
        filler.write_bytes(b"\0" * (free - 1024 * 1024))  # leave 1 MB, under the 2 MB minimum
        late = write_png(inbox / "late.png", size=64, seed=2)
        with caplog.at_level(logging.ERROR, logger="worker.watcher"):
            watcher.scan()
            watcher.poll(now=2.0)
            assert watcher.poll(now=3.0) == 0
        assert late.exists() and _count_studies(s.database_url) == 1
        assert "disk full" in caplog.text
        filler.unlink()
        watcher.scan()
        assert watcher.poll(now=100.0) == 1  # after its retry delay
        assert not late.exists() and _count_studies(s.database_url) == 2
        with session_scope(s.database_url) as db:
            assert all(Path(p).is_file() for p in db.scalars(select(Study.stored_path)))
    finally:
        from cxr.db.session import session_factory

        session_factory(f"sqlite:///{home / 'cxr.db'}").kw["bind"].dispose()
        subprocess.run(["umount", "-l", str(home)], capture_output=True)
