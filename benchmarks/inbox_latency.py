#!/usr/bin/env python3
"""Inbox-to-done latency on the embedded default, one file at a time.

Starts `cxr up` in a temporary CXR_HOME, waits until the worker has loaded the model,
then drops N files one by one into the inbox and measures, for each, the time from the
file landing to its study being `done` (with its heatmap written). Prints a table.

    python benchmarks/inbox_latency.py [--n 10] [--images DIR] [--checkpoint FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import select  # noqa: E402

from cxr.db.models import Result, Study  # noqa: E402
from cxr.db.session import session_scope  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10, help="files to send, one at a time")
    ap.add_argument("--images", type=Path, help="folder of PNG/JPEG/DICOM files (default: generated)")
    ap.add_argument("--checkpoint", type=Path, help="bundle (default: CXR_CHECKPOINT or the shipped model)")
    ap.add_argument("--settle", type=float, default=1.0, help="CXR_WATCH_SETTLE_SECONDS")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cxr-latency-"))
    home, inbox = tmp / "var", tmp / "inbox"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(CXR_HOME=str(home), CXR_INBOX=str(inbox), CXR_WATCH_SETTLE_SECONDS=str(args.settle))
    if args.checkpoint or os.environ.get("CXR_CHECKPOINT"):
        env["CXR_CHECKPOINT"] = str(args.checkpoint or os.environ["CXR_CHECKPOINT"])
    if args.images:
        files = sorted(p for p in args.images.rglob("*") if p.is_file())[: args.n]
    else:
        from tests.imagegen import write_png

        (tmp / "gen").mkdir()
        files = [write_png(tmp / "gen" / f"film{i}.png", size=1024, seed=i) for i in range(args.n)]
    log = (tmp / "up.log").open("w")
    up = subprocess.Popen([sys.executable, "-m", "cxr", "up", "--port", "0"], env=env, cwd=ROOT, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)
    db = f"sqlite:///{home / 'cxr.db'}"
    try:
        deadline = time.monotonic() + 180
        while "loaded model bundle" not in (tmp / "up.log").read_text():
            if up.poll() is not None or time.monotonic() > deadline:
                print((tmp / "up.log").read_text()[-3000:], file=sys.stderr)
                return 1
            time.sleep(0.2)
        rows = []
        for f in files:
            t0 = time.monotonic()
            shutil.copy(f, inbox / f.name)
            while True:
                with session_scope(db) as s:
                    row = s.execute(select(Study.status, Result.timings_ms).outerjoin(
                        Result, Result.study_id == Study.id).where(Study.filename == f.name)).first()
                if row and row.status in ("done", "failed", "rejected"):
                    break
                if time.monotonic() - t0 > 120:
                    raise TimeoutError(f"{f.name} not done after 120 s")
                time.sleep(0.02)
            rows.append((f.name, row.status, time.monotonic() - t0, row.timings_ms or {}))
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"| file | status | inbox -> done (s) | decode+preprocess ms | infer ms | Grad-CAM ms |")
    print("|---|---|---|---|---|---|")
    for name, status, dt, t in rows:
        print(f"| {name} | {status} | {dt:.2f} | {t.get('decode_preprocess', 0):.0f} | {t.get('infer', 0):.0f} "
              f"| {t.get('gradcam', 0):.0f} |")
    lat = [r[2] for r in rows]
    print(f"\nmedian {statistics.median(lat):.2f} s, min {min(lat):.2f} s, max {max(lat):.2f} s "
          f"(settle {args.settle} s included), n={len(lat)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
