"""The summary report: ``cxr report summary [--since] [--out DIR]``.

Per day (UTC, by when a study was received): studies by predicted class, flagged, rejected
(by reject code) and failed (by reason); throughput; the model versions whose results are in
use. Written as ``summary.md`` with PNG plots beside it: daily volume stacked by class, flag
rate over time, score histograms per class.

A study counts once, with its newest result (as in the worklist).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from statistics import median

from cxr import CLASS_NAMES_DEFAULT, DISCLAIMER
from cxr.db.repo import SummaryRow

PLOTS = {
    "daily_volume": "daily_volume.png",
    "flag_rate": "flag_rate.png",
    "score_histograms": "score_histograms.png",
}
_CODE = re.compile(r"^([a-z][a-z0-9_]{1,40}):")


def _utc(t: datetime | None) -> datetime | None:
    if t is None:
        return None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def reason_code(reject_code: str | None, error: str | None) -> str:
    """Why a study was not scored, as a short code: its reject code, or the error's leading ``code:``."""
    if reject_code:
        return reject_code
    m = _CODE.match(error or "")
    return m.group(1) if m else "other"


def failure_reason(row: SummaryRow) -> str:
    return reason_code(row.reject_code, row.error)


@dataclass
class Day:
    day: date
    received: int = 0
    by_class: Counter = field(default_factory=Counter)  # done studies by predicted class
    scored: int = 0
    flagged: int = 0
    rejected: Counter = field(default_factory=Counter)  # by reject code
    failed: Counter = field(default_factory=Counter)  # by reason
    pending: int = 0

    @property
    def flag_rate(self) -> float | None:
        return self.flagged / self.scored if self.scored else None


@dataclass
class ModelUse:
    version: str
    architecture: str
    scored: int = 0
    flagged: int = 0
    first: datetime | None = None
    last: datetime | None = None


@dataclass
class Throughput:
    finished: int  # done, rejected or failed, with a finish time
    span_hours: float | None  # first received .. last finished
    per_hour: float | None
    busiest_hour: datetime | None
    busiest_hour_count: int
    turnaround_median_s: float | None  # received -> finished, scored studies
    turnaround_p90_s: float | None


@dataclass
class Summary:
    generated_at: datetime
    since: datetime | None
    classes: list[str]
    days: list[Day]
    models: list[ModelUse]
    throughput: Throughput
    scores: dict[str, list[float]]  # class -> P(class) of every scored study
    scores_by_prediction: dict[str, dict[str, list[float]]]  # class -> predicted class -> P(class)

    @property
    def received(self) -> int:
        return sum(d.received for d in self.days)

    def total(self, attr: str) -> int:
        """Sum of a Day count (``scored``, ``flagged``, ``pending``) or Counter (``rejected``, ``failed``)."""
        total = 0
        for d in self.days:
            value = getattr(d, attr)
            total += sum(value.values()) if isinstance(value, Counter) else value
        return total


def _percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarise(rows: Sequence[SummaryRow], *, since: datetime | None = None,
              classes: Sequence[str] = CLASS_NAMES_DEFAULT, generated_at: datetime | None = None) -> Summary:
    classes = list(classes)
    for r in rows:
        for c in [r.predicted_class, *(r.probabilities or {})]:
            if c and c not in classes:
                classes.append(c)
    days: dict[date, Day] = {}
    models: dict[tuple[str, str], ModelUse] = {}
    scores: dict[str, list[float]] = {c: [] for c in classes}
    by_pred: dict[str, dict[str, list[float]]] = {c: defaultdict(list) for c in classes}
    finished_at: list[datetime] = []
    turnaround: list[float] = []
    first_received: datetime | None = None
    for r in rows:
        created, finished = _utc(r.created_at), _utc(r.finished_at)
        first_received = created if first_received is None else min(first_received, created)
        d = days.setdefault(created.date(), Day(created.date()))
        d.received += 1
        if r.status == "done" and r.predicted_class is not None:
            d.scored += 1
            d.by_class[r.predicted_class] += 1
            d.flagged += bool(r.flagged)
            for c, p in (r.probabilities or {}).items():
                scores[c].append(float(p))
                by_pred[c][r.predicted_class].append(float(p))
            mu = models.setdefault((r.model_version or "?", r.architecture or "?"),
                                   ModelUse(r.model_version or "?", r.architecture or "?"))
            mu.scored += 1
            mu.flagged += bool(r.flagged)
            at = _utc(r.result_at)
            if at is not None:
                mu.first = at if mu.first is None else min(mu.first, at)
                mu.last = at if mu.last is None else max(mu.last, at)
            if finished is not None:
                turnaround.append((finished - created).total_seconds())
        elif r.status == "rejected":
            d.rejected[r.reject_code or "unknown"] += 1
        elif r.status == "failed":
            d.failed[failure_reason(r)] += 1
        else:
            d.pending += 1
        if r.status in ("done", "rejected", "failed") and finished is not None:
            finished_at.append(finished)

    span = per_hour = None
    busiest, busiest_n = None, 0
    if finished_at and first_received is not None:
        span = max((max(finished_at) - first_received).total_seconds() / 3600, 1 / 3600)
        per_hour = len(finished_at) / span
        hours = Counter(t.replace(minute=0, second=0, microsecond=0) for t in finished_at)
        busiest, busiest_n = max(hours.items(), key=lambda kv: (kv[1], kv[0]))
    throughput = Throughput(
        finished=len(finished_at), span_hours=span, per_hour=per_hour, busiest_hour=busiest,
        busiest_hour_count=busiest_n,
        turnaround_median_s=median(turnaround) if turnaround else None,
        turnaround_p90_s=_percentile(turnaround, 0.9) if turnaround else None)
    return Summary(
        generated_at=(generated_at or datetime.now(timezone.utc)).astimezone(timezone.utc),
        since=_utc(since), classes=classes, days=[days[k] for k in sorted(days)],
        models=sorted(models.values(), key=lambda m: (m.first or datetime.min.replace(tzinfo=timezone.utc),
                                                      m.version)),
        throughput=throughput, scores=scores, scores_by_prediction={c: dict(v) for c, v in by_pred.items()})


def _rate(num: int, den: int) -> str:
    return f"{100 * num / den:.1f}%" if den else "-"


def _t(t: datetime | None) -> str:
    return f"{t:%Y-%m-%d %H:%M:%S} UTC" if t else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else (f"{seconds / 60:.1f} min" if seconds < 7200
                                                     else f"{seconds / 3600:.1f} h")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def render_markdown(s: Summary, *, plots: Sequence[str] = ()) -> str:
    scored, flagged = s.total("scored"), s.total("flagged")
    rejected, failed, pending = s.total("rejected"), s.total("failed"), s.total("pending")
    lines = [
        "# cxr-screen summary report",
        "",
        f"> **{DISCLAIMER}**",
        "",
        f"Generated {_t(s.generated_at)}. Studies received "
        + (f"since {_t(s.since)}" if s.since else "over the whole database")
        + (f": {s.days[0].day} to {s.days[-1].day} (UTC days)." if s.days else ": none."),
        "Each study counts once, on the day it was received, with its newest result.",
        "",
        "## Totals",
        "",
        *_table(["received", "scored", "flagged", "flag rate", "rejected", "failed", "pending"],
                [[s.received, scored, flagged, _rate(flagged, scored), rejected, failed, pending]]),
        "",
        "## Per day",
        "",
        *_table(["day", "received", *s.classes, "flagged", "flag rate", "rejected", "failed", "pending"],
                [[d.day.isoformat(), d.received, *(d.by_class.get(c, 0) for c in s.classes), d.flagged,
                  _rate(d.flagged, d.scored), sum(d.rejected.values()), sum(d.failed.values()), d.pending]
                 for d in s.days]),
        "",
        "## Rejections by code",
        "",
    ]
    rej = [[d.day.isoformat(), code, n] for d in s.days for code, n in sorted(d.rejected.items())]
    lines += _table(["day", "reject code", "studies"], rej) if rej else ["None."]
    lines += ["", "## Failures by reason", ""]
    fail = [[d.day.isoformat(), code, n] for d in s.days for code, n in sorted(d.failed.items())]
    lines += _table(["day", "reason", "studies"], fail) if fail else ["None."]
    tp = s.throughput
    lines += [
        "",
        "## Throughput",
        "",
        *_table(["finished", "span (first received to last finished)", "studies per hour", "busiest hour",
                 "studies in busiest hour", "turnaround median", "turnaround p90"],
                [[tp.finished, "-" if tp.span_hours is None else f"{tp.span_hours:.2f} h",
                  "-" if tp.per_hour is None else f"{tp.per_hour:.1f}",
                  f"{tp.busiest_hour:%Y-%m-%d %H:00} UTC" if tp.busiest_hour else "-", tp.busiest_hour_count,
                  _duration(tp.turnaround_median_s), _duration(tp.turnaround_p90_s)]]),
        "",
        "Turnaround: from a study's intake to its result (scored studies).",
        "",
        "## Model versions in use",
        "",
    ]
    lines += _table(["version", "architecture", "scored", "flagged", "first result", "last result"],
                    [[m.version, m.architecture, m.scored, m.flagged, _t(m.first), _t(m.last)]
                     for m in s.models]) if s.models else ["None: no study was scored."]
    titles = {"daily_volume": "Daily volume by class", "flag_rate": "Flag rate over time",
              "score_histograms": "Score histograms per class"}
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{titles[p]}]({PLOTS[p]})" for p in plots]
    lines += ["", f"_{DISCLAIMER}_", ""]
    return "\n".join(lines)


COLOURS = {"Normal": "#4c9a5b", "Pneumonia": "#d9822b", "Tuberculosis": "#b3261e"}


def _stamp(fig) -> None:
    fig.suptitle("cxr-screen - screening aid, not for clinical use", fontsize=7, color="#b3261e", x=0.99,
                 ha="right")


def _figure(size: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def plot_daily_volume(s: Summary, path: Path) -> Path:
    fig = _figure((max(5.5, 0.5 * len(s.days) + 3), 4))
    ax = fig.subplots()
    x = list(range(len(s.days)))
    bottom = [0] * len(s.days)
    series = [(c, [d.by_class.get(c, 0) for d in s.days], COLOURS.get(c)) for c in s.classes]
    series += [("rejected", [sum(d.rejected.values()) for d in s.days], "#9aa3ad"),
               ("failed", [sum(d.failed.values()) for d in s.days], "#4a4f57"),
               ("pending", [d.pending for d in s.days], "#c9d3e6")]
    for label, values, colour in series:
        if any(values):
            ax.bar(x, values, bottom=bottom, label=label, color=colour)
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(x, [d.day.isoformat() for d in s.days], rotation=45, ha="right")
    ax.set_ylabel("studies")
    ax.set_title("Studies received per day, by predicted class")
    if any(bottom):
        ax.legend(fontsize=8)
    _stamp(fig)
    fig.savefig(path, dpi=110)
    return path


def plot_flag_rate(s: Summary, path: Path) -> Path:
    fig = _figure((max(5.5, 0.5 * len(s.days) + 3), 3.6))
    ax = fig.subplots()
    pts = [(i, 100 * d.flag_rate) for i, d in enumerate(s.days) if d.flag_rate is not None]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="#b3261e")
    ax.set_xticks(range(len(s.days)), [d.day.isoformat() for d in s.days], rotation=45, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("flagged, % of scored")
    ax.set_title("Flag rate per day")
    ax.grid(alpha=0.3)
    _stamp(fig)
    fig.savefig(path, dpi=110)
    return path


def plot_score_histograms(s: Summary, path: Path) -> Path:
    n = len(s.classes)
    fig = _figure((3.2 * n, 3.2))
    axes = fig.subplots(1, n, squeeze=False)[0]
    bins = [i / 20 for i in range(21)]
    for ax, c in zip(axes, s.classes):
        groups = s.scores_by_prediction.get(c, {})
        labels = sorted(groups)
        if labels:
            ax.hist([groups[k] for k in labels], bins=bins, stacked=True, label=[f"predicted {k}" for k in labels],
                    color=[COLOURS.get(k, f"C{i}") for i, k in enumerate(labels)])
            ax.legend(fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_title(f"P({c})  n={len(s.scores.get(c, []))}", fontsize=10)
        ax.set_xlabel("probability")
    axes[0].set_ylabel("studies")
    _stamp(fig)
    fig.savefig(path, dpi=110)
    return path


def write_report(s: Summary, out_dir: Path) -> list[Path]:
    """Write summary.md and the plots into ``out_dir``; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    plots: list[str] = []
    if s.days:
        for name, fn in (("daily_volume", plot_daily_volume), ("flag_rate", plot_flag_rate),
                         ("score_histograms", plot_score_histograms)):
            written.append(fn(s, out_dir / PLOTS[name]))
            plots.append(name)
    md = out_dir / "summary.md"
    md.write_text(render_markdown(s, plots=plots), encoding="utf-8")
    return [md, *written]

