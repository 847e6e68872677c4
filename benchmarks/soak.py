#!/usr/bin/env python3
"""Soak: N generated files through the watcher and a worker, a corrupt one every Kth.

Starts `cxr watch` and `cxr worker` (real processes) on the given database and broker
(default: the embedded SQLite + filesystem transport in a temporary CXR_HOME), drops all
N files into the inbox at once, and waits until every study is finished. Prints the
counts per status, studies/s (from the drop to the last finished study) and the peak RSS
(VmHWM, summed over each process and its children) of every process, and checks that no
process exited or was restarted on the way. Exit status 0 when every study finished.

    python benchmarks/soak.py [--n 1000] [--corrupt-every 50] [--database-url URL] [--broker-url URL]
                              [--checkpoint FILE] [--size 96] [--json]

A corrupt file is a PNG cut in half: the worker rejects it (reject_code `unreadable`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from cxr.db.models import Study  # noqa: E402
from cxr.db.session import session_scope  # noqa: E402

FINISHED = ("done", "failed", "rejected")


def write_inputs(folder: Path, *, n: int, corrupt_every: int, size: int) -> list[Path]:
    """n distinct PNGs; every corrupt_every-th one (1-based) truncated to half its bytes."""
    from tests.imagegen import write_png

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(1, n + 1):
        path = write_png(folder / f"film{i:05d}.png", size=size, seed=i)
        if corrupt_every and i % corrupt_every == 0:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        files.append(path)
    return files


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident memory) of a process plus that of all its descendants, in MB."""
    total_kb = 0
    for p in [pid, *_descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue  # exited meanwhile
    return total_kb / 1024


def _descendants(pid: int) -> list[int]:
    out = []
    for kid in _children(pid):
        out += [kid, *_descendants(kid)]
    return out


def counts(database_url: str) -> dict[str, int]:
    with session_scope(database_url) as s:
        return dict(s.execute(select(Study.status, func.count()).group_by(Study.status)).all())


def run_soak(workdir: Path, *, n: int, corrupt_every: int, size: int, env: dict[str, str],
             timeout: float) -> dict:
    """Run the soak in workdir with the given CXR_* environment; returns the figures."""
    database_url = env["CXR_DATABASE_URL"]
    inbox, logs = Path(env["CXR_INBOX"]), workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    files = write_inputs(workdir / "originals", n=n, corrupt_every=corrupt_every, size=size)
    subprocess.run([sys.executable, "-m", "cxr", "db", "upgrade"], env=env, cwd=ROOT, check=True,
                   capture_output=True)
    procs = {}
    for name, args in (("worker", ["worker"]), ("watcher", ["watch"])):
        procs[name] = subprocess.Popen([sys.executable, "-m", "cxr", *args], env=env, cwd=ROOT,
                                       stdout=(logs / f"{name}.log").open("w"), stderr=subprocess.STDOUT,
                                       start_new_session=True)
    pids = {name: p.pid for name, p in procs.items()}
    try:
        # Wait for the worker to be ready (it logs "ready" once the model is loaded).
        deadline = time.monotonic() + 120
        while "ready" not in (logs / "worker.log").read_text():
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs.values()):
                raise RuntimeError(f"the worker did not start:\n{(logs / 'worker.log').read_text()[-3000:]}")
            time.sleep(0.2)
        inbox.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        for f in files:  # same filesystem: each file appears whole
            os.replace(f, inbox / f.name)
        deadline = start + timeout
        while True:
            c = counts(database_url)
            if sum(c.get(s, 0) for s in FINISHED) >= n:
                break
            exited = {name: p.returncode for name, p in procs.items() if p.poll() is not None}
            if exited or time.monotonic() > deadline:
                raise RuntimeError(f"soak stopped: exited={exited}, counts={c}, "
                                   f"{time.monotonic() - start:.0f} s elapsed")
            time.sleep(0.25)
        elapsed = time.monotonic() - start
        rss = {name: round(peak_rss_mb(p.pid), 1) for name, p in procs.items()}
        alive = all(p.poll() is None for p in procs.values())
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    return {"n": n, "corrupt_every": corrupt_every, "image_size": size, "counts": c,
            "elapsed_s": round(elapsed, 2), "studies_per_s": round(n / elapsed, 2), "peak_rss_mb": rss,
            "pids": pids, "no_process_restarted": alive}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="files to drop")
    ap.add_argument("--corrupt-every", type=int, default=50, help="every Kth file is a truncated PNG (0: none)")
    ap.add_argument("--size", type=int, default=96, help="image side in pixels")
    ap.add_argument("--database-url", default="", help="default: SQLite in the work folder")
    ap.add_argument("--broker-url", default="", help="default: filesystem transport in the work folder")
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "cxr-default.safetensors")
    ap.add_argument("--max-batch", type=int, default=1, help="CXR_MAX_BATCH of the worker")
    ap.add_argument("--heatmaps", default="all", choices=("all", "flagged", "none"))
    ap.add_argument("--workdir", type=Path, help="default: a temporary folder")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cxr-soak-"))
    home = workdir / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(PYTHONUNBUFFERED="1", CXR_HOME=str(home), CXR_INBOX=str(workdir / "inbox"),
               CXR_DATABASE_URL=args.database_url or f"sqlite:///{home / 'cxr.db'}",
               CXR_CHECKPOINT=str(args.checkpoint.resolve()), CXR_WATCH_SETTLE_SECONDS="0.3",
               CXR_WATCH_STALLED_SECONDS="2",  # the truncated files wait this long before intake
               CXR_GATE_MIN_SIZE=str(min(args.size, 256)), CXR_MAX_BATCH=str(args.max_batch),
               CXR_HEATMAPS=args.heatmaps, CXR_QUEUE=f"cxr-soak-{uuid.uuid4().hex[:8]}")
    if args.broker_url:
        env["CXR_BROKER_URL"] = args.broker_url
    home.mkdir(parents=True, exist_ok=True)
    figures = run_soak(workdir, n=args.n, corrupt_every=args.corrupt_every, size=args.size, env=env,
                       timeout=args.timeout)
    figures.update(database=env["CXR_DATABASE_URL"].split(":")[0], broker=(args.broker_url or "filesystem://")
                   .split(":")[0], max_batch=args.max_batch, heatmaps=args.heatmaps, workdir=str(workdir))
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"{figures['n']} files ({figures['counts']}) in {figures['elapsed_s']} s: "
              f"{figures['studies_per_s']} studies/s; peak RSS MB {figures['peak_rss_mb']}; "
              f"no process restarted: {figures['no_process_restarted']}")
    return 0 if figures["no_process_restarted"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
