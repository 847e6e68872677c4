"""Prometheus metrics against real stacks: the API's /metrics (database counts, queue depth,
model info) and the worker's multiprocess exporter (latency, batch size, outcomes).

Distributed: Postgres + Redis, a prefork worker of two processes (its children's samples
are added up by the exporter). Embedded: SQLite + the filesystem broker's queue folder.
"""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from cxr.bundle import file_sha256
from cxr.db.models import Study
from cxr.db.session import session_scope
from tests.badfiles import bad_files
from tests.imagegen import write_dicom, write_png
from tests.stack import Stack, clean_env, cxr, free_port, wait_until


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a /metrics page."""
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def db_counts(db_url: str) -> dict[str, int]:
    with session_scope(db_url) as s:
        return dict(s.execute(select(Study.status, func.count()).group_by(Study.status)).all())


def post_job(api: str, files: list[tuple[str, bytes]], **headers) -> dict:
    r = httpx.post(f"{api}/jobs", files=[("files", f) for f in files], headers=headers, timeout=60)
    assert r.status_code == 202, r.text
    return r.json()


@pytest.mark.distributed
def test_distributed_metrics_match_the_database(tmp_path, tiny_bundle, postgres_url, redis_url):
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    api_port, worker_port = free_port(), free_port()
    env = clean_env(CXR_HOME=str(tmp_path / "var"), CXR_DATABASE_URL=postgres_url, CXR_BROKER_URL=redis_url,
                    CXR_CHECKPOINT=str(tiny_bundle), CXR_WORKER_METRICS_PORT=str(worker_port))
    cxr("db", "upgrade", env=env)
    (tmp_path / "logs").mkdir()
    stack = Stack(log_dir=tmp_path / "logs", env=env)
    api = f"http://127.0.0.1:{api_port}"
    stack.start("api", "api", "--port", str(api_port))
    try:
        stack.wait_http(f"{api}/health")
        bad = bad_files()
        files = [(f"film{i}.png", write_png(tmp_path / f"film{i}.png", seed=i).read_bytes()) for i in range(3)]
        files.append(("film.dcm", write_dicom(tmp_path / "film.dcm", seed=7).read_bytes()))
        files.append(("film2.dcm", write_dicom(tmp_path / "film2.dcm", seed=8).read_bytes()))
        post_job(api, files)
        # No worker yet: everything waits in Redis (POST /jobs uses the batch priority list).
        before = scrape(f"{api}/metrics")
        assert value(before, "cxr_queue_depth", queue="cxr") == 5
        assert value(before, "cxr_studies", status="queued") == 5
        assert value(before, "cxr_studies", status="done") == 0
        assert value(before, "cxr_up", part="broker") == 1 and value(before, "cxr_up", part="database") == 1
        assert value(before, "cxr_model_info", version="test-random", architecture="efficientnet_b0",
                      sha256=file_sha256(tiny_bundle)) == 1

        stack.start("worker", "worker", "--concurrency", "2")  # prefork: two children share one exporter
        wait_until(lambda: db_counts(postgres_url).get("done") == 5, timeout=240, describe=stack.logs)
        # A truncated PNG and a lateral view: rejected by the worker, counted by reason.
        post_job(api, [(name, bad[name][0]) for name in ("truncated.png", "lateral.dcm")])
        wait_until(lambda: db_counts(postgres_url).get("rejected") == 2, timeout=120, describe=stack.logs)
        counts = db_counts(postgres_url)

        after = scrape(f"{api}/metrics")
        for status in ("queued", "processing", "done", "failed", "rejected"):
            assert value(after, "cxr_studies", status=status) == counts.get(status, 0), status
        assert value(after, "cxr_queue_depth", queue="cxr") == 0
        with session_scope(postgres_url) as s:
            reasons = dict(s.execute(select(Study.reject_code, func.count()).where(Study.status == "rejected")
                                     .group_by(Study.reject_code)).all())
        assert sum(reasons.values()) == 2
        for reason, n in reasons.items():
            assert value(after, "cxr_rejected_studies", reason=reason) == n

        # The worker's own series, added up over its child processes.
        w = scrape(f"http://127.0.0.1:{worker_port}/metrics")
        assert value(w, "cxr_screening_seconds_count", status="done") == 5
        assert value(w, "cxr_screening_seconds_count", status="rejected") == 2
        assert 0 < value(w, "cxr_screening_seconds_sum", status="done") < 5 * 120
        assert value(w, "cxr_screening_seconds_bucket", status="done", le="+Inf") == 5
        assert value(w, "cxr_batch_size_count") == 5  # one forward pass each: batch size 1
        assert value(w, "cxr_batch_size_bucket", le="1.0") == 5
        assert value(w, "cxr_screened_total", status="done", model_version="test-random") == 5
        assert value(w, "cxr_screened_total", status="rejected", model_version="test-random") == 2
        pids = {k[1] for k in w if k[0] == "cxr_screened_total"}
        assert all("pid" not in dict(labels) for labels in pids)  # summed, not per process
    finally:
        codes = stack.stop()
    assert codes["worker"] == 0, stack.logs()


def test_embedded_metrics_count_the_filesystem_queue_and_need_no_key(tmp_path, tiny_bundle):
    api_port = free_port()
    home = tmp_path / "var"
    env = clean_env(CXR_HOME=str(home), CXR_CHECKPOINT=str(tiny_bundle), CXR_API_KEYS="secret-key-1")
    cxr("db", "upgrade", env=env)
    (tmp_path / "logs").mkdir()
    stack = Stack(log_dir=tmp_path / "logs", env=env)
    api = f"http://127.0.0.1:{api_port}"
    stack.start("api", "api", "--port", str(api_port))
    try:
        stack.wait_http(f"{api}/health")
        files = [(f"f{i}.png", write_png(tmp_path / f"f{i}.png", seed=i).read_bytes()) for i in range(2)]
        post_job(api, files, **{"X-API-Key": "secret-key-1"})
        assert httpx.get(f"{api}/worklist").status_code == 401  # the rest of the API wants the key
        m = scrape(f"{api}/metrics")  # /metrics, like /health, does not
        assert value(m, "cxr_queue_depth", queue="cxr") == 2
        assert len(list((home / "broker" / "queue").glob("*.cxr.msg"))) == 2
        assert value(m, "cxr_studies", status="queued") == 2
        assert value(m, "cxr_up", part="model") == 1
    finally:
        stack.stop()


def test_a_taken_metrics_port_stops_the_worker_with_a_clear_error(tmp_path, tiny_bundle):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(CXR_HOME=str(tmp_path / "var"), CXR_CHECKPOINT=str(tiny_bundle),
                        CXR_WORKER_METRICS_PORT=str(port))
        out = cxr("worker", env=env, check=False, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"cannot serve worker metrics on 127.0.0.1:{port}" in out.stderr
    assert "its own CXR_WORKER_METRICS_PORT" in out.stderr and "Traceback" not in out.stderr
