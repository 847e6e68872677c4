"""The intake API against the real stack: Postgres, Redis, a real worker process, the API
under uvicorn. One stack serves the whole module."""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
import zipfile
from dataclasses import dataclass

import httpx
import hypothesis
import pytest
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance
from sqlalchemy import func, select

from cxr.db.models import ApiKey, Job, Study
from cxr.db.session import session_scope
from tests.badfiles import png_bytes
from tests.imagegen import chest_like, write_dicom
from tests.stack import Stack, clean_env, cxr, free_port, wait_until

pytestmark = pytest.mark.distributed

KEY = "test-key-" + uuid.uuid4().hex[:8]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = {"Normal", "Pneumonia", "Tuberculosis"}


@dataclass
class Api:
    base: str
    stack: Stack
    env: dict[str, str]
    db_url: str

    def client(self, key: str | None = KEY) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"X-API-Key": key} if key else {}, timeout=60)


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_bundle, module_postgres_url, module_redis_url):
    tmp = tmp_path_factory.mktemp("api")
    port = free_port()
    env = clean_env(CXR_HOME=str(tmp / "home"), CXR_DATABASE_URL=module_postgres_url,
                    CXR_BROKER_URL=module_redis_url, CXR_QUEUE=f"cxr-test-{uuid.uuid4().hex[:8]}",
                    CXR_CHECKPOINT=str(tiny_bundle), CXR_API_KEYS=f"other-key,{KEY}", CXR_MAX_UPLOAD_MB="2",
                    CXR_MAX_ZIP_UNCOMPRESSED_MB="4", CXR_CALLBACK_BACKOFF_SECONDS="0.5",
                    CXR_CALLBACK_ALLOW="127.0.0.1/32")  # the test receivers listen on loopback
    cxr("db", "upgrade", env=env)
    (tmp / "logs").mkdir()
    stack = Stack(log_dir=tmp / "logs", env=env)
    stack.start("api", "api", "--port", str(port))
    stack.start("worker", "worker")
    base = f"http://127.0.0.1:{port}"
    try:
        stack.wait_http(f"{base}/health")
        # Wait for the worker to answer pings, so every test meets a ready stack.
        wait_until(lambda: httpx.get(f"{base}/health", timeout=10).json()["workers"] == 1, timeout=120,
                   describe=stack.logs)
        yield Api(base=base, stack=stack, env=env, db_url=module_postgres_url)
    finally:
        codes = stack.stop()
    assert codes["worker"] == 0 and codes["api"] in (0, -15), stack.logs()


def png(seed: int, size: int = 300) -> bytes:
    return png_bytes(chest_like(size, seed=seed))


def files(*items: tuple[str, bytes], field: str = "files") -> list:
    return [(field, (name, data, "application/octet-stream")) for name, data in items]


def test_health_is_open_and_reports_workers_and_model(api):
    r = httpx.get(f"{api.base}/health", timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["database"], body["broker"], body["workers"]) == ("ok", "ok", 1)
    assert body["model_version"] == "test-random"


def test_every_other_endpoint_needs_a_key(api):
    sid = uuid.uuid4()
    for method, path in (("GET", "/model/info"), ("GET", f"/studies/{sid}"), ("GET", f"/jobs/{sid}"),
                         ("GET", f"/studies/{sid}/heatmap"), ("GET", f"/studies/{sid}/overlay"),
                         ("GET", "/worklist"), ("POST", "/jobs"), ("POST", "/predict"), ("POST", "/predict/batch"),
                         ("POST", "/predict/explain")):
        for key in (None, "wrong-key"):
            r = api.client(key).request(method, path, files=files(("a.png", png(1))) if method == "POST" else None)
            assert r.status_code == 401, (method, path, key, r.status_code)
    assert api.client("other-key").get("/model/info").status_code == 200
    info = api.client().get("/model/info").json()
    assert info["architecture"] == "efficientnet_b0" and info["classes"] == sorted(CLASSES)
    assert len(info["checkpoint_sha256"]) == 64 and info["version"] == "test-random" and info["input_size"] == 64
    assert {"metrics", "operating_points", "thresholds", "temperature"} <= set(info)


def test_predict_answers_in_the_seed_shape_with_extras(api):
    with api.client() as c:
        r = c.post("/predict", files=files(("film.png", png(10)), field="file"))
        assert r.status_code == 200, r.text
        p = r.json()
        assert set(p["probabilities"]) == CLASSES and abs(sum(p["probabilities"].values()) - 1) < 1e-5
        assert p["predicted_class"] == max(p["probabilities"], key=p["probabilities"].get)
        assert p["confidence"] == pytest.approx(p["probabilities"][p["predicted_class"]])
        assert p["inference_time_ms"] > 0 and p["status"] == "done" and p["model_version"] == "test-random"
        assert isinstance(p["flagged"], bool)
        study = c.get(f"/studies/{p['study_id']}").json()
        assert study["probabilities"] == p["probabilities"]
        # The same bytes again: the stored result at once, not screened twice.
        again = c.post("/predict", files=files(("copy.png", png(10)), field="file")).json()
        assert again["study_id"] == p["study_id"] and again["duplicate"] == "same_bytes"
        # The quality gate's refusal is a 422 with the code, not a result.
        small = c.post("/predict", files=files(("tiny.png", png(11, size=24)), field="file"))
        assert small.status_code == 422 and small.json()["detail"]["reject_code"] == "too_small", small.text


def test_bare_and_pk_preamble_dicom_and_negatives_are_screened_with_notes(api):
    """A DICOM with no Part 10 header, one whose preamble starts with 'PK' (not a zip), a
    negative PNG and a blank PNG, through HTTP: each ends as the gate says, notes included."""
    from tests.dicomgen import chest_dataset, to_bytes
    from tests.test_dicom_readers import bare

    pk = chest_dataset(256, seed=91)
    pk.preamble = b"PK\x03\x04" + b"\0" * 124
    sent = {"bare.dcm": bare(chest_dataset(256, seed=90), implicit=False), "pk.dcm": to_bytes(pk),
            "negative.png": png_bytes(255 - chest_like(256, seed=92)), "black.png": png_bytes(chest_like(256) * 0)}
    with api.client() as c:
        r = c.post("/jobs", files=files(*sent.items()))
        assert r.status_code == 202, r.text
        ids = {s["filename"]: s["study_id"] for s in r.json()["studies"]}

        def finished():
            got = {n: c.get(f"/studies/{i}").json() for n, i in ids.items()}
            return got if all(s["status"] not in ("queued", "processing") for s in got.values()) else None

        got = wait_until(finished, timeout=60, describe=api.stack.logs)
    assert got["bare.dcm"]["status"] == "done" and got["bare.dcm"]["notes"][0].startswith("dicom_no_meta:")
    assert got["pk.dcm"]["status"] == "done" and got["pk.dcm"]["notes"] == []
    assert got["pk.dcm"]["metadata"]["sop_instance_uid"] == pk.SOPInstanceUID
    assert got["negative.png"]["status"] == "done" and got["negative.png"]["notes"][0].startswith("polarity_inverted")
    assert got["black.png"]["status"] == "rejected" and got["black.png"]["reject_code"] == "blank_image"


def test_predict_batch_keeps_order_and_the_seed_limit(api, tmp_path):
    dicom = write_dicom(tmp_path / "d.dcm", seed=21).read_bytes()
    with api.client() as c:
        r = c.post("/predict/batch", files=files(("a.png", png(20)), ("b.dcm", dicom), ("c.png", png(22, size=24))))
        assert r.status_code == 200, r.text
        out = r.json()
        assert [o["filename"] for o in out] == ["a.png", "b.dcm", "c.png"]
        assert [o["status"] for o in out] == ["done", "done", "rejected"]
        assert out[2]["reject_code"] == "too_small" and out[2]["predicted_class"] is None
        assert all(set(o["probabilities"]) == CLASSES for o in out[:2])
        eleven = c.post("/predict/batch", files=files(*[(f"{i}.png", png(1)) for i in range(11)]))
        assert eleven.status_code == 413 and "at most 10" in eleven.json()["detail"]


def test_explain_returns_heatmap_and_overlay(api):
    with api.client() as c:
        r = c.post("/predict/explain", files=files(("e.png", png(30)), field="file"))
        assert r.status_code == 200, r.text
        e = r.json()
        assert e["predicted_class"] in CLASSES and e["status"] == "done"
        heat, overlay = base64.b64decode(e["heatmap"]), base64.b64decode(e["overlay"])
        assert heat.startswith(PNG_MAGIC) and overlay.startswith(PNG_MAGIC) and heat != overlay
        assert c.get(e["heatmap_url"]).content == heat
        got = c.get(e["overlay_url"])
        assert got.headers["content-type"] == "image/png" and got.content == overlay
        assert c.get(f"/studies/{uuid.uuid4()}/overlay").status_code == 404


def test_content_is_sniffed_and_size_is_limited(api):
    with api.client() as c:
        gif = c.post("/predict", files=files(("x.png", b"GIF89a" + b"\0" * 200), field="file"))
        assert gif.status_code == 415 and "image/gif" in gif.json()["detail"], gif.text
        text = c.post("/jobs", files=files(("ok.png", png(40)), ("notes.dcm", b"hello, not an image\n")))
        assert text.status_code == 415 and "file 2 is text/plain" in text.json()["detail"]
        assert "notes" not in text.json()["detail"]  # client names never appear in errors
        # Over CXR_MAX_UPLOAD_MB (2 here): refused on the declared length, and on a chunked body as it arrives.
        big = b"\x89PNG\r\n\x1a\n" + b"\0" * (3 * 1024 * 1024)
        r = c.post("/jobs", files=files(("big.png", big)))
        assert r.status_code == 413 and "2 MB" in r.json()["detail"], r.text

        def chunks():  # a well-formed multipart stream of 3 MB, sent without a Content-Length
            yield (b'--x\r\nContent-Disposition: form-data; name="file"; filename="c.png"\r\n'
                   b"Content-Type: image/png\r\n\r\n" + PNG_MAGIC)
            for _ in range(48):
                yield b"\0" * 65536
            yield b"\r\n--x--\r\n"

        r = c.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413, r.text
    with session_scope(api.db_url) as s:  # nothing from the refused requests became a study
        assert not s.scalars(select(Study).where(Study.filename.in_(["ok.png", "big.png", "x.png"]))).all()
    assert httpx.get(f"{api.base}/health", timeout=10).status_code == 200


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_jobs_take_a_zip_and_refuse_unsafe_ones(api):
    with api.client() as c:
        r = c.post("/jobs", files=files(("batch.zip", zip_of({"study1/a.png": png(50), "b.png": png(51),
                                                              "__MACOSX/._b.png": b"junk"}))))
        assert r.status_code == 202, r.text
        job = r.json()
        assert [s["filename"] for s in job["studies"]] == ["a.png", "b.png"]

        def done():
            body = c.get(f"/jobs/{job['job_id']}").json()
            return body if body["status"] == "done" else None

        body = wait_until(done, timeout=120, describe=api.stack.logs)
        assert body["counts"] == {"done": 2}
        with session_scope(api.db_url) as s:
            jobs_before = s.scalar(select(func.count()).select_from(Job))
        for bad, status in (({"../evil.png": png(52)}, 400), ({"/etc/evil.png": png(53)}, 400),
                            ({"a/../../evil.png": png(54)}, 400),
                            ({"bomb.png": PNG_MAGIC + b"\0" * (5 * 1024 * 1024)}, 413),
                            ({"readme.txt": b"hello"}, 415)):
            r = c.post("/jobs", files=files(("x.zip", zip_of(bad))))
            assert r.status_code == status, (bad.keys(), r.text)
            assert "evil" not in r.text
        assert "'..'" in c.post("/jobs", files=files(("x.zip", zip_of({"../e.png": png(55)})))).json()["detail"]
        # Members the unpacker cannot read: 4xx naming the member by position, never 500, never its name.
        from tests.test_zip_members import SECRET, bad_crc, compressed_with, encrypted, truncated_stream

        for data, status in ((encrypted(1), 422), (compressed_with(9, 0), 415), (bad_crc(2), 400),
                             (truncated_stream(1), 400)):
            r = c.post("/jobs", files=files((f"{SECRET}.zip", data)))
            assert r.status_code == status and "zip member" in r.json()["detail"] and SECRET not in r.text, r.text
        assert SECRET not in (api.stack.log_dir / "api.log").read_text()
        with session_scope(api.db_url) as s:  # a refused zip leaves no job behind
            assert s.scalar(select(func.count()).select_from(Job)) == jobs_before


def test_worklist_filters_and_pages_in_cli_order(api):
    with api.client() as c:
        c.post("/predict/batch", files=files(*[(f"w{i}.png", png(60 + i)) for i in range(4)],
                                             ("w-small.png", png(69, size=24))))

        def settled():  # /predict/batch answers with the scores; each study turns done once its heatmap is written
            body = c.get("/worklist", params={"limit": 1000}).json()
            return body if not any(s["status"] in ("queued", "processing") for s in body["items"]) else None

        everything = wait_until(settled, timeout=60, describe=api.stack.logs)
        assert everything["next_cursor"] is None
        ids = [s["study_id"] for s in everything["items"]]
        cli = json.loads(cxr("worklist", "--format", "json", "--limit", "0", env=api.env).stdout)
        assert ids == [s["study_id"] for s in cli]
        paged, cursor = [], None
        while True:
            page = c.get("/worklist", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
            assert len(page["items"]) <= 3
            paged += [s["study_id"] for s in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert paged == ids and len(ids) >= 5
        rejected = c.get("/worklist", params={"status": "rejected"}).json()["items"]
        assert rejected and all(s["status"] == "rejected" for s in rejected)
        for flag in (True, False):
            got = c.get("/worklist", params={"flagged": str(flag).lower()}).json()["items"]
            assert all(s["flagged"] is flag for s in got)
        done = [s for s in everything["items"] if s["status"] == "done"]
        cls = done[0]["predicted_class"]
        by_class = c.get("/worklist", params={"predicted_class": cls}).json()["items"]
        assert {s["study_id"] for s in by_class} == {s["study_id"] for s in done if s["predicted_class"] == cls}
        assert len(c.get("/worklist", params={"model_version": "test-random"}).json()["items"]) == len(done)
        assert c.get("/worklist", params={"model_version": "nope"}).json()["items"] == []
        assert c.get("/worklist", params={"until": "2000-01-01T00:00:00"}).json()["items"] == []
        assert len(c.get("/worklist", params={"since": "2000-01-01T00:00:00Z", "limit": 1000}).json()["items"]) \
            == len(ids)
        assert c.get("/worklist", params={"cursor": "not-a-cursor"}).status_code == 422
        assert c.get("/worklist", params={"predicted_class": "a\x00b"}).status_code == 422


def test_predict_times_out_with_the_study_id_and_high_priority_goes_first(api, tmp_path):
    """A second API on a queue no worker serves yet: /predict answers 504 with the study id.
    Then a worker starts on that queue: the high-priority study is screened before the job's."""
    port = free_port()
    queue = f"cxr-idle-{uuid.uuid4().hex[:8]}"
    env = {**api.env, "CXR_QUEUE": queue, "CXR_PREDICT_TIMEOUT_SECONDS": "1"}
    (tmp_path / "logs").mkdir()
    stack = Stack(log_dir=tmp_path / "logs", env=env)
    stack.start("api2", "api", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    try:
        stack.wait_http(f"{base}/health")
        with httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=30) as c:
            job = c.post("/jobs", files=files(*[(f"q{i}.png", png(80 + i)) for i in range(3)])).json()
            r = c.post("/predict", files=files(("urgent.png", png(90)), field="file"))
            assert r.status_code == 504, r.text
            urgent = r.json()["detail"]["study_id"]
            assert c.get(f"/studies/{urgent}").json()["status"] == "queued"
            # One study at a time (no micro-batching), so the order of completion is the order
            # the broker hands tasks out: high priority first. A batching worker reserves up to
            # CXR_MAX_BATCH tasks at once, so there priority decides who gets into the next batch.
            stack.env = {**env, "CXR_MAX_BATCH": "1"}
            stack.start("worker2", "worker")

            def finished():
                stack.assert_running()
                body = c.get(f"/jobs/{job['job_id']}").json()
                return body if body["status"] == "done" else None

            body = wait_until(finished, timeout=120, describe=stack.logs)
            first_batch = min(s["finished_at"] for s in body["studies"])
            assert c.get(f"/studies/{urgent}").json()["finished_at"] < first_batch
    finally:
        codes = stack.stop()
    assert codes.get("worker2") == 0, stack.logs()


def test_database_keys_work_until_revoked(api):
    out = cxr("apikey", "create", "--name", "ris-script", env=api.env)
    key = out.stdout.strip()
    assert key.startswith("cxr_") and len(key) > 40
    assert api.client(key).get("/model/info").status_code == 200
    listed = json.loads(cxr("apikey", "list", "--format", "json", env=api.env).stdout)
    mine = [k for k in listed if k["name"] == "ris-script"]
    assert len(mine) == 1 and key.startswith(mine[0]["prefix"]) and key not in json.dumps(listed)
    with session_scope(api.db_url) as s:  # only the hash is stored
        dump = repr(s.execute(select(ApiKey.__table__)).all())
    assert key not in dump
    cxr("apikey", "revoke", mine[0]["prefix"], env=api.env)
    assert api.client(key).get("/model/info").status_code == 401
    assert api.client().get("/model/info").status_code == 200  # CXR_API_KEYS still work
    assert cxr("apikey", "revoke", mine[0]["prefix"], env=api.env, check=False).returncode == 2


def test_cxr_submit_uploads_and_waits(api, tmp_path):
    folder = tmp_path / "films"
    folder.mkdir()
    for i in range(3):
        (folder / f"s{i}.png").write_bytes(png(100 + i))
    env = {**api.env, "CXR_API_URL": api.base, "CXR_API_KEY": KEY}
    out = cxr("submit", "--wait", "--per-request", "2", "--format", "json", str(folder), env=env)
    rows = json.loads(out.stdout)
    assert sorted(r["filename"] for r in rows) == ["s0.png", "s1.png", "s2.png"]
    assert all(r["status"] == "done" and r["predicted_class"] in CLASSES for r in rows)
    denied = cxr("submit", str(folder), env={**env, "CXR_API_KEY": "wrong"}, check=False)
    assert denied.returncode == 1 and "401" in denied.stderr


class Receiver:
    """A real HTTP server on loopback that records callback POSTs; it answers 500 to the
    first `fail_first` requests."""

    def __init__(self, fail_first: int) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.bodies: list[dict] = []
        self.attempts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.attempts += 1
                ok = outer.attempts > fail_first
                if ok:
                    outer.bodies.append(body)
                self.send_response(200 if ok else 500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_job_callback_is_posted_when_done_with_retries(api):
    hook = Receiver(fail_first=1)
    try:
        with api.client() as c:
            r = c.post("/jobs", data={"callback_url": hook.url}, files=files(("cb0.png", png(120)), ("cb1.png", png(121))))
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            body = wait_until(lambda: hook.bodies and hook.bodies[0], timeout=120, describe=api.stack.logs)
            assert hook.attempts == 2  # the first delivery got a 500 and was retried
            assert body["event"] == "job.completed" and body["job_id"] == job_id and body["status"] == "done"
            assert body["counts"] == {"done": 2} and all(s["predicted_class"] in CLASSES for s in body["studies"])
            sent = wait_until(lambda: (j := c.get(f"/jobs/{job_id}").json())["callback"]["state"] == "sent" and j,
                              timeout=30, describe=api.stack.logs)
            assert sent["callback"]["attempts"] == 2  # the 500, then the delivery
            # A job of studies already finished (the same bytes again) calls back at once.
            r = c.post("/jobs", data={"callback_url": hook.url}, files=files(("again.png", png(120))))
            again = wait_until(lambda: len(hook.bodies) > 1 and hook.bodies[1], timeout=60, describe=api.stack.logs)
            assert again["job_id"] == r.json()["job_id"] and again["counts"] == {"done": 1}
            assert c.post("/jobs", data={"callback_url": "file:///etc/passwd"},
                          files=files(("x.png", png(122)))).status_code == 422
            for host in ("127.0.0.2", "2130706434", "[::1]", "169.254.169.254", "10.1.2.3", "localhost"):
                r = c.post("/jobs", data={"callback_url": f"http://{host}/hook"}, files=files(("x.png", png(122))))
                assert r.status_code == 422 and "callback refused" in r.json()["detail"], (host, r.text)
        time.sleep(1.5)
        assert hook.attempts == 3  # one delivery per job, after the one retry
    finally:
        hook.server.shutdown()


# --- the OpenAPI schema, fuzzed -----------------------------------------------------------
# schemathesis generates requests from /openapi.json for every operation (about 25 each,
# a few hundred in all) against the real app and worker: no 5xx, and every response must
# conform to the schema (status code documented, content type, body schema).

def test_openapi_fuzz(api):
    schema = schemathesis.openapi.from_url(f"{api.base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 11
    calls: list[str] = []
    for operation in operations:
        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=25, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck), phases=[
                                 hypothesis.Phase.explicit, hypothesis.Phase.generate])
        def run(case):
            calls.append(operation.label)
            # Every check but positive_data_acceptance: any bytes are a schema-valid file
            # upload, yet the API refuses what is not PNG, JPEG or DICOM by content (415),
            # which OpenAPI cannot express.
            case.call_and_validate(headers={"X-API-Key": KEY}, timeout=60, excluded_checks=[positive_data_acceptance])

        run()
    assert 150 <= len(calls) <= 500, len(calls)
    api.stack.assert_running()
