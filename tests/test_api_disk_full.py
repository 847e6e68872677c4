"""A full disk: the API refuses new uploads with 507 and a clear reason, and takes nothing in."""

from __future__ import annotations

import shutil

import httpx
from sqlalchemy import func, select

from cxr.db.models import Study
from cxr.db.session import session_scope
from tests.imagegen import write_png
from tests.stack import Stack, clean_env, cxr, free_port


def test_uploads_are_refused_with_507_while_the_disk_is_below_the_minimum(tmp_path):
    home = tmp_path / "var"
    too_much = shutil.disk_usage(tmp_path).free / 1048576 + 1024  # more than this disk has free
    env = clean_env(CXR_HOME=str(home), CXR_MIN_FREE_MB=f"{too_much:.0f}")
    cxr("db", "upgrade", env=env)
    film = write_png(tmp_path / "film.png").read_bytes()
    (tmp_path / "logs").mkdir()
    stack = Stack(log_dir=tmp_path / "logs", env=env)
    port = free_port()
    stack.start("api", "api", "--port", str(port))
    try:
        stack.wait_http(f"http://127.0.0.1:{port}/health")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            for path, field in (("/jobs", "files"), ("/predict", "file")):
                r = c.post(path, files={field: ("film.png", film, "image/png")})
                assert r.status_code == 507, r.text
                assert "disk full" in r.json()["detail"] and "CXR_MIN_FREE_MB" in r.json()["detail"]
    finally:
        stack.stop()
    assert "refusing an upload: disk full" in stack.logs()
    with session_scope(f"sqlite:///{home / 'cxr.db'}") as s:
        assert s.scalar(select(func.count()).select_from(Study)) == 0
    assert [p for p in (home / "store").rglob("*") if p.is_file()] == []  # nothing stored
