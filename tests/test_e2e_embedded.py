"""The whole stack on the embedded default (SQLite + filesystem broker), as `cxr up` runs it."""

from __future__ import annotations

import json
import shutil

from sqlalchemy import select

from cxr.db.models import Result, Study
from cxr.db.session import session_scope
from tests.imagegen import write_dicom, write_png
from tests.stack import Stack, clean_env, cxr, free_port, wait_until


def test_embedded_stack_screens_dropped_files(tmp_path, tiny_bundle):
    home, inbox, originals = tmp_path / "var", tmp_path / "inbox", tmp_path / "originals"
    originals.mkdir()
    port = free_port()
    env = clean_env(CXR_HOME=str(home), CXR_INBOX=str(inbox), CXR_CHECKPOINT=str(tiny_bundle),
                    CXR_WATCH_SETTLE_SECONDS="0.3")
    (tmp_path / "logs").mkdir()
    stack = Stack(log_dir=tmp_path / "logs", env=env)
    stack.start("up", "up", "--port", str(port))
    try:
        stack.wait_http(f"http://127.0.0.1:{port}/health")
        files = [write_png(originals / f"film{i}.png", seed=i) for i in range(3)]
        files.append(write_dicom(originals / "film3.dcm", seed=3))
        for f in files:
            shutil.copy(f, inbox / f.name)
        db_url = f"sqlite:///{home / 'cxr.db'}"

        def all_done():
            with session_scope(db_url) as s:
                rows = s.execute(select(Study.filename, Study.status, Study.error)).all()
            return rows if len(rows) == 4 and all(r.status == "done" for r in rows) else None

        wait_until(all_done, timeout=180, describe=stack.logs)
        with session_scope(db_url) as s:
            results = s.execute(select(Study.filename, Result).join(Result, Result.study_id == Study.id)).all()
            by_name = {name: r for name, r in results}
        assert sorted(by_name) == ["film0.png", "film1.png", "film2.png", "film3.dcm"]
        for r in by_name.values():
            assert set(r.probabilities) == {"Normal", "Pneumonia", "Tuberculosis"}
            assert abs(sum(r.probabilities.values()) - 1) < 1e-6
            assert r.predicted_class == max(r.probabilities, key=r.probabilities.get)
            assert r.heatmap_path and (home / "heatmaps").joinpath(r.heatmap_path.split("/")[-1]).is_file()
            assert open(r.heatmap_path, "rb").read(3) == b"\xff\xd8\xff"  # the overlay: a JPEG
            bare = r.heatmap_path.removesuffix(".jpg") + ".cam.png"  # the map alone: a PNG
            assert open(bare, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        assert list(inbox.iterdir()) == []  # taken in, stored once by content

        # `cxr predict` runs the same decode/preprocess/infer in-process: identical probabilities.
        out = cxr("predict", "--format", "json", str(originals), env=env)
        predicted = {p["path"].split("/")[-1]: p for p in json.loads(out.stdout)}
        for name, r in by_name.items():
            assert predicted[name]["status"] == "done"
            assert predicted[name]["probabilities"] == r.probabilities, name

        # POST /predict on the embedded stack (SQLite, filesystem transport: FIFO, no priorities).
        import httpx

        r = httpx.post(f"http://127.0.0.1:{port}/predict", timeout=60,
                       files=[("file", ("fresh.png", write_png(originals / "fresh.png", seed=99).read_bytes()))])
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "done" and set(r.json()["probabilities"]) == set(by_name["film0.png"].probabilities)
        fresh = f"http://127.0.0.1:{port}/studies/{r.json()['study_id']}"
        wait_until(lambda: httpx.get(fresh).json()["status"] == "done", timeout=60)  # its heatmap follows the answer

        # The worklist reads the same rows.
        wl = json.loads(cxr("worklist", "--format", "json", env=env).stdout)
        assert {w["filename"] for w in wl} == set(by_name) | {"fresh.png"}
        assert all(w["status"] == "done" and w["heatmap_path"] for w in wl)
    finally:
        codes = stack.stop()
    assert codes["up"] == 0, stack.logs()
