"""Bad input through the real stack (`cxr up`: API, watcher, worker on SQLite + filesystem
broker): every bad file ends rejected with its own code, its bytes kept, the good files are
all scored, nothing dies, no patient identifier is logged, and `cxr predict` agrees."""

from __future__ import annotations

import io
import json

import httpx
from pydicom import dcmread
from sqlalchemy import select, text

from cxr.db.models import Study, StudyFile
from cxr.db.session import session_scope
from tests.badfiles import bad_files, good_dicoms, png_bytes
from tests.dicomgen import SECRET_PATIENT_ID, encode
from tests.imagegen import chest_like
from tests.stack import Stack, clean_env, cxr, free_port, wait_until


def test_bad_input_never_hurts_the_stack(tmp_path, tiny_bundle):
    home, inbox, originals = tmp_path / "var", tmp_path / "inbox", tmp_path / "originals"
    originals.mkdir()
    (tmp_path / "logs").mkdir()
    port = free_port()
    env = clean_env(CXR_HOME=str(home), CXR_INBOX=str(inbox), CXR_CHECKPOINT=str(tiny_bundle),
                    CXR_WATCH_SETTLE_SECONDS="0.3", CXR_LOG_LEVEL="DEBUG",
                    CXR_WATCH_STALLED_SECONDS="2")  # cut-short files wait this long, then go to errors/
    bad = bad_files()
    good = {"good0.png": png_bytes(chest_like(300, seed=50)), "good1.png": png_bytes(chest_like(400, seed=51))}
    good |= good_dicoms()
    for name, data in list(good.items()) + [(n, d) for n, (d, _) in bad.items()]:
        (originals / name).write_bytes(data)

    stack = Stack(log_dir=tmp_path / "logs", env=env)
    stack.start("up", "up", "--port", str(port))
    try:
        base = f"http://127.0.0.1:{port}"
        stack.wait_http(f"{base}/health")
        for f in originals.iterdir():  # the watcher takes files in by content, whatever their names say
            (inbox / f.name).write_bytes(f.read_bytes())
        db_url = f"sqlite:///{home / 'cxr.db'}"

        def settled(count: int):
            stack.assert_running()
            with session_scope(db_url) as s:
                studies = s.scalars(select(Study)).all()
            terminal = [st for st in studies if st.status in ("done", "rejected", "failed")]
            return studies if len(studies) == count and len(terminal) == len(studies) else None

        wait_until(lambda: settled(len(good) + len(bad)), timeout=240, interval=1.0, describe=stack.logs)
        # Through the API: a path in the file name, and the same bytes as a good file.
        evil = png_bytes(chest_like(300, seed=52))
        r = httpx.post(f"{base}/jobs", files=[("files", ("../../etc/evil.png", evil, "image/png")),
                                              ("files", ("dup.png", good["good0.png"], "image/png"))], timeout=30)
        assert r.status_code == 202, r.text
        api_refs = r.json()["studies"]
        assert api_refs[0]["status"] == "rejected" and api_refs[0]["filename"] == "evil.png"
        expected_count = len(good) + len(bad) + 1
        studies = wait_until(lambda: settled(expected_count), timeout=60, interval=0.5, describe=stack.logs)
        by_name = {s.filename: s for s in studies}
        assert api_refs[1]["duplicate"] == "same_bytes" and api_refs[1]["study_id"] == str(by_name["good0.png"].id)
        assert api_refs[1]["status"] == "done"

        for name in good:
            assert by_name[name].status == "done", (name, by_name[name].error)
        for name, (data, code) in bad.items():
            st = by_name[name]
            assert (st.status, st.reject_code) == ("rejected", code), (name, st.status, st.error)
            assert st.error.startswith(f"{code}: ")
            assert open(st.stored_path, "rb").read() == data, f"{name}: original bytes not kept"
        evil_study = by_name["evil.png"]
        assert (evil_study.status, evil_study.reject_code) == ("rejected", "bad_filename")
        assert open(evil_study.stored_path, "rb").read() == evil
        assert list(inbox.iterdir()) == []
        kept = tmp_path / "errors"  # files cut short are kept, not deleted: each with its reason
        cut_short = {n for n in bad if n.startswith(("truncated", "empty"))}
        assert {p.name for p in kept.iterdir() if not p.name.endswith(".reason.txt")} == cut_short
        assert all((kept / n).read_bytes() == bad[n][0] and (kept / f"{n}.reason.txt").is_file() for n in cut_short)

        # The same SOP instance re-sent after transcoding: recorded, not screened again.
        transcoded = encode(dcmread(io.BytesIO(good["good_explicit.dcm"])), "jpeg_ls")
        r = httpx.post(f"{base}/jobs", files=[("files", ("resent.dcm", transcoded, "application/dicom"))], timeout=30)
        ref = r.json()["studies"][0]
        assert ref["duplicate"] == "same_sop_instance" and ref["study_id"] == str(by_name["good_explicit.dcm"].id)
        assert ref["status"] == "done"
        with session_scope(db_url) as s:
            files = s.scalars(select(StudyFile).where(StudyFile.study_id == by_name["good_explicit.dcm"].id)).all()
            assert len(files) == 2 and len(s.scalars(select(Study)).all()) == expected_count
            dump = "".join(repr(s.execute(text(f"SELECT * FROM {t}")).all()) for t in ("studies", "study_files"))
        assert by_name["good_explicit.dcm"].patient_key and SECRET_PATIENT_ID not in dump

        # The worklist keeps rejected studies apart from scored ones.
        table = cxr("worklist", "--limit", "0", env=env).stdout
        scored, rest = table.split("Rejected and failed")
        assert "good0.png" in scored and "bomb.png" not in scored
        assert "bomb.png" in rest and "too_large" in rest and "good0.png" not in rest
        wl = {w["filename"]: w for w in json.loads(cxr("worklist", "--format", "json", "--limit", "0", env=env).stdout)}
        assert wl["ct.dcm"]["reject_code"] == "not_radiograph" and wl["ct.dcm"]["status"] == "rejected"
        assert wl["good_rle.dcm"]["metadata"]["transfer_syntax"] == "1.2.840.10008.1.2.5"

        # `cxr predict` decodes and gates exactly as the worker did.
        out = cxr("predict", "--format", "json", str(originals), env=env)
        predicted = {p["path"].split("/")[-1]: p for p in json.loads(out.stdout)}
        for name, st in by_name.items():
            if name in predicted:
                assert (predicted[name]["status"], predicted[name]["reject_code"], predicted[name]["error"]) == \
                    (st.status, st.reject_code, st.error), name
        stack.assert_running()
    finally:
        codes = stack.stop()
    assert codes["up"] == 0, stack.logs()
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))  # all of it, at DEBUG level
    assert "study" in logs and SECRET_PATIENT_ID not in logs and "Secretname" not in logs
    assert "Traceback" not in logs, stack.logs()
