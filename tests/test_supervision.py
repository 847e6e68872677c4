"""`cxr up` keeps its children running and stops within its grace period, with real
processes on the embedded default (SQLite + filesystem broker)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from cxr.db.models import Study
from cxr.db.session import session_scope
from tests.imagegen import write_png
from tests.stack import Stack, clean_env, free_port, wait_until

NAMES = {b"worker": "worker", b"watch": "watcher", b"api": "api"}


def up_env(tmp_path: Path, tiny_bundle: Path, **extra: str) -> dict[str, str]:
    return clean_env(CXR_HOME=str(tmp_path / "var"), CXR_INBOX=str(tmp_path / "inbox"),
                     CXR_CHECKPOINT=str(tiny_bundle), CXR_GATE_MIN_SIZE="64", CXR_WATCH_SETTLE_SECONDS="0.3",
                     CXR_QUEUE=f"cxr-sup-{uuid.uuid4().hex[:8]}", CXR_HEALTH_INTERVAL_SECONDS="0.5", **extra)


def children(pid: int) -> dict[str, int]:
    """{"worker" | "watcher" | "api": pid} of the live children of ``pid`` (from /proc)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue  # gone meanwhile
        if fields[1] == str(pid) and fields[0] != "Z" and len(cmdline) > 3 and cmdline[1:3] == [b"-m", b"cxr"]:
            out[NAMES[cmdline[3]]] = int(stat.parent.name)
    return out


def study_statuses(db_url: str) -> dict[str, str]:
    with session_scope(db_url) as s:
        return {f: st for f, st in s.execute(select(Study.filename, Study.status)).all()}


def drop(src: Path, inbox: Path) -> None:
    tmp = inbox / f".{src.name}.part"
    shutil.copy(src, tmp)
    os.replace(tmp, inbox / src.name)


@pytest.mark.timeout(400)
def test_cxr_up_restarts_a_child_that_dies_and_the_others_keep_serving(tmp_path, tiny_bundle):
    """SIGKILL (what the OOM killer sends) to each child of `cxr up` in turn. The worker:
    the API keeps answering, a new worker appears and screens a film sent afterwards. The
    watcher: a new one takes in a film dropped afterwards. The API: a new one answers on the
    same port. `cxr up` logs each restart, never exits, and stops cleanly (0) on SIGINT."""
    env = up_env(tmp_path, tiny_bundle)
    db_url = f"sqlite:///{tmp_path / 'var' / 'cxr.db'}"
    (tmp_path / "logs").mkdir()
    stack = Stack(log_dir=tmp_path / "logs", env=env)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    up = stack.start("up", "up", "--port", str(port))
    (tmp_path / "films").mkdir()
    films = [write_png(tmp_path / "films" / f"film{i}.png", size=96, seed=i) for i in range(3)]
    try:
        stack.wait_http(f"{base}/health")
        wait_until(lambda: httpx.get(f"{base}/health", timeout=10).json().get("workers") == 1, timeout=180,
                   describe=stack.logs)
        first = children(up.pid)
        assert set(first) == {"worker", "watcher", "api"}, first

        # 1. The worker.
        os.kill(first["worker"], signal.SIGKILL)
        for _ in range(5):  # the API answers while the worker is gone and coming back
            assert httpx.get(f"{base}/health", timeout=10).status_code == 200
            assert httpx.get(f"{base}/worklist", timeout=10).status_code == 200
            time.sleep(0.2)
        wait_until(lambda: children(up.pid).get("worker") not in (None, first["worker"]), timeout=60,
                   describe=stack.logs)
        r = httpx.post(f"{base}/jobs", files=[("files", ("film0.png", films[0].read_bytes(), "image/png"))],
                       timeout=30)
        assert r.status_code == 202, r.text
        wait_until(lambda: study_statuses(db_url).get("film0.png") == "done", timeout=180, describe=stack.logs)

        # 2. The watcher.
        os.kill(first["watcher"], signal.SIGKILL)
        wait_until(lambda: children(up.pid).get("watcher") not in (None, first["watcher"]), timeout=60,
                   describe=stack.logs)
        drop(films[1], tmp_path / "inbox")
        wait_until(lambda: study_statuses(db_url).get("film1.png") == "done", timeout=180, describe=stack.logs)

        # 3. The API.
        os.kill(first["api"], signal.SIGKILL)
        wait_until(lambda: children(up.pid).get("api") not in (None, first["api"]), timeout=60,
                   describe=stack.logs)
        stack.wait_http(f"{base}/health")
        r = httpx.post(f"{base}/jobs", files=[("files", ("film2.png", films[2].read_bytes(), "image/png"))],
                       timeout=30)
        assert r.status_code == 202, r.text
        wait_until(lambda: study_statuses(db_url).get("film2.png") == "done", timeout=180, describe=stack.logs)

        assert up.poll() is None, stack.logs()
        log = (tmp_path / "logs" / "up.log").read_text()
        for name in ("worker", "watcher", "api"):
            assert re.search(rf"{name} \(pid {first[name]}\) was killed by SIGKILL after \d+ s; starting it again "
                             rf"in 1 s", log), (name, log[-4000:])
        now = children(up.pid)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=120) == 0, stack.logs()
        del stack.procs["up"]
        assert all(not Path(f"/proc/{pid}").exists() for pid in now.values())
    finally:
        stack.stop()


SIGTERM_DEAF = """\
import signal, sys
# Test hook: the `cxr watch` child of `cxr up` ignores SIGTERM (blocked: its handler never runs).
if "watch" in sys.argv:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
"""


@pytest.mark.timeout(300)
def test_cxr_up_kills_a_child_that_ignores_sigterm_after_its_grace(tmp_path, tiny_bundle):
    """A child that does not stop on SIGTERM (here the watcher, with SIGTERM blocked) is
    killed with SIGKILL once CXR_STOP_GRACE_SECONDS have passed: `cxr up` says so in its
    log, leaves no child behind and exits 1 within the grace and a margin."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SIGTERM_DEAF)
    grace = 4
    env = up_env(tmp_path, tiny_bundle, CXR_STOP_GRACE_SECONDS=str(grace))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    (tmp_path / "logs").mkdir()
    stack = Stack(log_dir=tmp_path / "logs", env=env)
    port = free_port()
    up = stack.start("up", "up", "--port", str(port))
    try:
        stack.wait_http(f"http://127.0.0.1:{port}/health")
        wait_until(lambda: len(children(up.pid)) == 3, timeout=60, describe=stack.logs)
        kids = children(up.pid)
        t0 = time.monotonic()
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=grace + 60) == 1, stack.logs()
        took = time.monotonic() - t0
        del stack.procs["up"]
        log = (tmp_path / "logs" / "up.log").read_text()
        assert f"watcher (pid {kids['watcher']}) did not stop within {grace:g} s of SIGTERM; killing it (SIGKILL)" \
            in log, log[-3000:]
        assert took >= grace, took  # it was given its grace first
        assert all(not Path(f"/proc/{pid}").exists() for pid in kids.values())
    finally:
        stack.stop()


@pytest.mark.timeout(300)
def test_cxr_up_gives_up_on_a_child_that_cannot_start(tmp_path, tiny_bundle):
    """The API's port is taken by another program: the API exits at once each time it is
    started. `cxr up` retries with growing delays, then stops everything and exits 1 with a
    line that says why, instead of restarting it for ever."""
    import socket

    env = up_env(tmp_path, tiny_bundle, CXR_STOP_GRACE_SECONDS="20")
    (tmp_path / "logs").mkdir()
    stack = Stack(log_dir=tmp_path / "logs", env=env)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up = stack.start("up", "up", "--port", str(port))
        try:
            others = wait_until(lambda: (k := children(up.pid)).keys() >= {"worker", "watcher"} and k, timeout=120,
                                interval=0.1, describe=stack.logs)
            assert up.wait(timeout=240) == 1, stack.logs()
            del stack.procs["up"]
        finally:
            stack.stop()
    assert all(not Path(f"/proc/{others[name]}").exists() for name in ("worker", "watcher"))  # stopped with it
    log = (tmp_path / "logs" / "up.log").read_text()
    delays = [int(d) for d in re.findall(r"api \(pid \d+\) exited with code \d+ after \d+ s; starting it again in (\d+) s",
                                         log)]
    assert delays == [1, 2, 4, 8], log[-4000:]
    assert re.search(r"api \(pid \d+\) exited with code \d+, 5 times in a row within 30 s of starting; stopping "
                     r"everything", log), log[-4000:]
