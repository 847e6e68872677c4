"""Fault injection with real processes: no study is lost or screened twice, whatever fails.

Each test starts real `cxr` processes (worker, watcher, reaper) on real services, breaks
one part (SIGKILL, a Redis or Postgres server the test owns and stops, a stopped watcher),
and then checks in the database that every study finished exactly once: one result row
per done study, no duplicate rows, and an audit trail that tells what happened.
Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from cxr.db.models import Result, Study, StudyEvent
from cxr.db.session import session_scope
from tests.imagegen import write_png
from tests.stack import ROOT, Stack, clean_env, cxr, free_port, wait_until

SIZE = 96  # small generated films; the gate's minimum size is lowered to match


def films(folder: Path, n: int, *, first_seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_png(folder / f"film{first_seed + i:04d}.png", size=SIZE, seed=first_seed + i) for i in range(n)]


def drop(files: list[Path], inbox: Path) -> None:
    inbox.mkdir(parents=True, exist_ok=True)
    for f in files:
        tmp = inbox / f".{f.name}.part"  # ignored by the watcher until renamed
        shutil.copy(f, tmp)
        os.replace(tmp, inbox / f.name)


def status_counts(db_url: str) -> dict[str, int]:
    with session_scope(db_url) as s:
        return dict(s.execute(select(Study.status, func.count()).group_by(Study.status)).all())


def wait_all_finished(db_url: str, n: int, stack: Stack, timeout: float) -> dict[str, int]:
    def finished():
        stack.assert_running()
        c = status_counts(db_url)
        return c if sum(c.get(k, 0) for k in ("done", "failed", "rejected")) == n and sum(c.values()) == n else None

    return wait_until(finished, timeout=timeout, interval=0.5,
                      describe=lambda: f"{status_counts(db_url)}\n{stack.logs()}")


def assert_exactly_once(db_url: str, n_done: int) -> None:
    """Checked in the database: every done study has exactly one result row, no other study
    has one, and no (study, model version) pair appears twice."""
    with session_scope(db_url) as s:
        done = s.scalar(select(func.count()).select_from(Study).where(Study.status == "done"))
        rows = s.scalar(select(func.count()).select_from(Result))
        per_study = s.execute(select(Result.study_id, func.count()).group_by(Result.study_id)).all()
        dupes = s.execute(select(Result.study_id, Result.model_version_id, func.count())
                          .group_by(Result.study_id, Result.model_version_id).having(func.count() > 1)).all()
        scored_not_done = s.scalar(select(func.count()).select_from(Study).join(Result, Result.study_id == Study.id)
                                   .where(Study.status != "done"))
        leases_left = s.scalar(select(func.count()).select_from(Study).where(Study.worker_id.is_not(None)))
    assert done == n_done
    assert rows == n_done and len(per_study) == n_done and all(c == 1 for _, c in per_study)
    assert dupes == [] and scored_not_done == 0
    assert leases_left == 0  # every finished study released its lease


def history(db_url: str, study_id) -> list[StudyEvent]:
    with session_scope(db_url) as s:
        return list(s.scalars(select(StudyEvent).where(StudyEvent.study_id == study_id)
                              .order_by(StudyEvent.id)))


def base_env(tmp_path: Path, tiny_bundle: Path, **extra: str) -> dict[str, str]:
    return clean_env(CXR_HOME=str(tmp_path / "var"), CXR_INBOX=str(tmp_path / "inbox"),
                     CXR_CHECKPOINT=str(tiny_bundle), CXR_GATE_MIN_SIZE="64", CXR_WATCH_SETTLE_SECONDS="0.3",
                     CXR_QUEUE=f"cxr-rel-{uuid.uuid4().hex[:8]}", CXR_LEASE_SECONDS="4",
                     CXR_REAP_INTERVAL_SECONDS="1", CXR_REQUEUE_QUEUED_AFTER_SECONDS="4", **extra)


def new_stack(tmp_path: Path, env: dict[str, str]) -> Stack:
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    return Stack(log_dir=logs, env=env)


def wait_ready(stack: Stack, name: str, timeout: float = 120) -> None:
    log = stack.log_dir / f"{name}.log"
    wait_until(lambda: (stack.assert_running() or True) and "ready" in log.read_text(), timeout=timeout,
               interval=0.2, describe=stack.logs)


# 1 -------------------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_sigkill_worker_holding_a_batch_of_50(tmp_path, tiny_bundle, postgres_url, redis_url):
    """A worker holds a batch of 50: a threads pool of 51 (CXR_MAX_BATCH=51) has taken the 50
    tasks (unacknowledged, acks_late) and claimed all 50 studies, which wait in the
    micro-batcher for one forward pass (CXR_BATCH_EAGER off and a long CXR_MAX_WAIT_MS: the
    batch waits for a 51st study that never comes, so it is held for certain). It
    is SIGKILLed there. Its leases expire, the reaper (in the watcher) re-queues the 50,
    a new worker screens them: each is done once, and its history says so."""
    env = base_env(tmp_path, tiny_bundle, CXR_DATABASE_URL=postgres_url, CXR_BROKER_URL=redis_url,
                   CXR_MAX_BATCH="51", CXR_MAX_WAIT_MS="3000", CXR_BATCH_EAGER="false")
    cxr("db", "upgrade", env=env)
    stack = new_stack(tmp_path, env)
    first = stack.start("worker1", "worker")
    try:
        wait_ready(stack, "worker1")
        # Intake through the real code path (store, row, publish), in this process.
        from cxr.intake import register
        from cxr.queue import make_celery
        from cxr.settings import Settings
        from cxr.store import put_file

        settings = Settings(home=tmp_path / "var", database_url=postgres_url, broker_url=redis_url,
                            queue=env["CXR_QUEUE"])
        celery = make_celery(settings)
        ids = [register(settings, celery, stored=put_file(settings.store_dir, f), filename=f.name,
                        source="api").study_id for f in films(tmp_path / "films", 50)]

        def holding_50():
            return status_counts(postgres_url).get("processing", 0) == 50

        wait_until(holding_50, timeout=60, interval=0.05, describe=stack.logs)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        held = status_counts(postgres_url)
        assert held.get("processing") == 50 and "done" not in held, held  # killed while holding all 50
        del stack.procs["worker1"]

        stack.start("worker2", "worker")
        stack.start("watcher", "watch")  # runs the reaper
        wait_all_finished(postgres_url, 50, stack, timeout=180)
        assert status_counts(postgres_url) == {"done": 50}
        assert_exactly_once(postgres_url, 50)
        second = stack.procs["worker2"].pid
        for sid in ids:
            trail = [(e.status, e.actor.split(":")[-1], e.actor.split("@")[0]) for e in history(postgres_url, sid)]
            # A slow claim may let the reaper publish a queued study again (at-least-once
            # publishing; the result stays exactly once): repeated re-queues count as one.
            trail = [t for i, t in enumerate(trail) if i == 0 or t[::2] != trail[i - 1][::2]]
            statuses = [t[0] for t in trail]
            assert statuses == ["queued", "processing", "queued", "processing", "done"], trail
            assert trail[1][1] == str(first.pid) and trail[2][2] == "reaper"
            assert trail[3][1] == trail[4][1] == str(second)
    finally:
        stack.stop()


# 2 -------------------------------------------------------------------------------------------

def start_redis(port: int, log: Path) -> subprocess.Popen:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    p = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                         stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
    import redis

    wait_until(lambda: _pings(redis.Redis(port=port, socket_connect_timeout=1)), timeout=20, interval=0.1)
    return p


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


@pytest.mark.distributed
@pytest.mark.timeout(360)
def test_broker_stopped_and_restarted_during_100_files(tmp_path, tiny_bundle, postgres_url):
    """The test's own Redis (no persistence: a restart loses every queued task) is stopped
    while 100 files are being screened and started again. Tasks lost with it are published
    again by the reaper (studies queued with no task left in the broker queue); files taken
    in meanwhile wait in the inbox. All 100 end done, none twice."""
    port = free_port()
    redis_log = tmp_path / "redis.log"
    server = start_redis(port, redis_log)
    env = base_env(tmp_path, tiny_bundle, CXR_DATABASE_URL=postgres_url, CXR_BROKER_URL=f"redis://127.0.0.1:{port}/0")
    cxr("db", "upgrade", env=env)
    stack = new_stack(tmp_path, env)
    try:
        stack.start("worker", "worker")
        stack.start("watcher", "watch")
        wait_ready(stack, "worker")
        drop(films(tmp_path / "films", 100), tmp_path / "inbox")
        wait_until(lambda: status_counts(postgres_url).get("done", 0) >= 15, timeout=120, describe=stack.logs)
        server.send_signal(signal.SIGTERM)  # nothing saved: its queue is gone
        server.wait(timeout=20)
        during = status_counts(postgres_url)
        time.sleep(3)
        server = start_redis(port, redis_log)
        wait_all_finished(postgres_url, 100, stack, timeout=240)
        assert during.get("done", 0) < 100, during  # the outage really happened mid-run
        assert status_counts(postgres_url) == {"done": 100}
        assert_exactly_once(postgres_url, 100)
        assert list((tmp_path / "inbox").iterdir()) == []
        # The same worker reconnected, and the tasks Redis lost were published again from the database.
        assert (stack.log_dir / "worker.log").read_text().count("Connected to redis") >= 2
        assert "task published again" in (stack.log_dir / "watcher.log").read_text()
    finally:
        stack.stop()
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=20)


# 3 -------------------------------------------------------------------------------------------

class ThrowawayPostgres:
    """A Postgres cluster of the test's own (initdb on a temporary folder, its own port)."""

    def __init__(self, root: Path) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not bins:
            pytest.skip("no Postgres server binaries under /usr/lib/postgresql")
        self.bin = bins[-1].parent
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.as_user = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]
        root.mkdir(parents=True, exist_ok=True)
        if self.as_user:
            shutil.chown(root.parent, "postgres", "postgres")
            shutil.chown(root, "postgres", "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self.as_user, *cmd], check=True, capture_output=True, timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                  "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off", "start")

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")


@pytest.mark.distributed
@pytest.mark.timeout(360)
def test_postgres_stopped_and_restarted_during_a_run(tmp_path, tiny_bundle, redis_url):
    """The test's own Postgres cluster is stopped mid-run and started again. The watcher
    keeps files in the inbox and retries; the worker's tasks retry with backoff and its
    connection pool reconnects (no restart); leases that expired meanwhile are re-queued,
    and a study finished twice still has one result row. All end done."""
    import tempfile

    pg_root = Path(tempfile.mkdtemp(prefix="cxr-pg-"))  # not under tmp_path: the postgres user must reach it
    pg = ThrowawayPostgres(pg_root / "cluster")
    pg.start()
    env = base_env(tmp_path, tiny_bundle, CXR_DATABASE_URL=pg.url, CXR_BROKER_URL=redis_url)
    stack = new_stack(tmp_path, env)
    try:
        cxr("db", "upgrade", env=env)
        worker = stack.start("worker", "worker")
        stack.start("watcher", "watch")
        wait_ready(stack, "worker")
        drop(films(tmp_path / "films", 60), tmp_path / "inbox")
        wait_until(lambda: status_counts(pg.url).get("done", 0) >= 10, timeout=120, describe=stack.logs)
        pg.stop()
        time.sleep(5)
        pg.start()
        wait_all_finished(pg.url, 60, stack, timeout=240)
        assert status_counts(pg.url) == {"done": 60}
        assert_exactly_once(pg.url, 60)
        assert worker.poll() is None  # the same worker process, never restarted
        assert "the database is unreachable" in (stack.log_dir / "worker.log").read_text()  # it saw the outage
    finally:
        stack.stop()
        try:
            pg.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(pg_root, ignore_errors=True)


# 4 -------------------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_watcher_down_then_catches_up_and_never_resubmits(tmp_path, tiny_bundle):
    """Embedded default (SQLite, filesystem broker). 30 files dropped while the watcher is
    stopped are all taken in when it starts, each moved into CXR_WATCH_ARCHIVE; the same 30
    dropped again are recognised (same bytes) and not screened a second time."""
    archive = tmp_path / "archive"
    env = base_env(tmp_path, tiny_bundle, CXR_WATCH_ARCHIVE=str(archive))
    db_url = f"sqlite:///{tmp_path / 'var' / 'cxr.db'}"
    cxr("db", "upgrade", env=env)
    stack = new_stack(tmp_path, env)
    try:
        stack.start("worker", "worker")
        watcher = stack.start("watcher", "watch")
        wait_until(lambda: "watching" in (stack.log_dir / "watcher.log").read_text(), timeout=60, describe=stack.logs)
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=30) == 0
        del stack.procs["watcher"]
        files = films(tmp_path / "films", 30)
        drop(files, tmp_path / "inbox")
        stack.start("watcher2", "watch")
        wait_all_finished(db_url, 30, stack, timeout=180)
        assert status_counts(db_url) == {"done": 30}
        assert_exactly_once(db_url, 30)
        wait_until(lambda: not any((tmp_path / "inbox").iterdir()), timeout=30)
        assert sorted(p.name for p in archive.rglob("*.png")) == sorted(f.name for f in files)

        drop(files, tmp_path / "inbox")  # the same films again
        wait_until(lambda: not any((tmp_path / "inbox").iterdir()), timeout=60, describe=stack.logs)
        assert len(list(archive.rglob("*.png"))) == 60
        time.sleep(2)
        assert status_counts(db_url) == {"done": 30}
        with session_scope(db_url) as s:
            processing = s.scalar(select(func.count()).select_from(StudyEvent).where(StudyEvent.status == "processing"))
        assert processing == 30  # each screened once
        assert_exactly_once(db_url, 30)
    finally:
        stack.stop()


# 5 -------------------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_soak_1000_files_with_a_corrupt_one_every_50th(tmp_path, tiny_bundle, postgres_url, redis_url):
    """1,000 generated films through one watcher and one worker on Postgres + Redis; every
    50th is a PNG cut in half. 980 end done and 20 rejected (`unreadable`, with the reason),
    and no process exits or is restarted. Prints studies/s and each process's peak RSS."""
    queue = f"cxr-soak-{uuid.uuid4().hex[:8]}"
    out = subprocess.run(
        [sys.executable, "benchmarks/soak.py", "--n", "1000", "--corrupt-every", "50", "--size", "64",
         "--database-url", postgres_url, "--broker-url", redis_url, "--checkpoint", str(tiny_bundle),
         "--heatmaps", "none", "--max-batch", "8", "--workdir", str(tmp_path), "--timeout", "480", "--json"],
        cwd=ROOT, env=clean_env(CXR_QUEUE=queue), capture_output=True, text=True, timeout=560)
    assert out.returncode == 0, out.stdout + out.stderr
    figures = json.loads(out.stdout)
    print(f"\nsoak: {figures['studies_per_s']} studies/s, peak RSS MB {figures['peak_rss_mb']}, {figures['counts']}")
    assert figures["no_process_restarted"] is True
    assert status_counts(postgres_url) == {"done": 980, "rejected": 20}
    assert_exactly_once(postgres_url, 980)
    with session_scope(postgres_url) as s:
        rejected = s.execute(select(Study.filename, Study.reject_code, Study.error)
                             .where(Study.status == "rejected")).all()
    assert sorted(r.filename for r in rejected) == [f"film{i:05d}.png" for i in range(50, 1001, 50)]
    assert all(r.reject_code == "unreadable" and r.error and r.error.startswith("unreadable:") for r in rejected)


# Graceful shutdown ------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_sigterm_lets_the_worker_finish_and_ack_its_batch(tmp_path, tiny_bundle, postgres_url, redis_url):
    """SIGTERM while a worker holds a batch of 10 (threads pool, all claimed): Celery's warm
    shutdown finishes those 10, acknowledges them and exits 0; none is left half-done or
    unacknowledged, and a new worker screens them and 15 more.

    The batch is held for certain: a pool of 11 (CXR_MAX_BATCH=11) gets 10 studies, so the
    batcher (CXR_BATCH_EAGER off) waits CXR_MAX_WAIT_MS=5000 for an 11th that never comes.
    (With a full batch, a fast worker screened it in less time than one look at the database.)"""
    import redis

    env = base_env(tmp_path, tiny_bundle, CXR_DATABASE_URL=postgres_url, CXR_BROKER_URL=redis_url,
                   CXR_MAX_BATCH="11", CXR_MAX_WAIT_MS="5000", CXR_BATCH_EAGER="false")
    cxr("db", "upgrade", env=env)
    stack = new_stack(tmp_path, env)
    first = stack.start("worker1", "worker")
    try:
        wait_ready(stack, "worker1")
        from cxr.intake import register
        from cxr.queue import make_celery
        from cxr.settings import Settings
        from cxr.store import put_file

        settings = Settings(home=tmp_path / "var", database_url=postgres_url, broker_url=redis_url,
                            queue=env["CXR_QUEUE"])
        celery = make_celery(settings)
        all25 = films(tmp_path / "films", 25)
        batch, later = all25[:10], all25[10:]
        for f in batch:
            register(settings, celery, stored=put_file(settings.store_dir, f), filename=f.name, source="api")
        wait_until(lambda: status_counts(postgres_url).get("processing", 0) == 10, timeout=60, interval=0.05,
                   describe=stack.logs)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=90) == 0, stack.logs()
        del stack.procs["worker1"]
        assert status_counts(postgres_url) == {"done": 10}
        unacked = [json.loads(v) for v in redis.Redis.from_url(redis_url).hvals("unacked")]
        assert not [m for m in unacked if m[-1] == env["CXR_QUEUE"]]  # nothing of ours left unacknowledged
        for f in later:
            register(settings, celery, stored=put_file(settings.store_dir, f), filename=f.name, source="api")
        assert status_counts(postgres_url) == {"done": 10, "queued": 15}

        stack.start("worker2", "worker")
        wait_all_finished(postgres_url, 25, stack, timeout=120)
        assert status_counts(postgres_url) == {"done": 25}
        assert_exactly_once(postgres_url, 25)
    finally:
        stack.stop()


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_a_remote_shutdown_command_stops_the_worker_for_good(tmp_path, tiny_bundle, redis_url):
    """`cxr worker` starts Celery again in place when it stops by itself; one that was asked
    to stop (here `celery control shutdown`, as an operator or Flower sends it) exits 0 and
    stays down."""
    from cxr.queue import make_celery
    from cxr.settings import Settings

    env = base_env(tmp_path, tiny_bundle, CXR_BROKER_URL=redis_url)
    stack = new_stack(tmp_path, env)
    worker = stack.start("worker", "worker")
    try:
        wait_ready(stack, "worker")
        celery = make_celery(Settings(home=tmp_path / "var", broker_url=redis_url, queue=env["CXR_QUEUE"]))
        name = next(line.split()[-2] for line in (stack.log_dir / "worker.log").read_text().splitlines()
                    if line.endswith(" ready."))
        celery.control.shutdown(destination=[name])
        assert worker.wait(timeout=60) == 0, stack.logs()
        del stack.procs["worker"]
        log = (stack.log_dir / "worker.log").read_text()
        assert "Got shutdown from remote" in log and "starting it again" not in log, log[-3000:]
    finally:
        stack.stop()


@pytest.mark.timeout(300)
def test_sigint_stops_cxr_up_cleanly_and_it_resumes(tmp_path, tiny_bundle):
    """Ctrl-C (SIGINT) to `cxr up`: its worker, watcher and API stop cleanly (warm shutdown:
    the study in hand is finished), `cxr up` exits 0, no study is left `processing`; started
    again, it screens the rest, each once."""
    from tests.stack import free_port

    env = base_env(tmp_path, tiny_bundle)
    db_url = f"sqlite:///{tmp_path / 'var' / 'cxr.db'}"
    stack = new_stack(tmp_path, env)
    port = free_port()
    up = stack.start("up", "up", "--port", str(port))
    try:
        stack.wait_http(f"http://127.0.0.1:{port}/health")
        drop(films(tmp_path / "films", 12), tmp_path / "inbox")
        wait_until(lambda: status_counts(db_url).get("done", 0) >= 1, timeout=120, interval=0.1,
                   describe=stack.logs)
        children = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
                    if p.read_text().rsplit(")", 1)[1].split()[1] == str(up.pid)]
        assert len(children) == 3
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=90) == 0, stack.logs()
        del stack.procs["up"]
        assert all(not Path(f"/proc/{c}").exists() for c in children)
        assert "processing" not in status_counts(db_url)

        stack.start("up2", "up", "--port", str(port))
        wait_all_finished(db_url, 12, stack, timeout=180)
        assert status_counts(db_url) == {"done": 12}
        assert_exactly_once(db_url, 12)
    finally:
        stack.stop()
