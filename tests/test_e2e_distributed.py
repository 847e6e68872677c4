"""The same code on Postgres + Redis: API and worker as separate processes, intake over HTTP."""

from __future__ import annotations

import uuid

import httpx
import pytest
from sqlalchemy import func, select

from cxr.db.models import Result, Study
from cxr.db.session import session_scope
from tests.imagegen import write_dicom, write_png
from tests.stack import Stack, clean_env, cxr, free_port, wait_until

pytestmark = pytest.mark.distributed


def test_distributed_stack_over_http(tmp_path, tiny_bundle, postgres_url, redis_url):
    port = free_port()
    env = clean_env(CXR_HOME=str(tmp_path / "shared-store"), CXR_DATABASE_URL=postgres_url,
                    CXR_BROKER_URL=redis_url, CXR_QUEUE=f"cxr-test-{uuid.uuid4().hex[:8]}",
                    CXR_CHECKPOINT=str(tiny_bundle))
    cxr("db", "upgrade", env=env)
    (tmp_path / "logs").mkdir()
    stack = Stack(log_dir=tmp_path / "logs", env=env)
    stack.start("api", "api", "--port", str(port))
    stack.start("worker", "worker")
    base = f"http://127.0.0.1:{port}"
    try:
        stack.wait_http(f"{base}/health")
        health = httpx.get(f"{base}/health").json()
        assert health["database"] == "ok" and health["broker"] == "ok", health

        files = [write_png(tmp_path / f"p{i}.png", seed=10 + i) for i in range(3)]
        files.append(write_dicom(tmp_path / "d.dcm", seed=13))
        upload = [("files", (f.name, f.read_bytes(), "application/octet-stream")) for f in files]
        r = httpx.post(f"{base}/jobs", files=upload, timeout=30)
        assert r.status_code == 202, r.text
        job = r.json()
        assert [s["filename"] for s in job["studies"]] == ["p0.png", "p1.png", "p2.png", "d.dcm"]

        def job_done():
            body = httpx.get(f"{base}/jobs/{job['job_id']}", timeout=10).json()
            stack.assert_running()
            return body if body["status"] == "done" else None

        body = wait_until(job_done, timeout=180, describe=stack.logs)
        assert body["counts"] == {"done": 4}
        for s in body["studies"]:
            assert s["predicted_class"] in ("Normal", "Pneumonia", "Tuberculosis")
            one = httpx.get(f"{base}/studies/{s['study_id']}").json()
            assert one["probabilities"] == s["probabilities"]
            heat = httpx.get(f"{base}/studies/{s['study_id']}/heatmap")
            assert heat.status_code == 200 and heat.headers["content-type"] == "image/png"
            assert heat.content[:8] == b"\x89PNG\r\n\x1a\n"

        info = httpx.get(f"{base}/model/info").json()
        assert info["architecture"] == "efficientnet_b0" and len(info["checkpoint_sha256"]) == 64

        with session_scope(postgres_url) as s:
            assert s.scalar(select(func.count()).select_from(Study)) == 4
            assert s.scalar(select(func.count()).select_from(Result)) == 4

        # The same bytes again: one study, linked from the new job, not screened twice.
        r2 = httpx.post(f"{base}/jobs", files=upload[:1], timeout=30).json()
        assert r2["studies"][0]["study_id"] == job["studies"][0]["study_id"]
        assert r2["studies"][0]["status"] == "done"
        assert httpx.get(f"{base}/studies/{uuid.uuid4()}").status_code == 404
    finally:
        codes = stack.stop()
    # uvicorn re-raises SIGTERM after its graceful shutdown, so the API's clean exit reads -15.
    assert codes["worker"] == 0 and codes["api"] in (0, -15), stack.logs()
