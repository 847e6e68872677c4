"""The worklist as one self-contained HTML file: ``cxr worklist --format html``.

Everything is inline (CSS, JavaScript, thumbnails as ``data:`` URIs) and a Content Security
Policy forbids loading anything else, so the file can be mailed, archived or opened offline.
Rows come in worklist order (flagged first, then by risk); the reader can re-sort by clicking
a column header and filter by text, status or flag. Studies that were rejected or failed are
in their own section with the reason.

Shown per study: file name, study id, heatmap overlay thumbnail, flag, predicted class, risk,
per-class probabilities as bars, status, reason, model version and time, and a marker badge
(``uid_conflict``, see ``cxr.identity``) with its sentence where a study has one. DICOM metadata
(pseudonymised patient key, age, sex, accession number) is left out on purpose.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, UnidentifiedImageError

from cxr import CLASS_NAMES_DEFAULT, DISCLAIMER
from cxr.reports.summary import reason_code

log = logging.getLogger(__name__)

THUMB_PX = 160
SCORED_STATUSES = ("done", "queued", "processing")
UNSCORED_STATUSES = ("rejected", "failed")
BANNER = "Screening aid, not for clinical use."


@dataclass(frozen=True)
class Thumb:
    uri: str
    kind: str  # "heatmap" | "placeholder"
    note: str  # alt text


def _data_uri(image: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(buf, format="JPEG", quality=80, optimize=True)
    else:
        image.save(buf, format="PNG", optimize=True)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


@lru_cache(maxsize=8)
def placeholder(text: str, px: int = THUMB_PX) -> str:
    """A grey square saying why there is no heatmap, as a PNG data URI."""
    image = Image.new("RGB", (px, px), (226, 229, 234))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, px - 1, px - 1), outline=(170, 176, 186))
    box = draw.textbbox((0, 0), text)
    draw.text(((px - (box[2] - box[0])) / 2, (px - (box[3] - box[1])) / 2), text, fill=(90, 96, 106))
    return _data_uri(image, "PNG")


def thumbnail(row: dict[str, Any], px: int = THUMB_PX) -> Thumb:
    """The study's heatmap overlay, downscaled to ``px`` on the long side, or a placeholder."""
    path = row.get("heatmap_path")
    if not path:
        why = "no heatmap" if row.get("status") == "done" else f"{row.get('status') or 'no'} - no heatmap"
        return Thumb(placeholder(why, px), "placeholder", why)
    try:
        with Image.open(Path(path)) as image:
            image.thumbnail((px, px), Image.Resampling.LANCZOS)
            return Thumb(_data_uri(image, "JPEG"), "heatmap", "Grad-CAM heatmap overlay (AI output)")
    except (OSError, UnidentifiedImageError) as e:
        # The row still shows; the file says the heatmap is missing instead of failing the report.
        log.warning("study %s: its heatmap cannot be read (%s); showing a placeholder", row.get("study_id"),
                    type(e).__name__)
        return Thumb(placeholder("heatmap missing", px), "placeholder", "heatmap file missing or unreadable")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    t = datetime.fromisoformat(value)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _time_cell(row: dict[str, Any]) -> str:
    t = _parse_time(row.get("finished_at")) or _parse_time(row.get("created_at"))
    if t is None:
        return '<td data-v="">-</td>'
    t = t.astimezone(timezone.utc)
    return f'<td data-v="{_e(t.isoformat())}"><time datetime="{_e(t.isoformat())}">{t:%Y-%m-%d %H:%M} UTC</time></td>'


def _prob_cell(p: float | None) -> str:
    if p is None:
        return '<td class="num" data-v="">-</td>'
    pct = max(0.0, min(100.0, 100.0 * float(p)))
    return (f'<td class="prob" data-v="{float(p):.6f}"><div class="bar" role="img" aria-label="{pct:.1f} percent">'
            f'<span style="width:{pct:.1f}%"></span></div><span class="pv">{float(p):.3f}</span></td>')


def _reason(row: dict[str, Any]) -> str:
    code, error = row.get("reject_code"), row.get("error")
    if code and error and error.startswith(f"{code}:"):
        return error
    return ": ".join(str(x) for x in (code, error) if x)


def _search_text(row: dict[str, Any], reason: str) -> str:
    parts = (row.get("filename"), row.get("study_id"), row.get("status"), row.get("predicted_class"),
             row.get("model_version"), reason, "flagged" if row.get("flagged") else "",
             "uncertain" if row.get("uncertain") else "", row.get("marker"))
    return " ".join(str(p) for p in parts if p).lower()


def _marker(row: dict[str, Any]) -> str:
    """A study's marker (e.g. uid_conflict) as a badge and its sentence; empty without one."""
    if not row.get("marker"):
        return ""
    return (f'<div class="marker"><span class="badge mark" title="{_e(row.get("marker_detail"))}">'
            f'{_e(row.get("marker"))}</span><div class="mark-detail">{_e(row.get("marker_detail"))}</div></div>')


def _study_cell(row: dict[str, Any]) -> str:
    sid = row.get("study_id") or ""
    return (f'<td class="study" data-v="{_e((row.get("filename") or "").lower())}">'
            f'<div class="fn">{_e(row.get("filename"))}</div><div class="sid" title="{_e(sid)}">{_e(sid[:8])}</div>'
            f'{_marker(row)}</td>')


def _thumb_cell(row: dict[str, Any], px: int) -> str:
    t = thumbnail(row, px)
    return (f'<td class="thumb"><img class="thumb-img {t.kind}" data-kind="{t.kind}" src="{t.uri}" '
            f'alt="{_e(t.note)}" title="{_e(t.note)}"></td>')


def _scored_row(rank: int, row: dict[str, Any], classes: Sequence[str], px: int) -> str:
    probs = row.get("probabilities") or {}
    flagged = bool(row.get("flagged"))
    risk = row.get("risk")
    reason = _reason(row)
    cells = [
        f'<td class="num" data-v="{rank}">{rank}</td>',
        _thumb_cell(row, px),
        _study_cell(row),
        f'<td data-v="{1 if flagged else 0}">' + ('<span class="badge flag">FLAGGED</span>' if flagged else
                                                  ('<span class="badge">no</span>' if row.get("flagged") is not None
                                                   else "-"))
        + ('<span class="badge uncertain" title="uncertainty {:.3f}: the model is unsure; refer for review">'
           'UNCERTAIN</span>'.format(float(row.get("uncertainty") or 0)) if row.get("uncertain") else "") + "</td>",
        f'<td data-v="{_e((row.get("predicted_class") or "").lower())}">{_e(row.get("predicted_class") or "-")}</td>',
        f'<td class="num" data-v="{"" if risk is None else f"{float(risk):.6f}"}">'
        f'{"-" if risk is None else f"{float(risk):.3f}"}</td>',
        *(_prob_cell(probs.get(c)) for c in classes),
        f'<td data-v="{_e(row.get("status"))}"><span class="status s-{_e(row.get("status"))}">{_e(row.get("status"))}</span>'
        + (f'<div class="reason">{_e(reason)}</div>' if reason else "") + "</td>",
        f'<td data-v="{_e((row.get("model_version") or "").lower())}">{_e(row.get("model_version") or "-")}</td>',
        _time_cell(row),
    ]
    return (f'<tr class="{"flagged" if flagged else ""}" data-rank="{rank}" data-status="{_e(row.get("status"))}" '
            f'data-flagged="{1 if flagged else 0}" data-text="{_e(_search_text(row, reason))}">{"".join(cells)}</tr>')


def _unscored_row(rank: int, row: dict[str, Any], px: int) -> str:
    reason = _reason(row)
    code = reason_code(row.get("reject_code"), row.get("error"))
    cells = [
        f'<td class="num" data-v="{rank}">{rank}</td>',
        _thumb_cell(row, px),
        _study_cell(row),
        f'<td data-v="{_e(row.get("status"))}"><span class="status s-{_e(row.get("status"))}">{_e(row.get("status"))}</span></td>',
        f'<td data-v="{_e(code.lower())}">{_e(code)}</td>',
        f'<td class="reason" data-v="{_e(reason.lower())}">{_e(reason or "-")}</td>',
        _time_cell(row),
    ]
    return (f'<tr data-rank="{rank}" data-status="{_e(row.get("status"))}" data-flagged="0" '
            f'data-text="{_e(_search_text(row, reason))}">{"".join(cells)}</tr>')


def _th(label: str, kind: str, first: str = "ascending", title: str = "") -> str:
    tip = f' title="{_e(title)}"' if title else ""
    return f'<th scope="col" data-type="{kind}" data-first="{first}"{tip}>{_e(label)}</th>'


def _section(title: str, table_id: str, head: list[str], rows: list[str]) -> str:
    if not rows:
        return (f'<section id="{table_id}-section"><h2>{_e(title)} <span class="count">(0)</span></h2>'
                f'<p class="empty">None.</p></section>')
    return (f'<section id="{table_id}-section"><h2>{_e(title)} <span class="count" data-total="{len(rows)}">'
            f'({len(rows)})</span></h2><div class="scroll"><table class="wl" id="{table_id}"><thead><tr>'
            f'{"".join(head)}</tr></thead><tbody>{"".join(rows)}</tbody></table></div></section>')


CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.35 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d2430;background:#f5f6f8}
.banner{position:sticky;top:0;z-index:2;background:#b3261e;color:#fff;padding:8px 16px;font-weight:600}
.banner small{font-weight:400;opacity:.9;margin-left:8px}
header,main,footer{padding:8px 16px}
h1{font-size:20px;margin:8px 0 4px}
h2{font-size:16px;margin:18px 0 6px}
.meta{color:#556;font-size:13px}
.tally span{display:inline-block;margin-right:14px}
.controls{display:flex;flex-wrap:wrap;gap:12px;align-items:center;margin:10px 0;padding:8px;background:#fff;border:1px solid #d8dce3;border-radius:6px}
.controls input[type=search]{width:22em;padding:4px 6px}
.scroll{overflow-x:auto}
table.wl{border-collapse:collapse;background:#fff;width:100%;border:1px solid #d8dce3}
table.wl th{background:#e9edf3;text-align:left;padding:6px;cursor:pointer;user-select:none;white-space:nowrap;position:relative}
table.wl th:hover{background:#dde3ec}
table.wl th[aria-sort=ascending]::after{content:" \\25B2";font-size:10px}
table.wl th[aria-sort=descending]::after{content:" \\25BC";font-size:10px}
table.wl td{padding:4px 6px;border-top:1px solid #e6e9ee;vertical-align:middle}
tr.flagged td:first-child{border-left:4px solid #b3261e}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td time{white-space:nowrap}
td.thumb img{display:block;width:auto;height:auto;max-width:120px;max-height:120px;border-radius:3px;background:#000}
.fn{font-weight:600;word-break:break-all}
.sid{font-family:ui-monospace,monospace;color:#667;font-size:12px}
.badge{display:inline-block;padding:1px 6px;border-radius:9px;background:#e3e6ea;font-size:12px}
.badge.flag{background:#b3261e;color:#fff;font-weight:700}
.badge.uncertain{background:#8a5a00;color:#fff;font-weight:700;margin-left:4px}
.badge.mark{background:#7a4b00;color:#fff;font-weight:700}
.mark-detail{font-size:12px;color:#7a4b00;max-width:30em}
.prob{min-width:110px}
.bar{height:10px;background:#e6e9ee;border-radius:5px;overflow:hidden}
.bar span{display:block;height:100%;background:#3b6fd8}
.pv{font-size:12px;font-variant-numeric:tabular-nums}
.status{font-size:12px;padding:1px 6px;border-radius:4px;background:#e3e6ea}
.s-done{background:#d8f0dc}.s-rejected{background:#fde2c8}.s-failed{background:#f8d0cd}.s-queued,.s-processing{background:#dde6f7}
.reason{font-size:12px;color:#7a2e12;max-width:36em}
.empty{color:#667}
footer{color:#556;font-size:12px;margin-bottom:20px}
"""

JS = """
(function () {
  "use strict";
  function key(row, i, type) {
    // A cell without a value of its own (a thumbnail) sorts by the row's worklist rank.
    var c = row.cells[i], v = c.hasAttribute("data-v") ? c.getAttribute("data-v") : row.getAttribute("data-rank");
    if (type === "num") { var n = parseFloat(v); return isNaN(n) ? -Infinity : n; }
    return v.toLowerCase();
  }
  function sortBy(table, th) {
    var current = th.getAttribute("aria-sort");
    var dir = current ? (current === "ascending" ? "descending" : "ascending") : th.getAttribute("data-first");
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) { c.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir);
    var i = th.cellIndex, type = th.getAttribute("data-type"), body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a, i, type), y = key(b, i, type);
      var r = x < y ? -1 : (x > y ? 1 : 0);
      if (dir === "descending") { r = -r; }
      return r || (+a.getAttribute("data-rank") - +b.getAttribute("data-rank"));
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.wl"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      th.tabIndex = 0;
      th.addEventListener("click", function () { sortBy(table, th); });
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(table, th); }
      });
    });
  });
  var q = document.getElementById("q"), st = document.getElementById("status-filter"),
      fl = document.getElementById("flagged-only"), shown = document.getElementById("shown");
  function apply() {
    var text = q.value.trim().toLowerCase(), s = st.value, f = fl.checked, n = 0;
    Array.prototype.forEach.call(document.querySelectorAll("table.wl tbody tr"), function (r) {
      var ok = (!text || r.getAttribute("data-text").indexOf(text) >= 0) &&
               (!s || r.getAttribute("data-status") === s) &&
               (!f || r.getAttribute("data-flagged") === "1");
      r.hidden = !ok;
      if (ok) { n += 1; }
    });
    shown.textContent = String(n);
  }
  q.addEventListener("input", apply);
  st.addEventListener("change", apply);
  fl.addEventListener("change", apply);
  apply();
})();
"""

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")


def render_worklist_html(
    rows: Sequence[dict[str, Any]],
    *,
    classes: Sequence[str] = CLASS_NAMES_DEFAULT,
    generated_at: datetime | None = None,
    limit: int | None = None,
    thumb_px: int = THUMB_PX,
) -> str:
    """The worklist page for ``rows`` (``repo.study_summary`` dicts, in worklist order).

    ``limit``: the row limit the rows were fetched with; the page says so when it was reached."""
    generated_at = (generated_at or datetime.now(timezone.utc)).astimezone(timezone.utc)
    classes = list(classes)
    for r in rows:  # a model with other class names still shows all its probabilities
        for c in (r.get("probabilities") or {}):
            if c not in classes:
                classes.append(c)
    scored = [r for r in rows if r.get("status") not in UNSCORED_STATUSES]
    unscored = [r for r in rows if r.get("status") in UNSCORED_STATUSES]

    scored_head = [_th("#", "num", title="Worklist order: flagged first, then by risk"), _th("Heatmap", "num"),
                   _th("Study", "text"), _th("Flag", "num", "descending"), _th("Prediction", "text"),
                   _th("Risk", "num", "descending", "1 - P(Normal)"),
                   *(_th(f"P({c})", "num", "descending") for c in classes),
                   _th("Status", "text"), _th("Model", "text"), _th("Time", "text", "descending")]
    unscored_head = [_th("#", "num"), _th("Image", "num"),
                     _th("Study", "text"), _th("Status", "text"), _th("Code", "text"), _th("Reason", "text"),
                     _th("Time", "text", "descending")]
    scored_rows = [_scored_row(i, r, classes, thumb_px) for i, r in enumerate(scored, 1)]
    unscored_rows = [_unscored_row(i, r, thumb_px) for i, r in enumerate(unscored, 1)]

    n_flagged = sum(1 for r in rows if r.get("flagged"))
    tally = {"studies": len(rows), "flagged": n_flagged,
             "scored": sum(1 for r in rows if r.get("status") == "done"),
             "pending": sum(1 for r in rows if r.get("status") in ("queued", "processing")),
             "rejected": sum(1 for r in rows if r.get("status") == "rejected"),
             "failed": sum(1 for r in rows if r.get("status") == "failed"),
             "marked": sum(1 for r in rows if r.get("marker"))}
    statuses = sorted({str(r.get("status")) for r in rows})
    limit_note = (f'<p class="meta"><strong>Only the first {limit} studies are shown</strong> (the row limit); '
                  f'raise <code>--limit</code> or use <code>--limit 0</code> for all.</p>'
                  if limit and len(rows) >= limit else "")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>cxr-screen worklist - {BANNER}</title>
<style>{CSS}</style>
</head>
<body>
<div class="banner" id="disclaimer" role="alert">{_e(BANNER)}<small>{_e(DISCLAIMER)}</small></div>
<header>
<h1>Chest X-ray screening worklist</h1>
<p class="meta">Generated {generated_at:%Y-%m-%d %H:%M:%S} UTC by cxr-screen. Flagged studies first, then by risk
(1 - P(Normal)). Heatmaps are Grad-CAM overlays: AI output, not findings.</p>
<p class="tally">{"".join(f'<span>{_e(k)}: <strong id="n-{_e(k)}">{v}</strong></span>' for k, v in tally.items())}</p>
{limit_note}
<div class="controls">
<label>Filter <input type="search" id="q" placeholder="file name, study id, class, reason, model"
 autocomplete="off"></label>
<label>Status <select id="status-filter"><option value="">all</option>{"".join(
        f'<option value="{_e(s)}">{_e(s)}</option>' for s in statuses)}</select></label>
<label><input type="checkbox" id="flagged-only"> flagged only</label>
<span>showing <strong id="shown">{len(rows)}</strong> of {len(rows)}</span>
<span class="meta">Click a column header to sort; click again to reverse.</span>
</div>
</header>
<main>
{_section("Worklist", "scored", scored_head, scored_rows)}
{_section("Rejected and failed (not scored)", "unscored", unscored_head, unscored_rows)}
</main>
<footer>{_e(DISCLAIMER)}</footer>
<script>{JS}</script>
</body>
</html>
"""
