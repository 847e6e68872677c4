"""Rendering lists of result dicts as a table, CSV or JSON for the command line."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

CLASS_COLUMNS = ("Normal", "Pneumonia", "Tuberculosis")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def header_for(columns: Sequence[str]) -> list[str]:
    """Column names, with "probabilities" expanded to one p_<class> column per class."""
    out: list[str] = []
    for c in columns:
        out += [f"p_{k}" for k in CLASS_COLUMNS] if c == "probabilities" else [c]
    return out


def flatten(row: dict[str, Any], header: Sequence[str]) -> dict[str, Any]:
    probs = row.get("probabilities") or {}
    return {h: probs.get(h[2:]) if h.startswith("p_") else row.get(h) for h in header}


def render(rows: list[dict[str, Any]], *, fmt: str, columns: Sequence[str]) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2, default=str)
    header = header_for(columns)
    flat = [flatten(r, header) for r in rows]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore")
        w.writeheader()
        for r in flat:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
        return buf.getvalue().rstrip("\n")
    table = [[_fmt(r[h]) for h in header] for r in flat]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    return "\n".join(lines)


def render_sections(
    rows: list[dict[str, Any]], *, sections: Sequence[tuple[str, Sequence[str], Sequence[str]]]
) -> str:
    """Tables, one per (title, statuses, columns) section, in order. Empty sections say so."""
    out: list[str] = []
    for title, statuses, columns in sections:
        part = [r for r in rows if r.get("status") in statuses]
        out.append(f"{title} ({len(part)})")
        out.append(render(part, fmt="table", columns=columns) if part else "  (none)")
        out.append("")
    return "\n".join(out).rstrip("\n")
