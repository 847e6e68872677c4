"""No patient data in logs, the database or the outputs, whatever the header holds.

Hostile PatientName values (a newline followed by a forged log line, terminal escape
sequences, 300 characters, multi-valued with backslashes), a PatientID with a newline and a
malformed PatientBirthDate (whose conversion error quotes it). The filter (cxr/logsafe.py) is
checked on its own, then real processes (the embedded stack: worker and watcher, with DICOM
outputs on, whose writer trips over the bad date) screen such files and every log file, a
dump of the database and the exported worklists are searched for the values."""

from __future__ import annotations

import io
import json
import logging
import sqlite3
import uuid

import pytest

from cxr.logsafe import WITHHELD, RedactingFilter, redact_text
from tests.dicomgen import chest_dataset, to_bytes
from tests.stack import Stack, clean_env, cxr, wait_until

HOSTILE_NAMES = {
    "newline": "SMITHSECRET^JOHN\n2026-01-01 INFO cxr: all fine PatientName=DECOY",
    "escape": "EVILSECRET\x1b[31m^RED\x1b[0m\r\x07\x1b]0;title\x07",
    "long": "LONGSECRET^" + "Q" * 289,
    "multi": "FIRSTSECRET^ONE\\SECONDSECRET^TWO\\\\THIRDSECRET",
}
BIRTH = "19X7-BADSECRET"
PATIENT_ID = "PIDSECRET\n42"
TOKENS = ["SMITHSECRET", "EVILSECRET", "LONGSECRET", "Q" * 40, "FIRSTSECRET", "SECONDSECRET", "THIRDSECRET",
          "BADSECRET", "PIDSECRET", "DECOY"]


def hostile_file(kind: str, seed: int) -> bytes:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own complaints about setting and writing these values
        ds = chest_dataset(128, seed=seed)
        ds.PatientName = HOSTILE_NAMES[kind]
        ds.PatientBirthDate = f"{BIRTH}{kind.upper()}"
        ds.PatientID = PATIENT_ID
        return to_bytes(ds)


def capture() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger(f"test-redaction-{uuid.uuid4().hex[:6]}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return logger, stream


@pytest.mark.parametrize("kind", sorted(HOSTILE_NAMES))
def test_identifying_pairs_are_masked_across_lines_and_control_characters_escaped(kind):
    log, out = capture()
    name = HOSTILE_NAMES[kind]
    log.warning("header PatientName=%s, Modality=CR", name)
    log.warning("(0010,0010) PN: %s", name)
    log.info("a record with %s inside", "two\nlines\x1b[2J")
    text = out.getvalue()
    assert not any(t in text for t in TOKENS), text
    assert "Modality=CR" in text
    assert len(text.splitlines()) == 3  # one line per record: nothing forged
    assert "\x1b" not in text and "\r" not in text and "two\\nlines\\x1b[2J" in text
    assert redact_text("PatientID=\n123\n456") == "PatientID=<redacted>"


def test_exception_text_from_dicom_code_is_withheld_and_other_errors_kept():
    from pydicom.valuerep import DA

    log, out = capture()
    try:
        DA(BIRTH)
    except ValueError as e:
        log.exception("cannot convert: %s", e)
        log.error("again (%s: %s)", type(e).__name__, e)
    try:
        raise OSError("the outbox /srv/out is full")
    except OSError:
        log.exception("writing failed")
    text = out.getvalue()
    assert BIRTH not in text and WITHHELD in text
    assert "valuerep.py" in text  # the frames stay: where it happened is still known
    assert "the outbox /srv/out is full" in text  # not DICOM code: kept


@pytest.mark.timeout(240)
def test_real_processes_keep_hostile_header_values_out_of_logs_db_and_outputs(tmp_path, tiny_bundle):
    home, inbox, outbox = tmp_path / "var", tmp_path / "inbox", tmp_path / "outbox"
    env = clean_env(CXR_HOME=str(home), CXR_INBOX=str(inbox), CXR_CHECKPOINT=str(tiny_bundle),
                    CXR_GATE_MIN_SIZE="64", CXR_WATCH_SETTLE_SECONDS="0.2", CXR_QUEUE=f"red-{uuid.uuid4().hex[:8]}",
                    CXR_DICOM_OUTBOX=str(outbox), CXR_LOG_LEVEL="DEBUG")
    cxr("db", "upgrade", env=env)
    inbox.mkdir(exist_ok=True)
    names = []
    for seed, kind in enumerate(sorted(HOSTILE_NAMES)):
        (inbox / f"{kind}.dcm").write_bytes(hostile_file(kind, seed))
        names.append(kind)
    (tmp_path / "logs").mkdir()
    stack = Stack(log_dir=tmp_path / "logs", env=env)
    stack.start("worker", "worker")
    stack.start("watcher", "watch")
    db = home / "cxr.db"

    def finished():
        stack.assert_running()
        if not db.exists():
            return False
        with sqlite3.connect(db) as c:
            rows = c.execute("select status from studies").fetchall()
        return len(rows) == len(names) and all(r[0] in ("done", "rejected", "failed") for r in rows)

    try:
        wait_until(finished, timeout=150, describe=stack.logs)
        exports = {fmt: cxr("worklist", "--format", fmt, "--limit", "0", env=env).stdout
                   for fmt in ("json", "csv", "html", "table")}
        show = [cxr("study", "show", s["study_id"], "--format", "json", env=env).stdout
                for s in json.loads(exports["json"])]
    finally:
        stack.stop()
    with sqlite3.connect(db) as c:
        dump = "\n".join(c.iterdump())
    logs = {p.name: p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log")}
    assert "DICOM outputs not written" in logs["worker.log"]  # the bad date did trip the writer ...
    assert WITHHELD in logs["worker.log"]  # ... and its error was logged without the value
    places = {**logs, "database": dump, **exports, "study show": "\n".join(show),
              "heatmap names": "\n".join(p.name for p in (home / "heatmaps").glob("*"))}
    for where, text in places.items():
        leaked = [t for t in TOKENS if t.lower() in text.lower()]
        assert not leaked, (where, leaked)
        assert "\x1b" not in text or where in ("table",), where


def test_uvicorn_access_lines_keep_their_shape_and_are_redacted():
    """uvicorn's AccessFormatter unpacks its five args: the filter keeps them a tuple (a
    None there broke every access line of `cxr api`), and still masks what they carry."""
    from uvicorn.logging import AccessFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False))
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("uvicorn.access")
    old = (logger.handlers[:], logger.propagate, logger.level)
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    try:
        logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET",
                    "/worklist?PatientName=SMITHSECRET\nforged", "1.1", 200)
    finally:
        logger.handlers, logger.propagate, _ = old
        logger.setLevel(old[2])
    line = stream.getvalue()
    assert "GET /worklist?PatientName=" in line and '" 200' in line
    assert "SMITHSECRET" not in line and line.count("\n") == 1


def test_a_failed_statement_does_not_quote_its_parameters(tmp_path):
    """SQLAlchemy puts a failed statement's parameters (a file name, an accession number) in
    its error message, which intake logs ("intake of a file failed (...)") and routes turn into
    sentences: the engines are made with hide_parameters, so they never are."""
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    from cxr.db.session import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'p.db'}", pool_size=1)
    with engine.begin() as c:
        c.execute(text("CREATE TABLE t (name VARCHAR(64) NOT NULL UNIQUE)"))
        c.execute(text("INSERT INTO t VALUES (:n)"), {"n": "SMITHSECRET^JOHN.dcm"})
    with pytest.raises(IntegrityError) as e:
        with engine.begin() as c:
            c.execute(text("INSERT INTO t VALUES (:n)"), {"n": "SMITHSECRET^JOHN.dcm"})
    assert "UNIQUE" in str(e.value) and "SMITHSECRET" not in str(e.value)
    engine.dispose()
