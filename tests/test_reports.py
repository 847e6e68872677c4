"""The HTML worklist and the summary report, on a database of 20 studies screened by the real
intake and worker code (tests/reportdb.py), on the embedded SQLite default and on Postgres."""

from __future__ import annotations

import base64
import io
import logging
import re
from collections import Counter
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from cxr.db import repo
from cxr.db.models import Study
from cxr.db.session import session_scope
from cxr.reports.summary import failure_reason
from cxr.reports.worklist_html import render_worklist_html, thumbnail
from tests import reportdb
from tests.stack import clean_env, cxr


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def db(request, tmp_path_factory, tiny_bundle) -> reportdb.ReportDb:
    url = request.getfixturevalue("module_postgres_url") if request.param == "postgres" else None
    return reportdb.build(tmp_path_factory.mktemp(f"reports-{request.param}") / "var", tiny_bundle, database_url=url)


# ---------------------------------------------------------------- HTML parsing helpers


class Page(HTMLParser):
    """Rows of each table.wl (cells' data-v and text), img tags and every URL-bearing attribute."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, dict] = {}
        self.urls: list[str] = []
        self.imgs: list[dict[str, str]] = []
        self._table = None
        self._row = None
        self._cell = None
        self._in_head = False
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("src", "href", "action", "data", "poster"):
            if k in a:
                self.urls.append(a[k] or "")
        if tag == "table" and "wl" in (a.get("class") or ""):
            self._table = self.tables.setdefault(a["id"], {"head": [], "rows": []})
        elif tag == "thead":
            self._in_head = True
        elif tag == "tr" and self._table is not None and not self._in_head:
            self._row = {"attrs": a, "cells": [], "imgs": []}
            self._table["rows"].append(self._row)
        elif tag in ("td", "th") and self._table is not None:
            self._cell = {"v": a.get("data-v"), "text": "", "attrs": a}
            if self._in_head:
                self._table["head"].append(self._cell)
            elif self._row is not None:
                self._row["cells"].append(self._cell)
        elif tag == "img":
            self.imgs.append(a)
            if self._row is not None:
                self._row["imgs"].append(a)

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "thead":
            self._in_head = False
        elif tag == "tr":
            self._row = None
        elif tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell["text"] += data


def parse(html_text: str) -> Page:
    p = Page()
    p.feed(html_text)
    p.close()
    return p


def column(table: dict, label: str) -> int:
    return [h["text"].strip() for h in table["head"]].index(label)


def decode_data_uri(uri: str) -> tuple[str, Image.Image]:
    m = re.fullmatch(r"data:(image/(?:png|jpeg));base64,([A-Za-z0-9+/=]+)", uri)
    assert m, uri[:80]
    image = Image.open(io.BytesIO(base64.b64decode(m.group(2))))
    image.load()
    return m.group(1), image


# ---------------------------------------------------------------- the HTML worklist


def test_html_worklist_from_the_cli(db, tmp_path):
    out = tmp_path / "deep" / "worklist.html"
    proc = cxr("worklist", "--format", "html", "--limit", "0", "--out", str(out), env=clean_env(**db.env))
    assert "20 studies written" in proc.stderr and "not for clinical use" in proc.stderr
    assert proc.stdout == ""
    text = out.read_text(encoding="utf-8")
    page = parse(text)

    # Banner, and nothing that would load from elsewhere (a CSP forbids it as well).
    assert 'id="disclaimer"' in text and "Screening aid, not for clinical use." in text
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    assert page.urls and all(u.startswith("data:") for u in page.urls), [u[:60] for u in page.urls if
                                                                       not u.startswith("data:")]
    assert not re.search(r"https?://", text), re.search(r".{40}https?://.{40}", text)
    assert "<link" not in text and "@import" not in text and "url(" not in text

    # The worklist order of repo.worklist: scored studies, flagged first, then by risk.
    with session_scope(db.settings.database_url) as s:
        expected = [repo.study_summary(r.study, r.result) for r in repo.worklist(s, limit=None)]
        patient_keys = [k for k in s.scalars(select(Study.patient_key)) if k]
        sops = [k for k in s.scalars(select(Study.sop_instance_uid)) if k]
    by_name = {r["filename"]: r for r in expected}
    scored, unscored = page.tables["scored"]["rows"], page.tables["unscored"]["rows"]
    assert len(scored) == 15 and len(unscored) == 5
    study_col = column(page.tables["scored"], "Study")
    names = [r["cells"][study_col]["text"] for r in scored]
    assert [n[:-8] for n in names] == [r["filename"] for r in expected if r["status"] == "done"]
    flags = [r["attrs"]["data-flagged"] == "1" for r in scored]
    assert flags == sorted(flags, reverse=True) and any(flags) and not all(flags)
    risk_col = column(page.tables["scored"], "Risk")
    for flag in (True, False):
        risks = [float(r["cells"][risk_col]["v"]) for r, f in zip(scored, flags) if f is flag]
        assert risks == sorted(risks, reverse=True)

    # Per row: probabilities as bars, status, model version, time, heatmap thumbnail.
    head = [h["text"].strip() for h in page.tables["scored"]["head"]]
    assert head[:6] == ["#", "Heatmap", "Study", "Flag", "Prediction", "Risk"]
    assert head[6:9] == ["P(Normal)", "P(Pneumonia)", "P(Tuberculosis)"] and head[9:] == ["Status", "Model", "Time"]
    for row in scored:
        want = by_name[row["cells"][study_col]["text"][:-8]]
        assert row["cells"][study_col]["text"].endswith(want["study_id"][:8])
        for i, cls in enumerate(("Normal", "Pneumonia", "Tuberculosis"), start=6):
            assert float(row["cells"][i]["v"]) == pytest.approx(want["probabilities"][cls], abs=1e-6)
            assert f"{want['probabilities'][cls]:.3f}" in row["cells"][i]["text"]
        assert row["cells"][4]["text"] == want["predicted_class"]
        assert row["cells"][9]["text"] == "done"
        assert row["cells"][10]["text"] == want["model_version"] and want["model_version"] in db.versions
        assert row["cells"][11]["text"].endswith(" UTC")
        (img,) = row["imgs"]
        assert img["data-kind"] == "heatmap"
        mime, thumb = decode_data_uri(img["src"])
        assert mime == "image/jpeg" and max(thumb.size) == 160
        with Image.open(want["heatmap_path"]) as full:  # the overlay, downscaled
            assert abs(thumb.size[0] / thumb.size[1] - full.size[0] / full.size[1]) < 0.02
    assert {r["cells"][10]["text"] for r in scored} == set(db.versions)

    # Rejected and failed: own section, with the reason and a placeholder image.
    assert {r["cells"][3]["text"] for r in unscored} == {"rejected", "failed"}
    reasons = {r["cells"][2]["text"][:-8]: r["cells"][5]["text"] for r in unscored}
    for name, code in reportdb.REJECTED.items():
        assert reasons[name].startswith(f"{code}: ")
    codes = {r["cells"][2]["text"][:-8]: r["cells"][4]["text"] for r in unscored}
    assert codes == {**reportdb.REJECTED, **{name: "store_unreadable" for name in reportdb.FAILED}}
    for name in reportdb.FAILED:
        assert reasons[name].startswith("store_unreadable: ")
    for row in unscored:
        (img,) = row["imgs"]
        assert img["data-kind"] == "placeholder"
        mime, image = decode_data_uri(img["src"])
        assert mime == "image/png" and image.size == (160, 160)

    # No patient identifiers: neither the pseudonymised key nor the DICOM's PatientID/Name.
    assert patient_keys and sops
    for secret in (*patient_keys, "TEST0014", "Test^Patient"):
        assert secret not in text
    assert len(text) < 400_000, len(text)  # small thumbnails, not full-size PNGs


def test_html_worklist_limit_and_filters(db, tmp_path):
    env = clean_env(**db.env)
    out = tmp_path / "w.html"
    cxr("worklist", "-f", "html", "--limit", "4", "-o", str(out), env=env)
    page = parse(text := out.read_text())
    assert len(page.tables["scored"]["rows"]) == 4 and "unscored" not in page.tables
    assert "Only the first 4 studies are shown" in text
    # --status narrows it as for the other formats; the unscored section then says None.
    cxr("worklist", "-f", "html", "--status", "done", "--limit", "0", "-o", str(out), env=env)
    page = parse(text := out.read_text())
    assert len(page.tables["scored"]["rows"]) == 15 and "unscored" not in page.tables
    assert 'id="unscored-section"' in text and "None." in text and "Only the first" not in text
    # Without --out the page goes to standard output.
    proc = cxr("worklist", "-f", "html", "--status", "failed", env=env)
    assert proc.stdout.lstrip().startswith("<!DOCTYPE html>")
    assert len(parse(proc.stdout).tables["unscored"]["rows"]) == 2


def test_html_escapes_text_and_survives_a_missing_heatmap(tmp_path, caplog):
    hostile = '<img src=x onerror="alert(1)">&"\''
    rows = [{"study_id": "11111111-2222-3333-4444-555555555555", "filename": hostile, "status": "done",
             "predicted_class": "Pneumonia", "probabilities": {"Normal": 0.1, "Pneumonia": 0.7, "Tuberculosis": 0.2},
             "risk": 0.9, "flagged": True, "heatmap_path": str(tmp_path / "gone.png"), "model_version": hostile,
             "reject_code": None, "error": None, "created_at": "2026-01-02T03:04:05+00:00", "finished_at": None},
            {"study_id": "66666666-2222-3333-4444-555555555555", "filename": "x.png", "status": "rejected",
             "predicted_class": None, "probabilities": None, "risk": None, "flagged": None, "heatmap_path": None,
             "model_version": None, "reject_code": "not_an_image", "error": f"not_an_image: {hostile}",
             "created_at": "2026-01-02T03:04:05", "finished_at": None}]
    with caplog.at_level(logging.WARNING, logger="cxr.reports.worklist_html"):
        text = render_worklist_html(rows, generated_at=datetime(2026, 1, 2, tzinfo=timezone.utc))
    assert "<img src=x" not in text and 'onerror="alert' not in text
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;&quot;&#x27;" in text
    page = parse(text)
    assert page.tables["scored"]["rows"][0]["cells"][2]["text"].startswith(hostile)
    assert page.tables["unscored"]["rows"][0]["cells"][5]["text"] == f"not_an_image: {hostile}"
    assert page.tables["scored"]["rows"][0]["imgs"][0]["data-kind"] == "placeholder"
    assert page.tables["scored"]["rows"][0]["imgs"][0]["alt"] == "heatmap file missing or unreadable"
    assert any("heatmap cannot be read" in r.getMessage() for r in caplog.records)
    assert all(hostile not in r.getMessage() for r in caplog.records)
    assert page.tables["scored"]["rows"][0]["cells"][11]["text"] == "2026-01-02 03:04 UTC"

    # A file that is not an image gives the same placeholder.
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    assert thumbnail({"heatmap_path": str(junk), "status": "done", "study_id": "x"}).kind == "placeholder"


# ---------------------------------------------------------------- the summary report


def md_table(md: str, heading: str) -> list[dict[str, str]]:
    section = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    if not lines:
        return []
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def db_counts(db: reportdb.ReportDb, since: datetime | None = None):
    """Per day and totals, counted here from the ORM objects (newest result per study)."""
    per_day: dict[str, Counter] = {}
    models: Counter = Counter()
    rejected: Counter = Counter()
    failed: Counter = Counter()
    with session_scope(db.settings.database_url) as s:
        for st in s.scalars(select(Study)):
            created = st.created_at if st.created_at.tzinfo else st.created_at.replace(tzinfo=timezone.utc)
            if since is not None and created < since:
                continue
            day = created.astimezone(timezone.utc).date().isoformat()
            c = per_day.setdefault(day, Counter())
            c["received"] += 1
            result = st.results[-1] if st.results else None
            if st.status == "done":
                c[result.predicted_class] += 1
                c["flagged"] += int(result.flagged)
                c["scored"] += 1
                models[result.model_version.version] += 1
            elif st.status == "rejected":
                c["rejected"] += 1
                rejected[(day, st.reject_code)] += 1
            elif st.status == "failed":
                c["failed"] += 1
                failed[(day, st.error.split(":")[0])] += 1
            else:
                c["pending"] += 1
    return per_day, models, rejected, failed


def test_summary_report_matches_the_database(db, tmp_path):
    out = tmp_path / "summary"
    proc = cxr("report", "summary", "--out", str(out), env=clean_env(**db.env))
    assert "summary of 20 studies over 3 day(s)" in proc.stderr
    md = (out / "summary.md").read_text()
    assert "not for clinical use" in md
    per_day, models, rejected, failed = db_counts(db)
    assert len(per_day) == 3

    days = md_table(md, "Per day")
    assert [d["day"] for d in days] == sorted(per_day)
    for d in days:
        want = per_day[d["day"]]
        for key in ("received", "Normal", "Pneumonia", "Tuberculosis", "flagged", "rejected", "failed", "pending"):
            assert int(d[key]) == want[key], (d["day"], key)
        assert d["flag rate"] == (f"{100 * want['flagged'] / want['scored']:.1f}%" if want["scored"] else "-")

    (totals,) = md_table(md, "Totals")
    assert int(totals["received"]) == 20 == sum(c["received"] for c in per_day.values())
    for key in ("scored", "flagged", "rejected", "failed", "pending"):
        assert int(totals[key]) == sum(c[key] for c in per_day.values()), key
    assert (int(totals["scored"]), int(totals["rejected"]), int(totals["failed"])) == (15, 3, 2)

    assert {(r["day"], r["reject code"]): int(r["studies"]) for r in md_table(md, "Rejections by code")} == rejected
    assert {(r["day"], r["reason"]): int(r["studies"]) for r in md_table(md, "Failures by reason")} == failed
    assert {r["version"]: int(r["scored"]) for r in md_table(md, "Model versions in use")} == models
    assert set(models) == set(db.versions)

    # Throughput: every study finished; studies per hour over first intake .. last result.
    (tp,) = md_table(md, "Throughput")
    assert int(tp["finished"]) == 20
    with session_scope(db.settings.database_url) as s:
        times = s.execute(select(Study.created_at, Study.finished_at)).all()
    utc = [(a if a.tzinfo else a.replace(tzinfo=timezone.utc), b if b.tzinfo else b.replace(tzinfo=timezone.utc))
           for a, b in times]
    span_h = (max(b for _, b in utc) - min(a for a, _ in utc)).total_seconds() / 3600
    assert tp["span (first received to last finished)"] == f"{span_h:.2f} h"
    assert tp["studies per hour"] == f"{20 / span_h:.1f}"

    # The plots: real PNGs, not blank, linked from the Markdown.
    for name in ("daily_volume.png", "flag_rate.png", "score_histograms.png"):
        assert f"]({name})" in md
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 250
            extrema = im.convert("L").getextrema()
            assert extrema[1] - extrema[0] > 100, name


def test_summary_since_and_empty(db, tmp_path):
    env = clean_env(**db.env)
    per_day, *_ = db_counts(db)
    last = sorted(per_day)[-1]
    out = tmp_path / "since"
    cxr("report", "summary", "--since", f"{last}T00:00:00", "--out", str(out), env=env)
    md = (out / "summary.md").read_text()
    (totals,) = md_table(md, "Totals")
    assert int(totals["received"]) == per_day[last]["received"]
    assert [d["day"] for d in md_table(md, "Per day")] == [last]
    assert f"since {last} 00:00:00 UTC" in md

    # Nothing received after --since: a report that says so, and no plots.
    empty = tmp_path / "empty"
    proc = cxr("report", "summary", "--since", "2999-01-01", "--out", str(empty), env=env)
    assert "summary of 0 studies" in proc.stderr
    md = (empty / "summary.md").read_text()
    (totals,) = md_table(md, "Totals")
    assert totals["received"] == "0" and totals["flag rate"] == "-"
    assert "None: no study was scored." in md
    assert sorted(p.name for p in empty.iterdir()) == ["summary.md"]


def test_failure_reason_codes():
    row = repo.SummaryRow(created_at=datetime.now(timezone.utc), finished_at=None, status="failed", reject_code=None,
                          error="internal_error: RuntimeError: boom", predicted_class=None, flagged=None, risk=None,
                          probabilities=None, model_version=None, architecture=None, result_at=None)
    assert failure_reason(row) == "internal_error"
    from dataclasses import replace

    assert failure_reason(replace(row, reject_code="codec_missing")) == "codec_missing"
    assert failure_reason(replace(row, error="Something odd")) == "other"
    assert failure_reason(replace(row, error=None)) == "other"


def test_cli_help_describes_the_reports():
    env = clean_env()
    text = cxr("worklist", "--help", env=env).stdout
    assert "html" in text and "--out" in text and "self-contained" in text
    text = cxr("report", "summary", "--help", env=env).stdout
    for word in ("--since", "--out", "summary.md", "daily_volume.png", "flag_rate.png", "score_histograms.png"):
        assert word in text, word


def test_the_worklist_html_module_needs_no_torch():
    import subprocess
    import sys

    code = ("import sys, cxr.reports.worklist_html, cxr.reports.summary, cxr.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_unwritable_output_is_a_clear_error(db, tmp_path):
    env = clean_env(**db.env)
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    proc = cxr("report", "summary", "--out", str(blocker), env=env, check=False)
    assert proc.returncode == 2 and "cannot write the report into" in proc.stderr and "Traceback" not in proc.stderr
    proc = cxr("worklist", "-f", "html", "--out", str(blocker / "w.html"), env=env, check=False)
    assert proc.returncode == 2 and "cannot write the worklist to" in proc.stderr and "Traceback" not in proc.stderr
    assert blocker.read_text() == "in the way"
