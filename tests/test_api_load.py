"""The API under probes, bursts and unauthenticated uploads, with a real `cxr api` under
uvicorn: on the embedded default (SQLite + filesystem broker) and on Postgres + Redis.

No worker runs here (none is needed to answer these routes): the Celery ping of the health
check then waits its full timeout on every round, the case that wedged the API before.
Assertions are on status codes and on what was stored, never on timings.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select as sql_select

from cxr.db.models import Job, Study
from cxr.db.session import session_scope
from tests.badfiles import png_bytes
from tests.imagegen import chest_like
from tests.stack import Stack, clean_env, cxr, free_port, wait_until

KEY = "load-key-" + uuid.uuid4().hex[:8]


@dataclass
class Api:
    base: str
    port: int
    stack: Stack
    env: dict[str, str]
    db_url: str
    home: Path


def start_api(tmp: Path, tiny_bundle: Path, *, db_url: str | None = None, broker_url: str | None = None,
              **extra: str) -> Api:
    env = clean_env(CXR_HOME=str(tmp / "home"), CXR_CHECKPOINT=str(tiny_bundle),
                    CXR_QUEUE=f"cxr-load-{uuid.uuid4().hex[:8]}", CXR_HEALTH_INTERVAL_SECONDS="0.5", **extra)
    if db_url:
        env["CXR_DATABASE_URL"] = db_url
    if broker_url:
        env["CXR_BROKER_URL"] = broker_url
    cxr("db", "upgrade", env=env)
    (tmp / "logs").mkdir(exist_ok=True)
    stack = Stack(log_dir=tmp / "logs", env=env)
    port = free_port()
    stack.start("api", "api", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    stack.wait_http(f"{base}/health")
    return Api(base=base, port=port, stack=stack, env=env, db_url=db_url or f"sqlite:///{tmp / 'home' / 'cxr.db'}",
               home=tmp / "home")


def stop_api(api: Api) -> None:
    codes = api.stack.stop(timeout=30)  # SIGTERM; SIGKILL (-9) only if it does not stop in 30 s
    assert codes["api"] in (0, -15), (codes, api.stack.logs())


@pytest.fixture(scope="module", params=["embedded", pytest.param("distributed", marks=pytest.mark.distributed)])
def api(request, tmp_path_factory, tiny_bundle):
    tmp = tmp_path_factory.mktemp(f"load-{request.param}")
    urls = {}
    if request.param == "distributed":
        urls = {"db_url": request.getfixturevalue("module_postgres_url"),
                "broker_url": request.getfixturevalue("module_redis_url")}
    a = start_api(tmp, tiny_bundle, CXR_API_KEYS=KEY, **urls)
    try:
        # A few queued studies, so /worklist has rows to read.
        r = httpx.post(f"{a.base}/jobs", headers={"X-API-Key": KEY}, timeout=60,
                       files=[("files", (f"f{i}.png", png_bytes(chest_like(96, seed=i)), "image/png"))
                              for i in range(5)])
        assert r.status_code == 202, r.text
        yield a
    finally:
        stop_api(a)


async def burst(base: str, path: str, n: int, headers: dict[str, str] | None = None) -> list:
    """``n`` concurrent GETs, one connection each: [(status or exception name, Retry-After or None)]."""
    async with httpx.AsyncClient(base_url=base, timeout=120, headers=headers or {},
                                 limits=httpx.Limits(max_connections=n, max_keepalive_connections=0)) as client:
        async def one():
            try:
                r = await client.get(path)
                return r.status_code, r.headers.get("retry-after")
            except httpx.HTTPError as e:
                return type(e).__name__, None

        return await asyncio.gather(*(one() for _ in range(n)))


def test_health_bursts_leave_every_route_answering(api):
    """2 x 40 concurrent unauthenticated GET /health (probes, load balancers): every one is
    answered 200, and afterwards /health, /worklist and /model/info still answer."""
    for _ in range(2):
        results = asyncio.run(burst(api.base, "/health", 40))
        assert [code for code, _ in results] == [200] * 40, results
    # The first Celery ping may still be under way (workers None until it answers); the ping
    # is broadcast on the broker, so on a shared Redis other people's workers answer too.
    body = wait_until(lambda: (b := httpx.get(f"{api.base}/health", timeout=10).json())["workers"] is not None
                      and b, timeout=30, interval=0.2, describe=api.stack.logs)
    assert (body["status"], body["database"], body["broker"]) == ("ok", "ok", "ok"), body
    assert isinstance(body["workers"], int) and "workers_error" not in body, body
    assert body["model_version"] == "test-random" and "checked_seconds_ago" in body
    with httpx.Client(base_url=api.base, headers={"X-API-Key": KEY}, timeout=10) as c:
        assert c.get("/worklist").status_code == 200
        assert c.get("/model/info").status_code == 200
    api.stack.assert_running()


def test_200_concurrent_keyed_worklists_queue_instead_of_failing(api):
    """More requests than database connections: they wait their turn. No 5xx, except a 503
    that carries Retry-After; the API answers afterwards."""
    results = asyncio.run(burst(api.base, "/worklist", 200, headers={"X-API-Key": KEY}))
    bad = [(code, retry) for code, retry in results if code != 200 and not (code == 503 and retry)]
    assert bad == [], bad
    ok = sum(1 for code, _ in results if code == 200)
    assert ok >= 190, results  # a 503 with Retry-After is allowed, not the norm
    r = httpx.get(f"{api.base}/worklist", headers={"X-API-Key": KEY}, timeout=10)
    assert r.status_code == 200 and len(r.json()["items"]) == 5
    api.stack.assert_running()


def test_metrics_bursts_do_not_take_the_api_down(api):
    """/metrics (database and broker read per scrape) scraped 20 at once: all answered, and
    the keyed routes still answer."""
    results = asyncio.run(burst(api.base, "/metrics", 20))
    assert [code for code, _ in results] == [200] * 20, results
    assert httpx.get(f"{api.base}/worklist", headers={"X-API-Key": KEY}, timeout=10).status_code == 200


# --- keys fail closed ----------------------------------------------------------------------

def film() -> bytes:
    return png_bytes(chest_like(96, seed=3))


REFUSED = (None, "", "wrong-key")  # no header, an empty one, a key nobody issued


def refused_everywhere(api: Api, *keys: str | None) -> None:
    """Each key (None: no header) gets 401 on reads, on POST /jobs and on POST /predict."""
    for key in keys:
        headers = {} if key is None else {"X-API-Key": key}
        with httpx.Client(base_url=api.base, headers=headers, timeout=30) as c:
            assert c.get("/worklist").status_code == 401, key
            assert c.get(f"/studies/{uuid.uuid4()}").status_code == 401, key
            assert c.post("/jobs", files=[("files", ("a.png", film(), "image/png"))]).status_code == 401, key
            assert c.post("/predict", files=[("file", ("a.png", film(), "image/png"))]).status_code == 401, key


def stored_counts(api: Api) -> tuple[int, int, int]:
    """(jobs, studies, files in the store)."""
    with session_scope(api.db_url) as s:
        jobs = s.scalar(sql_select(func.count()).select_from(Job))
        studies = s.scalar(sql_select(func.count()).select_from(Study))
    store = api.home / "store"
    return jobs, studies, sum(1 for p in store.rglob("*") if p.is_file()) if store.exists() else 0


def test_revoking_the_last_database_key_keeps_the_api_closed(tmp_path, tiny_bundle):
    """Keys only in the database. Open while no key ever existed; once one was created,
    revoking it (the last one) leaves every route closed to it, to no key and to wrong keys;
    only CXR_AUTH=open opens it again (with a warning), and CXR_AUTH=required closes an
    installation that never had a key."""
    api = start_api(tmp_path / "a", tiny_bundle)
    try:
        assert httpx.get(f"{api.base}/worklist", timeout=10).status_code == 200  # no key ever: open
        key = cxr("apikey", "create", "--name", "ris", env=api.env).stdout.strip()
        refused_everywhere(api, *REFUSED)
        assert httpx.get(f"{api.base}/worklist", headers={"X-API-Key": key}, timeout=10).status_code == 200
        cxr("apikey", "revoke", key[:12], env=api.env)
        refused_everywhere(api, key, *REFUSED)
        assert httpx.get(f"{api.base}/health", timeout=10).status_code == 200  # probes need no key
        assert stored_counts(api) == (0, 0, 0)  # nothing of a refused upload was kept
    finally:
        stop_api(api)
    # A restarted API (nothing cached in the process) is just as closed.
    api = start_api(tmp_path / "a", tiny_bundle)
    try:
        refused_everywhere(api, key, None)
    finally:
        stop_api(api)
    opened = start_api(tmp_path / "a", tiny_bundle, CXR_AUTH="open")
    try:
        assert httpx.get(f"{opened.base}/worklist", timeout=10).status_code == 200
        assert "CXR_AUTH=open" in (tmp_path / "a" / "logs" / "api.log").read_text()
    finally:
        stop_api(opened)
    closed = start_api(tmp_path / "b", tiny_bundle, CXR_AUTH="required")  # no key was ever created here
    try:
        refused_everywhere(closed, *REFUSED)
        assert "CXR_AUTH=required but no API key exists" in (tmp_path / "b" / "logs" / "api.log").read_text()
    finally:
        stop_api(closed)


def _send_until_answered(port: int, head: bytes, chunks, total: int) -> tuple[bytes, int]:
    """Send ``head`` and then ``chunks`` (bytes) without blocking, reading whenever the
    server has something to say; stop at the first answer. Returns (what the server sent
    until it closed or 10 s passed, body bytes sent before the answer was seen)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    sent = 0
    try:
        _send_all(sock, head)
        pending = b""
        chunks = iter(chunks)
        while True:
            if not pending:
                pending = next(chunks, b"")
            readable, writable, _ = select.select([sock], [sock] if pending else [], [], 10)
            if readable:
                break
            if not readable and not writable:
                raise AssertionError(f"no answer after {sent} of {total} body bytes")
            try:
                n = sock.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += n
            pending = pending[n:]
        answer = b""
        sock.setblocking(True)
        sock.settimeout(10)
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            answer += data
        return answer, sent
    finally:
        sock.close()


def _send_all(sock: socket.socket, data: bytes) -> None:
    while data:
        select.select([], [sock], [], 10)
        data = data[sock.send(data):]


def test_an_upload_without_a_valid_key_is_refused_before_its_body(api):
    """60 MB uploads to POST /jobs and /predict with no key or a wrong one, declared by
    Content-Length or sent chunked: the 401 comes while most of the body is unsent (the
    server does not read it), and nothing is stored."""
    total = 60 * 1024 * 1024
    piece = b"\0" * 65536
    before = stored_counts(api)
    for path in ("/jobs", "/predict"):
        for key_header in (b"", b"X-API-Key: wrong-key\r\n"):
            for chunked in (False, True):
                boundary = b"cxrboundary"
                lead = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
                        b"Content-Type: image/png\r\n\r\n\x89PNG\r\n\x1a\n")
                framing = b"Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {total}\r\n".encode()
                head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + key_header + framing +
                        b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n\r\n")

                def body():
                    first = lead + piece[len(lead):]
                    for i in range(total // len(piece)):
                        data = first if i == 0 else piece
                        yield (f"{len(data):x}\r\n".encode() + data + b"\r\n") if chunked else data

                answer, sent = _send_until_answered(api.port, head, body(), total)
                case = (path, key_header, chunked, sent)
                assert answer.startswith(b"HTTP/1.1 401"), (case, answer[:300])
                assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"] == "missing or invalid X-API-Key"
                assert sent < total // 4, case  # answered long before the body was through
    assert stored_counts(api) == before
    assert httpx.get(f"{api.base}/worklist", headers={"X-API-Key": KEY}, timeout=10).status_code == 200


@pytest.mark.parametrize("down", ["broker", "database"])
def test_health_says_what_is_down_and_still_answers_bursts(tmp_path, tiny_bundle, down):
    """A broker or a database nobody answers on (a port with nothing listening): /health
    says which part is down (503 `degraded`), every probe of a 2 x 40 burst gets that answer,
    and the API stays up; with only the broker down, keyed reads still work."""
    dead = f"127.0.0.1:{free_port()}"
    env = clean_env(CXR_HOME=str(tmp_path / "home"), CXR_CHECKPOINT=str(tiny_bundle), CXR_API_KEYS=KEY,
                    CXR_QUEUE=f"cxr-load-{uuid.uuid4().hex[:8]}", CXR_HEALTH_INTERVAL_SECONDS="0.5")
    if down == "broker":
        env["CXR_BROKER_URL"] = f"redis://{dead}/0"
        cxr("db", "upgrade", env=env)
    else:
        env["CXR_DATABASE_URL"] = f"postgresql+psycopg://postgres@{dead}/cxr"
    (tmp_path / "logs").mkdir()
    stack = Stack(log_dir=tmp_path / "logs", env=env)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    stack.start("api", "api", "--port", str(port))
    try:
        def degraded():
            stack.assert_running()
            try:
                r = httpx.get(f"{base}/health", timeout=10)
            except httpx.TransportError:
                return None  # not listening yet
            return r if r.json()["status"] != "starting" else None

        r = wait_until(degraded, timeout=120, interval=0.3, describe=stack.logs)
        body = r.json()
        up = ({"database", "broker"} - {down}).pop()
        assert r.status_code == 503 and body["status"] == "degraded", body
        assert body[down].startswith("error: ") and body[up] == "ok", body
        for _ in range(2):
            results = asyncio.run(burst(base, "/health", 40))
            assert [code for code, _ in results] == [503] * 40, results
        if down == "broker":
            assert httpx.get(f"{base}/worklist", headers={"X-API-Key": KEY}, timeout=10).status_code == 200
        stack.assert_running()
    finally:
        codes = stack.stop(timeout=30)
    assert codes["api"] in (0, -15), stack.logs()


def test_pings_to_killed_workers_do_not_pile_up_in_the_filesystem_broker(tmp_path):
    """The background ping is broadcast to every worker that ever bound a control queue;
    on the filesystem broker a killed worker's queue would collect one file per ping for
    ever. Control messages older than a minute are removed; nothing else is touched."""
    import os
    import time

    from api.health import STALE_CONTROL_SECONDS, prune_dead_pidbox_messages

    queue = tmp_path / "queue"
    queue.mkdir()
    old = time.time() - STALE_CONTROL_SECONDS - 5
    names = {
        "dead": [f"{1000 + i}_{uuid.uuid4()}.cxr-123@host.celery.pidbox.msg" for i in range(5)],
        "fresh": [f"{2000 + i}_{uuid.uuid4()}.cxr-456@host.celery.pidbox.msg" for i in range(2)],
        "old task": [f"{3000 + i}_{uuid.uuid4()}.cxr.msg" for i in range(3)],  # screening tasks wait as long as needed
        "partial": [f"{4000}_{uuid.uuid4()}.cxr-123@host.celery.pidbox.msg.tmp"],
    }
    for kind, files in names.items():
        for name in files:
            (queue / name).write_bytes(b"{}")
            if kind != "fresh":
                os.utime(queue / name, (old, old))
    assert prune_dead_pidbox_messages(queue) == 5
    assert sorted(p.name for p in queue.iterdir()) == sorted(names["fresh"] + names["old task"] + names["partial"])
    assert prune_dead_pidbox_messages(tmp_path / "absent") == 0
