"""A worker that dies: what it held comes back within seconds, not after CXR_LEASE_SECONDS or
CXR_REQUEUE_QUEUED_AFTER_SECONDS, on the embedded default and on Postgres + Redis.

A real worker holds 4 studies it has claimed (leased; its batcher waits for a fuller batch)
and 6 tasks it has taken from the broker but not started (published with a countdown: the
worker keeps such a task in memory, unacknowledged, and notes the delivery on the study). It is
SIGKILLed with its whole process group. The lease (120 s) and the lost-task delay (600 s) keep
their defaults, so only the heartbeat can bring the studies back: the reaper sees the worker's
heartbeat stop, re-queues its leased studies and publishes the tasks it had taken. A new worker
screens all 10 within the bound, each exactly once (one result row), and each history says so.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid

import pytest
from sqlalchemy import func, select

from cxr.db import repo
from cxr.db.models import Result, Study, StudyEvent, Worker
from cxr.db.session import session_scope
from tests.imagegen import write_png
from tests.stack import Stack, clean_env, cxr, wait_until

BOUND_S = 120  # "everything a dead worker held is screened within about 2 minutes of a new worker being ready"


def counts(db_url: str) -> dict[str, int]:
    with session_scope(db_url) as s:
        return dict(s.execute(select(Study.status, func.count()).group_by(Study.status)).all())


def wait_ready(stack: Stack, name: str) -> None:
    log = stack.log_dir / f"{name}.log"
    marker = f"cxr-{stack.procs[name].pid}@"  # the screening worker's own name, not its callback process
    wait_until(lambda: (stack.assert_running() or True) and any(marker in line and "ready" in line
                                                                 for line in log.read_text().splitlines()),
               timeout=120, interval=0.2, describe=stack.logs)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["embedded", pytest.param("distributed", marks=pytest.mark.distributed)])
def test_a_dead_workers_leased_and_prefetched_studies_come_back_quickly(request, tmp_path, tiny_bundle, backend):
    extra = {}
    if backend == "distributed":
        extra = dict(CXR_DATABASE_URL=request.getfixturevalue("postgres_url"),
                     CXR_BROKER_URL=request.getfixturevalue("redis_url"))
    env = clean_env(CXR_HOME=str(tmp_path / "var"), CXR_INBOX=str(tmp_path / "inbox"),
                    CXR_CHECKPOINT=str(tiny_bundle), CXR_GATE_MIN_SIZE="64", CXR_HEATMAPS="none",
                    CXR_QUEUE=f"dead-{uuid.uuid4().hex[:8]}", CXR_REAP_INTERVAL_SECONDS="1",
                    CXR_WORKER_HEARTBEAT_SECONDS="1", CXR_WORKER_DEAD_AFTER_SECONDS="5",
                    # The first worker's batch waits for 8 studies: its 4 stay claimed until it is killed.
                    CXR_MAX_BATCH="8", CXR_BATCH_EAGER="false", CXR_MAX_WAIT_MS="120000", **extra)
    db_url = extra.get("CXR_DATABASE_URL", f"sqlite:///{tmp_path / 'var' / 'cxr.db'}")
    cxr("db", "upgrade", env=env)
    (tmp_path / "logs").mkdir()
    stack = Stack(log_dir=tmp_path / "logs", env=env)
    first = stack.start("worker1", "worker")
    try:
        wait_ready(stack, "worker1")
        from cxr.intake import register
        from cxr.queue import SCREEN_TASK, make_celery
        from cxr.settings import Settings
        from cxr.store import put_file

        settings = Settings(home=tmp_path / "var", database_url=db_url, broker_url=env.get("CXR_BROKER_URL", ""),
                            queue=env["CXR_QUEUE"])
        celery = make_celery(settings)
        films = [write_png(tmp_path / f"f{i}.png", size=96, seed=i) for i in range(10)]
        leased = [register(settings, celery, stored=put_file(settings.store_dir, f), filename=f.name,
                           source="api").study_id for f in films[:4]]
        wait_until(lambda: counts(db_url).get("processing", 0) == 4, timeout=60, interval=0.1, describe=stack.logs)
        taken = []
        for f in films[4:]:  # rows committed, tasks published to run in 10 minutes: the worker holds them
            stored = put_file(settings.store_dir, f)
            with session_scope(db_url) as s:
                taken.append(repo.intake_file(s, sha256=stored.sha256, filename=f.name, source="api",
                                              stored_path=str(stored.path), size_bytes=stored.size_bytes).study.id)
            celery.send_task(SCREEN_TASK, args=[str(taken[-1])], countdown=600)

        def delivered():
            with session_scope(db_url) as s:
                return s.scalar(select(func.count()).select_from(Study).where(
                    Study.id.in_(taken), Study.status == "queued", Study.worker_id.is_not(None))) == 6

        wait_until(delivered, timeout=60, interval=0.1, describe=stack.logs)  # noted as taken by worker1
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        killed_at = time.monotonic()
        del stack.procs["worker1"]
        assert counts(db_url) == {"processing": 4, "queued": 6}

        stack.env = {**env, "CXR_MAX_BATCH": "4", "CXR_BATCH_EAGER": "true", "CXR_MAX_WAIT_MS": "50"}
        second = stack.start("worker2", "worker")
        stack.start("watcher", "watch")  # runs the reaper
        wait_ready(stack, "worker2")
        ready_at = time.monotonic()
        wait_until(lambda: counts(db_url) == {"done": 10}, timeout=BOUND_S, interval=0.5,
                   describe=lambda: f"{counts(db_url)}\n{stack.logs()}")
        took = time.monotonic() - ready_at
        logging.getLogger(__name__).info("%s: all 10 done %.1f s after the new worker was ready, %.1f s after the kill",
                                         backend, took, time.monotonic() - killed_at)
        assert took < 60, took  # well within the bound, with the lease and lost-task delays at their defaults
        with session_scope(db_url) as s:
            per_study = dict(s.execute(select(Result.study_id, func.count()).group_by(Result.study_id)).all())
            assert sorted(per_study.values()) == [1] * 10  # exactly one result each
            for sid in leased + taken:
                trail = [(e.status, e.actor, e.detail or "") for e in
                         s.scalars(select(StudyEvent).where(StudyEvent.study_id == sid).order_by(StudyEvent.id))]
                requeue = [t for t in trail if t[0] == "queued" and t[1].startswith("reaper@")]
                assert requeue and "is dead" in requeue[0][2] and f":{first.pid}" in requeue[0][2], trail
                assert trail[-1][0] == "done" and trail[-1][1].endswith(f":{second.pid}"), trail
            assert s.get(Worker, s.scalar(select(Worker.name).where(Worker.name.like(f"%:{second.pid}")))) is not None
    finally:
        stack.stop()
