"""The repository side of worker liveness and the callback outbox, on SQLite and Postgres."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from cxr.db import repo
from cxr.db.migrate import upgrade
from cxr.db.models import Job, Study, utcnow
from cxr.db.session import session_scope


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.distributed)])
def db_url(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'o.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    upgrade(url)
    return url


def new_study(url: str, job: uuid.UUID | None = None, position: int = 0) -> uuid.UUID:
    with session_scope(url) as s:
        study = repo.intake_file(s, sha256=uuid.uuid4().hex * 2, filename="a.png", source="api",
                                 stored_path="/store/a", size_bytes=10).study
        if job is not None:
            repo.link_job_study(s, job=s.get(Job, job), study=study, filename="a.png", position=position)
        return study.id


def test_a_dead_workers_leases_and_taken_tasks_are_reaped_a_live_ones_are_not(db_url):
    held, taken, other = new_study(db_url), new_study(db_url), new_study(db_url)
    t0 = utcnow()
    with session_scope(db_url) as s:
        repo.heartbeat(s, worker="dead:1", now=t0)
        repo.heartbeat(s, worker="live:2", now=t0)
        assert repo.claim_study(s, study_id=held, worker="dead:1", lease_seconds=600)
        assert repo.claim_study(s, study_id=other, worker="nobeat:3", lease_seconds=600)  # no heartbeat row
    with session_scope(db_url) as s:
        assert repo.mark_delivered(s, worker="dead:1", study_ids=[taken, held]) == 1  # only the queued one
    later = t0 + timedelta(seconds=20)
    with session_scope(db_url) as s:
        repo.heartbeat(s, worker="live:2", now=later)
        assert repo.reap_expired(s, now=t0 + timedelta(seconds=3), dead_after=5) == []  # not dead yet
    with session_scope(db_url) as s:
        reaped = {r.study_id: r.reason for r in repo.reap_expired(s, now=later, dead_after=5, actor="reaper@t:0")}
    assert set(reaped) == {held, taken}  # the study leased by a worker without heartbeats waits for its lease
    assert "dead:1 is dead" in reaped[held] and "taken by worker dead:1" in reaped[taken]
    with session_scope(db_url) as s:
        assert {s.get(Study, i).status for i in (held, taken)} == {"queued"}
        assert s.get(Study, held).worker_id is None and s.get(Study, taken).worker_id is None
        assert s.get(Study, other).status == "processing"
        assert repo.reap_expired(s, now=later, dead_after=5) == []  # compare-and-set: once
        assert repo.prune_workers(s, older_than=later) == 1  # dead:1 holds nothing now; live:2 is recent


def test_the_callback_outbox_is_leased_per_attempt_and_reaped_when_abandoned(db_url):
    with session_scope(db_url) as s:
        jid = repo.create_job(s, source="api", callback_url="https://hooks.example.org/x").id
    sid = new_study(db_url, jid)
    with session_scope(db_url) as s:
        assert repo.claim_complete_callbacks(s, job_id=jid) == []  # its study is not finished
        repo.mark_study(s, study_id=sid, status=repo.StudyStatus.rejected, error="x")
    with session_scope(db_url) as s:
        assert repo.claim_complete_callbacks(s, publish_grace_seconds=30) == [jid]
        assert repo.claim_complete_callbacks(s) == []  # claimed once
    with session_scope(db_url) as s:
        first = repo.begin_callback_attempt(s, job_id=jid, holder="task-a", lease_seconds=60)
        assert first.attempt == 1 and first.url.startswith("https://") and first.report["callback"]["attempts"] == 1
        assert repo.begin_callback_attempt(s, job_id=jid, holder="task-b", lease_seconds=60) is None  # a's lease
        repo.callback_attempt_failed(s, job_id=jid, holder="task-a", error="HTTP 500")
    with session_scope(db_url) as s:
        assert repo.begin_callback_attempt(s, job_id=jid, holder="task-a", lease_seconds=60).attempt == 2  # a's retry
        assert repo.reap_callbacks(s) == []  # leased
    with session_scope(db_url) as s:  # task-a's worker died: after its lease, the reaper releases it
        assert repo.reap_callbacks(s, now=utcnow() + timedelta(seconds=120), publish_grace_seconds=30) == [jid]
        third = repo.begin_callback_attempt(s, job_id=jid, holder="task-c", lease_seconds=60)
        assert third.attempt == 3
    with session_scope(db_url) as s:
        repo.finish_callback(s, job_id=jid, state="sent", holder="task-a")  # not a's any more: no effect
        assert s.get(Job, jid).callback_state == "sending"
        repo.finish_callback(s, job_id=jid, state="sent", holder="task-c")
    with session_scope(db_url) as s:
        job = s.get(Job, jid)
        assert (job.callback_state, job.callback_attempts, job.callback_holder) == ("sent", 3, None)
        assert repo.job_report(s, job_id=jid)["callback"]["state"] == "sent"
        assert repo.reap_callbacks(s, now=utcnow() + timedelta(days=1)) == []
        assert repo.begin_callback_attempt(s, job_id=jid, holder="task-d", lease_seconds=60) is None
